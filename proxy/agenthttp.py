"""KeepAlivePool: persistent HTTP/1.1 connections to the local agent for per-connection calls.

Why not httpx here: every inbound connection costs one authorize call, and through httpx
that call took about half of the proxy's CPU per connection (bench/README.md: the request
and response models, the pool's socket-readability `poll()` before each reuse, the
anyio-style locks). This pool does only what that call needs: an idle keep-alive
connection is taken (or one is opened), one request is written, one response is parsed
with `h11`, and the connection goes back to the idle list.

Rule 1: a request sent on a reused connection that the agent had already closed (an idle
keep-alive timeout) is sent once more on a new connection, and only when no byte of a
response had arrived; a second failure is the caller's error.
Rule 2: nothing here logs; headers (the ACL token among them) never appear in an error text.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import h11

# Idle connections kept per pool. Connections beyond it (a burst of concurrent calls) are
# closed once their response is read.
MAX_IDLE = 32


class PoolClosed(ConnectionError):
    """The pool was closed."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, parsed by h11."""

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[RawResponse] | None = None
        self.got_bytes = False
        self.lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they provide its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self._feed(data)

    def eof_received(self) -> bool:
        self._feed(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        self._fail(exc or ConnectionResetError("the agent closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
            # Read here, so a failure nobody awaits any more never logs "never retrieved".
            self.answer.exception()

    def _feed(self, data: bytes) -> None:
        try:
            self.h11.receive_data(data)
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Response):
                    self._status = event.status_code
                    self._headers = {
                        k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers
                    }
                elif isinstance(event, h11.Data):
                    self._body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    response = RawResponse(self._status, self._headers, b"".join(self._body))
                    self._body = []
                    if self.answer is not None and not self.answer.done():
                        self.answer.set_result(response)
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    self._fail(ConnectionResetError("the agent closed the connection"))
                    return
        except h11.RemoteProtocolError as exc:
            self._fail(ConnectionError(f"invalid HTTP response from the agent: {exc}"))
            self.close()

    def reusable(self) -> bool:
        if self.lost or self.transport is None or self.transport.is_closing():
            return False
        if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        self.got_bytes = False
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


Opener = Callable[[], Awaitable[tuple[asyncio.BaseTransport, _Connection]]]


class KeepAlivePool:
    """Keep-alive HTTP/1.1 connections to one agent address (TCP, TLS or a Unix socket)."""

    def __init__(self, open_connection: Opener, host_header: str, max_idle: int = MAX_IDLE) -> None:
        self._open = open_connection
        self._host = host_header
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._closed = False
        self.opened = 0  # connections opened so far (for tests and the benchmark)

    @classmethod
    def tcp(
        cls,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        host_header: str = "",
    ) -> KeepAlivePool:
        async def open_tcp() -> tuple[asyncio.BaseTransport, _Connection]:
            loop = asyncio.get_running_loop()
            return await loop.create_connection(
                _Connection,
                host,
                port,
                ssl=tls,
                server_hostname=(server_hostname or host) if tls is not None else None,
            )

        return cls(open_tcp, host_header or f"{host}:{port}")

    @classmethod
    def unix(cls, path: str) -> KeepAlivePool:
        async def open_unix() -> tuple[asyncio.BaseTransport, _Connection]:
            loop = asyncio.get_running_loop()
            return await loop.create_unix_connection(_Connection, path)

        return cls(open_unix, "localhost")

    async def request(
        self,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        timeout: float,
    ) -> RawResponse:
        """Send one request and read its whole response.

        Raises:
            TimeoutError: no complete response within `timeout` seconds (connecting included).
            OSError: the connection could not be opened, or broke (`ConnectionError`).
        """
        all_headers = [("Host", self._host), *headers]
        if body is not None:
            all_headers.append(("Content-Length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=all_headers)
        async with asyncio.timeout(timeout):
            conn, reused = await self._take()
            try:
                return await self._round_trip(conn, request, body)
            except ConnectionError:
                # A reused connection the agent closed while it sat idle: the request never
                # reached it, so sending it again cannot do anything twice.
                if not reused or conn.got_bytes:
                    raise
            conn, _ = await self._take()
            return await self._round_trip(conn, request, body)

    async def _round_trip(
        self, conn: _Connection, request: h11.Request, body: bytes | None
    ) -> RawResponse:
        try:
            response = await self._exchange(conn, request, body)
        except BaseException:
            conn.close()  # broken, timed out or cancelled mid-exchange: unusable
            raise
        self._give_back(conn)
        return response

    async def _take(self) -> tuple[_Connection, bool]:
        if self._closed:
            raise PoolClosed("the agent connection pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn, True
        _, conn = await self._open()
        self.opened += 1
        return conn, False

    async def _exchange(
        self, conn: _Connection, request: h11.Request, body: bytes | None
    ) -> RawResponse:
        assert conn.transport is not None
        loop = asyncio.get_running_loop()
        conn.answer = loop.create_future()
        data = conn.h11.send(request) or b""
        if body:
            data += conn.h11.send(h11.Data(data=body)) or b""
        data += conn.h11.send(h11.EndOfMessage()) or b""
        if conn.lost:
            raise ConnectionResetError("the agent closed the connection")
        conn.transport.write(data)
        try:
            return await conn.answer
        finally:
            conn.answer = None

    def _give_back(self, conn: _Connection) -> None:
        if not self._closed and len(self._idle) < self._max_idle and conn.reusable():
            self._idle.append(conn)
        else:
            conn.close()

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
