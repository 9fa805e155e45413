"""What a command shows a person: hclog-shaped log lines, `==>` output, and the event loop.

Consul's commands print `==> ...` lines for what happens (stderr for errors) and log in
hclog's shape (`<time> [INFO]  proxy: ...`, or JSON with `-log-json`); scripts that read
them must read ours the same way. uvloop is installed here, and only here, by the commands.

Rule 1: output never stops a command: a stream whose reader is gone (`| head`) is ignored.
Rule 2: library code logs through `logging`; only commands call these functions. Structured
fields ride on a record as `extra={"fields": {...}}`: key=value pairs in human lines, keys of
the object in JSON lines. The one exception is `log_fields`, for a line per connection: it
writes the same line straight to the console when nothing else would see the record, and
through `logging` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import resource
import sys
import time
from collections.abc import Mapping

_LOG_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERR": logging.ERROR,
    "ERROR": logging.ERROR,
}

_HCLOG_LEVELS = {
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARNING": "WARN",
    "ERROR": "ERROR",
    "CRITICAL": "ERROR",
}


class _HCLogFormatter(logging.Formatter):
    """Lines shaped like Consul's (hclog): `<time> [INFO]  proxy.inbound: message`."""

    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines
        self._second = -1
        self._second_text = ""

    def _stamp(self, created: float) -> str:
        # The access log writes a line per connection: the date part is formatted once per
        # second, not per line (strftime is a third of a line's cost).
        second = int(created)
        if second != self._second:
            when = dt.datetime.fromtimestamp(second, dt.UTC)
            self._second, self._second_text = second, when.strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._second_text}{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        fields = getattr(record, "fields", None)
        return self.line(record.created, record.levelname, record.name, message, fields)

    def line(
        self,
        created: float,
        levelname: str,
        name: str,
        message: str,
        fields: Mapping[str, object] | None,
    ) -> str:
        """The line of a record with these parts (`log_fields` writes it without one)."""
        stamp = self._stamp(created)
        level = _HCLOG_LEVELS.get(levelname, levelname)
        if self.json_lines:
            line: dict[str, object] = {
                "@level": level.lower(),
                "@message": message,
                "@module": name,
                "@timestamp": stamp,
            }
            if fields:
                line.update({k: v for k, v in fields.items() if not k.startswith("@")})
            return json.dumps(line)
        if fields:
            message += ": " + _pairs(fields)
        return f"{stamp} [{level}] {' ' * (5 - len(level))}{name}: {message}"


_NEEDS_QUOTES = re.compile(r'[\s"=\\]')
_TEXTS_MAX = 256
# String values as written, by value: most repeat on every line of a listener (its name, the
# peer's URI, the app's address, the decision's reason), and a quoted one costs a
# `json.dumps`. Emptied when full (client ports make a new `src` on every line).
_texts: dict[str, str] = {}


def _text(value: str) -> str:
    """A string value as hclog writes it: as it is, or quoted when it has spaces or quotes."""
    text = json.dumps(value) if _NEEDS_QUOTES.search(value) else value
    if len(_texts) >= _TEXTS_MAX:
        _texts.clear()
    _texts[value] = text
    return text


def _pairs(fields: Mapping[str, object]) -> str:
    """`key=value` pairs as hclog writes them (quoted when a value has spaces or quotes);
    empty and absent values are left out."""
    parts = []
    for key, value in fields.items():
        if type(value) is str:
            if not value:
                continue
            text = _texts.get(value)
            if text is None:
                text = _text(value)
        elif value is None:
            continue
        else:
            # Numbers mostly: asking them `== ""` first, as before, was a slow mixed compare.
            text = str(value)
            if not text:
                continue  # an empty str subclass, left out as an empty str is
        parts.append(f"{key}={text}")
    return " ".join(parts)


# How long lines of `log_fields` may wait before they are formatted and written, all at once.
# Written as they came, with a flush per turn of the event loop, they cost about one write
# to a pipe per connection, each waking the reader; formatted one by one amid a
# connection's other work they cost an inbound proxy about 28 µs each, 5 % of its CPU, for
# some 90,000 instructions; in a batch the same instructions cost about 10 µs less per line
# (bench/README.md, "The access log's cost").
FLUSH_AFTER = 0.1
# ... or once this many wait, whichever comes first (a bound on memory and on the delay
# under a flood of connections).
MAX_WAITING = 512

# A line of `log_fields` not yet formatted: created, level name, logger name, message, fields.
_Line = tuple[float, str, str, str, Mapping[str, object]]


class _QuietStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that drops lines when its stream is gone (a closed pipe).

    Lines from `log_fields` wait, unformatted, until `FLUSH_AFTER` seconds after the first of
    them, or until `MAX_WAITING` of them wait; then they are formatted and written together.
    Anything else written to the stream first writes the lines waiting before it, so the
    order stays: a record through `emit`, `flush()` (`logging.shutdown` at exit calls it),
    and the commands' `==>` output.
    """

    def __init__(self, stream: object, formatter: _HCLogFormatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.line_formatter = formatter
        self._waiting: list[_Line] = []
        # The loop whose timer will write the waiting lines; None when none will.
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ValueError):
            return
        super().handleError(record)

    def defer(self, line: _Line) -> None:
        """Keep `line` for the next write of the waiting lines (and make sure there is one)."""
        with self.lock:  # type: ignore[union-attr]
            self._waiting.append(line)
            full = len(self._waiting) >= MAX_WAITING
        pending = self._flush_loop
        # A timer is set already, unless its loop was closed since (which dropped it).
        if not full and pending is not None and not pending.is_closed():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if full or loop is None:
            self._flush_now()
            return
        self._flush_loop = loop
        loop.call_later(FLUSH_AFTER, self._flush_now)

    def _write_waiting(self) -> None:
        """Format and write the waiting lines (the caller holds the lock)."""
        waiting, self._waiting = self._waiting, []
        if waiting:
            line, end = self.line_formatter.line, self.terminator
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("".join([line(*parts) + end for parts in waiting]))

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_waiting()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_waiting()
        super().flush()

    def _flush_now(self) -> None:
        self._flush_loop = None
        with contextlib.suppress(OSError, ValueError):
            self.flush()


def _write_waiting_lines() -> None:
    """Write the console's waiting access-log lines (before other output to the terminal)."""
    for handler in logging.getLogger().handlers:
        if type(handler) is _QuietStreamHandler:
            with contextlib.suppress(OSError, ValueError):
                handler.flush()


def setup_logging(level: str, json_format: bool = False, stream: object = None) -> None:
    handler = _QuietStreamHandler(stream or sys.stdout, _HCLogFormatter(json_format))
    # Records need neither the caller's frame (a stack walk per line) nor thread and process
    # names: the logging HOWTO's "Optimization" settings, for a log line per connection.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LOG_LEVELS.get(level.upper(), logging.INFO))
    # Request lines of the HTTP client stay out of the log (they are noise, and a URL is
    # the one place a token could hide).
    for name in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _console_alone(logger: logging.Logger, level: int) -> _QuietStreamHandler | None:
    """The console handler, if a record of `logger` at `level` would reach it and nothing
    else: no other handler or filter on the way, nothing that disables it."""
    root = logging.root
    if len(root.handlers) != 1 or root.manager.disable >= level:
        return None
    handler = root.handlers[0]
    if type(handler) is not _QuietStreamHandler or handler.filters or level < handler.level:
        return None
    node: logging.Logger | None = logger
    while node is not None and node is not root:
        if node.handlers or node.filters or node.disabled or not node.propagate:
            return None
        node = node.parent
    return None if root.filters or root.disabled else handler


def log_fields(
    logger: logging.Logger, level: int, message: str, fields: Mapping[str, object]
) -> None:
    """`logger.log(level, message, extra={"fields": fields})` for a line per connection.

    With the commands' console handler alone on the way (the usual case), the line it would
    write is handed to it without a `LogRecord` and the handler chain (a third of what the
    same line costs through `logging`, bench/README.md, "Per-connection work, third pass"),
    to be formatted and written with the others of the next `FLUSH_AFTER` seconds. The
    caller must not change `fields` afterwards. Otherwise (another handler, a filter,
    pytest's caplog) it goes through `logging` as any record. The caller has checked
    `logger.isEnabledFor(level)`.
    """
    handler = _console_alone(logger, level)
    if handler is None:
        # No arguments: the message is the text (a `%` in it stays as it is).
        logger.log(level, message, extra={"fields": fields})
        return
    handler.defer((time.time(), logging.getLevelName(level), logger.name, message, fields))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Go's runtime does for Consul's
    proxy at start: the listeners' default connection caps are derived from it, and a
    sidecar should not refuse connections at a soft 1,024 its hard limit does not need."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass  # a container may forbid it; the soft limit then stays, and the caps with it


def _print(text: str, stream: object) -> None:
    # The output may be a pipe whose reader has gone (`| head`); that must never stop the
    # proxy, and above all not its signal handling.
    _write_waiting_lines()
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)  # type: ignore[call-overload]


def info(line: str) -> None:
    _print(f"    {line}", sys.stdout)


def output(line: str) -> None:
    _print(f"==> {line}", sys.stdout)


def error(line: str) -> None:
    _print(f"==> {line}", sys.stderr)


def dump(text: str) -> None:
    """A block of text to stderr as it is (the metrics on SIGUSR1)."""
    _print(text.rstrip("\n"), sys.stderr)


def say(text: str, *, error: bool = False) -> None:
    """One message as it is, then a newline (mitchellh/cli's `Info`/`Output`, or `Error` to
    stderr). Bytes that are not UTF-8, decoded with `surrogateescape`, go out unchanged."""
    stream = sys.stderr if error else sys.stdout
    with contextlib.suppress(OSError, ValueError):
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is None:
            stream.write(text + "\n")
        else:
            buffer.write((text + "\n").encode("utf-8", "surrogateescape"))
            buffer.flush()
