"""A child process for tests/test_budget.py: a real listener under a low descriptor limit.

Usage: python -m tests.budget_child NOFILE MAX_CONNECTIONS|default
Prints the bound port. Then, per line `NAME VALUE` read on stdin (until EOF), waits (up to
10 s) until the listener's counter NAME equals VALUE and prints one JSON status line.
Each accepted connection echoes what it reads until the client closes.

Rule 1: the limit is lowered in this process only (never in pytest's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import sys

from listeners.serve import Listener, Slot


class _Echo(asyncio.Protocol):
    def __init__(self, listener: Listener, slot: Slot) -> None:
        self.listener = listener
        self.slot = slot
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.listener.spawn(self._until_closed(), "echo", transport, self.slot)

    async def _until_closed(self) -> None:
        await self.closed.wait()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


async def _main(limit: int, cap: str) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    listener = Listener(
        "echo",
        "127.0.0.1",
        0,
        logging.getLogger("proxy.inbound"),
        max_connections=None if cap == "default" else int(cap),
    )

    await listener.bind(lambda slot: _Echo(listener, slot))
    print(listener.port, flush=True)

    def status() -> dict[str, int]:
        return {
            "open": listener.open,
            "accepted": listener.accepted.value,
            "over_connection_limit": listener.over_connection_limit,
            "accept_pauses": listener.accept_pauses,
            "max_connections": listener.max_connections,
        }

    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        name, value = line.split()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                # The counters are plain ints, set by the accept loop: nothing to await.
                while status()[name] != int(value):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        print(json.dumps(status()), flush=True)
    await listener.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    asyncio.run(_main(int(sys.argv[1]), sys.argv[2]))
