"""What every listener shares: bind, readiness, per-connection tasks, drain-then-cancel close.

Rule 1: every connection task has an owner (the listener's task set); none is fire-and-forget.
Rule 2: `close()` stops accepting first, lets connections finish up to a deadline, then
cancels the rest; it is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from listeners.events import Connection, NullObserver, Observer, now
from proxy.addr import join_host_port
from proxy.counter import Counter

KEEPALIVE_IDLE = 15  # seconds, as Go's default dialer and listener


def tune_socket(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY and keepalive (15 s) on a connection's socket, as Go sets by default."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_IDLE)


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The `host:port` of a connection's remote end ("" when the socket has none)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return join_host_port(str(peer[0]), int(peer[1]))
    return ""


def is_routine_close(exc: BaseException | None) -> bool:
    """Peer resets, broken pipes and EOFs: part of life, logged at debug only."""
    return exc is None or isinstance(
        exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError | EOFError
    )


class Listener:
    """A bound TCP server whose connections are handled by tracked tasks."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        log: logging.Logger,
        *,
        reuse_port: bool = False,
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        # With -workers, several processes bind the same address; the kernel spreads the
        # connections over them (SO_REUSEPORT).
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.log = log
        self.ready = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Connections accepted in all (a test awaits `accepted.reached(n)`).
        self.accepted = Counter()
        self.observer: Observer = observer or NullObserver()
        # The records of the connections being handled (the admin endpoint lists them).
        self.connections: set[Connection] = set()

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def active(self) -> int:
        """Connections being handled right now."""
        return len(self._tasks)

    async def bind(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        """Listen; `port` becomes the bound port (useful with port 0).

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory,
            self.host,
            self.port,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.log.info("Starting listener listener=%s bind_addr=%s", self.name, self.address)
        self.ready.set()

    def spawn(
        self, coro: Coroutine[Any, Any, None], name: str, transport: asyncio.BaseTransport
    ) -> None:
        """Handle the connection on `transport` in a tracked task.

        The transport is aborted if the listener is already closing, and if the task ends
        cancelled (a task cancelled before it first runs never reaches its own cleanup) or
        with an unexpected exception (which is logged).
        """
        if self._closed:
            coro.close()
            transport.abort()  # type: ignore[attr-defined]
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        def reap(t: asyncio.Task[None]) -> None:
            if t.cancelled():
                transport.abort()  # type: ignore[attr-defined]
            elif (exc := t.exception()) is not None:
                self.log.error("connection handler failed: %r", exc, exc_info=exc)
                transport.abort()  # type: ignore[attr-defined]

        task.add_done_callback(reap)
        self.accepted.add()

    def track(self, conn: Connection) -> Connection:
        """Keep `conn` among the open connections until `untrack()`."""
        self.connections.add(conn)
        return conn

    def untrack(self, conn: Connection) -> None:
        """The connection is over: drop its record and tell the observer, once."""
        if conn.duration is not None:
            return
        conn.duration = now() - conn.started
        self.connections.discard(conn)
        self.observer.finished(conn)

    async def until_idle(self) -> None:
        """Return once no connection is being handled (bound it with a timeout)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    def stop_accepting(self) -> None:
        """Close the listening socket now (the address can be bound again at once).

        A connection the kernel handed to asyncio in the same loop step as this close is
        dropped by CPython's accept path (Server._attach asserts; the socket is left to the
        garbage collector). The client sees it closed; nothing here can intercept it.
        """
        if self._server is not None and self._server.is_serving():
            self._server.close()
            self.log.info(
                "listener stopped accepting listener=%s active_connections=%d",
                self.name,
                self.active,
            )

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting, wait up to `drain_timeout` for connections, cancel the rest."""
        if self._closed:
            return
        self._closed = True
        self.stop_accepting()
        if self._tasks and drain_timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.log.info("listener stopped listener=%s", self.name)
