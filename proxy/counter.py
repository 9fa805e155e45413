"""Counter: a number that any number of tasks can wait on.

The proxy and the dev agent count things that tests (and the demo) wait for: connections
accepted, certificate rotations, watch answers, blocked queries. A waiter asks for "at least
n" and is woken when the count gets there; many may wait at once, for different targets.

Rule 1: no I/O; futures of the running loop only. Waiting is bounded by the caller.
"""

from __future__ import annotations

import asyncio


class Counter:
    """A count with `await reached(n)`; `add()` may be called from any code on the loop."""

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, n: int = 1) -> None:
        """Move the count by `n` (negative counts down) and wake every waiter it reaches."""
        self.value += n
        if not self._waiters:
            return
        still: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._waiters:
            if self.value >= target:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((target, future))
        self._waiters = still

    async def reached(self, target: int) -> None:
        """Return once the count is at least `target` (bound it with a timeout)."""
        if self.value >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (target, future)
        self._waiters.append(entry)
        try:
            await future
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
