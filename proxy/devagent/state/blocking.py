"""Blocking queries: the shared index, the notifier that wakes waiters, content hashes.

Every mutation of any table takes the next Raft-like index (`Index.bump`) and wakes the
waiters of the topics it touched (`services`, `checks`, `svc:<name>`, `connect:<name>`,
`intentions`, `roots`, `leaf:<name>`, ...). A waiter holds a future, not a timer: a blocked
request costs nothing until something it watches changes or its deadline passes.

Rule 1: no tables and no HTTP here; a table says what a query watches as a `Watch` (topics
plus how to read the current index or hash), and this module only waits.
Rule 2: every wait is bounded by its deadline, and `Notifier.close()` releases them all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from proxy.counter import Counter

T = TypeVar("T")


def fnv64a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def content_hash(value: Mapping[str, Any]) -> str:
    """An opaque hash of a rendered object, formatted like Consul's (`%x` of 64 bits)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return f"{fnv64a(data):x}"


@dataclass(frozen=True, slots=True)
class Watch(Generic[T]):
    """What one blocking query waits on: the topics whose changes may move it, and how to
    read its current value (an index or a content hash) afresh after each wake-up."""

    topics: tuple[str, ...]
    current: Callable[[], T]


class Notifier:
    """Wakes blocked queries when the topics they watch change."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._parked: set[asyncio.Future[None]] = set()
        # How many blocked queries are parked right now; many may wait on it (tests do
        # `await notifier.parked.reached(n)` under a timeout).
        self.parked = Counter()
        self.closed = False

    def watch(self, topics: Iterable[str]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_result(None)
            return fut
        for t in topics:
            self._waiters.setdefault(t, set()).add(fut)
        self._parked.add(fut)
        self.parked.add(1)
        return fut

    def unwatch(self, fut: asyncio.Future[None], topics: Iterable[str]) -> None:
        for t in topics:
            waiters = self._waiters.get(t)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[t]
        if fut in self._parked:
            self._parked.discard(fut)
            self.parked.add(-1)

    def notify(self, topics: Iterable[str]) -> None:
        for t in topics:
            for fut in self._waiters.pop(t, ()):
                if not fut.done():
                    fut.set_result(None)

    def close(self) -> None:
        """Release every waiter now and every future one at once (agent shutdown)."""
        self.closed = True
        self.notify(list(self._waiters))

    def waiting(self) -> int:
        """How many blocked queries are parked right now."""
        return self.parked.value

    async def wait_until(
        self, topics: tuple[str, ...], done: Callable[[], bool], timeout: float
    ) -> None:
        """Return once `done()`, or at the deadline, or at shutdown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Each pass either returns or awaits a change: the number of passes is bounded by the
        # number of changes to the watched topics before the deadline.
        while not done() and not self.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            fut = self.watch(topics)
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                return
            finally:
                self.unwatch(fut, topics)


class Index:
    """The one Raft-like index all tables take from, and the last index of each topic."""

    def __init__(self, notifier: Notifier) -> None:
        self.value = 1
        self._notifier = notifier
        self._topics: dict[str, int] = {}

    @property
    def next(self) -> int:
        """The index the next `bump()` takes (records stamp it before they are stored)."""
        return self.value + 1

    def bump(self, topics: Iterable[str]) -> int:
        """Take the next index for `topics` and wake their waiters. Returns the index."""
        self.value += 1
        topics = tuple(topics)
        for t in topics:
            self._topics[t] = self.value
        self._notifier.notify(topics)
        return self.value

    def of(self, *topics: str, fallback: str | None = None) -> int:
        """The highest index of `topics` (of `fallback` if none has one yet); at least 1."""
        found = [self._topics[t] for t in topics if t in self._topics]
        if not found and fallback:
            found = [self._topics.get(fallback, 1)]
        return max(max(found, default=1), 1)

    def watch(self, *topics: str, fallback: str | None = None) -> Watch[int]:
        """A watch of `topics` whose current value is `of(*topics, fallback=fallback)`."""
        return Watch(topics, lambda: self.of(*topics, fallback=fallback))
