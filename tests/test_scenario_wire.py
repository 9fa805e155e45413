"""Wire-level settings of the proxy: TLS versions and ciphers, SNI, socket options, IPv6,
and graceful shutdown. On both TLS engines (the peers are CPython's ssl)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import ssl
import warnings

import pytest

from listeners.serve import Listener, Slot
from listeners.sockets import is_loopback, tune_accepted, tune_socket
from listeners.tls.contexts import build_contexts
from proxy.config import ProxyConfig, PublicListenerConfig
from proxy.demo import ReservedPorts
from proxy.devagent import DevAgent
from tests.proxyfix import client_ctx, db_sidecar, echo_app, running_proxy, tls_exchange

pytestmark = pytest.mark.tls_engines()


async def _handshake_ok(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None)
    except (ssl.SSLError, ConnectionError):
        return False
    writer.close()
    with contextlib.suppress(ssl.SSLError, OSError):
        await writer.wait_closed()
    return True


async def test_tls_12_with_consul_ciphers_only(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        port = db.public.port
        ctx = client_ctx(agent, "web")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        assert await _handshake_ok(port, ctx)
        ctx = client_ctx(agent, "web")
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-ECDSA-AES256-SHA384")  # CBC: not in Consul's list
        assert not await _handshake_ok(port, ctx)


async def test_tls_below_12_is_refused(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        ctx = client_ctx(agent, "web")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.1 on purpose
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        assert not await _handshake_ok(db.public.port, ctx)


async def test_upstream_dial_sends_no_sni(agent: DevAgent, tls_engine: str) -> None:
    from tests.proxyfix import local_port, plain_exchange, upstream

    seen: list[object] = []
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None and db.tls.material is not None
        # A server context that records the SNI of each ClientHello, swapped in as a
        # rotation would (a context is not changed once it has served a connection).
        leaf = agent.state.ca.sign_leaf("db", datacenter="dc1")
        roots = [r.cert_pem for r in agent.state.ca.roots]
        server, _ = build_contexts(roots, leaf.cert_pem, leaf.private_key_pem, tls_engine)
        if isinstance(server, ssl.SSLContext):

            def record(sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
                seen.append(name)

            server.sni_callback = record
        else:
            server.set_tlsext_servername_callback(lambda conn: seen.append(conn.get_servername()))
        db.tls.material = dataclasses.replace(db.tls.material, server=server)
        async with running_proxy(
            agent, ProxyConfig(service="web", upstreams=(upstream("db"),))
        ) as web:
            assert await plain_exchange(local_port(web), b"sni?") == b"sni?"
    assert seen == [None]


async def test_sockets_get_nodelay_and_keepalive() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        tune_socket(writer.transport)
        sock = writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 15
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_accepted_connections_get_nodelay_and_keepalive() -> None:
    """Set once on the listening socket, inherited by each accepted one (on Linux; elsewhere
    `tune_accepted` sets them per connection)."""
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[tuple[int, int, int]] = loop.create_future()

    class Probe(asyncio.Protocol):
        def __init__(self, slot: Slot) -> None:
            self.slot = slot

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            tune_accepted(transport)
            sock = transport.get_extra_info("socket")
            idle = (
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                if hasattr(socket, "TCP_KEEPIDLE")
                else 15
            )
            seen.set_result(
                (
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    idle,
                )
            )
            transport.close()
            self.slot.release()

    listener = Listener("probe", "127.0.0.1", 0, logging.getLogger("test.probe"))
    await listener.bind(Probe)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        assert await asyncio.wait_for(seen, 10) == (1, 1, 15)
        writer.close()
    finally:
        await listener.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("::", False),
        ("app.internal", False),  # names other than localhost are not resolved
        ("", False),
    ],
)
def test_which_app_hosts_are_loopback(host: str, loopback: bool) -> None:
    # The app dial leaves keepalive off on loopback only (listeners/public.py).
    assert is_loopback(host) is loopback


def test_a_reserved_port_is_held_on_every_address_yet_a_listener_can_take_it() -> None:
    """`ReservedPorts` holds the wildcard: a socket bound to another loopback address cannot
    take the port (one from 127.0.0.2 once did, and the sidecar's bind on 0.0.0.0 failed),
    while a listener binding with SO_REUSEADDR, as the proxy's do, still can."""
    ports = ReservedPorts()
    try:
        port = ports.take()
        with socket.socket() as other, pytest.raises(OSError) as caught:
            other.bind(("127.0.0.2", port))
        assert caught.value.errno == errno.EADDRINUSE
        for host in ("0.0.0.0", "127.0.0.1"):
            with socket.socket() as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, port))
                listener.listen()
    finally:
        ports.release()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_local_app_on_ipv6(agent: DevAgent) -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(100))
        await w.drain()
        w.close()

    app = await asyncio.start_server(echo, "::1", 0)
    port = app.sockets[0].getsockname()[1]
    try:
        cfg = ProxyConfig(
            service="db",
            public_listener=PublicListenerConfig(
                bind_address="127.0.0.1", local_service_host="::1", local_service_port=port
            ),
        )
        async with running_proxy(agent, cfg) as db:
            assert db.public is not None
            assert await tls_exchange(db.public.port, client_ctx(agent, "web"), b"v6") == b"v6"
    finally:
        app.close()
        await app.wait_closed()


async def test_close_drains_active_connections_then_cuts_the_rest(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        ctx = client_ctx(agent, "web")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", db.public.port, ssl=ctx, server_hostname=None
        )
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        # Closing stops accepting at once; the open connection is given the drain timeout,
        # and cut when it passes.
        closing = asyncio.create_task(db.close(drain_timeout=0.3))
        async with asyncio.timeout(5):
            await db.public.until_idle()
            await closing
        assert not await _handshake_ok(db.public.port, ctx)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await reader.read(10) == b""
        writer.close()


async def test_close_waits_for_a_connection_that_finishes_in_time(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        ctx = client_ctx(agent, "web")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", db.public.port, ssl=ctx, server_hostname=None
        )
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        closing = asyncio.create_task(db.close(drain_timeout=30))
        # The connection still works while the proxy drains...
        writer.write(b"y")
        assert await reader.readexactly(1) == b"y"
        assert not closing.done()
        # ...and the close completes as soon as it ends, long before the drain timeout.
        writer.close()
        async with asyncio.timeout(5):
            await closing
