"""Deadline: `asyncio.timeout()` for one await on a connection's path, at a third of its cost.

Each connection waits on a deadline two or three times (the authorize call, the app or
upstream dial). `asyncio.timeout()` costs 11 µs per use on CPython 3.11 with uvloop, an
async context manager that reschedules itself through `call_at`; a loop timer that cancels
the task costs 4 µs (bench/README.md, "Per-connection work, third pass").

    with Deadline(1.0):
        transport, protocol = await loop.create_connection(...)

Rule 1: the semantics of `asyncio.timeout()`: only the cancellation the timer caused becomes
`TimeoutError`; a cancellation from elsewhere, earlier or at the same time, stays a
`CancelledError`; the timer is gone once the block is left.
Rule 2: one block, entered once, in the task that made it.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """A synchronous context manager around awaits of the current task."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_task")

    def __init__(self, delay: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`loop`: the running loop, when the caller has it at hand (CPython 3.11 makes a
        system call in every `asyncio.get_running_loop()`, bench/README.md)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self._handle = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        # Ours unless someone else asked too (then it stays a cancellation). `uncancel()`
        # runs only for a cancellation the timer made.
        if (
            self._expired
            and kind is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    @property
    def expired(self) -> bool:
        return self._expired
