"""proxy.agenthttp.KeepAlivePool: reuse, bursts, stale keep-alives, broken and slow agents.

Every server here is a real one on 127.0.0.1 (or a Unix socket): a small asyncio server whose
behaviour each test scripts at the byte level, the dev agent, or aiohttp over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from proxy.agent import AgentClient
from proxy.agenthttp import KeepAlivePool, PoolClosed
from proxy.answers import AuthorizeResult
from proxy.devagent import DevAgent
from proxy.errors import AgentUnavailable
from proxy.httpflags import HTTPOptions

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer:
    """Accepts connections and runs `script` on each; counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests = 0
        self._counted = asyncio.Condition()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request's head and body (by Content-Length), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        async with self._counted:
            self.requests += 1
            self._counted.notify_all()
        return head + body

    async def until_requests(self, count: int) -> None:
        """Return once `count` requests have arrived (bound it with a timeout)."""
        async with self._counted:
            await self._counted.wait_for(lambda: self.requests >= count)

    async def start(self) -> None:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.append(writer)
            try:
                await self.script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[tuple[ScriptedServer, KeepAlivePool]]:
    server = ScriptedServer(script)
    await server.start()
    pool = KeepAlivePool.tcp("127.0.0.1", server.port)
    try:
        yield server, pool
    finally:
        await pool.aclose()
        await server.close()


async def _get(pool: KeepAlivePool, timeout: float = 5.0) -> bytes:
    response = await pool.request("GET", "/v1/x", [], None, timeout)
    assert response.status == 200
    return response.body


async def test_sequential_calls_share_one_connection() -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            writer.write(OK)

    async with scripted(keep_alive) as (server, pool):
        for _ in range(20):
            assert await _get(pool) == b"{}"
        assert server.connections == 1 and server.requests == 20
        assert pool.opened == 1 and pool.idle == 1


async def test_a_burst_opens_connections_and_keeps_at_most_max_idle() -> None:
    gate = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            await gate.wait()
            writer.write(OK)

    server = ScriptedServer(slow)
    await server.start()
    pool = KeepAlivePool(KeepAlivePool.tcp("127.0.0.1", server.port)._open, "x", max_idle=4)
    try:
        calls = [asyncio.create_task(_get(pool)) for _ in range(10)]
        async with asyncio.timeout(5):
            await server.until_requests(10)
        gate.set()
        assert await asyncio.gather(*calls) == [b"{}"] * 10
        assert pool.opened == 10 and pool.idle == 4
        # The kept connections serve the next calls.
        await asyncio.gather(*(_get(pool) for _ in range(4)))
        assert pool.opened == 10
    finally:
        await pool.aclose()
        await server.close()


async def test_a_keep_alive_the_agent_closed_is_retried_on_a_new_connection() -> None:
    async def one_request_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # Answers as if keeping the connection, then drops it: an idle timeout.
        if await server.read_request(reader) is not None:
            writer.write(OK)
            await writer.drain()

    async with scripted(one_request_per_connection) as (server, pool):
        assert await _get(pool) == b"{}"
        first = weakref.ref(pool._idle[0])
        # Once the idle connection has seen the close, it is not taken again.
        async with asyncio.timeout(5):
            await pool._idle[0].closed
        # The parser calls back into its connection: the two must not stay a cycle once the
        # connection is lost, or every retired connection waits for the cyclic collector.
        gc.disable()
        try:
            assert await _get(pool) == b"{}"  # takes the lost one out of the pool, drops it
            assert first() is None, "the lost connection is still alive: a reference cycle"
        finally:
            gc.enable()
        assert server.requests == 2 and pool.opened == 2


async def test_a_stale_connection_that_looked_alive_is_retried_once() -> None:
    # The agent closes right after reading the second request: the request was sent on a
    # reused connection and no response byte came back, so it goes out once more.
    async def close_on_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await server.read_request(reader) is not None:
            n += 1
            if n == 2 and server.connections == 1:
                return
            writer.write(OK)

    async with scripted(close_on_second) as (server, pool):
        assert await _get(pool) == b"{}"
        assert await _get(pool) == b"{}"
        assert server.connections == 2 and server.requests == 3


async def test_a_response_cut_short_is_an_error_and_not_retried() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is not None:
            writer.write(OK[:30])
            await writer.drain()

    async with scripted(half) as (server, pool):
        with pytest.raises(ConnectionError):
            await _get(pool)
        assert server.requests == 1 and pool.idle == 0


async def test_connection_close_answers_are_not_reused() -> None:
    async def close_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\ntrue")
            await writer.drain()
            # Keep our side open: the client must not wait for it to close.
            await reader.read()

    async with scripted(close_each) as (server, pool):
        assert await _get(pool) == b"true"
        assert await _get(pool) == b"true"
        assert server.connections == 2 and pool.idle == 0


async def test_chunked_and_split_responses_are_read_whole() -> None:
    body = json.dumps({"Authorized": True, "Reason": "x" * 3000}).encode()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(body), 1000):
                piece = body[i : i + 1000]
                raw += b"%x\r\n%s\r\n" % (len(piece), piece)
            raw += b"0\r\n\r\n"
            for i in range(0, len(raw), 7):  # in small TCP writes
                writer.write(raw[i : i + 7])
                await writer.drain()

    async with scripted(chunked) as (server, pool):
        assert await _get(pool) == body
        assert await _get(pool) == body
        assert pool.opened == 1


async def test_a_body_ended_by_the_close_is_read_whole_and_not_reused() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is not None:
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a":')
            await writer.drain()
            writer.write(b"1}")
            writer.write_eof()
            await reader.read()

    async with scripted(until_close) as (server, pool):
        assert await _get(pool) == b'{"a":1}'
        assert await _get(pool) == b'{"a":1}'
        assert server.connections == 2 and pool.idle == 0


async def test_an_interim_response_is_skipped() -> None:
    async def interim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await server.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)

    async with scripted(interim) as (server, pool):
        assert await _get(pool) == b"{}"
        assert await _get(pool) == b"{}"
        assert pool.opened == 1


async def test_bytes_nobody_asked_for_retire_the_connection() -> None:
    closed_by_client = asyncio.Event()

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await server.read_request(reader) is not None:
            writer.write(OK)
            await writer.drain()
            writer.write(OK)  # a second answer to a question never asked
            if await server.read_request(reader) is None:
                closed_by_client.set()
        while await server.read_request(reader) is not None:
            writer.write(OK)

    async with scripted(chatty) as (server, pool):
        assert await _get(pool) == b"{}"
        await asyncio.wait_for(closed_by_client.wait(), 5)
        assert await _get(pool) == b"{}"
        assert server.connections == 2


@pytest.mark.parametrize(
    ("headers", "target", "words"),
    [
        ([("X-Consul-Token", "secret\r\nX-Evil: 1")], "/v1/x", "HTTP header X-Consul-Token"),
        ([("X-Consul-Token", "secret\n")], "/v1/x", "HTTP header X-Consul-Token"),
        ([("Bad Name", "v")], "/v1/x", "invalid HTTP header name 'Bad Name'"),
        ([], "/v1/x y", "invalid HTTP request target"),
        ([], "/v1/x\r\nHost: evil", "invalid HTTP request target"),
    ],
)
async def test_a_head_that_cannot_be_written_is_refused_without_its_value(
    headers: list[tuple[str, str]], target: str, words: str
) -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with scripted(never) as (server, pool):
        with pytest.raises(ValueError, match=re.escape(words)) as caught:
            await pool.request("GET", target, headers, None, 5)
        assert "secret" not in str(caught.value)
        assert server.requests == 0


async def test_a_slow_agent_times_out_and_the_connection_is_dropped() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    async with scripted(silent) as (server, pool):
        with pytest.raises(TimeoutError):
            await _get(pool, timeout=0.2)
        assert pool.idle == 0


async def test_garbage_is_a_connection_error_naming_the_problem() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(garbage) as (server, pool):
        with pytest.raises(ConnectionError, match="invalid HTTP response from the agent"):
            await _get(pool)


async def test_a_refused_connection_raises_and_a_closed_pool_refuses() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        pool = KeepAlivePool.tcp("127.0.0.1", port)
        with pytest.raises(ConnectionRefusedError):
            await _get(pool)
    await pool.aclose()
    with pytest.raises(PoolClosed):
        await _get(pool)


async def test_request_shape_on_the_wire() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await server.read_request(reader)) is not None:
            seen.append(request)
            writer.write(OK)

    async with scripted(record) as (server, pool):
        await pool.request(
            "POST", "/v1/agent/connect/authorize", [("X-Consul-Token", "t")], b'{"a":1}\n', 5
        )
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/agent/connect/authorize HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers[b"host"] == f"127.0.0.1:{server.port}".encode()
    assert headers[b"x-consul-token"] == b"t"
    assert headers[b"content-length"] == b"8"
    assert body == b'{"a":1}\n'


# -- through AgentClient, against real agents -----------------------------------------------


async def test_authorize_calls_reuse_one_connection_to_the_dev_agent(agent: DevAgent) -> None:
    client = AgentClient(HTTPOptions(address=agent.http_addr))
    try:
        for _ in range(10):
            answer = await client.authorize(
                "db", f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/web", "01"
            )
            assert answer.allowed is True
        assert client.pool.opened == 1
    finally:
        await client.aclose()


async def test_authorize_over_a_unix_socket(tmp_path: Path) -> None:
    async def allow(request: web.Request) -> web.Response:
        return web.json_response({"Authorized": True, "Reason": request.host})

    app = web.Application()
    app.router.add_post("/v1/agent/connect/authorize", allow)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = tmp_path / "agent.sock"
    await web.UnixSite(runner, str(sock)).start()
    client = AgentClient(HTTPOptions(scheme="unix", address=str(sock)))
    try:
        answer = await client.authorize("db", "spiffe://x/ns/default/dc/dc1/svc/web", "01")
        assert answer == AuthorizeResult(True, "localhost")
    finally:
        await client.aclose()
        await runner.cleanup()


async def test_authorize_over_https_verifies_the_agent(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("consul.local")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def allow(request: web.Request) -> web.Response:
        return web.json_response({"Authorized": True, "Reason": "tls"})

    app = web.Application()
    app.router.add_post("/v1/agent/connect/authorize", allow)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await web.SockSite(runner, listener, ssl_context=server_ctx).start()
    good = AgentClient(
        HTTPOptions(
            scheme="https",
            address=f"127.0.0.1:{port}",
            ca_file=str(ca_file),
            tls_server_name="consul.local",
        )
    )
    wrong_name = AgentClient(
        HTTPOptions(scheme="https", address=f"127.0.0.1:{port}", ca_file=str(ca_file))
    )
    try:
        answer = await good.authorize("db", "spiffe://x/ns/default/dc/dc1/svc/web", "01")
        assert answer == AuthorizeResult(True, "tls")
        with pytest.raises(AgentUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await wrong_name.authorize("db", "spiffe://x/ns/default/dc/dc1/svc/web", "01")
    finally:
        await good.aclose()
        await wrong_name.aclose()
        await runner.cleanup()
