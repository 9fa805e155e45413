"""proxy.watch: cursor and backoff arithmetic, and the one loop driven by a scripted fetch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from proxy.errors import AgentResponseError, AgentUnavailable
from proxy.watch import (
    BACKOFF_BASE,
    BACKOFF_JITTER,
    BACKOFF_MAX,
    CONTENT_HASH,
    INDEX,
    backoff,
    changes,
    next_hash,
    next_index,
    watch,
)

log = logging.getLogger("test.watch")

# uvloop schedules timers from a clock cached per loop iteration, in whole milliseconds, so a
# sleep can end a little before the wall-clock delay has passed.
CLOCK_SLACK = 0.005


@pytest.mark.parametrize(
    ("previous", "returned", "expected"),
    [
        (0, 5, 5),  # first answer: block on what it returned
        (5, 7, 7),  # moved forward
        (7, 7, 7),  # unchanged (a blocking timeout): block again on the same index
        (10, 3, 0),  # went backwards: reset, so the next call does not block forever
        (1, 0, 1),  # the agent never sends 0; treat it as 1 rather than busy-loop
        (0, 0, 1),
        (5, -1, 1),
    ],
)
def test_next_index(previous: int, returned: int, expected: int) -> None:
    assert next_index(previous, returned) == expected


@pytest.mark.parametrize(
    ("previous", "returned", "expected"),
    [
        ("", "a1", "a1"),  # first answer: block on its hash
        ("a1", "a1", "a1"),  # unchanged (a blocking timeout): block on it again
        ("a1", "b2", "b2"),  # changed: a hash has no order, so no reset
        ("a1", "", ""),  # no hash header: the next read does not block (as Consul's client)
    ],
)
def test_next_hash(previous: str, returned: str, expected: str) -> None:
    assert next_hash(previous, returned) == expected


def test_cursors_start_non_blocking() -> None:
    assert (INDEX.start, CONTENT_HASH.start) == (0, "")


@pytest.mark.parametrize(
    ("failures", "base", "expected"),
    [
        (0, 0.5, 0.0),
        (-1, 0.5, 0.0),
        (1, 0.5, 0.5),
        (2, 0.5, 1.0),
        (3, 0.5, 1.25),  # 2.0, held at 1.5 / 1.2 so that +20 % stays within 1.5
        (4, 0.5, 1.25),
        (10_000, 0.5, 1.25),  # a long outage: no overflow, still the hold
        (1, 0.05, 0.05),  # the tests' base
        (5, 0.05, 0.8),
        (6, 0.05, 1.25),
        (1, 5.0, 5.0),  # a base above the hold is a fixed delay
        (3, 5.0, 5.0),
        (3, 0.0, 0.0),
    ],
)
def test_backoff_doubles_to_a_hold_under_the_cap(
    failures: int, base: float, expected: float
) -> None:
    assert backoff(failures, base) == pytest.approx(expected)


def test_backoff_defaults_first_retry_half_a_second_never_over_one_and_a_half() -> None:
    assert (BACKOFF_BASE, BACKOFF_MAX, BACKOFF_JITTER) == (0.5, 1.5, 0.2)
    assert backoff(1) == pytest.approx(0.5)
    assert backoff(50, draw=1.0) == pytest.approx(BACKOFF_MAX)


@pytest.mark.parametrize(
    ("failures", "draw", "expected"),
    [
        (1, 0.0, 0.4),  # -20 %
        (1, 1.0, 0.6),  # +20 %
        (1, 0.25, 0.45),
        (2, 0.0, 0.8),
        (9, 0.0, 1.0),
        (9, 1.0, 1.5),  # the cap, jitter included
    ],
)
def test_backoff_jitter_is_plus_or_minus_twenty_percent(
    failures: int, draw: float, expected: float
) -> None:
    assert backoff(failures, 0.5, draw=draw) == pytest.approx(expected)


def test_backoff_custom_cap_and_jitter() -> None:
    assert backoff(10, 1.0, cap=7.5, jitter=0.0) == 7.5
    assert backoff(10, 1.0, cap=7.5, jitter=0.5, draw=1.0) == pytest.approx(7.5)
    assert backoff(10, 1.0, cap=7.5, jitter=0.5, draw=0.0) == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": -0.1}, "backoff base and cap must be >= 0 seconds, got -0.1 and 1.5"),
        ({"cap": -1.0}, "backoff base and cap must be >= 0 seconds, got 0.5 and -1.0"),
        ({"jitter": 1.0}, r"backoff jitter must be in \[0, 1\), got 1.0"),
        ({"draw": 1.5}, r"backoff draw must be in \[0, 1\], got 1.5"),
    ],
)
def test_backoff_rejects_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        backoff(1, **kwargs)


def test_backoff_with_real_draws_stays_within_its_band_and_spreads() -> None:
    rng = random.Random(12)
    delays = [backoff(7, 0.5, draw=rng.random()) for _ in range(200)]
    assert all(1.0 <= d <= 1.5 for d in delays)
    assert max(delays) - min(delays) > 0.4  # spread, not one value for every proxy


Step = tuple[Any, Any] | Exception


class ScriptedFetch:
    """Answers each call with the next step; after the last one, signals `exhausted` and blocks
    until cancelled (as a blocking query on an index that never moves would)."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = list(steps)
        self.indexes: list[Any] = []  # the cursors asked for
        self.times: list[float] = []
        self.exhausted = asyncio.Event()

    async def __call__(self, index: Any) -> tuple[Any, Any]:
        self.indexes.append(index)
        self.times.append(time.monotonic())
        if len(self.indexes) > len(self.steps):
            self.exhausted.set()
            await asyncio.Event().wait()  # cancelled by the test
        step = self.steps[len(self.indexes) - 1]
        if isinstance(step, Exception):
            raise step
        return step


async def _run(
    steps: Sequence[Step],
    on_change: Callable[[Any], object],
    *,
    backoff_base: float = 0.001,
    draw: Callable[[], float] = lambda: 0.5,
) -> ScriptedFetch:
    """Run the watch until every step was answered and the next call is blocking.

    The jitter's draw is 0.5 unless told: every delay is the nominal one.
    """
    fetch = ScriptedFetch(steps)
    task = asyncio.create_task(
        watch("test", fetch, on_change, log=log, backoff_base=backoff_base, draw=draw),
        name="watch",
    )
    try:
        async with asyncio.timeout(5):
            await fetch.exhausted.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert task.cancelled()
    return fetch


async def test_first_call_does_not_block_then_each_call_blocks_on_the_last_index() -> None:
    seen: list[Any] = []
    fetch = await _run([("a", 5), ("b", 7), ("c", 9)], seen.append)
    assert fetch.indexes == [0, 5, 7, 9]
    assert seen == ["a", "b", "c"]


async def test_unchanged_values_do_not_fire_the_handler_again() -> None:
    seen: list[Any] = []
    fetch = await _run(
        [({"k": [1]}, 5), ({"k": [1]}, 6), ({"k": [2]}, 7), ({"k": [2]}, 7)], seen.append
    )
    assert fetch.indexes == [0, 5, 6, 7, 7]
    assert seen == [{"k": [1]}, {"k": [2]}]


async def test_index_going_backwards_makes_the_next_call_non_blocking() -> None:
    seen: list[Any] = []
    fetch = await _run([("a", 10), ("b", 3), ("c", 4)], seen.append)
    assert fetch.indexes == [0, 10, 0, 4]
    assert seen == ["a", "b", "c"]


async def test_index_zero_from_the_agent_becomes_one() -> None:
    fetch = await _run([("a", 0), ("a", 0)], lambda _: None)
    assert fetch.indexes == [0, 1, 1]


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if text in r.getMessage()]


async def test_error_makes_the_retry_non_blocking_after_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    seen: list[Any] = []
    base = 0.05
    fetch = await _run(
        [
            ("a", 5),
            AgentUnavailable("connection refused"),
            AgentResponseError("Unexpected response code: 500 (boom)", status=500),
            ("a", 6),
            ("b", 8),
        ],
        seen.append,
        backoff_base=base,
    )
    assert fetch.indexes == [0, 5, 0, 0, 6, 8]
    # The value after recovery equals the one before the errors: no second fire.
    assert seen == ["a", "b"]
    # The retries waited base and 2 x base.
    assert fetch.times[2] - fetch.times[1] >= base * 1 - CLOCK_SLACK
    assert fetch.times[3] - fetch.times[2] >= base * 2 - CLOCK_SLACK
    # One warning when the outage begins, the retries at debug, one line at recovery.
    assert _lines(caplog, "Watch errored") == [
        (logging.WARNING, "Watch errored type=test error=connection refused retry=0.1s")
    ]
    assert _lines(caplog, "Watch still failing") == [
        (
            logging.DEBUG,
            "Watch still failing type=test error=Unexpected response code: 500 (boom) "
            "failures=2 retry=0.1s",
        )
    ]
    ((level, recovered),) = _lines(caplog, "Watch recovered")
    assert level == logging.INFO
    match = re.fullmatch(r"Watch recovered type=test down=(\d+\.\d)s retries=2", recovered)
    assert match is not None, recovered
    # Down from the first error to the success: both waits (0.05 + 0.1 s), rounded.
    assert float(match[1]) >= 0.1


async def test_failure_count_resets_after_a_success(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    base = 0.1  # large enough for the logged retry (one decimal) to tell 1 x from 2 x
    fetch = await _run(
        [
            AgentUnavailable("down"),
            AgentUnavailable("down"),
            ("a", 5),
            AgentUnavailable("down"),
            ("a", 6),
        ],
        lambda _: None,
        backoff_base=base,
    )
    assert fetch.indexes == [0, 0, 0, 5, 0, 6]
    assert fetch.times[2] - fetch.times[1] >= 2 * base - CLOCK_SLACK
    retries = [
        r.getMessage().rsplit(" ", 1)[1]
        for r in caplog.records
        if "errored" in r.getMessage() or "still failing" in r.getMessage()
    ]
    # The failure after a success waits 1 x base again, not 4 x base.
    assert retries == ["retry=0.1s", "retry=0.2s", "retry=0.1s"]
    # Two outages: two warnings, two recoveries.
    assert [level for level, _ in _lines(caplog, "Watch errored")] == [logging.WARNING] * 2
    recovered = [m.rsplit(" ", 1)[1] for _, m in _lines(caplog, "Watch recovered type=test")]
    assert recovered == ["retries=2", "retries=1"]


async def test_a_long_outage_logs_one_line_when_it_begins_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    down = AgentUnavailable("connection refused")
    fetch = await _run([down] * 30 + [("a", 5)], lambda _: None, backoff_base=0.0)
    assert fetch.indexes == [0] * 31 + [5]
    assert len(_lines(caplog, "Watch errored")) == 1
    assert len(_lines(caplog, "Watch still failing")) == 29
    ((_, recovered),) = _lines(caplog, "Watch recovered")
    assert recovered.endswith(" retries=30")
    at_info = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(at_info) == 2


async def test_the_jitter_draw_scales_each_delay(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    draws = iter([0.0, 1.0])
    down = AgentUnavailable("down")
    fetch = await _run(
        [down, down, ("a", 5)], lambda _: None, backoff_base=0.25, draw=lambda: next(draws)
    )
    assert fetch.indexes == [0, 0, 0, 5]
    # 0.25 x 0.8, then 0.5 x 1.2.
    assert fetch.times[1] - fetch.times[0] >= 0.2 - CLOCK_SLACK
    assert fetch.times[2] - fetch.times[1] >= 0.6 - CLOCK_SLACK
    assert [m.rsplit(" ", 1)[1] for _, m in _lines(caplog, "retry=")] == [
        "retry=0.2s",
        "retry=0.6s",
    ]


async def test_a_negative_base_is_refused_before_any_fetch() -> None:
    fetch = ScriptedFetch([("a", 1)])
    stream = changes("test", fetch, INDEX, log=log, backoff_base=-1.0)
    async with contextlib.aclosing(stream):
        with pytest.raises(ValueError, match="backoff base and cap must be >= 0 seconds"):
            await anext(stream)
    assert fetch.indexes == []


async def test_handler_exception_is_logged_and_the_watch_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[Any] = []

    def on_change(value: Any) -> None:
        seen.append(value)
        if value == "a":
            raise RuntimeError("handler broke")

    fetch = await _run([("a", 5), ("b", 6)], on_change)
    assert fetch.indexes == [0, 5, 6]
    assert seen == ["a", "b"]
    (record,) = [r for r in caplog.records if "handler of watch" in r.getMessage()]
    assert record.getMessage() == "handler of watch type=test failed"
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "handler broke" in str(record.exc_info[1])


async def test_handler_sees_unusable_answers_logged_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[Any] = []
    fetch = await _run([KeyError("Roots"), ("a", 5)], seen.append)
    assert fetch.indexes == [0, 0, 5]
    assert seen == ["a"]
    errored = [r.getMessage() for r in caplog.records if "Watch errored" in r.getMessage()]
    assert errored == [
        "Watch errored type=test error=unusable answer: KeyError: 'Roots' retry=0.0s"
    ]


async def _collect(
    cursor: Any, steps: Sequence[Step], count: int, **kwargs: Any
) -> tuple[ScriptedFetch, list[Any]]:
    """The first `count` values of `changes` over `steps`; the generator is then closed."""
    fetch = ScriptedFetch(steps)
    values: list[Any] = []
    stream = changes("test", fetch, cursor, log=log, backoff_base=0.001, **kwargs)
    async with asyncio.timeout(5), contextlib.aclosing(stream):
        async for value in stream:
            values.append(value)
            if len(values) == count:
                break
    return fetch, values


async def test_content_hash_cursor_blocks_on_the_last_hash_and_resets_after_an_error() -> None:
    fetch, values = await _collect(
        CONTENT_HASH,
        [
            ("c1", "h1"),
            ("c1", "h1"),  # a blocking timeout: same hash, no new value
            ("c2", "h2"),
            AgentUnavailable("down"),
            ("c2", "h2"),  # after recovery, the same value does not fire again
            ("c3", "h3"),
        ],
        3,
    )
    assert values == ["c1", "c2", "c3"]
    assert fetch.indexes == ["", "h1", "h1", "h2", "", "h2"]


async def test_on_error_sees_each_failure_before_the_retry() -> None:
    errors: list[Exception] = []
    down, boom = AgentUnavailable("down"), AgentResponseError("boom", status=500)
    fetch, values = await _collect(INDEX, [down, boom, ("a", 3)], 1, on_error=errors.append)
    assert values == ["a"]
    assert errors == [down, boom]
    assert fetch.indexes == [0, 0, 0]


async def test_the_service_of_an_explained_403_is_read_at_the_time_of_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=log.name)
    denied = AgentResponseError("Unexpected response code: 403 (Permission denied)", status=403)
    names = iter(["first", "second"])
    await _collect(INDEX, [denied, denied, ("a", 1)], 1, service=lambda: next(names))
    explained = [m for _, m in _lines(caplog, "service:write on")]
    assert len(explained) == 2
    assert explained[0].startswith("Watch errored type=test")
    assert "service:write on 'first'" in explained[0]
    assert explained[1].startswith("Watch still failing type=test")
    assert "service:write on 'second'" in explained[1]
