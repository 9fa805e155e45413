"""Two-way byte copy between two transports: backpressure, half-close, counters.

Works on asyncio transports and on `listeners.tls.transport.TLSTransport` alike: each side
gets a small protocol that writes what it receives into the other side's transport.

- Backpressure: when a transport's write buffer passes its high-water mark, reading from the
  other side is paused until it drains, so memory per connection stays bounded whatever the
  peers do.
- Half-close: EOF from one side becomes `write_eof()` on the other (TCP FIN, or TLS
  close_notify) and the other direction keeps flowing. Consul's Go proxy closes both sides
  on the first EOF instead (`connect/proxy/conn.go`), losing responses still in flight.
  Where a transport cannot write EOF, the connection is closed `close_timeout` seconds
  after the EOF unless it finishes first.
- Counters: bytes copied in each direction.

A side may be the protocol of its connection from the first byte (the upstream listener makes
side A the protocol of the accepted connection): what arrives before `start()` waits in the
side, so nothing sent with the connect is lost.

Rule 1: no Consul and no TLS knowledge here; only transports.
Rule 2: each transport is closed exactly once, by this module, once the pipe owns it.
Rule 3: nothing flows before `start()`, and this module owns that: a side pauses its
transport's reading when it gets one and keeps what arrives anyway; `start()` delivers it and
resumes reading. After that, reading is paused and resumed only for backpressure, here too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


class Transport(Protocol):
    """What the pump needs of a transport (asyncio.Transport and TLSTransport have it)."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...


@dataclass(slots=True)
class PipeStats:
    """Bytes copied: `a_to_b` from side A (the accepted connection) to side B, and back."""

    a_to_b: int = 0
    b_to_a: int = 0


class Side(asyncio.Protocol):
    """Reads from its own transport and writes into the peer's.

    A subclass may act on `connection_made` (calling this one's first); the rest is the pump's.
    Slotted, as the pipe (a subclass adds its own `__slots__`).
    """

    __slots__ = ("early", "early_eof", "eof", "lost", "name", "peer", "pipe", "transport")

    # Set by the pipe that takes this side.
    pipe: Pipe
    name: str  # "a" or "b"

    def __init__(self) -> None:
        self.transport: Transport | None = None
        self.peer: Side | None = None
        self.eof = False  # this side sent EOF (its direction is finished)
        self.lost = False
        # What arrived before the pipe started (an event loop may deliver data before a
        # pause_reading() in connection_made takes effect; a server-first app may greet).
        # Made when the first such byte comes: most connections never need it.
        self.early: bytearray | None = None
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Nothing flows until both sides exist: `Pipe.start()` resumes reading.
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.pipe.started:
            if self.early is None:
                self.early = bytearray(data)
            else:
                self.early += data
            assert self.transport is not None
            self.transport.pause_reading()
            return
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if self.name == "a":
            self.pipe.stats.a_to_b += len(data)
        else:
            self.pipe.stats.b_to_a += len(data)
        peer.transport.write(data)

    def eof_received(self) -> bool:
        if not self.pipe.started:
            self.early_eof = True
            return True
        self.eof = True
        peer = self.peer
        assert peer is not None and peer.transport is not None
        if peer.lost or peer.transport.is_closing():
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            if peer.eof:
                self.pipe.close()  # both directions are done
                return True
            return True
        # No way to pass the EOF on: give the other direction a bounded time to finish.
        self.pipe.close_later()
        return True

    def pause_writing(self) -> None:
        # Our transport's buffer is full: stop reading what would be written into it.
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.lost:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.pipe.side_lost(self, exc)


class Pipe:
    """Copies bytes between transports A and B until both are closed.

    Create it, hand `pipe.a` and `pipe.b` to the transports as their protocols (or via
    `set_protocol`/`attach`), then call `start()`. `done` resolves with the stats.

    Args:
        a: side A, when it must be a `Side` subclass (a fresh `Side` otherwise).
        close_timeout: how long a direction may go on after an EOF that cannot be passed on.
    """

    __slots__ = (
        "_close_handle",
        "_closing",
        "a",
        "b",
        "close_timeout",
        "done",
        "error",
        "started",
        "stats",
    )

    def __init__(
        self,
        a: Side | None = None,
        *,
        close_timeout: float = 10.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.stats = PipeStats()
        self.close_timeout = close_timeout
        self.a = a if a is not None else Side()
        self.b = Side()
        self.a.pipe, self.a.name, self.a.peer = self, "a", self.b
        self.b.pipe, self.b.name, self.b.peer = self, "b", self.a
        self.error: Exception | None = None
        if loop is None:
            loop = asyncio.get_running_loop()
        self.done: asyncio.Future[PipeStats] = loop.create_future()
        self._closing = False
        self._close_handle: asyncio.TimerHandle | None = None
        self.started = False

    def start(self) -> None:
        """Begin the flow; both sides' transports must be set."""
        if self.done.done():
            return  # both sides were lost before it began: nothing to start
        for side in (self.a, self.b):
            if side.transport is None:
                raise RuntimeError(f"pipe side {side.name} has no transport")
        self.started = True
        for side in (self.a, self.b):
            if side.early:
                data, side.early = bytes(side.early), None
                side.data_received(data)
        for side in (self.a, self.b):
            if side.early_eof and not side.eof:
                side.eof_received()
        for side in (self.a, self.b):
            if side.lost:
                self.side_lost(side, None)
                return
        for side in (self.a, self.b):
            assert side.transport is not None
            if not side.eof:
                side.transport.resume_reading()

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        peer = side.peer
        assert peer is not None
        if not peer.lost and peer.transport is not None and not peer.transport.is_closing():
            # Whatever was already written to the peer is flushed before it closes.
            peer.transport.close()
        if self.a.lost and self.b.lost:
            if self._close_handle is not None:
                self._close_handle.cancel()
                self._close_handle = None
            if not self.done.done():
                self.done.set_result(self.stats)
            self._unlink()

    def _unlink(self) -> None:
        """Drop the references that make the pipe, its sides and their transports a cycle
        (side to side, side to pipe, side to a transport whose protocol it is), so that a
        finished connection is freed when its handler lets go of it, not by the cyclic
        garbage collector. Left to the collector, every connection's objects waited for a
        generation-1 collection, which walked the live connections too (bench/README.md,
        "Connections freed without the collector")."""
        for side in (self.a, self.b):
            side.peer = None
            side.transport = None
            del side.pipe

    def close(self) -> None:
        """Close both sides gracefully (buffered data is flushed first). Idempotent."""
        if self._closing:
            return
        self._closing = True
        for side in (self.a, self.b):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()

    def close_later(self) -> None:
        if self._close_handle is None and not self._closing:
            self._close_handle = self.done.get_loop().call_later(self.close_timeout, self.close)

    def abort(self) -> None:
        """Cut both sides now."""
        self._closing = True
        for side in (self.a, self.b):
            if side.transport is not None:
                side.transport.abort()
