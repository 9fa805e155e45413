"""Peered upstreams under bad input and faults: an imported instance that shows the wrong
identity, or a chain of the wrong trust domain (refused, 0 bytes sent), the SNI it is sent,
a peering deleted with connections open, and the exporter's CA rotation mid-traffic."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from proxy.devagent import DevAgent
from proxy.peeranswers import TrustBundle
from tests.certs import issue_leaf, load_chain
from tests.conftest import wait_until
from tests.peerfix import Cluster, wait_imported, web_config
from tests.proxyfix import (
    custom_leaf,
    db_sidecar,
    echo_app,
    local_port,
    plain_exchange,
    register_proxy,
    running_proxy,
)

pytestmark = [
    pytest.mark.tls_engines(),
    pytest.mark.one_loop,
]  # engines matter here; the loop is covered elsewhere


@dataclass
class FakeInstance:
    """A TLS server registered as db's sidecar in dc2, with a leaf the test chooses; it
    records the SNI it was sent and every byte it received after the handshake."""

    server: asyncio.Server | None = None
    port: int = 0
    names: list[str | None] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    handshakes: int = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def fake_db(dc2: Cluster, cert_pem: str, key_pem: str) -> AsyncIterator[FakeInstance]:
    fake = FakeInstance()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_chain(ctx, cert_pem, key_pem)

    def sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        fake.names.append(name)

    ctx.sni_callback = sni
    fake.server = await asyncio.start_server(fake._serve, "127.0.0.1", 0, ssl=ctx)
    fake.port = fake.server.sockets[0].getsockname()[1]
    await register_proxy(dc2.agent, "db-sidecar-proxy", fake.port, "db", 1)
    await dc2.export("db", "dc1")
    try:
        yield fake
    finally:
        fake.server.close()
        await fake.server.wait_closed()


def _db_uri(dc2: Cluster) -> str:
    return f"spiffe://{dc2.trust_domain}/ns/default/dc/dc2/svc/db"


async def test_the_right_instance_gets_the_peer_meta_sni(clusters: tuple[Cluster, Cluster]) -> None:
    dc1, dc2 = clusters
    cert, key = custom_leaf(dc2.agent, serial=0x51, uri=_db_uri(dc2))
    async with fake_db(dc2, cert, key) as fake:
        await wait_imported(dc1, dc2)
        (entry,) = await dc1.imports("db", "dc2")
        sni = entry["Service"]["Connect"]["PeerMeta"]["SNI"][0]
        assert sni == f"db.default.default.dc1.external.{dc2.trust_domain}"
        async with running_proxy(dc1.agent, web_config()) as web:
            assert await plain_exchange(local_port(web), b"ping", half_close=False) == b"ping"
        assert fake.names == [sni]
        assert bytes(fake.received) == b"ping"


@pytest.mark.parametrize("case", ["wrong_service", "wrong_datacenter", "wrong_trust_domain"])
async def test_an_instance_with_the_wrong_identity_gets_no_byte(
    clusters: tuple[Cluster, Cluster], case: str
) -> None:
    dc1, dc2 = clusters
    uri = {
        "wrong_service": _db_uri(dc2).replace("/svc/db", "/svc/other"),
        "wrong_datacenter": _db_uri(dc2).replace("/dc/dc2/", "/dc/dc1/"),
        # dc2's CA signs a leaf naming dc1's trust domain: the chain verifies, the ID is not
        # one of PeerMeta's (trust domains are compared for peers).
        "wrong_trust_domain": _db_uri(dc2).replace(dc2.trust_domain, dc1.trust_domain),
    }[case]
    cert, key = custom_leaf(dc2.agent, serial=0x52, uri=uri)
    async with fake_db(dc2, cert, key) as fake:
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            assert await plain_exchange(local_port(web), b"secret") == b""
            (listener,) = web.upstreams.values()
            assert listener.failed == 1
        assert bytes(fake.received) == b""


@pytest.mark.parametrize("issuer", ["dc1", "stranger"])
async def test_a_chain_of_another_ca_fails_the_handshake(
    clusters: tuple[Cluster, Cluster], issuer: str
) -> None:
    """The right URI under a CA that is not the peer's (dc1's own, which web trusts for its
    local upstreams, or a third one): the peer's context trusts only the peer's roots."""
    dc1, dc2 = clusters
    root = (dc1.agent if issuer == "dc1" else DevAgent()).state.ca.active_root
    cert, key = issue_leaf(root.cert, root.key, uri=_db_uri(dc2), serial=0x53)
    async with fake_db(dc2, cert, key) as fake:
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            assert await plain_exchange(local_port(web), b"secret") == b""
            (listener,) = web.upstreams.values()
            assert listener.failed == 1
        assert fake.handshakes == 0
        assert bytes(fake.received) == b""


async def test_a_deleted_peering_refuses_new_connections_and_keeps_open_ones(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """Deleting the peering in dc1 removes the imports and dc2's bundle: web's sidecar drops
    its context for dc2 and refuses new connections. An open connection is not closed by
    either sidecar: its bytes keep flowing until one end closes it."""
    dc1, dc2 = clusters
    await dc2.export("db", "dc1")
    async with echo_app() as app, db_sidecar(dc2.agent, app):
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            reader, writer = await asyncio.open_connection("127.0.0.1", local_port(web))
            try:
                writer.write(b"before")
                assert await reader.readexactly(6) == b"before"
                r = await dc1.http.delete("/v1/peering/dc2")
                assert r.status_code == 200
                await wait_until(lambda: not web.peer_trust.client_ready("dc2"), timeout=10)
                assert await plain_exchange(local_port(web), b"new") == b""
                writer.write(b"after")
                assert await reader.readexactly(5) == b"after"
            finally:
                writer.close()
            assert app.connections == 1


async def test_the_exporters_ca_rotation_mid_traffic(clusters: tuple[Cluster, Cluster]) -> None:
    """dc2 rotates its CA while web opens connections back to back: none fails; web's
    context for dc2 is rebuilt from the new bundle and db's sidecar from its new leaf."""
    dc1, dc2 = clusters
    await dc2.export("db", "dc1")
    async with echo_app() as app, db_sidecar(dc2.agent, app) as db:
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            port = local_port(web)
            record = web.peer_trust.peers["dc2"]
            contexts_before, leaf_rotations = record.rotations, db.tls.rotations.value
            old_roots = {r.cert_pem.strip() for r in dc2.agent.state.ca.roots}
            results: list[bool] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                n = 0
                while not stop.is_set() and n < 2000:
                    payload = f"message {n}".encode()
                    results.append(await plain_exchange(port, payload) == payload)
                    n += 1

            task = asyncio.create_task(traffic())
            await wait_until(lambda: len(results) >= 5, timeout=10)
            started = time.monotonic()
            r = await dc2.http.put(
                "/v1/connect/ca/configuration",
                json={"Provider": "consul", "Config": {"Rotate": True}},
            )
            assert r.status_code == 200, r.text
            before = len(results)
            await wait_until(lambda: record.rotations > contexts_before, timeout=10)
            bundle_after = time.monotonic() - started
            await wait_until(lambda: db.tls.rotations.value > leaf_rotations, timeout=10)
            on_new_leaf = len(results)  # from here db's sidecar serves the new CA's leaf
            await wait_until(lambda: len(results) >= on_new_leaf + 5, timeout=10)
            stop.set()
            await task
            assert all(results), f"{results.count(False)} of {len(results)} failed"
            assert record.bundle is not None
            new_roots = {p.strip() for p in record.bundle.root_pems} - old_roots
            active = dc2.agent.state.ca.active_root.cert_pem.strip()
            assert new_roots == {active}
            print(
                f"rotation: {len(results)} connections, 0 failed, {len(results) - before} "
                f"after it, {len(results) - on_new_leaf} to db's new leaf; web's context for "
                f"dc2 rebuilt {bundle_after * 1000:.0f} ms after the rotation"
            )
            assert app.connections == len(results)


async def test_a_refused_bundle_keeps_the_last_good_one(clusters: tuple[Cluster, Cluster]) -> None:
    dc1, dc2 = clusters
    await dc2.export("db", "dc1")
    async with echo_app() as app, db_sidecar(dc2.agent, app):
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            assert await plain_exchange(local_port(web), b"one") == b"one"
            record = web.peer_trust.peers["dc2"]
            good = record.client
            for roots in ((), ("-----BEGIN CERTIFICATE-----\nnot base64\n",)):
                web.peer_trust._adopt(record, TrustBundle("dc2", dc2.trust_domain, roots))
                assert record.client is good
            assert await plain_exchange(local_port(web), b"two") == b"two"
