"""What a command shows a person: hclog-shaped log lines, `==>` output, and the event loop.

Consul's commands print `==> ...` lines for what happens (stderr for errors) and log in
hclog's shape (`<time> [INFO]  proxy: ...`, or JSON with `-log-json`); scripts that read
them must read ours the same way. uvloop is installed here, and only here, by the commands.

Rule 1: output never stops a command: a stream whose reader is gone (`| head`) is ignored.
Rule 2: library code logs through `logging`; only commands call these functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import sys

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

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
        level = _HCLOG_LEVELS.get(record.levelname, record.levelname)
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if self.json_lines:
            return json.dumps(
                {
                    "@level": level.lower(),
                    "@message": message,
                    "@module": record.name,
                    "@timestamp": stamp,
                }
            )
        return f"{stamp} [{level}] {' ' * (5 - len(level))}{record.name}: {message}"


class _QuietStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that drops lines when its stream is gone (a closed pipe)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ValueError):
            return
        super().handleError(record)


def setup_logging(level: str, json_format: bool = False, stream: object = None) -> None:
    handler = _QuietStreamHandler(stream or sys.stdout)
    handler.setFormatter(_HCLogFormatter(json_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LOG_LEVELS.get(level.upper(), logging.INFO))
    # Request lines of the HTTP client stay out of the log (they are noise, and a URL is
    # the one place a token could hide).
    for name in ("httpx", "httpcore", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _print(text: str, stream: object) -> None:
    # The output may be a pipe whose reader has gone (`| head`); that must never stop the
    # proxy, and above all not its signal handling.
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)  # type: ignore[call-overload]


def info(line: str) -> None:
    _print(f"    {line}", sys.stdout)


def output(line: str) -> None:
    _print(f"==> {line}", sys.stdout)


def error(line: str) -> None:
    _print(f"==> {line}", sys.stderr)
