"""Blocking-query watch loops: pure index and backoff arithmetic, and the async loop.

Owns the rules of Consul's watch library (consul-spec.md 1.1): the first fetch is
non-blocking; each next one blocks on the last index; an index that goes backwards resets
to 0; after an error the retry is a non-blocking read after a quadratic backoff (5 s x n²,
capped at 180 s); an unchanged result does not fire the handler.

Rule 1: `next_index` and `backoff` are pure; the loop does I/O only through `fetch`.
Rule 2: the loop ends only when cancelled. Every failed fetch (the agent unreachable or
answering an error, or a body `fetch` cannot use) is logged with its retry delay and retried;
nothing is raised to the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.agent import explain
from proxy.errors import AgentError

BACKOFF_BASE = 5.0
BACKOFF_MAX = 180.0


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


def backoff(failures: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait after `failures` consecutive errors: base x failures², capped."""
    if failures <= 0:
        return 0.0
    return float(min(base * failures * failures, cap))


async def watch(
    name: str,
    fetch: Callable[[int], Awaitable[tuple[Any, int]]],
    on_change: Callable[[Any], object],
    *,
    log: logging.Logger,
    backoff_base: float = BACKOFF_BASE,
    service: str = "",
) -> None:
    """Run a blocking-query watch until cancelled.

    Args:
        name: for log lines (`Watch errored type=<name> ...`).
        fetch: called with the index to block on (0 = don't block); returns (value, index).
        on_change: called with each value that differs from the previous one. An exception
            it raises is logged and the watch goes on.
    """
    index = 0
    failures = 0
    previous: Any = object()
    while True:
        try:
            value, returned = await fetch(index)
        except Exception as exc:  # CancelledError is a BaseException and ends the loop
            failures += 1
            delay = backoff(failures, backoff_base)
            if isinstance(exc, AgentError):
                log.warning(
                    "Watch errored type=%s error=%s retry=%.1fs", name, explain(exc, service), delay
                )
            else:
                log.warning(
                    "Watch errored type=%s error=unusable answer: %s: %s retry=%.1fs",
                    name,
                    type(exc).__name__,
                    exc,
                    delay,
                )
            index = 0  # the retry is a non-blocking read, as in Consul's watch library
            await asyncio.sleep(delay)
            continue
        if failures:
            log.info("Watch recovered type=%s", name)
        failures = 0
        index = next_index(index, returned)
        if value != previous:
            previous = value
            try:
                on_change(value)
            except Exception:
                log.exception("handler of watch type=%s failed", name)
