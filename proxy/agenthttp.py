"""KeepAlivePool: persistent HTTP/1.1 connections to the local agent for per-connection calls.

Why not httpx here: every inbound connection costs one authorize call, and through httpx
that call took about half of the proxy's CPU per connection (bench/README.md: the request
and response models, the pool's socket-readability `poll()` before each reuse, the
anyio-style locks). This pool does only what that call needs: an idle keep-alive
connection is taken (or one is opened), one request is written, one response is parsed
with `httptools` (llhttp, the parser uvicorn uses), and the connection goes back to the idle
list. h11 did the parsing until it showed as 138 µs per call against httptools' 9 µs
(bench/README.md, "Per-connection work, second pass").

Rule 1: a request sent on a reused connection that the agent had already closed (an idle
keep-alive timeout) is sent once more on a new connection, and only when no byte of a
response had arrived; a second failure is the caller's error.
Rule 2: nothing here logs; headers (the ACL token among them) never appear in an error text.
Rule 3: the request head is written here, from a method, a target and header values checked
once per distinct header list (`_header_block`): no line break or control character gets
into the head, and a bad one is a ValueError naming the header, never its value.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

import httptools

from proxy.deadline import Deadline

# Idle connections kept per pool. Connections beyond it (a burst of concurrent calls) are
# closed once their response is read.
MAX_IDLE = 32

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: methods, header names
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF, NUL or other controls
_TARGET = re.compile(r"[\x21-\x7e]+")  # origin-form: visible ASCII, no space


class PoolClosed(ConnectionError):
    """The pool was closed."""


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


@functools.lru_cache(maxsize=64)
def _header_block(headers: tuple[tuple[str, str], ...]) -> bytes:
    """`Name: value\\r\\n` lines, each name and value checked (Rule 3)."""
    lines = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid HTTP header name {name!r}")
        if not _FIELD_VALUE.fullmatch(value) or value != value.strip(" \t"):
            raise ValueError(
                f"invalid value of HTTP header {name}: a control character or edge space"
            )
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(lines)


def request_head(
    method: str, target: str, headers: Sequence[tuple[str, str]], length: int | None
) -> bytes:
    """The head of one HTTP/1.1 request, `Content-Length` last when there is a body.

    Raises:
        ValueError: the method, the target or a header cannot be written as given.
    """
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"invalid HTTP method {method!r}")
    if not _TARGET.fullmatch(target):
        raise ValueError("invalid HTTP request target: empty, or a space or control character")
    head = b"%s %s HTTP/1.1\r\n%s" % (
        method.encode("ascii"),
        target.encode("ascii"),
        _header_block(tuple(headers)),
    )
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    return head + b"\r\n"


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, its response parsed by httptools.

    Not for HEAD requests (the parser would wait for a body the response does not have).
    """

    def __init__(self) -> None:
        # The parser calls back into this object: dropped when the connection is lost, so
        # that the two are not a cycle left to the garbage collector.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[RawResponse] | None = None
        self.got_bytes = False
        self.lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._reading = False  # a response has begun and has not ended
        self._head_read = False  # ... and its status line and headers were read whole
        self._keep_alive = False  # the last response allows another request after it
        self._broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they provide its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.answer is None or self.answer.done():
            # Bytes nobody asked for: this connection cannot be trusted with another request.
            self._broken = True
            self.close()
            return
        if self.parser is None:
            return  # lost already
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken = True
            self._fail(ConnectionError(f"invalid HTTP response from the agent: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        if self._reading and self._until_eof():
            self._complete(keep_alive=False)  # a body delimited by the end of the connection
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.parser = None
        if not self.closed.done():
            self.closed.set_result(None)
        self._fail(exc or ConnectionResetError("the agent closed the connection"))

    # -- the parser's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading = True
        self._head_read = False
        self._headers = {}
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head_read = True

    def on_body(self, body: bytes) -> None:
        self._body.append(bytes(body))

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # called from its feed_data()
        if parser.get_status_code() < 200:
            self._reading = False  # an interim response (1xx): the real one follows
            return
        self._complete(keep_alive=parser.should_keep_alive())

    # --------------------------------------------------------------------------------------

    def _until_eof(self) -> bool:
        """The response's body ends with the connection (no length, not chunked)."""
        return (
            self._head_read
            and "content-length" not in self._headers
            and "transfer-encoding" not in self._headers
        )

    def _complete(self, *, keep_alive: bool) -> None:
        self._reading = False
        self._keep_alive = keep_alive
        assert self.parser is not None  # the connection is not lost yet
        response = RawResponse(self.parser.get_status_code(), self._headers, b"".join(self._body))
        self._body = []
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(response)
        else:  # a second response to one request: the connection cannot be trusted further
            self._broken = True
            self.close()

    def _fail(self, exc: BaseException) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
            # Read here, so a failure nobody awaits any more never logs "never retrieved".
            self.answer.exception()

    def begin(self) -> asyncio.Future[RawResponse]:
        """A request is about to be written: the future of its response."""
        self.got_bytes = False
        self._keep_alive = False
        # The loop of `closed` (made with the connection): asyncio.get_running_loop() makes
        # a system call on every call on CPython 3.11.
        self.answer = self.closed.get_loop().create_future()
        return self.answer

    def reusable(self) -> bool:
        if self.lost or self._broken or self.transport is None or self.transport.is_closing():
            return False
        return self._keep_alive and not self._reading

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
            ValueError: the method, target or a header cannot be written (Rule 3).
            TimeoutError: no complete response within `timeout` seconds (connecting included).
            OSError: the connection could not be opened, or broke (`ConnectionError`).
        """
        head = request_head(
            method, target, [("Host", self._host), *headers], None if body is None else len(body)
        )
        request = head + body if body else head
        with Deadline(timeout):
            conn, reused = await self._take()
            try:
                return await self._round_trip(conn, request)
            except ConnectionError:
                # A reused connection the agent closed while it sat idle: the request never
                # reached it, so sending it again cannot do anything twice.
                if not reused or conn.got_bytes:
                    raise
            conn, _ = await self._take()
            return await self._round_trip(conn, request)

    async def _round_trip(self, conn: _Connection, request: bytes) -> RawResponse:
        try:
            response = await self._exchange(conn, request)
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

    async def _exchange(self, conn: _Connection, request: bytes) -> RawResponse:
        assert conn.transport is not None
        answer = conn.begin()
        if conn.lost:
            raise ConnectionResetError("the agent closed the connection")
        conn.transport.write(request)
        try:
            return await answer
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
