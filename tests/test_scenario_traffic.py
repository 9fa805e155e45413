"""Traffic through both sidecars: half-close, large transfers both ways, many connections."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from proxy.config import ProxyConfig
from proxy.devagent import DevAgent
from proxy.supervisor import Proxy
from tests.proxyfix import (
    EchoApp,
    db_sidecar,
    echo_app,
    local_port,
    plain_exchange,
    running_proxy,
    upstream,
)


@contextlib.asynccontextmanager
async def mesh(agent: DevAgent, app: EchoApp) -> AsyncIterator[tuple[Proxy, Proxy]]:
    async with (
        db_sidecar(agent, app) as db,
        running_proxy(agent, ProxyConfig(service="web", upstreams=(upstream("db"),))) as web,
    ):
        yield web, db


async def test_response_after_client_half_close_arrives_whole(agent: DevAgent) -> None:
    """The client sends a request and shuts down its write side; the app answers only after
    it has seen EOF. Consul's Go proxy closes both sides on the first EOF and loses this."""

    async def digest_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until EOF: only possible if the EOF was propagated
        writer.write(hashlib.sha256(data).hexdigest().encode() * 2000)  # a 128 KB answer
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(digest_app, "127.0.0.1", 0)
    app = EchoApp(server=server, port=server.sockets[0].getsockname()[1])
    try:
        async with mesh(agent, app) as (web, _):
            request = os.urandom(300_000)
            answer = await plain_exchange(local_port(web), request, half_close=True)
            assert answer == hashlib.sha256(request).hexdigest().encode() * 2000
    finally:
        server.close()
        await server.wait_closed()


async def test_16_mib_each_way_at_once(agent: DevAgent) -> None:
    size = 16 << 20
    payload = os.urandom(size)
    async with echo_app() as app, mesh(agent, app) as (web, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", local_port(web))

        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, size, 1 << 20):
                writer.write(view[i : i + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        async def receive() -> str:
            digest = hashlib.sha256()
            got = 0
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                got += len(chunk)
            assert got == size
            return digest.hexdigest()

        try:
            async with asyncio.timeout(60):
                _, received = await asyncio.gather(send(), receive())
        finally:
            writer.close()
        assert received == hashlib.sha256(payload).hexdigest()
        (listener,) = web.upstreams.values()
        async with asyncio.timeout(5):
            await listener.until_idle()  # totals are recorded when both ends have closed
        assert listener.bytes_out == size and listener.bytes_in == size


async def test_500_concurrent_connections(agent: DevAgent) -> None:
    # The app, both proxies and the 500 clients share this one event loop. On a loaded
    # machine one turn of it (hundreds of handshakes) can outlast Consul's 1 s default for
    # the app dial, which then refuses a connection: the deadline of the machine, not of the
    # proxy. Concurrency is the subject here; the app dial's deadline has tests of its own.
    async with (
        echo_app() as app,
        db_sidecar(agent, app, local_connect_timeout=10.0) as db,
        running_proxy(agent, ProxyConfig(service="web", upstreams=(upstream("db"),))) as web,
    ):
        port = local_port(web)
        opened = asyncio.Event()
        release = asyncio.Event()
        count = 500
        state = {"open": 0}

        async def one(i: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                message = f"conn {i}\n".encode()
                writer.write(message)
                echoed = await reader.readexactly(len(message))
                state["open"] += 1
                if state["open"] == count:
                    opened.set()
                await release.wait()  # hold every connection open at the same time
                return echoed
            finally:
                writer.close()

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        all_open = asyncio.create_task(opened.wait())
        try:
            async with asyncio.timeout(50):
                # Until every connection is open, or one has failed: a failure ends the test
                # at once, with its error, instead of leaving the rest to wait for the timeout.
                await asyncio.wait([all_open, *tasks], return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task.done():
                        task.result()
                assert app.connections == count
                assert db.public is not None and db.public.active == count
                release.set()
                results = await asyncio.gather(*tasks)
        finally:
            release.set()
            for pending in (all_open, *tasks):
                pending.cancel()
            await asyncio.gather(all_open, *tasks, return_exceptions=True)
        assert results == [f"conn {i}\n".encode() for i in range(count)]


# Where the objects of a proxied connection come from: the proxy's code (not the in-process
# dev agent's, which is another program) and the TLS libraries.
_PROXY_MODULES = ("listeners.", "proxy.", "OpenSSL.", "ssl")


def _proxy_garbage() -> Counter[str]:
    return Counter(
        f"{type(o).__module__}.{type(o).__qualname__}"
        for o in gc.garbage
        if type(o).__module__.startswith(_PROXY_MODULES)
        and not type(o).__module__.startswith("proxy.devagent")
    )


@pytest.mark.tls_engines()
async def test_finished_connections_are_freed_without_the_garbage_collector(
    agent: DevAgent, tls_engine: str
) -> None:
    """A connection's objects on both proxies (pipe, sides, transports, TLS engine, the
    agent pool's connections) form no reference cycle once it is over, so reference
    counting frees them at once. Left in cycles, each waited for the cyclic collector, whose
    passes then also walked every live connection (bench/README.md, "Connections freed
    without the collector")."""
    async with echo_app() as app, mesh(agent, app) as (web, db):
        port = local_port(web)
        (outbound,) = web.upstreams.values()
        assert db.public is not None
        # The first connection fills what lives on: the agent pool, the upstream's session.
        assert await plain_exchange(port, b"warm-up") == b"warm-up"
        async with asyncio.timeout(10):
            await outbound.until_idle()
            await db.public.until_idle()
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage
        try:
            for n in range(5):
                payload = os.urandom(1000 * (n + 1))
                assert await plain_exchange(port, payload) == payload
            async with asyncio.timeout(10):
                await outbound.until_idle()
                await db.public.until_idle()
            gc.collect()
            left = _proxy_garbage()
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert not left, f"objects of finished connections left to the collector: {dict(left)}"
