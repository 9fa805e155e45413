"""What the listeners' own accept loop costs per connection against uvloop's `create_server`,
in instructions (valgrind callgrind).

The listeners accept in Python (`listeners.serve.Listener`: `socket.accept()`, the budgets'
`Slot`, a task that awaits `loop.connect_accepted_socket`), so that a connection beyond a
budget is closed before any transport exists and descriptor exhaustion pauses accepting with
a backoff. uvloop's own server accepts in libuv and makes the transport in C. This script
measures the difference, the largest structural lever on the inbound path that issue 13's
profile left:

- one process per (variant, connection count), on uvloop, holds a server and a client;
- the server's protocol is the same in both variants: it answers one byte and closes;
- the client opens N connections, 8 at a time, each sends a byte and reads the answer;
- the cost of one connection is the slope between two counts (start-up cancels out), and
  the difference of the slopes is what our accept path adds.

    python bench/accept_paths.py                # about 2 minutes on 2 cores
    python bench/accept_paths.py --small 200 --large 1000

Rule 1: nothing here is collected by pytest; valgrind must be on PATH (else a clear error).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_util import callgrind_slopes, connect_many  # noqa: E402

from listeners.serve import Listener, Slot  # noqa: E402

CONCURRENCY = 8
VARIANTS = ("ours", "loop")


class _Answer(asyncio.Protocol):
    """Answers the first byte with one byte, then closes (the same in both variants)."""

    def __init__(self, slot: Slot | None = None) -> None:
        self.slot = slot
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"y")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.slot is not None:
            self.slot.release()


async def child(variant: str, n: int) -> None:
    """The measured process: a server of `variant` and n connections to it."""
    if variant == "ours":
        listener = Listener("bench", "127.0.0.1", 0, logging.getLogger("bench"))
        await listener.bind(_Answer)
        port = listener.port
        await connect_many(port, n, b"x", concurrency=CONCURRENCY)
        await listener.close()
    else:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        await connect_many(port, n, b"x", concurrency=CONCURRENCY)
        server.close()
        await server.wait_closed()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=200, help="connections, first count")
    parser.add_argument("--large", type=int, default=1000, help="connections, second count")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uvloop.run(child(args.child[0], int(args.child[1])))
        return 0
    if not 0 < args.small < args.large:
        print("need 0 < --small < --large", file=sys.stderr)
        return 2
    try:
        per = callgrind_slopes(__file__, list(VARIANTS), args.small, args.large)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"instructions per connection ({args.small} -> {args.large}, server and client):")
    for variant in VARIANTS:
        print(f"  {variant:5s} {per[variant]:>12,.0f}")
    extra = per["ours"] - per["loop"]
    print(f"  ours - loop: {extra:,.0f} per connection ({per['ours'] / per['loop']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
