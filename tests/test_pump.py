"""listeners.pump: the byte pipe between two real loopback connections.

Layout of every test: a client connects to a listener and the pipe takes the accepted end
as side A (as the public and upstream listeners do); the pipe dials a far-end listener and
takes that connection as side B. The test drives the client of A ("A") and the far end of B
("B") with asyncio streams or protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from listeners.pump import Pipe, PipeStats
from listeners.tls.contexts import build_contexts
from listeners.tls.engine import TLSContext
from listeners.tls.transport import TLSTransport
from proxy.devagent import DevAgent
from tests.certs import client_context, server_context

MiB = 1 << 20
RESPONSE = bytes(range(256)) * 4096  # 1 MiB, every byte value, position-dependent


@dataclass
class Ends:
    pipe: Pipe
    a_reader: asyncio.StreamReader
    a_writer: asyncio.StreamWriter
    b_reader: asyncio.StreamReader
    b_writer: asyncio.StreamWriter


async def _accept_into(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connects to a fresh listener; the accepted socket gets `protocol_factory`."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        reader, writer = await asyncio.open_connection(*lsock.getsockname()[:2])
        sock, _ = await loop.sock_accept(lsock)
    await loop.connect_accepted_socket(protocol_factory, sock)
    return reader, writer


async def _dial_from(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`protocol_factory` dials a fresh listener; the accepted end is returned as streams."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        await loop.create_connection(protocol_factory, *lsock.getsockname()[:2])
        sock, _ = await loop.sock_accept(lsock)
    return await asyncio.open_connection(sock=sock)


async def _finish(pipe: Pipe, *writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
    try:
        async with asyncio.timeout(2):
            await asyncio.shield(pipe.done)
    except TimeoutError:
        pipe.abort()
        async with asyncio.timeout(2):
            await asyncio.shield(pipe.done)
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def plain_pipe(**kwargs: float) -> AsyncIterator[Ends]:
    pipe = Pipe(**kwargs)
    a_reader, a_writer = await _accept_into(lambda: pipe.a)
    b_reader, b_writer = await _dial_from(lambda: pipe.b)
    pipe.start()
    try:
        yield Ends(pipe, a_reader, a_writer, b_reader, b_writer)
    finally:
        await _finish(pipe, a_writer, b_writer)


async def test_bytes_flow_both_ways_and_are_counted() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        for round_ in (1, 2):
            e.a_writer.write(b"ping 1\n")
            assert await e.b_reader.readexactly(7) == b"ping 1\n"
            e.b_writer.write(b"ping 2\n")
            assert await e.a_reader.readexactly(7) == b"ping 2\n"
            assert e.pipe.stats == PipeStats(a_to_b=7 * round_, b_to_a=7 * round_)


async def test_bytes_and_eof_sent_before_start_reach_the_far_end() -> None:
    # The upstream listener's case: side A is the accepted connection from its first byte,
    # and side B exists only once the upstream has been dialled.
    pipe = Pipe()
    a_reader, a_writer = await _accept_into(lambda: pipe.a)
    b_writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(5):
            a_writer.write(b"sent with the connect")
            a_writer.write_eof()
            await a_writer.drain()
            b_reader, b_writer = await _dial_from(lambda: pipe.b)
            pipe.start()
            assert await b_reader.read() == b"sent with the connect"  # then EOF
            b_writer.write(b"reply")
            assert await a_reader.readexactly(5) == b"reply"
            assert pipe.stats == PipeStats(a_to_b=21, b_to_a=5)
    finally:
        await _finish(pipe, *([a_writer] if b_writer is None else [a_writer, b_writer]))


async def test_large_transfer_arrives_intact() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        payload = RESPONSE * 4

        async def send() -> None:
            e.a_writer.write(payload)
            await e.a_writer.drain()

        sender = asyncio.create_task(send())
        assert await e.b_reader.readexactly(len(payload)) == payload
        await sender
        assert e.pipe.stats.a_to_b == len(payload)


async def test_half_close_keeps_the_response_flowing() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        request = b"GET / HTTP/1.0\r\n\r\n"
        e.a_writer.write(request)
        e.a_writer.write_eof()

        # B sees the whole request, then EOF...
        assert await e.b_reader.read() == request
        assert e.b_reader.at_eof()
        # ...and still answers after it.
        e.b_writer.write(RESPONSE)
        await e.b_writer.drain()
        e.b_writer.write_eof()

        assert await e.a_reader.read() == RESPONSE  # all of it, then EOF
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=len(request), b_to_a=len(RESPONSE))
        assert e.pipe.error is None


async def test_half_close_from_the_far_end_keeps_the_request_flowing() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        e.b_writer.write(b"220 banner\r\n")
        e.b_writer.write_eof()
        assert await e.a_reader.read() == b"220 banner\r\n"

        e.a_writer.write(b"QUIT\r\n")
        e.a_writer.write_eof()
        assert await e.b_reader.read() == b"QUIT\r\n"
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=6, b_to_a=12)


async def test_reset_on_one_side_closes_the_other_and_resolves_done() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        e.a_writer.write(b"hello")
        assert await e.b_reader.readexactly(5) == b"hello"
        # B goes away abruptly: SO_LINGER 0 makes the close a TCP RST.
        sock = e.b_writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        e.b_writer.transport.abort()

        assert await e.a_reader.read() == b""  # A is closed for it, after a clean flush
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=5, b_to_a=0)
        assert isinstance(e.pipe.error, ConnectionError)


async def test_client_closing_fully_ends_the_pipe_once_the_far_end_closes() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        e.a_writer.write(b"bye")
        e.a_writer.close()
        assert await e.b_reader.read() == b"bye"
        e.b_writer.close()
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=3, b_to_a=0)


async def test_abort_cuts_both_sides() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        e.a_writer.write(b"x")
        assert await e.b_reader.readexactly(1) == b"x"

        e.pipe.abort()

        for reader in (e.a_reader, e.b_reader):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=1, b_to_a=0)


async def test_close_is_idempotent_and_flushes() -> None:
    async with asyncio.timeout(5), plain_pipe() as e:
        e.a_writer.write(RESPONSE)
        await e.a_writer.drain()
        assert await e.b_reader.readexactly(len(RESPONSE)) == RESPONSE
        e.pipe.close()
        e.pipe.close()
        assert await e.b_reader.read() == b""
        assert await e.a_reader.read() == b""
        await e.pipe.done


async def test_reading_from_a_pauses_while_b_does_not_read() -> None:
    # At most the high-water mark plus one read's worth should ever wait in B's buffer.
    limit = 1 * MiB
    chunk = b"x" * (256 * 1024)
    async with asyncio.timeout(10), plain_pipe() as e:
        # asyncio's or uvloop's TCP transport (uvloop's is no asyncio.Transport subclass).
        b_transport: Any = e.pipe.b.transport
        a_transport: Any = e.pipe.a.transport
        assert b_transport is not None and a_transport is not None
        written = 0
        stalled = False
        for _ in range(256):  # at most 64 MiB
            e.a_writer.write(chunk)
            written += len(chunk)
            try:
                await asyncio.wait_for(e.a_writer.drain(), 0.25)
            except TimeoutError:
                stalled = True  # A's own buffers are full: the pipe stopped reading it
                break
            assert b_transport.get_write_buffer_size() < limit
        assert stalled, f"wrote {written} bytes without ever filling A's send buffer"
        assert not a_transport.is_reading()
        assert b_transport.get_write_buffer_size() < limit
        assert e.a_writer.transport.get_write_buffer_size() > 0
        assert e.pipe.stats.a_to_b < written

        # B reads again: everything arrives and the pipe reads A again.
        drained = asyncio.create_task(e.a_writer.drain())
        received = 0
        while received < written:
            data = await e.b_reader.read(MiB)
            assert data and set(data) == {ord("x")}
            received += len(data)
        await drained
        assert received == written
        assert e.pipe.stats.a_to_b == written
        assert a_transport.is_reading()


# -- with TLSTransport on side A ----------------------------------------------------------


class Collector(asyncio.Protocol):
    """An app protocol over a client TLSTransport: keeps what arrives, resolves on EOF."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: TLSTransport | None = None
        self.data = bytearray()
        self.eof: asyncio.Future[bytes] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_exception(ConnectionError(f"lost before EOF: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(exc)


@dataclass
class TLSEnds:
    pipe: Pipe
    client: TLSTransport  # A: the mTLS client
    app: Collector
    b_reader: asyncio.StreamReader
    b_writer: asyncio.StreamWriter


def _contexts(agent: DevAgent) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = agent.state.ca
    roots = [r.cert_pem for r in ca.roots]
    db = ca.sign_leaf("db", datacenter="dc1")
    web = ca.sign_leaf("web", datacenter="dc1")
    return (
        server_context(db.cert_pem, db.private_key_pem, roots),
        client_context(web.cert_pem, web.private_key_pem, roots),
    )


def _engine_contexts(agent: DevAgent, engine: str) -> tuple[TLSContext, TLSContext]:
    """The product's contexts (listeners.tls.contexts) of `engine`: db serves, web dials."""
    ca = agent.state.ca
    roots = [r.cert_pem for r in ca.roots]
    db = ca.sign_leaf("db", datacenter="dc1")
    web = ca.sign_leaf("web", datacenter="dc1")
    return (
        build_contexts(roots, db.cert_pem, db.private_key_pem, engine)[0],
        build_contexts(roots, web.cert_pem, web.private_key_pem, engine)[1],
    )


@contextlib.asynccontextmanager
async def tls_pipe(agent: DevAgent, engine: str) -> AsyncIterator[TLSEnds]:
    loop = asyncio.get_running_loop()
    server_ctx, client_ctx = _engine_contexts(agent, engine)
    pipe = Pipe()
    client = TLSTransport(client_ctx, server_side=False)
    server = TLSTransport(server_ctx, server_side=True)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        await loop.create_connection(lambda: client, *lsock.getsockname()[:2])
        sock, _ = await loop.sock_accept(lsock)
    await loop.connect_accepted_socket(lambda: server, sock)
    app = Collector()
    b_writer: asyncio.StreamWriter | None = None
    try:
        await asyncio.gather(server.handshake(5), client.handshake(5))
        server.attach(pipe.a)
        client.attach(app)
        client.resume_reading()
        b_reader, b_writer = await _dial_from(lambda: pipe.b)
        pipe.start()
        yield TLSEnds(pipe, client, app, b_reader, b_writer)
    finally:
        client.close()
        if b_writer is not None:
            await _finish(pipe, b_writer)
        else:
            server.abort()
        async with asyncio.timeout(2):
            await app.lost


@pytest.mark.tls_engines()
async def test_tls_side_half_close_keeps_the_response_flowing(
    agent: DevAgent, tls_engine: str
) -> None:
    async with asyncio.timeout(5), tls_pipe(agent, tls_engine) as e:
        request = b"GET / HTTP/1.0\r\n\r\n"
        e.client.write(request)
        e.client.write_eof()  # close_notify; the client keeps reading

        assert await e.b_reader.read() == request
        e.b_writer.write(RESPONSE)
        await e.b_writer.drain()
        e.b_writer.write_eof()

        assert await e.app.eof == RESPONSE
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=len(request), b_to_a=len(RESPONSE))


@pytest.mark.tls_engines()
async def test_far_end_half_close_reaches_the_tls_client_as_close_notify(
    agent: DevAgent, tls_engine: str
) -> None:
    async with asyncio.timeout(5), tls_pipe(agent, tls_engine) as e:
        e.b_writer.write(b"220 banner\r\n")
        e.b_writer.write_eof()
        assert await e.app.eof == b"220 banner\r\n"

        # The TLS client's write side is still open after it received close_notify.
        e.client.write(b"QUIT\r\n")
        e.client.write_eof()
        assert await e.b_reader.read() == b"QUIT\r\n"
        stats = await e.pipe.done
        assert stats == PipeStats(a_to_b=6, b_to_a=12)


@pytest.mark.tls_engines()
@pytest.mark.parametrize("size", [1, 64 * 1024, 3 * MiB])
async def test_tls_side_carries_bytes_both_ways(
    agent: DevAgent, size: int, tls_engine: str
) -> None:
    payload = (RESPONSE * 3)[:size]
    async with asyncio.timeout(5), tls_pipe(agent, tls_engine) as e:
        e.client.write(payload)
        assert await e.b_reader.readexactly(size) == payload
        e.b_writer.write(payload)
        await e.b_writer.drain()
        e.b_writer.write_eof()
        assert await e.app.eof == payload
        assert e.pipe.stats == PipeStats(a_to_b=size, b_to_a=size)


async def test_eof_towards_a_side_that_cannot_half_close_closes_after_the_close_timeout(
    agent: DevAgent,
) -> None:
    # Side B is asyncio's own TLS transport, which cannot write_eof(): the pipe lets the
    # other direction finish for `close_timeout`, then closes both sides.
    loop = asyncio.get_running_loop()
    server_ctx, client_ctx = _contexts(agent)
    far: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = loop.create_future()

    async def on_far(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        far.set_result((reader, writer))

    server = await asyncio.start_server(on_far, "127.0.0.1", 0, ssl=server_ctx)
    close_timeout = 0.1
    pipe = Pipe(close_timeout=close_timeout)
    a_reader, a_writer = await _accept_into(lambda: pipe.a)
    b_writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(5):
            host, port = server.sockets[0].getsockname()[:2]
            # Handed to the pipe once both ends completed the handshake: asyncio's (and
            # uvloop's) TLS transport holds back its Finished while the protocol has paused
            # reading, and the pipe's sides pause reading in connection_made().
            b_transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=client_ctx, server_hostname=None
            )
            b_reader, b_writer = await far
            b_transport.set_protocol(pipe.b)
            pipe.b.connection_made(b_transport)
            assert not b_transport.can_write_eof()
            pipe.start()

            a_writer.write(b"req")
            a_writer.write_eof()
            eof_at = loop.time()
            assert await b_reader.readexactly(3) == b"req"
            b_writer.write(b"resp")  # still carried: the pipe waits before closing
            assert await a_reader.readexactly(4) == b"resp"

            assert await a_reader.read() == b""
            stats = await pipe.done
            # (uvloop's clock has millisecond steps, cached per loop iteration)
            assert loop.time() - eof_at >= close_timeout - 0.005
            assert stats == PipeStats(a_to_b=3, b_to_a=4)
            assert await b_reader.read() == b""  # B got close_notify
    finally:
        writers = [a_writer] if b_writer is None else [a_writer, b_writer]
        await _finish(pipe, *writers)
        server.close()
        await server.wait_closed()
