"""Blocking queries: the one watch loop of the proxy, over an index or a content hash.

Owns the rules of Consul's watch library (`api/watch/plan.go`): the first fetch is
non-blocking; each next one blocks on the last cursor (the `X-Consul-Index`, or the
`X-Consul-ContentHash` of hash-blocking endpoints); an index that goes backwards resets
to 0; after an error the retry is a non-blocking read after a quadratic backoff (5 s x n²,
capped at 180 s); an unchanged result does not fire. Every watch of the proxy runs on
`changes`: roots and leaf (the supervisor), the healthy instances of a service upstream
(`resolve.WatchingResolver`) and the proxy's own registration (`sources.AgentConfigSource`),
so all of them log the same `Watch errored type=<name> error=<text> retry=<s>s` and
`Watch recovered type=<name>` lines.

Rule 1: `next_index`, `next_hash` and `backoff` are pure; the loop does I/O only through
`fetch`.
Rule 2: the loop ends only when cancelled or closed. Every failed fetch (the agent
unreachable or answering an error, or a body `fetch` cannot use) is logged with its retry
delay and retried; nothing is raised to the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from proxy.agent import explain
from proxy.errors import AgentError

BACKOFF_BASE = 5.0
BACKOFF_MAX = 180.0

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


def backoff(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait after `failures` consecutive errors: base x failures², capped."""
    if failures <= 0:
        return 0.0
    return float(min(base * failures * failures, cap))


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
) -> AsyncGenerator[V, None]:
    """Each distinct value of a blocking query, forever (close it with `contextlib.aclosing`).

    Args:
        name: the watch in log lines (`Watch errored type=<name> ...`), such as
            `connect_roots` or `health_connect service=db`.
        fetch: called with the cursor to block on (`cursor.start`: don't block); returns
            (value, the cursor of the answer).
        cursor: `INDEX` or `CONTENT_HASH`.
        service: the service named when a 403 is explained (`agent.explain`), or a callable
            giving it at the time of the error.
        on_error: called with the exception of each failed fetch, before the backoff.

    Yields:
        The first value, then each one that differs from the one before it.
    """
    position = cursor.start
    failures = 0
    previous: Any = _NOTHING
    while True:
        try:
            value, returned = await fetch(position)
        except Exception as exc:  # CancelledError is a BaseException and ends the loop
            failures += 1
            delay = backoff(failures, backoff_base)
            log.warning(
                "Watch errored type=%s error=%s retry=%.1fs", name, _describe(exc, service), delay
            )
            if on_error is not None:
                on_error(exc)
            position = cursor.start  # the retry is a non-blocking read, as in Consul's library
            await asyncio.sleep(delay)
            continue
        if failures:
            log.info("Watch recovered type=%s", name)
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
) -> None:
    """Run an index-blocking watch until cancelled, handing each change to `on_change`.

    Args:
        name, fetch, service, on_error: as for `changes` (with the `INDEX` cursor).
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
    )
    async with contextlib.aclosing(values):
        async for value in values:
            try:
                on_change(value)
            except Exception:
                log.exception("handler of watch type=%s failed", name)
