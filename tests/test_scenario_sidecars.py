"""End to end on the dev agent: a `web` sidecar with upstream `db`, a `db` sidecar, an app.
On both TLS engines."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from proxy.config import ProxyConfig
from proxy.devagent import DevAgent
from tests.certs import load_chain
from tests.proxyfix import (
    client_ctx,
    custom_leaf,
    db_sidecar,
    echo_app,
    local_port,
    plain_exchange,
    running_proxy,
    tls_exchange,
    upstream,
)

pytestmark = pytest.mark.tls_engines()


async def _deny(agent: DevAgent, source: str = "web") -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put(
            f"/v1/connect/intentions/exact?source={source}&destination=db", json={"Action": "deny"}
        )
        assert r.status_code == 200


async def test_web_to_db_through_both_sidecars(agent: DevAgent) -> None:
    async with (
        echo_app() as app,
        db_sidecar(agent, app) as db,
        running_proxy(agent, ProxyConfig(service="web", upstreams=(upstream("db"),))) as web,
    ):
        payload = b"hello through the mesh\n" * 100
        assert await plain_exchange(local_port(web), payload) == payload
        assert app.connections == 1
        assert db.public is not None and db.public.accepted.value == 1
        (listener,) = web.upstreams.values()
        assert listener.bytes_out == len(payload) and listener.bytes_in == len(payload)


async def test_denied_client_never_reaches_the_app(agent: DevAgent) -> None:
    await _deny(agent)
    async with (
        echo_app() as app,
        db_sidecar(agent, app) as db,
        running_proxy(agent, ProxyConfig(service="web", upstreams=(upstream("db"),))) as web,
    ):
        assert await plain_exchange(local_port(web), b"let me in") == b""
        # The refusal is counted before the connection is closed, which is what ended
        # the exchange above.
        assert db.public is not None and db.public.denied == 1
        assert app.connections == 0


async def test_direct_mtls_client_allowed_and_alpn_not_negotiated(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        ctx = client_ctx(agent, "web")
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", db.public.port, ssl=ctx, server_hostname=None
        )
        try:
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
            writer.write(b"Hello World")
            assert await reader.readexactly(11) == b"Hello World"
        finally:
            writer.close()


async def test_client_from_a_foreign_ca_is_rejected(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        other = DevAgent()
        ctx = client_ctx(agent, None)
        leaf = other.state.ca.sign_leaf("web", datacenter="dc1")
        load_chain(ctx, leaf.cert_pem, leaf.private_key_pem)
        assert await tls_exchange(db.public.port, ctx, b"x") == b""
        assert app.connections == 0


async def test_client_without_certificate_is_rejected(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        assert await tls_exchange(db.public.port, client_ctx(agent, None), b"x") == b""
        assert app.connections == 0


async def test_client_leaf_without_uri_san_is_rejected(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        ctx = client_ctx(agent, None)
        cert, key = custom_leaf(agent, serial=77, uri=None, cn="web")
        load_chain(ctx, cert, key)
        assert await tls_exchange(db.public.port, ctx, b"x") == b""
        assert db.public.denied == 1
        assert app.connections == 0


async def test_intention_change_applies_to_new_connections_only(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        ctx = client_ctx(agent, "web")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", db.public.port, ssl=ctx, server_hostname=None
        )
        try:
            writer.write(b"1")
            assert await reader.readexactly(1) == b"1"
            await _deny(agent)
            # The established connection keeps flowing (authorized once, at handshake)...
            writer.write(b"2")
            assert await reader.readexactly(1) == b"2"
            # ...while a new one is refused.
            assert await tls_exchange(db.public.port, ctx, b"3") == b""
        finally:
            writer.close()
