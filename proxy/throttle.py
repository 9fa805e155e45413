"""Throttle: log the first of a run of identical events, count the rest, summarize per window.

A client that retries a refused connection a hundred times a second must not write a hundred
log lines a second forever. The first event of a kind is admitted (logged in full); the
identical ones after it within `window` seconds are only counted; `summaries()`, called
periodically, hands out one (key, count, seconds) per kind that had suppressed events, and
starts a new window for it, so a steady flood gives one summary line per window.

Rule 1: pure bookkeeping: no logging, no tasks; the clock is injectable.
Rule 2: bounded: at most `max_keys` kinds are tracked; beyond that the oldest are dropped
(their next event is logged in full again).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Throttle(Generic[K]):
    def __init__(
        self,
        window: float,
        *,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        # key -> [window start, events suppressed in this window]; insertion-ordered.
        self._kinds: dict[K, list[float]] = {}

    def admit(self, key: K) -> bool:
        """Whether this event should be logged in full (else it is counted)."""
        kind = self._kinds.get(key)
        if kind is not None:
            kind[1] += 1
            return False
        if len(self._kinds) >= self.max_keys:
            del self._kinds[next(iter(self._kinds))]
        self._kinds[key] = [self.clock(), 0]
        return True

    def summaries(self) -> Iterator[tuple[K, int, float]]:
        """(key, suppressed count, seconds covered) for each kind whose window has ended.

        A kind with nothing suppressed is forgotten; one with suppressed events starts a new
        window (its next events are counted toward the next summary).
        """
        now = self.clock()
        for key, kind in list(self._kinds.items()):
            start, suppressed = kind
            if now - start < self.window:
                continue
            if suppressed:
                kind[0], kind[1] = now, 0
                yield key, int(suppressed), now - start
            else:
                del self._kinds[key]
