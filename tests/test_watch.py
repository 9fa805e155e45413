"""proxy.watch: cursor and backoff arithmetic, and the one loop driven by a scripted fetch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from proxy.errors import AgentResponseError, AgentUnavailable
from proxy.watch import (
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
        (0, 5.0, 0.0),
        (-1, 5.0, 0.0),
        (1, 5.0, 5.0),
        (2, 5.0, 20.0),
        (3, 5.0, 45.0),
        (5, 5.0, 125.0),
        (6, 5.0, 180.0),  # 5 x 36 = 180: the cap
        (7, 5.0, 180.0),  # 245, capped
        (100, 5.0, BACKOFF_MAX),
        (1, 0.5, 0.5),
        (3, 0.5, 4.5),
        (2, 0.001, 0.004),
    ],
)
def test_backoff_is_quadratic_and_capped(failures: int, base: float, expected: float) -> None:
    assert backoff(failures, base) == pytest.approx(expected)


def test_backoff_custom_cap() -> None:
    assert backoff(10, 1.0, cap=7.5) == 7.5


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
) -> ScriptedFetch:
    """Run the watch until every step was answered and the next call is blocking."""
    fetch = ScriptedFetch(steps)
    task = asyncio.create_task(
        watch("test", fetch, on_change, log=log, backoff_base=backoff_base), name="watch"
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


async def test_error_makes_the_retry_non_blocking_after_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    seen: list[Any] = []
    base = 0.02
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
    # The retries waited base x 1² and base x 2².
    assert fetch.times[2] - fetch.times[1] >= base * 1 - CLOCK_SLACK
    assert fetch.times[3] - fetch.times[2] >= base * 4 - CLOCK_SLACK
    errored = [r.getMessage() for r in caplog.records if "Watch errored" in r.getMessage()]
    assert errored == [
        "Watch errored type=test error=connection refused retry=0.0s",
        "Watch errored type=test error=Unexpected response code: 500 (boom) retry=0.1s",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "errored" in r.getMessage())
    assert [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()] == [
        "Watch recovered type=test"
    ]


async def test_failure_count_resets_after_a_success(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    base = 0.1  # large enough for the logged retry (one decimal) to tell 1 x from 4 x
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
    assert fetch.times[2] - fetch.times[1] >= 4 * base - CLOCK_SLACK
    retries = [
        r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if "errored" in r.getMessage()
    ]
    # The failure after a success waits 1 x base again, not 9 x base.
    assert retries == ["retry=0.1s", "retry=0.4s", "retry=0.1s"]
    recovered = [r for r in caplog.records if r.getMessage() == "Watch recovered type=test"]
    assert len(recovered) == 2


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
    denied = AgentResponseError("Unexpected response code: 403 (Permission denied)", status=403)
    names = iter(["first", "second"])
    await _collect(INDEX, [denied, denied, ("a", 1)], 1, service=lambda: next(names))
    errored = [r.getMessage() for r in caplog.records if "Watch errored" in r.getMessage()]
    assert len(errored) == 2
    assert "service:write on 'first'" in errored[0]
    assert "service:write on 'second'" in errored[1]
