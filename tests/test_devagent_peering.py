"""Cluster peering between two dev agents: the token's bytes, establish and states, the
exported services under `?peer=` with blocking wake-ups, trust bundles, authorize across
trust domains, deletion, and each bad input with Consul's text."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from cryptography import x509

from proxy.devagent import AgentConfig
from tests.conftest import register, wait_until
from tests.peerfix import Cluster, cluster, cluster_config

pytestmark = pytest.mark.one_loop  # the dev agent: one loop is enough

ROOT = "root-secret-peering"


Side = Cluster  # one side of a peering


@pytest.fixture
async def dc1() -> AsyncIterator[Side]:
    async with cluster("dc1") as side:
        yield side


@pytest.fixture
async def dc2() -> AsyncIterator[Side]:
    async with cluster("dc2") as side:
        yield side


async def _peered(dc1: Side, dc2: Side) -> None:
    """dc2 accepts (calls dc1 "dc1"); dc1 dials (calls dc2 "dc2")."""
    token = await dc2.token("dc1")
    r = await dc1.establish("dc2", token)
    assert (r.status_code, r.json()) == (200, {})
    await wait_until(lambda: _both_active(dc1, dc2))


async def _both_active(dc1: Side, dc2: Side) -> bool:
    return await dc1.state("dc2") == "ACTIVE" and await dc2.state("dc1") == "ACTIVE"


def _decode(token: str) -> tuple[bytes, dict[str, Any]]:
    raw = base64.b64decode(token, validate=True)
    data: dict[str, Any] = json.loads(raw)
    return raw, data


# -- the token ------------------------------------------------------------------------------


async def test_token_bytes_follow_consul(dc2: Side) -> None:
    token = await dc2.token("dc1", ServerExternalAddresses=["10.0.0.5:8503"])
    assert base64.b64encode(base64.b64decode(token)).decode() == token  # standard, padded
    raw, data = _decode(token)
    assert list(data) == [
        "CA",
        "ManualServerAddresses",
        "ServerAddresses",
        "ServerName",
        "PeerID",
        "EstablishmentSecret",
        "Remote",
    ]
    assert list(data["Remote"]) == ["Partition", "Datacenter", "Locality"]
    assert b" " not in raw.replace(b"BEGIN CERTIFICATE", b"").replace(b"END CERTIFICATE", b"")
    td = dc2.agent.state.ca.trust_domain
    assert data["ServerName"] == f"server.dc2.peering.{td}"
    assert data["ManualServerAddresses"] == ["10.0.0.5:8503"]
    assert data["ServerAddresses"] == [f"127.0.0.1:{dc2.agent.peering.port}"]  # type: ignore[union-attr]
    assert data["Remote"] == {"Partition": "default", "Datacenter": "dc2", "Locality": None}
    roots = (await dc2.http.get("/v1/connect/ca/roots")).json()["Roots"]
    assert data["CA"] == [
        r["RootCert"] if r["RootCert"].endswith("\n") else r["RootCert"] + "\n" for r in roots
    ]
    for pem in data["CA"]:
        x509.load_pem_x509_certificate(pem.encode())
    uuid.UUID(data["PeerID"])
    uuid.UUID(data["EstablishmentSecret"])
    # Without manual addresses the key is still there, null.
    _, plain = _decode(await dc2.token("other"))
    assert plain["ManualServerAddresses"] is None


async def test_regenerating_keeps_the_id_and_invalidates_the_unused_token(
    dc1: Side, dc2: Side
) -> None:
    first = await dc2.token("dc1", Meta={"env": "test"})
    second = await dc2.token("dc1", Meta={"ignored": "yes"})
    _, a = _decode(first)
    _, b = _decode(second)
    assert a["PeerID"] == b["PeerID"]
    assert a["EstablishmentSecret"] != b["EstablishmentSecret"]
    peering = (await dc2.http.get("/v1/peering/dc1")).json()
    assert peering["ID"] == a["PeerID"]
    assert peering["State"] == "PENDING"
    assert peering["Meta"] == {"env": "test"}  # a regeneration's Meta is not applied
    r = await dc1.establish("dc2", first)
    assert r.status_code == 403, r.text
    assert r.text == "a new peering token must be generated: invalid peering establishment secret"
    assert (await dc1.http.get("/v1/peering/dc2")).status_code == 404
    r = await dc1.establish("dc2", second)
    assert r.status_code == 200, r.text
    # The used token cannot be used again (from another name, too).
    r = await dc1.establish("dc2-again", second)
    assert (r.status_code, r.text) == (
        403,
        "a new peering token must be generated: invalid peering establishment secret",
    )


async def test_token_request_errors(dc2: Side) -> None:
    http = dc2.http
    r = await http.post("/v1/peering/token")
    assert (r.status_code, r.text) == (400, "The peering arguments must be provided in the body")
    r = await http.post("/v1/peering/token", content=b"{nope")
    assert r.status_code == 400 and r.text.startswith("Body decoding failed: "), r.text
    r = await http.post("/v1/peering/token", json={"Meta": {}})
    assert (r.status_code, r.text) == (
        400,
        "PeerName is required in the payload when generating a new peering token.",
    )
    r = await http.post("/v1/peering/token", json={"PeerName": "Bad_Name"})
    assert r.status_code == 400
    assert r.text.startswith("Bad_Name is not a valid peer name: a valid peering name must")
    r = await http.post("/v1/peering/token", json={"PeerName": "ok", "Meta": {"consul-x": "1"}})
    assert r.status_code == 400 and "reserved" in r.text
    r = await http.post("/v1/peering/token?partition=other", json={"PeerName": "ok"})
    assert r.status_code == 400 and "Enterprise" in r.text


async def test_no_peering_port_and_disabled() -> None:
    cfg = AgentConfig(node_name="n", cluster_id=str(uuid.uuid4()))
    async with cluster(cfg) as side:
        r = await side.http.post("/v1/peering/token", json={"PeerName": "x"})
        assert (r.status_code, r.text) == (
            500,
            "TLS for gRPC must be enabled when generating peering tokens",
        )
    cfg = AgentConfig(node_name="n", grpc_tls_port=0, peering_enabled=False)
    async with cluster(cfg) as side:
        for r in (
            await side.http.post("/v1/peering/token", json={"PeerName": "x"}),
            await side.http.get("/v1/peerings"),
        ):
            assert (r.status_code, r.text) == (400, "peering must be enabled to use this endpoint")


# -- establish, states, read, list ------------------------------------------------------


async def test_establish_states_read_and_list(dc1: Side, dc2: Side) -> None:
    token = await dc2.token("dc1", Meta={"team": "db"})
    assert await dc2.state("dc1") == "PENDING"
    r = await dc1.http.post(
        "/v1/peering/establish",
        json={"PeerName": "dc2", "PeeringToken": token, "Meta": {"from": "dc1"}},
    )
    assert (r.status_code, r.json()) == (200, {})
    await wait_until(lambda: _both_active(dc1, dc2))
    dialer = (await dc1.http.get("/v1/peering/dc2")).json()
    acceptor = (await dc2.http.get("/v1/peering/dc1")).json()
    assert list(dialer) == [
        "ID",
        "Name",
        "Partition",
        "Meta",
        "State",
        "PeerID",
        "PeerCAPems",
        "PeerServerName",
        "PeerServerAddresses",
        "StreamStatus",
        "CreateIndex",
        "ModifyIndex",
        "Remote",
    ]
    assert dialer["PeerID"] == acceptor["ID"]
    assert dialer["Meta"] == {"from": "dc1"}
    assert dialer["PeerServerName"] == f"server.dc2.peering.{dc2.agent.state.ca.trust_domain}"
    assert dialer["Remote"] == {"Partition": "default", "Datacenter": "dc2"}
    assert acceptor["Remote"] == {"Partition": "default", "Datacenter": "dc1"}
    assert acceptor["Meta"] == {"team": "db"}
    assert set(dialer["StreamStatus"]) == {
        "ImportedServices",
        "ExportedServices",
        "LastHeartbeat",
        "LastReceive",
        "LastSend",
    }
    listed = (await dc1.http.get("/v1/peerings")).json()
    assert [p["Name"] for p in listed] == ["dc2"]
    r = await dc1.http.get("/v1/peering/nope")
    assert (r.status_code, r.text) == (404, 'Peering not found for "nope"')
    # Heartbeats flow both ways.
    await wait_until(
        lambda: _heartbeat_seen(dc2, "dc1"),
    )


async def _heartbeat_seen(side: Side, name: str) -> bool:
    r = await side.http.get(f"/v1/peering/{name}")
    return r.json()["StreamStatus"]["LastHeartbeat"] is not None


async def test_establish_bad_tokens(dc1: Side, dc2: Side) -> None:
    def enc(obj: Any) -> str:
        return base64.b64encode(json.dumps(obj).encode()).decode()

    good = _decode(await dc2.token("dc1"))[1]
    cases = [
        ("not base64!", "failed to decode peering token: illegal base64 data at input byte 3"),
        (base64.b64encode(b"{nope").decode(), "failed to unmarshal peering token: "),
        (
            enc({**good, "CA": ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]}),
            "peering token invalid CA: ",
        ),
        (
            enc({**good, "ServerAddresses": None, "ManualServerAddresses": None}),
            "peering token server addresses value is empty",
        ),
        (
            enc({**good, "ServerAddresses": ["127.0.0.1:0"]}),
            "127.0.0.1:0 is not a valid peering server address",
        ),
        (
            enc({**good, "ServerAddresses": ["127.0.0.1:99999"]}),
            "127.0.0.1:99999 is not a valid peering server address",
        ),
        (
            enc({**good, "ServerAddresses": ["no-port"]}),
            "no-port is not a valid peering server address",
        ),
        (enc({**good, "ServerName": ""}), "peering token server name value is empty"),
        (enc({**good, "PeerID": ""}), "peering token peer ID value is empty"),
    ]
    for token, text in cases:
        r = await dc1.establish("dc2", token)
        assert r.status_code == 400, (token, r.text)
        assert r.text.startswith(text), (text, r.text)
    r = await dc1.http.post("/v1/peering/establish", json={"PeerName": "dc2"})
    assert (r.status_code, r.text) == (
        400,
        "PeeringToken is required in the payload when establishing a peering.",
    )
    r = await dc1.http.post("/v1/peering/establish", json={"PeeringToken": "x"})
    assert (r.status_code, r.text) == (
        400,
        "PeerName is required in the payload when establishing a peering.",
    )
    # A token of our own cluster.
    own = await dc1.token("loop")
    r = await dc1.establish("self", own)
    assert r.status_code == 400
    assert r.text.startswith(
        f'cannot create a peering within the same cluster "server.dc1.peering.'
        f'{dc1.agent.state.ca.trust_domain}". Refer to the `exported-services`'
    )
    # The name of a peering that expects to be dialed.
    r = await dc1.establish("loop", await dc2.token("x"))
    assert (r.status_code, r.text) == (
        400,
        'cannot create peering with name: "loop"; there is an existing peering expecting '
        "to be dialed",
    )
    assert (await dc1.http.get("/v1/peerings")).json()[0]["Name"] == "loop"


async def test_peer_down_during_establish_times_out(dc1: Side, dc2: Side) -> None:
    token = _decode(await dc2.token("dc1"))[1]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token["ServerAddresses"] = [f"127.0.0.1:{port}"]
    loop_time = __import__("asyncio").get_running_loop().time
    start = loop_time()
    r = await dc1.establish("dc2", base64.b64encode(json.dumps(token).encode()).decode())
    took = loop_time() - start
    assert r.status_code == 500
    assert r.text.startswith("")
    assert "error" in r.text and "occurred:" in r.text
    assert f'failed to exchange peering secret through address "127.0.0.1:{port}": ' in r.text
    assert "connection refused" in r.text
    assert 2.5 < took < 8.0, took  # 3 s overall, plus the HTTP round trip under load
    assert (await dc1.http.get("/v1/peering/dc2")).status_code == 404


async def test_wrong_server_name_is_refused(dc1: Side, dc2: Side) -> None:
    token = _decode(await dc2.token("dc1"))[1]
    token["ServerName"] = "server.dc2.peering.someone-else.consul"
    r = await dc1.establish("dc2", base64.b64encode(json.dumps(token).encode()).decode())
    assert r.status_code == 500
    assert "certificate verify failed" in r.text or "Hostname mismatch" in r.text, r.text


# -- exported services, imports, bundles -----------------------------------------------------


async def test_exported_services_appear_under_peer_and_blocking_wakes(dc1: Side, dc2: Side) -> None:
    await register(
        dc2.http,
        {
            "Name": "db",
            "Port": 5432,
            "Check": {"CheckID": "db-ttl", "TTL": "60s"},
            "Connect": {"SidecarService": {}},
        },
    )
    await _peered(dc1, dc2)
    r = await dc1.http.get("/v1/health/connect/db?peer=dc2")
    assert (r.status_code, r.json()) == (200, [])
    index = r.headers["X-Consul-Index"]

    async def blocked() -> httpx.Response:
        return await dc1.http.get(f"/v1/health/connect/db?peer=dc2&index={index}&wait=5s")

    import asyncio

    waiter = asyncio.create_task(blocked())
    await dc2.export("db", "dc1")
    r = await waiter
    assert int(r.headers["X-Consul-Index"]) > int(index)
    entries = r.json()
    assert len(entries) == 1
    svc = entries[0]["Service"]
    td2 = dc2.agent.state.ca.trust_domain
    assert svc["Kind"] == "connect-proxy"
    assert svc["PeerName"] == "dc2"
    assert entries[0]["Node"]["PeerName"] == "dc2"
    assert svc["Connect"]["PeerMeta"] == {
        "SNI": [f"db.default.default.dc1.external.{td2}"],
        "SpiffeID": [f"spiffe://{td2}/ns/default/dc/dc2/svc/db"],
        "Protocol": "tcp",
    }
    plain = (await dc1.http.get("/v1/health/service/db?peer=dc2")).json()
    assert [e["Service"]["Port"] for e in plain] == [5432]
    catalog = (await dc1.http.get("/v1/catalog/service/db?peer=dc2")).json()
    assert [(c["ServiceName"], c["PeerName"]) for c in catalog] == [("db", "dc2")]
    # Without ?peer= the local catalog does not show it.
    assert (await dc1.http.get("/v1/health/service/db")).json() == []
    # Health changes wake a watcher too.
    r = await dc1.http.get("/v1/health/service/db?peer=dc2")
    index = r.headers["X-Consul-Index"]
    waiter = asyncio.create_task(
        dc1.http.get(f"/v1/health/service/db?peer=dc2&index={index}&wait=5s")
    )
    r = await dc2.http.put("/v1/agent/check/pass/db-ttl")
    assert r.status_code == 200
    r = await waiter
    statuses = {c["CheckID"]: c["Status"] for c in r.json()[0]["Checks"]}
    assert statuses["db-ttl"] == "passing"
    passing = await dc1.http.get("/v1/health/service/db?peer=dc2&passing=1")
    assert len(passing.json()) == 1
    # The stream status counts imported and exported services on each side.
    assert (await dc1.http.get("/v1/peering/dc2")).json()["StreamStatus"]["ImportedServices"] == [
        "db"
    ]
    await wait_until(lambda: _exported(dc2, "dc1", ["db"]))
    # Un-exporting removes the import and wakes the watcher.
    r = await dc1.http.get("/v1/health/connect/db?peer=dc2")
    index = r.headers["X-Consul-Index"]
    waiter = asyncio.create_task(
        dc1.http.get(f"/v1/health/connect/db?peer=dc2&index={index}&wait=5s")
    )
    r = await dc2.http.delete("/v1/config/exported-services/default")
    assert r.status_code == 200
    assert (await waiter).json() == []


async def _exported(side: Side, name: str, services: list[str]) -> bool:
    r = await side.http.get(f"/v1/peering/{name}")
    return bool(r.json()["StreamStatus"]["ExportedServices"] == services)


async def test_trust_bundle_and_rotation(dc1: Side, dc2: Side) -> None:
    import asyncio

    await _peered(dc1, dc2)
    path = "/v1/internal/connect-proxy/peering/trust-bundle"
    await wait_until(lambda: _bundle_ready(dc1, path))
    r = await dc1.http.get(f"{path}/dc2")
    bundle = r.json()
    roots2 = [x["RootCert"] for x in (await dc2.http.get("/v1/connect/ca/roots")).json()["Roots"]]
    assert bundle["TrustDomain"] == dc2.agent.state.ca.trust_domain
    assert bundle["PeerName"] == "dc2"
    assert bundle["RootPEMs"] == roots2
    index = r.headers["X-Consul-Index"]
    waiter = asyncio.create_task(dc1.http.get(f"{path}/dc2?index={index}&wait=5s"))
    dc2.agent.rotate_ca()
    rotated = (await waiter).json()
    assert len(rotated["RootPEMs"]) == 2
    assert rotated["ModifyIndex"] > bundle["ModifyIndex"]
    r = await dc1.http.get(f"{path}/nope")
    assert (r.status_code, r.text) == (404, 'No trust bundle for peer "nope"')


async def _bundle_ready(side: Side, path: str) -> bool:
    return (await side.http.get(f"{path}/dc2")).status_code == 200


async def test_authorize_a_client_from_the_peer(dc1: Side, dc2: Side) -> None:
    await _peered(dc1, dc2)
    path = "/v1/internal/connect-proxy/peering/trust-bundle"
    await wait_until(lambda: _bundle_ready(dc1, path))
    td2 = dc2.agent.state.ca.trust_domain
    uri = f"spiffe://{td2}/ns/default/dc/dc2/svc/web"

    async def authorize() -> dict[str, Any]:
        r = await dc1.http.post(
            "/v1/agent/connect/authorize",
            json={"Target": "db", "ClientCertURI": uri, "ClientCertSerial": "01"},
        )
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    assert (await authorize())["Authorized"] is True  # default allow
    entry = {
        "Kind": "service-intentions",
        "Name": "db",
        "Sources": [
            {"Name": "web", "Action": "allow"},
            {"Name": "web", "Peer": "dc2", "Action": "deny"},
        ],
    }
    assert (await dc1.http.put("/v1/config", json=entry)).status_code == 200
    denied = await authorize()
    assert denied["Authorized"] is False
    assert "Matched L4 intention" in denied["Reason"]
    local = f"spiffe://{dc1.agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/web"
    r = await dc1.http.post(
        "/v1/agent/connect/authorize", json={"Target": "db", "ClientCertURI": local}
    )
    assert r.json()["Authorized"] is True


# -- deletion --------------------------------------------------------------------------------


async def test_delete_while_established_terminates_the_other_side(dc1: Side, dc2: Side) -> None:
    await register(dc2.http, {"Name": "db", "Port": 5432, "Connect": {"SidecarService": {}}})
    await dc2.export("db", "dc1")
    await _peered(dc1, dc2)
    await wait_until(lambda: _imported_count(dc1, 1))
    r = await dc2.http.delete("/v1/peering/dc1")
    assert (r.status_code, r.json()) == (200, {})
    await wait_until(lambda: _gone(dc2, "dc1"))
    await wait_until(lambda: _state_is(dc1, "dc2", "TERMINATED"))
    assert (await dc1.http.get("/v1/health/connect/db?peer=dc2")).json() == []
    r = await dc1.http.get("/v1/internal/connect-proxy/peering/trust-bundle/dc2")
    assert r.status_code == 404
    assert dc2.agent.state.connect_ca.peer_trust_domains == set()
    assert dc1.agent.state.connect_ca.peer_trust_domains == set()
    # Deleting an unknown name is not an error (Consul answers 200).
    assert (await dc1.http.delete("/v1/peering/unknown")).status_code == 200


async def _imported_count(side: Side, n: int) -> bool:
    return len((await side.http.get("/v1/health/connect/db?peer=dc2")).json()) == n


async def _gone(side: Side, name: str) -> bool:
    return (await side.http.get(f"/v1/peering/{name}")).status_code == 404


async def _state_is(side: Side, name: str, state: str) -> bool:
    return await side.state(name) == state


async def test_the_dialer_goes_failing_and_back_when_the_acceptor_restarts_its_stream(
    dc1: Side, dc2: Side
) -> None:
    await _peered(dc1, dc2)
    r = await dc1.http.get("/v1/peering/dc2")
    index = r.headers["X-Consul-Index"]
    seen: list[str] = []

    async def follow() -> None:
        """The dialer's states, one blocking read per change (FAILING lasts at least the
        first redial backoff, so no change is missed between two reads)."""
        nonlocal index
        while seen[-2:] != ["FAILING", "ACTIVE"]:  # bounded by the caller's deadline
            r = await dc1.http.get("/v1/peering/dc2", params={"index": index, "wait": "5s"})
            index = r.headers["X-Consul-Index"]
            if not seen or seen[-1] != r.json()["State"]:
                seen.append(r.json()["State"])

    watcher = asyncio.create_task(follow())
    # Cut the stream from the acceptor's side: the dialer goes FAILING, then reconnects.
    link = dc2.agent.peering
    assert link is not None
    for writer in list(link._streams.values()):
        writer.close()
    async with asyncio.timeout(10):
        await watcher
    assert seen == ["FAILING", "ACTIVE"]
    await wait_until(lambda: _both_active(dc1, dc2))


# -- ACLs ------------------------------------------------------------------------------------


async def test_peering_acls() -> None:
    cfg = cluster_config(
        "dc9", acl_enabled=True, acl_default_policy="deny", acl_initial_management=ROOT
    )
    async with cluster(cfg) as side:
        r = await side.http.post("/v1/peering/token", json={"PeerName": "x"})
        assert r.status_code == 403
        assert r.text.endswith("lacks permission 'peering:write'"), r.text
        r = await side.http.get("/v1/peerings")
        assert r.status_code == 403 and r.text.endswith("lacks permission 'peering:read'")
        headers = {"X-Consul-Token": ROOT}
        r = await side.http.put(
            "/v1/acl/policy", json={"Name": "p", "Rules": 'peering = "read"'}, headers=headers
        )
        assert r.status_code == 200, r.text
        r = await side.http.put(
            "/v1/acl/token", json={"Policies": [{"Name": "p"}]}, headers=headers
        )
        reader = r.json()["SecretID"]
        r = await side.http.get("/v1/peerings", headers={"X-Consul-Token": reader})
        assert (r.status_code, r.json()) == (200, [])
        r = await side.http.post(
            "/v1/peering/token", json={"PeerName": "x"}, headers={"X-Consul-Token": reader}
        )
        assert r.status_code == 403
        r = await side.http.post("/v1/peering/token", json={"PeerName": "x"}, headers=headers)
        assert r.status_code == 200


# -- the exported-services entry ----------------------------------------------------------


async def test_exported_services_entry_validation(dc1: Side) -> None:
    async def put(entry: dict[str, Any]) -> httpx.Response:
        return await dc1.http.put("/v1/config", json={"Kind": "exported-services", **entry})

    cases = [
        ({"Name": "other", "Services": []}, 'exported-services Name must be "default"'),
        (
            {"Name": "default", "Services": [{"Consumers": [{"Peer": "a"}]}]},
            "Services[0]: service name cannot be empty",
        ),
        (
            {"Name": "default", "Services": [{"Name": "db"}]},
            "Services[0]: must have at least one consumer",
        ),
        (
            {"Name": "default", "Services": [{"Name": "db", "Consumers": [{}]}]},
            "Services[0].Consumers[0]: must define at least one of Peer, Partition, or SamenessGroup",
        ),
        (
            {"Name": "default", "Services": [{"Name": "db", "Consumers": [{"Peer": "*"}]}]},
            "Services[0].Consumers[0]: exporting to all peers (wildcard) is not supported",
        ),
        (
            {
                "Name": "default",
                "Services": [{"Name": "db", "Consumers": [{"Peer": "a", "Partition": "b"}]}],
            },
            "Services[0].Consumers[0]: must define at most one of Peer, Partition, or SamenessGroup",
        ),
    ]
    for entry, text in cases:
        r = await put(entry)
        assert (r.status_code, r.text) == (400, text)
    r = await put(
        {"name": "default", "services": [{"name": "db", "consumers": [{"peer_name": "a"}]}]}
    )
    assert r.status_code == 200, r.text
    stored = (await dc1.http.get("/v1/config/exported-services/default")).json()
    assert stored["Services"] == [
        {"Name": "db", "Namespace": "default", "Consumers": [{"Peer": "a"}]}
    ]


# -- py-consul, a real Consul client -----------------------------------------------------------


async def test_py_consul_exports_and_reads_imports_with_blocking(dc1: Side, dc2: Side) -> None:
    import asyncio
    import warnings

    import consul.aio

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ssl_context is deprecated", DeprecationWarning)
        c1 = consul.aio.Consul(host=dc1.agent.http_host, port=dc1.agent.http_port)
        c2 = consul.aio.Consul(host=dc2.agent.http_host, port=dc2.agent.http_port)
    try:
        await _peered(dc1, dc2)
        await c2.agent.service.register("db", port=5432)
        index, entries = await c1.health.service("db", peer="dc2")
        assert entries == []
        waiter = asyncio.create_task(c1.health.service("db", peer="dc2", index=index, wait="5s"))
        assert await c2.config.set(
            "exported-services",
            "default",
            {"Services": [{"Name": "db", "Consumers": [{"Peer": "dc1"}]}]},
        )
        new_index, entries = await waiter
        assert int(new_index) > int(index)
        assert [(e["Service"]["Service"], e["Service"]["PeerName"]) for e in entries] == [
            ("db", "dc2")
        ]
    finally:
        await c1.close()
        await c2.close()


# -- hostile bytes on the peering port ----------------------------------------------------------


async def test_hostile_bytes_on_the_peering_port_break_nothing(dc1: Side, dc2: Side) -> None:
    import asyncio
    import ssl

    link = dc2.agent.peering
    assert link is not None
    # Plain garbage (not TLS).
    reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
    writer.write(b"\x00\xff" * 1000 + b"GET / HTTP/1.1\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    # TLS, then a line that is not JSON, and an open with a made-up secret.
    token = _decode(await dc2.token("dc1"))[1]
    ctx = ssl.create_default_context(cadata="".join(token["CA"]))
    for line in (b"{not json\n", b"[1,2]\n", b'{"Op":"open","PeerID":"x","StreamSecretID":"y"}\n'):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", link.port, ssl=ctx, server_hostname=token["ServerName"]
        )
        writer.write(line)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer in (
            b"",
            b'{"Error":{"Code":"PermissionDenied","Message":"invalid peering stream secret"}}\n',
        )
        writer.close()
    # The real thing still works afterwards.
    r = await dc1.establish("dc2", await dc2.token("dc1"))
    assert r.status_code == 200, r.text
    await wait_until(lambda: _both_active(dc1, dc2))


async def test_a_stream_without_the_dialers_certificate_is_refused(dc1: Side, dc2: Side) -> None:
    import asyncio
    import ssl

    await _peered(dc1, dc2)
    dialer = dc1.agent.state.peerings.peerings["dc2"]
    ctx = ssl.create_default_context(cadata="".join(dialer.peer_ca_pems))
    link = dc2.agent.peering
    assert link is not None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", link.port, ssl=ctx, server_hostname=dialer.peer_server_name
    )
    # The right IDs and secret, but no client certificate: refused.
    writer.write(
        json.dumps(
            {"Op": "open", "PeerID": dialer.peer_id, "StreamSecretID": dialer.stream_secret}
        ).encode()
        + b"\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    assert b"the stream's client certificate is not the peer's" in answer
    writer.close()
    assert await dc2.state("dc1") == "ACTIVE"


async def test_config_file_keys(tmp_path: Any) -> None:
    from proxy.devagent import load_files

    path = tmp_path / "agent.hcl"
    path.write_text("ports { grpc_tls = 0 }\npeering { enabled = false }\n")
    config = load_files([path])
    assert (config.grpc_tls_port, config.peering_enabled) == (0, False)
    assert "peering" not in config.ignored_keys
