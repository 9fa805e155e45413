"""Peered upstreams: web in dc1 reaches db in dc2 through two sidecars (one per dev agent)
over mTLS across trust domains; the config forms of `destination_peer`; the deny intention
of dc2 against a peer's client. On both TLS engines."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from proxy.config import (
    load_agent_service,
    load_upstream,
    parse_upstream_flag,
    plan_upstreams,
    upstream_key,
)
from proxy.errors import ConfigError
from proxy.peertrust import PeerClientContexts
from tests.conftest import wait_until
from tests.peerfix import (
    Cluster,
    peer_client_ctx,
    peered_upstream,
    wait_imported,
    web_config,
)
from tests.proxyfix import (
    db_sidecar,
    echo_app,
    local_port,
    plain_exchange,
    running_proxy,
    tls_exchange,
)

pytestmark = [
    pytest.mark.tls_engines(),
    pytest.mark.one_loop,
]  # engines matter here; the loop is covered elsewhere


async def test_web_in_dc1_reaches_db_in_dc2(clusters: tuple[Cluster, Cluster]) -> None:
    dc1, dc2 = clusters
    await dc2.export("db", "dc1")
    async with echo_app() as app, db_sidecar(dc2.agent, app) as db:
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            payload = b"across the peering\n" * 500
            assert await plain_exchange(local_port(web), payload) == payload
            assert app.connections == 1
            assert db.public is not None and db.public.accepted.value == 1
            (listener,) = web.upstreams.values()
            assert listener.bytes_out == len(payload) == listener.bytes_in
            # The client context trusts dc2's roots, not dc1's.
            contexts = listener.contexts
            assert isinstance(contexts, PeerClientContexts) and contexts.peer == "dc2"
            record = web.peer_trust.peers["dc2"]
            assert record.bundle is not None
            assert record.bundle.trust_domain == dc2.trust_domain
            dc2_roots = {r.cert_pem.strip() for r in dc2.agent.state.ca.roots}
            assert {p.strip() for p in record.bundle.root_pems} == dc2_roots
            # dc2's public listener trusts dc1's roots: db is exported to dc1.
            assert [b.peer for b in db.peer_trust.exported] == ["dc1"]
            assert db.peer_trust.exported[0].trust_domain == dc1.trust_domain


async def test_a_local_upstream_of_the_same_name_is_not_the_peered_one(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """No peered instance is reached through a local upstream, and the other way round."""
    dc1, dc2 = clusters
    await dc2.export("db", "dc1")
    async with echo_app() as app, db_sidecar(dc2.agent, app):
        await wait_imported(dc1, dc2)
        local = web_config(peered_upstream(peer=""))
        async with running_proxy(dc1.agent, local) as web:
            assert await plain_exchange(local_port(web), b"local?") == b""
        assert app.connections == 0


async def test_intention_in_dc2_denying_web_from_dc1(clusters: tuple[Cluster, Cluster]) -> None:
    dc1, dc2 = clusters
    await dc2.export("db", "dc1")
    async with echo_app() as app, db_sidecar(dc2.agent, app) as db:
        await wait_imported(dc1, dc2)
        async with running_proxy(dc1.agent, web_config()) as web:
            assert await plain_exchange(local_port(web), b"allowed") == b"allowed"
            await dc2.intention("web", "db", "deny", peer="dc1")
            assert await plain_exchange(local_port(web), b"denied") == b""
            assert db.public is not None and db.public.denied == 1
            assert app.connections == 1
            # An intention for another peer's web does not apply to dc1's.
            await dc2.intention("web", "db", "deny", peer="elsewhere")
            assert await plain_exchange(local_port(web), b"again") == b"again"


async def test_without_exports_a_peer_client_fails_the_handshake(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """db not exported: dc2's public listener trusts only dc2's roots, so web of dc1 fails
    the handshake; exported: the same client gets through."""
    dc1, dc2 = clusters
    ctx = peer_client_ctx(dc1.agent, dc2.agent, "web")
    async with echo_app() as app, db_sidecar(dc2.agent, app) as db:
        assert db.public is not None
        await wait_until(lambda: db.peer_trust.server_rotations >= 1)  # answered: no exports
        assert db.peer_trust.exported == ()
        assert db.peer_trust.server_context() is db.tls.server_context()
        assert await tls_exchange(db.public.port, ctx, b"x") == b""
        assert app.connections == 0
        await dc2.export("db", "dc1")
        await wait_until(lambda: db.peer_trust.exported != ())
        assert await tls_exchange(db.public.port, ctx, b"now") == b"now"
        assert app.connections == 1


# -- configuration ---------------------------------------------------------------------------


def test_destination_peer_in_agent_and_sidecar_configs() -> None:
    upstream = load_upstream(
        {"DestinationName": "db", "DestinationPeer": "dc2", "LocalBindPort": 9191}
    )
    assert upstream.destination_peer == "dc2"
    assert upstream.label == "127.0.0.1:9191->service:default/default/db@dc2"
    service = {
        "Kind": "connect-proxy",
        "ID": "web-sidecar-proxy",
        "Proxy": {
            "DestinationServiceName": "web",
            "Upstreams": [
                {"DestinationName": "db", "DestinationPeer": "dc2", "LocalBindPort": 9191},
                {"DestinationName": "db", "LocalBindPort": 9192},
            ],
        },
    }
    peered, local = load_agent_service(service).upstreams
    assert (peered.destination_peer, local.destination_peer) == ("dc2", "")
    assert peered != local


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"DestinationPeer": "Bad_Peer"}, "destination_peer 'Bad_Peer' is not a valid peer name"),
        ({"DestinationPeer": 7}, "destination_peer 7 is not a valid peer name"),
        (
            {"DestinationPeer": "dc2", "DestinationType": "prepared_query"},
            "destination_peer cannot be used with a prepared query",
        ),
        (
            {"DestinationPeer": "dc2", "Datacenter": "dc9"},
            "destination_peer and datacenter cannot both be set",
        ),
    ],
)
def test_destination_peer_errors(raw: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_upstream({"DestinationName": "db", "LocalBindPort": 9191, **raw})
    assert str(info.value).startswith(f"upstream db: {error}")


def test_upstream_flag_with_a_peer() -> None:
    upstream = parse_upstream_flag("db@dc2:9191")
    assert (upstream.destination_name, upstream.destination_peer) == ("db", "dc2")
    assert upstream.local_bind_port == 9191
    upstream = parse_upstream_flag("db@dc2:127.0.0.2:9191")
    assert (upstream.local_bind_address, upstream.destination_peer) == ("127.0.0.2", "dc2")
    assert parse_upstream_flag("db:9191").destination_peer == ""
    with pytest.raises(ValueError, match='Upstream peer name is empty in "db@:9191"'):
        parse_upstream_flag("db@:9191")
    with pytest.raises(ValueError, match="not a valid peer name"):
        parse_upstream_flag("db@DC2:9191")
    with pytest.raises(ValueError, match="cannot be used with a prepared query"):
        parse_upstream_flag("db.query@dc2:9191")


def test_the_upstream_diff_and_admin_config_know_the_peer() -> None:
    peered = parse_upstream_flag("db@dc2:9191")
    moved = parse_upstream_flag("db@dc3:9191")
    running = {upstream_key(peered): peered}
    assert plan_upstreams(running, (peered,)) == ([], [])
    assert plan_upstreams(running, (moved,)) == ([upstream_key(peered)], [moved])
    # The admin endpoint's /config renders upstreams with dataclasses.asdict.
    assert asdict(peered)["destination_peer"] == "dc2"
