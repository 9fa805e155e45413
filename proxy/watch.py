"""Blocking queries: the one watch loop of the proxy, over an index or a content hash.

Owns the rules of Consul's watch library (`api/watch/plan.go`): the first fetch is
non-blocking; each next one blocks on the last cursor (the `X-Consul-Index`, or the
`X-Consul-ContentHash` of hash-blocking endpoints); an index that goes backwards resets
to 0; after an error the retry is a non-blocking read; an unchanged result does not fire.
Every watch of the proxy runs on `changes`: roots and leaf (the supervisor), the healthy
instances of a service upstream (`resolve.WatchingResolver`) and the proxy's own
registration (`sources.AgentConfigSource`), so all of them log the same lines.

The retry delay is not Consul's (5 s x n², capped at 3 min: after an 8 s outage a proxy
waited up to 20 s more, issue 12): it doubles from 0.5 s with ±20 % jitter and never
exceeds 1.5 s, and the first success resets it, so a proxy is current again within 2 s of
the agent answering (the longest wait plus one non-blocking read), while a dead agent sees
under one request a second per watch, spread so that a node's proxies do not retry in step.

Rule 1: `next_index`, `next_hash` and `backoff` are pure (the jitter's random draw is an
argument); the loop does I/O only through `fetch`.
Rule 2: the loop ends only when cancelled or closed. Every failed fetch (the agent
unreachable or answering an error, or a body `fetch` cannot use) is retried; nothing is
raised to the consumer.
Rule 3: one outage, two lines: `Watch errored type=<name> error=<text> retry=<s>s` (warning)
at its first failure, `Watch recovered type=<name> down=<s>s retries=<n>` (info) at the
first success after it. The failures in between are logged at debug only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from proxy.agent import explain
from proxy.errors import AgentError

BACKOFF_BASE = 0.5  # the first retry's delay, before jitter
BACKOFF_MAX = 1.5  # the longest delay, jitter included
BACKOFF_JITTER = 0.2  # each delay is drawn within ±20 % of its nominal value
_MAX_DOUBLINGS = 64  # 2**64 x any base is past the cap; a bigger power could overflow

C = TypeVar("C", int, str)
V = TypeVar("V")


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking call.

    Going backwards (a snapshot restore, a new agent) resets to 0, so the next call does not
    block on an index that may never come. An index of 0 from the agent (which Consul never
    sends) becomes 1, so a broken agent cannot turn the watch into a busy loop.
    """
    if returned <= 0:
        return 1
    if returned < previous:
        return 0
    return returned


def next_hash(previous: str, returned: str) -> str:
    """The content hash for the next hash-blocking call: the one just returned.

    A hash has no order, so there is nothing to reset: a different hash is simply the state
    to block on next (as Consul's `WaitHashVal.Next`).
    """
    return returned


def backoff(
    failures: int,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_MAX,
    *,
    jitter: float = BACKOFF_JITTER,
    draw: float = 0.5,
) -> float:
    """Seconds to wait after `failures` consecutive errors.

    The nominal delay is base x 2^(failures-1), held at cap / (1 + jitter) so that the
    jittered delay never exceeds `cap`; it is then scaled by 1 + jitter x (2 draw - 1), so
    `draw` (uniform in [0, 1], as `random.random()`) of 0.5 gives the nominal delay and 0
    or 1 its -/+ `jitter` bounds. A base above that hold is used as it is: a fixed delay.

    Raises:
        ValueError: a negative base or cap, a jitter outside [0, 1), a draw outside [0, 1].
    """
    if base < 0 or cap < 0:
        raise ValueError(f"backoff base and cap must be >= 0 seconds, got {base} and {cap}")
    if not 0 <= jitter < 1:
        raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
    if not 0 <= draw <= 1:
        raise ValueError(f"backoff draw must be in [0, 1], got {draw}")
    if failures <= 0:
        return 0.0
    hold = max(cap / (1 + jitter), base)
    nominal = min(base * 2.0 ** min(failures - 1, _MAX_DOUBLINGS), hold)
    return nominal * (1 + jitter * (2 * draw - 1))


@dataclass(frozen=True, slots=True)
class Cursor(Generic[C]):
    """How a watch blocks: the cursor of a non-blocking read, and the next one after an answer."""

    start: C
    advance: Callable[[C, C], C]


INDEX: Cursor[int] = Cursor(0, next_index)
CONTENT_HASH: Cursor[str] = Cursor("", next_hash)

_NOTHING: Any = object()  # equal to no value: the first answer always fires


def _describe(exc: Exception, service: str | Callable[[], str]) -> str:
    if isinstance(exc, AgentError):
        return explain(exc, service() if callable(service) else service)
    return f"unusable answer: {type(exc).__name__}: {exc}"


async def changes(
    name: str,
    fetch: Callable[[C], Awaitable[tuple[V, C]]],
    cursor: Cursor[C],
    *,
    log: logging.Logger,
    backoff_base: float = BACKOFF_BASE,
    service: str | Callable[[], str] = "",
    on_error: Callable[[Exception], object] | None = None,
    draw: Callable[[], float] = random.random,
) -> AsyncGenerator[V, None]:
    """Each distinct value of a blocking query, forever (close it with `contextlib.aclosing`).

    Args:
        name: the watch in log lines (`Watch errored type=<name> ...`), such as
            `connect_roots` or `health_connect service=db`.
        fetch: called with the cursor to block on (`cursor.start`: don't block); returns
            (value, the cursor of the answer).
        cursor: `INDEX` or `CONTENT_HASH`.
        backoff_base: the first retry's nominal delay (`backoff`); the tests use 0.05 s.
        service: the service named when a 403 is explained (`agent.explain`), or a callable
            giving it at the time of the error.
        on_error: called with the exception of each failed fetch, before the backoff.
        draw: the jitter's random number in [0, 1] (a constant makes delays exact in tests).

    Yields:
        The first value, then each one that differs from the one before it.

    Raises:
        ValueError: a negative `backoff_base` (at the first iteration, before any fetch).
    """
    backoff(1, backoff_base)  # a bad base fails now, not at the first error
    clock = asyncio.get_running_loop().time
    position = cursor.start
    failures = 0
    down_since = 0.0
    previous: Any = _NOTHING
    while True:
        try:
            value, returned = await fetch(position)
        except Exception as exc:  # CancelledError is a BaseException and ends the loop
            failures += 1
            delay = backoff(failures, backoff_base, draw=draw())
            error = _describe(exc, service)
            if failures == 1:
                down_since = clock()
                log.warning("Watch errored type=%s error=%s retry=%.1fs", name, error, delay)
            else:
                log.debug(
                    "Watch still failing type=%s error=%s failures=%d retry=%.1fs",
                    name,
                    error,
                    failures,
                    delay,
                )
            if on_error is not None:
                on_error(exc)
            position = cursor.start  # the retry is a non-blocking read, as in Consul's library
            await asyncio.sleep(delay)
            continue
        if failures:
            # Each failure was followed by one retry, the last of which just succeeded.
            log.info(
                "Watch recovered type=%s down=%.1fs retries=%d",
                name,
                clock() - down_since,
                failures,
            )
            failures = 0
        position = cursor.advance(position, returned)
        if value != previous:
            previous = value
            yield value


async def watch(
    name: str,
    fetch: Callable[[int], Awaitable[tuple[V, int]]],
    on_change: Callable[[V], object],
    *,
    log: logging.Logger,
    backoff_base: float = BACKOFF_BASE,
    service: str = "",
    on_error: Callable[[Exception], object] | None = None,
    draw: Callable[[], float] = random.random,
) -> None:
    """Run an index-blocking watch until cancelled, handing each change to `on_change`.

    Args:
        name, fetch, backoff_base, service, on_error, draw: as for `changes` (with the
            `INDEX` cursor).
        on_change: called with each value that differs from the previous one. An exception
            it raises is logged and the watch goes on.
    """
    values = changes(
        name,
        fetch,
        INDEX,
        log=log,
        backoff_base=backoff_base,
        service=service,
        on_error=on_error,
        draw=draw,
    )
    async with contextlib.aclosing(values):
        async for value in values:
            try:
                on_change(value)
            except Exception:
                log.exception("handler of watch type=%s failed", name)
