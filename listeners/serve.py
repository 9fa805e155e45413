"""What every listener shares: bind, our own accept loop with its budgets, readiness,
per-connection tasks, drain-then-cancel close.

The accept loop is ours, not the event loop's (`create_server`), for two reasons:
- budgets: beyond `max_connections` open connections, or `handshake_limit` connections not
  yet through their TLS handshake, a new connection is closed at once, before any TLS, and
  reported to the observer as refused (`over_connection_limit`, `over_handshake_limit`).
  A full handshake budget first makes room by closing the oldest connection that has sent
  nothing at all, taken from the client address holding the most handshakes: a slowloris
  gives way to everyone, itself included, and a TLS client (which sends its ClientHello at
  once) is never evicted; only when no silent connection is found is the newcomer closed;
- descriptor exhaustion: on EMFILE/ENFILE (and ENOBUFS/ENOMEM) accepting pauses with a
  backoff (`ACCEPT_BACKOFF_FIRST` doubling to `ACCEPT_BACKOFF_MAX`), logs one warning per
  outage and one line when it accepts again, and resumes. The connections that wait meanwhile
  stay in the kernel's backlog. (CPython's own loop logs a traceback at error level every
  second and retries after a fixed 1 s; uvloop leaves it to libuv, which accepts and closes
  the waiting connections itself. Go's listener returns the error and the proxy stops
  accepting for good.)

Rule 1: every connection task has an owner (the listener's task sets); none is
fire-and-forget.
Rule 2: `close()` stops accepting first, lets connections finish up to a deadline, then
cancels the rest; it is idempotent.
Rule 3: a connection's share of the budgets (its `Slot`) is given back exactly once, whatever
happens to it; a connection already past its handshake is never closed for a budget.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from listeners.events import INBOUND, Connection, NullObserver, Observer, Refusal, now
from listeners.limits import default_max_connections
from listeners.sockets import tune_listening_socket
from proxy.addr import join_host_port
from proxy.counter import Counter

BACKLOG = 1024
ACCEPT_BATCH = 64  # connections accepted per readiness callback (others wait their turn)
EVICT_SCAN = 64  # handshaking connections looked at, oldest first, for a silent one to evict
ACCEPT_BACKOFF_FIRST = 0.05  # seconds of the first pause on descriptor exhaustion
ACCEPT_BACKOFF_MAX = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Slot:
    """One accepted connection's share of its listener's budgets, given back exactly once.

    While in the handshake budget, a slot can be evicted for a newer connection if its
    client has sent nothing at all (`Listener._evict_silent`): the protocol lends it the
    means with `watch()`. `source` is the client's address without the port.
    """

    __slots__ = ("_abort", "_handshaking", "_listener", "_open", "_silent", "evicted", "source")

    def __init__(self, listener: Listener, *, handshaking: bool, source: str = "") -> None:
        self._listener = listener
        self.source = source
        self._open = True
        self._handshaking = handshaking
        self._abort: Callable[[], object] | None = None
        self._silent: Callable[[], bool] | None = None
        self.evicted = False  # closed to make room: the handler reports it as such
        listener.open += 1
        if handshaking:
            listener.handshaking += 1
            listener._in_handshake.setdefault(source, {})[self] = None

    def watch(self, abort: Callable[[], object], silent: Callable[[], bool]) -> None:
        """How to close this connection, and whether its client has sent nothing yet."""
        self._abort = abort
        self._silent = silent

    def silent(self) -> bool:
        return self._silent is not None and self._silent()

    def evict(self) -> None:
        """Close the connection now to give its place in the handshake budget away."""
        abort = self._abort
        self.evicted = True
        self.handshake_over()
        if abort is not None:
            abort()

    def handshake_over(self) -> None:
        """The handshake ended (either way): the connection leaves the handshake budget."""
        if self._handshaking:
            self._handshaking = False
            self._listener.handshaking -= 1
            by_source = self._listener._in_handshake
            slots = by_source.get(self.source)
            if slots is not None:
                slots.pop(self, None)
                if not slots:
                    del by_source[self.source]
            self._abort = self._silent = None

    def release(self) -> None:
        """The connection is over: it leaves both budgets."""
        self.handshake_over()
        if self._open:
            self._open = False
            self._listener.open -= 1


ProtocolFactory = Callable[[Slot], asyncio.BaseProtocol]


class _Reaper:
    """The one done callback of a connection's task (`Listener.spawn`): forgets the task,
    gives the slot back, aborts the transport if the task was cancelled or failed.

    An object with three slots, not a closure: a closure over the same three costs a
    function and a cell each for the life of the connection (bench/README.md, "Memory per
    idle connection"); one callback, not two: each costs an entry and a copy of the context.
    """

    __slots__ = ("listener", "slot", "transport")

    def __init__(
        self, listener: Listener, transport: asyncio.BaseTransport, slot: Slot | None
    ) -> None:
        self.listener = listener
        self.transport = transport
        self.slot = slot

    def __call__(self, task: asyncio.Task[None]) -> None:
        self.listener._tasks.discard(task)
        if self.slot is not None:
            self.slot.release()
        if task.cancelled():
            self.transport.abort()  # type: ignore[attr-defined]
        elif (exc := task.exception()) is not None:
            self.listener.log.error("connection handler failed: %r", exc, exc_info=exc)
            self.transport.abort()  # type: ignore[attr-defined]


class Listener:
    """A bound TCP server whose connections are handled by tracked tasks.

    Subclasses pass `bind()` a factory that makes the protocol of one accepted connection
    from its `Slot`; the protocol's `connection_made` calls `spawn()` with that slot.
    """

    direction = INBOUND  # for the refusals reported at accept

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        log: logging.Logger,
        *,
        reuse_port: bool = False,
        observer: Observer | None = None,
        max_connections: int | None = None,
        handshake_limit: int = 0,
    ) -> None:
        """Args:
        max_connections: connections open at once (None: `default_max_connections()`).
        handshake_limit: connections at once still in their TLS handshake (0: no such
            budget, for listeners whose connections make no handshake).

        Raises:
            ValueError: a budget below 1 (or below 0 for `handshake_limit`).
        """
        if max_connections is None:
            max_connections = default_max_connections()
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if handshake_limit < 0:
            raise ValueError(f"handshake_limit must not be negative, got {handshake_limit}")
        self.name = name
        # With -workers, several processes bind the same address; the kernel spreads the
        # connections over them (SO_REUSEPORT).
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.log = log
        self.ready = asyncio.Event()
        self.max_connections = max_connections
        self.handshake_limit = handshake_limit
        self.open = 0  # connections holding a slot (accepted, not yet over)
        self.handshaking = 0  # of those, the ones not yet through their handshake
        self.over_connection_limit = 0  # closed at accept: `max_connections` reached
        self.over_handshake_limit = 0  # closed at accept: `handshake_limit` reached
        self.accept_pauses = 0  # accepting paused for want of descriptors
        self.evicted_silent = 0  # closed in their handshake, silent, to admit a newer one
        # The slots in the handshake budget by client address, each oldest first (a dict
        # keeps insertion order).
        self._in_handshake: dict[str, dict[Slot, None]] = {}
        self._sockets: list[socket.socket] = []
        self._factory: ProtocolFactory | None = None
        self._backoff = 0.0  # the current pause (0: accepting normally)
        self._resume: asyncio.TimerHandle | None = None
        self._attaching: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it was bound in
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

    async def bind(self, factory: ProtocolFactory) -> None:
        """Listen; `port` becomes the bound port (useful with port 0).

        Every address the host resolves to is bound, as `create_server` does.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self.host or None,
            self.port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tune_listening_socket(sock)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: {exc.strerror}",
                    ) from None
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._sockets = sockets
        self._factory = factory
        self._loop = loop
        self.port = sockets[0].getsockname()[1]
        self._watch(loop)
        self.log.info("Starting listener listener=%s bind_addr=%s", self.name, self.address)
        self.ready.set()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in self._sockets:
            # As plain numbers, taken once: `socket.accept()` reads the listening socket's
            # family and type as enums for every connection it makes.
            shape = (int(sock.family), int(sock.type), sock.proto)
            loop.add_reader(sock.fileno(), self._accept_ready, sock, shape)

    def _unwatch(self, loop: asyncio.AbstractEventLoop) -> None:
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the listener was bound in, which runs its connections.

        Per connection this, not `asyncio.get_running_loop()`: on CPython 3.11 that makes a
        `getpid` system call each time, 18 per inbound connection in all before (bench/
        README.md, "The running loop looked up once per listener").
        """
        loop = self._loop
        return loop if loop is not None else asyncio.get_running_loop()

    def _accept_ready(self, sock: socket.socket, shape: tuple[int, int, int]) -> None:
        loop = self.running_loop()
        family, kind, proto = shape
        for _ in range(ACCEPT_BATCH):
            try:
                # `socket.accept()` without its conversions (the listening socket is
                # non-blocking, so it would not make the new one blocking either).
                fd, address = sock._accept()  # type: ignore[attr-defined]
                conn = socket.socket(family, kind, proto, fd)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while waiting in the backlog
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(loop, exc)
                    return
                raise
            if self._backoff:
                self.log.info(
                    "listener accepting again listener=%s pauses=%d", self.name, self.accept_pauses
                )
                self._backoff = 0.0
            self._admit(loop, conn, address)

    def _pause(self, loop: asyncio.AbstractEventLoop, exc: OSError) -> None:
        """Out of descriptors: stop watching the sockets, watch again after a backoff."""
        self.accept_pauses += 1
        self.observer.accept_paused()
        if not self._backoff:
            self.log.warning(
                "listener paused accepting: %s listener=%s open_connections=%d "
                "(retrying with backoff up to %gs)",
                exc.strerror or exc,
                self.name,
                self.open,
                ACCEPT_BACKOFF_MAX,
            )
            self._backoff = ACCEPT_BACKOFF_FIRST
        else:
            self._backoff = min(self._backoff * 2, ACCEPT_BACKOFF_MAX)
        self._unwatch(loop)
        self._resume = loop.call_later(self._backoff, self._resume_accepting, loop)

    def _resume_accepting(self, loop: asyncio.AbstractEventLoop) -> None:
        self._resume = None
        if not self._closed and self._sockets:
            self._watch(loop)

    def _admit(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, address: Any) -> None:
        """Within budget: hand `conn` to a protocol. Beyond: close it now and report it."""
        if self._closed:
            conn.close()
            return
        if self.open >= self.max_connections:
            self.over_connection_limit += 1
            self._refuse(
                conn,
                address,
                Refusal.OVER_CONNECTION_LIMIT,
                f"{self.max_connections} connections already open",
            )
            return
        if (
            self.handshake_limit
            and self.handshaking >= self.handshake_limit
            and not self._evict_silent()
        ):
            self.over_handshake_limit += 1
            self._refuse(
                conn,
                address,
                Refusal.OVER_HANDSHAKE_LIMIT,
                f"{self.handshake_limit} connections already in their handshake",
            )
            return
        source = address[0] if isinstance(address, tuple) and address else ""
        slot = Slot(self, handshaking=self.handshake_limit > 0, source=str(source))
        task = loop.create_task(self._attach(conn, slot), name=f"attach {self.name}")
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)

    def _evict_silent(self) -> bool:
        """Make room in a full handshake budget: close the oldest connection whose client
        has sent not one byte (a TLS client sends its ClientHello at once; a slowloris
        sends nothing), looking first at the client address that holds the most handshakes,
        then at the next (so one flooding address gives way to the others, and to itself,
        never the reverse). False if none of the first `EVICT_SCAN` looked at is silent."""
        victim = None
        scanned = 0
        for slots in sorted(self._in_handshake.values(), key=len, reverse=True):
            for slot in slots:
                if scanned >= EVICT_SCAN:
                    break
                scanned += 1
                if slot.silent():
                    victim = slot
                    break
            if victim is not None or scanned >= EVICT_SCAN:
                break
        if victim is None:
            return False
        victim.evict()
        self.evicted_silent += 1
        return True

    def _refuse(self, conn: socket.socket, address: Any, reason: Refusal, detail: str) -> None:
        conn.close()
        source = ""
        if isinstance(address, tuple) and len(address) >= 2:
            source = join_host_port(str(address[0]), int(address[1]))
        record = Connection(self.direction, self.name, source)
        record.refuse(reason, detail)
        record.duration = 0.0
        self.observer.finished(record)

    async def _attach(self, conn: socket.socket, slot: Slot) -> None:
        """Make the transport and protocol of an accepted socket (the protocol spawns)."""
        factory = self._factory
        assert factory is not None
        try:
            await self.running_loop().connect_accepted_socket(lambda: factory(slot), conn)
        except asyncio.CancelledError:
            slot.release()
            conn.close()
            raise
        except OSError as exc:  # the client reset it already
            slot.release()
            conn.close()
            self.log.debug("accepted connection lost before use: %s", exc)

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        transport: asyncio.BaseTransport,
        slot: Slot | None = None,
    ) -> None:
        """Handle the connection on `transport` in a tracked task.

        The transport is aborted if the listener is already closing, and if the task ends
        cancelled (a task cancelled before it first runs never reaches its own cleanup) or
        with an unexpected exception (which is logged). The slot is released when the task
        ends.
        """
        if self._closed:
            coro.close()
            transport.abort()  # type: ignore[attr-defined]
            if slot is not None:
                slot.release()
            return
        task = self.running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(_Reaper(self, transport, slot))
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
        while self._tasks or self._attaching:
            await asyncio.wait(self._tasks | self._attaching)

    def stop_accepting(self) -> None:
        """Close the listening sockets now (the address can be bound again at once).

        Connections still in the kernel's backlog are reset by the close.
        """
        if not self._sockets:
            return
        loop = asyncio.get_running_loop()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            self._unwatch(loop)
        for sock in self._sockets:
            sock.close()
        self._sockets = []
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
        if self._attaching:
            await asyncio.wait(set(self._attaching))
        if self._tasks and drain_timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.log.info("listener stopped listener=%s", self.name)
