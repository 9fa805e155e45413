"""The commands' console log: `log_fields`, the access log's direct path, against `logging`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator

import pytest

from proxy import console

FIELDS = {
    "direction": "inbound",
    "src": "127.0.0.1:5000",
    "peer": "spiffe://a.consul/ns/default/dc/dc1/svc/web",
    "detail": 'said "no" = twice',
    "empty": "",
    "absent": None,
    "bytes_to_dst": 11,
    "duration_ms": 1.25,
}

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.flushed = ""
        self.on_flush: Callable[[], None] | None = None

    def flush(self) -> None:
        self.flushes += 1
        self.flushed = self.getvalue()
        if self.on_flush is not None:
            self.on_flush()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def through_logging(json_lines: bool, logger: str, level: int, message: str) -> str:
    """The line `logging` writes for the same record, with the same handler setup."""
    stream = io.StringIO()
    console.setup_logging("DEBUG", json_lines, stream)
    logging.getLogger(logger).log(level, message, extra={"fields": FIELDS})
    return stream.getvalue()


@pytest.mark.parametrize("json_lines", [False, True], ids=["human", "json"])
@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, logging.DEBUG])
def test_direct_line_is_the_line_logging_writes(
    restore_logging: None, json_lines: bool, level: int
) -> None:
    expected = through_logging(json_lines, "proxy.inbound", level, "connection 50% denied")
    stream = CountingStream()
    console.setup_logging("DEBUG", json_lines, stream)
    assert console._console_alone(logging.getLogger("proxy.inbound"), level) is not None
    console.log_fields(logging.getLogger("proxy.inbound"), level, "connection 50% denied", FIELDS)
    got = stream.getvalue()
    assert stream.flushes == 1  # no event loop: flushed at once
    # Equal but for the stamp (the two lines were made at two times).
    if json_lines:
        a, b = json.loads(got), json.loads(expected)
        assert STAMP.fullmatch(a.pop("@timestamp")) and STAMP.fullmatch(b.pop("@timestamp"))
        assert a == b and "absent" in a and a["empty"] == ""
    else:
        assert STAMP.fullmatch(got[:24]) and STAMP.fullmatch(expected[:24])
        assert got[24:] == expected[24:]
        assert got.endswith('detail="said \\"no\\" = twice" bytes_to_dst=11 duration_ms=1.25\n')
        assert "empty=" not in got and "absent=" not in got


def test_another_handler_gets_the_record(restore_logging: None) -> None:
    stream = CountingStream()
    console.setup_logging("INFO", False, stream)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("proxy.inbound")
    for where in (logging.getLogger(), logger):  # on the root (as caplog), then on the way
        keep = Keep()
        where.addHandler(keep)
        try:
            assert console._console_alone(logger, logging.INFO) is None
            console.log_fields(logger, logging.INFO, "connection forwarded", FIELDS)
        finally:
            where.removeHandler(keep)
        record = seen.pop()
        assert record.getMessage() == "connection forwarded"
        assert record.fields == FIELDS  # type: ignore[attr-defined]
        assert record.levelno == logging.INFO and record.name == "proxy.inbound"
    # Both records reached the console too, through logging, as lines of their own.
    assert stream.getvalue().count("connection forwarded: direction=inbound") == 2
    logger.addFilter(lambda record: False)
    try:
        assert console._console_alone(logger, logging.INFO) is None
    finally:
        logger.filters.clear()
    logging.disable(logging.INFO)
    try:
        assert console._console_alone(logger, logging.INFO) is None
    finally:
        logging.disable(logging.NOTSET)
    assert console._console_alone(logger, logging.INFO) is not None


async def _flushed(stream: CountingStream, flushes: int) -> None:
    """Wait until `stream` has been flushed `flushes` times."""
    async with asyncio.timeout(5):
        while stream.flushes < flushes:
            flushed = asyncio.Event()
            stream.on_flush = flushed.set
            await flushed.wait()
    stream.on_flush = None


async def test_lines_wait_for_one_flush_in_order(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Longer than the shipped 0.1 s: 100 turns of the loop must fit in it on a loaded machine.
    monkeypatch.setattr(console, "FLUSH_AFTER", 0.5)
    stream = CountingStream()
    console.setup_logging("INFO", False, stream)
    logger = logging.getLogger("proxy.inbound")
    loop = asyncio.get_running_loop()
    first = loop.time()
    # Lines of many turns of the loop share one flush: one write for all of them.
    for i in range(100):
        console.log_fields(logger, logging.INFO, f"connection {i}", {})
        await asyncio.sleep(0)
    assert stream.flushes == 0 and stream.flushed == ""
    await _flushed(stream, 1)
    assert loop.time() - first >= console.FLUSH_AFTER * 0.9  # uvloop's clock is in ms
    assert stream.flushes == 1
    assert [line.split(": ", 1)[1] for line in stream.flushed.splitlines()] == [
        f"connection {i}" for i in range(100)
    ]
    # The next line sets a flush of its own.
    console.log_fields(logger, logging.INFO, "connection later", {})
    await _flushed(stream, 2)
    assert stream.flushed.endswith("proxy.inbound: connection later\n")
    # A record through logging flushes what waits before it, and keeps the order.
    console.log_fields(logger, logging.INFO, "connection before", {})
    logging.getLogger("proxy").warning("a warning")
    lines = stream.flushed.splitlines()
    assert lines[-2].endswith("proxy.inbound: connection before")
    assert lines[-1].endswith("[WARN]  proxy: a warning")


def test_a_flush_lost_with_its_loop_is_set_again(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop closed before its flush ran does not keep the lines of the next one waiting."""
    monkeypatch.setattr(console, "FLUSH_AFTER", 0.5)  # the first loop surely closes before
    stream = CountingStream()
    console.setup_logging("INFO", False, stream)
    logger = logging.getLogger("proxy.inbound")

    async def one_line(text: str) -> None:
        console.log_fields(logger, logging.INFO, text, {})

    asyncio.run(one_line("connection 1"))  # ends, and closes its loop, before the flush
    assert stream.flushes == 0

    async def next_loop() -> None:
        await one_line("connection 2")
        await _flushed(stream, 1)

    asyncio.run(next_loop())
    assert [line.split(": ", 1)[1] for line in stream.flushed.splitlines()] == [
        "connection 1",
        "connection 2",
    ]


async def test_waiting_lines_are_bounded(restore_logging: None) -> None:
    stream = CountingStream()
    console.setup_logging("INFO", False, stream)
    logger = logging.getLogger("proxy.inbound")
    for i in range(console.MAX_WAITING - 1):
        console.log_fields(logger, logging.INFO, f"connection {i}", {})
    assert stream.getvalue() == ""
    # The last one the bound allows: all are written now, with no turn of the loop.
    console.log_fields(logger, logging.INFO, "connection last", {})
    assert stream.flushes == 1
    lines = stream.flushed.splitlines()
    assert len(lines) == console.MAX_WAITING and lines[-1].endswith("connection last")


async def test_waiting_lines_go_before_other_output(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    console.setup_logging("INFO", False)  # the process's stdout, as the commands do
    logger = logging.getLogger("proxy.inbound")
    console.log_fields(logger, logging.INFO, "connection first", {})
    console.output("Caught signal: SIGTERM, draining connections")
    console.log_fields(logger, logging.INFO, "connection second", {})
    for handler in logging.getLogger().handlers:
        handler.flush()  # as logging.shutdown() does at exit
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[-1] if "proxy." in line else line for line in out] == [
        "connection first",
        "==> Caught signal: SIGTERM, draining connections",
        "connection second",
    ]


def test_a_closed_stream_is_ignored(restore_logging: None) -> None:
    stream = io.StringIO()
    console.setup_logging("INFO", False, stream)
    stream.close()
    console.log_fields(logging.getLogger("proxy.inbound"), logging.INFO, "connection x", {})
