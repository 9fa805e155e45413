"""The dev agent's HTTP API against Consul's documented shapes and semantics."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from cryptography import x509

from proxy.devagent import AgentConfig, DevAgent
from proxy.identity import encode_serial
from tests.conftest import register

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
COLON_HEX = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2})*$")


def uri(agent: DevAgent, service: str) -> str:
    return f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/{service}"


async def authorize(
    client: httpx.AsyncClient, target: str, client_uri: str, token: str = ""
) -> httpx.Response:
    headers = {"X-Consul-Token": token} if token else {}
    return await client.post(
        "/v1/agent/connect/authorize",
        json={"Target": target, "ClientCertURI": client_uri, "ClientCertSerial": "0e"},
        headers=headers,
    )


# -- roots and leaf ----------------------------------------------------------------------


async def test_roots_response_fields(agent: DevAgent, client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/agent/connect/ca/roots")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert int(r.headers["X-Consul-Index"]) >= 1
    body = r.json()
    assert set(body) == {"ActiveRootID", "TrustDomain", "Roots"}
    assert re.fullmatch(r"[0-9a-f-]{36}\.consul", body["TrustDomain"])
    (root,) = body["Roots"]
    assert set(root) >= {
        "ID",
        "Name",
        "SerialNumber",
        "SigningKeyID",
        "ExternalTrustDomain",
        "NotBefore",
        "NotAfter",
        "RootCert",
        "IntermediateCerts",
        "Active",
        "PrivateKeyType",
        "PrivateKeyBits",
        "CreateIndex",
        "ModifyIndex",
    }
    assert root["ID"] == body["ActiveRootID"] and COLON_HEX.match(root["ID"])
    assert len(root["ID"].split(":")) == 20
    assert isinstance(root["SerialNumber"], int)
    assert COLON_HEX.match(root["SigningKeyID"]) and len(root["SigningKeyID"].split(":")) == 32
    assert root["ExternalTrustDomain"] == body["TrustDomain"].removesuffix(".consul")
    assert RFC3339.match(root["NotBefore"]) and RFC3339.match(root["NotAfter"])
    assert root["Active"] is True
    assert (root["PrivateKeyType"], root["PrivateKeyBits"]) == ("ec", 256)
    cert = x509.load_pem_x509_certificate(root["RootCert"].encode())
    assert cert.serial_number == root["SerialNumber"]


async def test_leaf_response_fields(agent: DevAgent, client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/agent/connect/ca/leaf/web")
    assert r.status_code == 200
    leaf = r.json()
    assert set(leaf) >= {
        "SerialNumber",
        "CertPEM",
        "PrivateKeyPEM",
        "Service",
        "ServiceURI",
        "ValidAfter",
        "ValidBefore",
        "CreateIndex",
        "ModifyIndex",
    }
    assert int(r.headers["X-Consul-Index"]) == leaf["ModifyIndex"]
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    assert leaf["SerialNumber"] == encode_serial(cert.serial_number)
    assert leaf["Service"] == "web" and leaf["ServiceURI"] == uri(agent, "web")
    assert RFC3339.match(leaf["ValidAfter"]) and RFC3339.match(leaf["ValidBefore"])
    assert leaf["PrivateKeyPEM"].startswith("-----BEGIN EC PRIVATE KEY-----")
    # The agent caches the leaf: a second non-blocking fetch returns the same certificate.
    again = (await client.get("/v1/agent/connect/ca/leaf/web")).json()
    assert again["SerialNumber"] == leaf["SerialNumber"]


async def test_leaf_blocking_returns_new_cert_after_rotation(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    first = await client.get("/v1/agent/connect/ca/leaf/web")
    index = first.headers["X-Consul-Index"]
    pending = asyncio.create_task(
        client.get(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10s")
    )
    await _until_blocked(agent, 1)
    old_root = agent.state.ca.active_root.id
    agent.rotate_ca()
    async with asyncio.timeout(5):
        r = await pending
    assert int(r.headers["X-Consul-Index"]) > int(index)
    new = r.json()
    assert new["SerialNumber"] != first.json()["SerialNumber"]
    roots = (await client.get("/v1/agent/connect/ca/roots")).json()
    assert roots["ActiveRootID"] != old_root
    assert [root["Active"] for root in roots["Roots"]] == [False, True]
    assert len(roots["Roots"][1]["IntermediateCerts"]) == 1
    # The new leaf bundles the cross-signed root for peers that still trust only the old one.
    assert len(x509.load_pem_x509_certificates(new["CertPEM"].encode())) == 2


async def test_leaf_blocking_returns_unchanged_at_wait(client: httpx.AsyncClient) -> None:
    first = await client.get("/v1/agent/connect/ca/leaf/web")
    index = first.headers["X-Consul-Index"]
    r = await client.get(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=100ms")
    assert r.status_code == 200
    assert r.headers["X-Consul-Index"] == index
    assert r.json()["SerialNumber"] == first.json()["SerialNumber"]


async def test_roots_blocking_wakes_on_rotation(agent: DevAgent, client: httpx.AsyncClient) -> None:
    first = await client.get("/v1/agent/connect/ca/roots")
    index = first.headers["X-Consul-Index"]
    pending = asyncio.create_task(client.get(f"/v1/agent/connect/ca/roots?index={index}&wait=10s"))
    await _until_blocked(agent, 1)
    agent.rotate_ca()
    async with asyncio.timeout(5):
        r = await pending
    assert int(r.headers["X-Consul-Index"]) > int(index)
    assert len(r.json()["Roots"]) == 2


@pytest.mark.parametrize("path", ["/v1/agent/connect/ca/roots", "/v1/connect/ca/roots"])
async def test_leaf_ttl_update_wakes_a_blocked_roots_query(
    agent: DevAgent, client: httpx.AsyncClient, path: str
) -> None:
    # A roots query's index covers the CA configuration too (Consul's CARootsAndConfig), so
    # a new leaf TTL alone, which rotates nothing, still wakes it with a higher index.
    first = await client.get(path)
    index = int(first.headers["X-Consul-Index"])
    before = (await client.get("/v1/connect/ca/configuration")).json()
    pending = asyncio.create_task(client.get(f"{path}?index={index}&wait=30s"))
    await _until_blocked(agent, 1)
    r = await client.put(
        "/v1/connect/ca/configuration", json={"Provider": "consul", "Config": {"LeafCertTTL": "2h"}}
    )
    assert (r.status_code, r.json()) == (200, True)
    async with asyncio.timeout(5):
        woken = await pending
    assert int(woken.headers["X-Consul-Index"]) > index
    assert woken.json()["ActiveRootID"] == first.json()["ActiveRootID"]
    after = (await client.get("/v1/connect/ca/configuration")).json()
    assert after["Config"]["LeafCertTTL"] == "2h"
    assert after["ModifyIndex"] == int(woken.headers["X-Consul-Index"]) > before["ModifyIndex"]


async def test_ca_configuration_with_a_new_key_type_rotates_the_root(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    old_root = agent.state.ca.active_root.id
    config = (await client.get("/v1/connect/ca/configuration")).json()
    assert (config["Provider"], config["Config"]["PrivateKeyType"]) == ("consul", "ec")
    r = await client.put(
        "/v1/connect/ca/configuration",
        json={"Provider": "consul", "Config": {"PrivateKeyType": "rsa", "PrivateKeyBits": 2048}},
    )
    assert r.status_code == 200, r.text
    roots = (await client.get("/v1/agent/connect/ca/roots")).json()
    assert roots["ActiveRootID"] != old_root
    config = (await client.get("/v1/connect/ca/configuration")).json()
    assert (config["Config"]["PrivateKeyType"], config["Config"]["PrivateKeyBits"]) == ("rsa", 2048)


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {"Provider": "vault"},
            'the dev agent only runs the built-in "consul" CA provider, not "vault"',
        ),
        ({"Config": {"LeafCertTTL": "0s"}}, "LeafCertTTL must be positive"),
        ({"Config": {"LeafCertTTL": "soon"}}, "Invalid LeafCertTTL: "),
    ],
)
async def test_ca_configuration_refuses_what_it_cannot_use(
    client: httpx.AsyncClient, body: dict[str, Any], text: str
) -> None:
    before = (await client.get("/v1/connect/ca/configuration")).json()
    r = await client.put("/v1/connect/ca/configuration", json=body)
    assert r.status_code == 400 and r.text.startswith(text), r.text
    assert (await client.get("/v1/connect/ca/configuration")).json() == before


async def test_leaf_renews_between_60_and_90_percent_of_its_lifetime() -> None:
    dev = DevAgent(AgentConfig(node_name="n", leaf_cert_ttl=0.5))
    await dev.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=dev.url) as c:
            first = await c.get("/v1/agent/connect/ca/leaf/web")
            index = first.headers["X-Consul-Index"]
            async with asyncio.timeout(10):
                r = await c.get(f"/v1/agent/connect/ca/leaf/web?index={index}&wait=10s")
            assert r.json()["SerialNumber"] != first.json()["SerialNumber"]
            # The leaf was backdated one minute, so with a 0.5 s lifetime the renewal point had
            # already passed: it must have been re-issued right away, not after the wait.
            assert int(r.headers["X-Consul-Index"]) > int(index)
    finally:
        await dev.close()


# -- blocking queries --------------------------------------------------------------------


async def _until_blocked(agent: DevAgent, n: int) -> None:
    async with asyncio.timeout(5):
        await agent.state.notifier.parked.reached(n)


async def test_health_blocking_returns_promptly_after_change(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    r = await client.get("/v1/health/connect/db")
    assert r.json() == []
    index = r.headers["X-Consul-Index"]
    assert int(index) >= 1
    pending = asyncio.create_task(client.get(f"/v1/health/connect/db?index={index}&wait=30s"))
    await _until_blocked(agent, 1)
    await register(client, {"Name": "db", "Port": 5432, "Connect": {"SidecarService": {}}})
    async with asyncio.timeout(5):
        r = await pending
    assert int(r.headers["X-Consul-Index"]) > int(index)
    (entry,) = r.json()
    assert entry["Service"]["ID"] == "db-sidecar-proxy"
    assert set(entry) == {"Node", "Service", "Checks"}
    assert entry["Node"]["Address"] == "127.0.0.1"


async def test_blocking_returns_unchanged_at_wait(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/health/connect/db")
    index = r.headers["X-Consul-Index"]
    r2 = await client.get(f"/v1/health/connect/db?index={index}&wait=50ms")
    assert r2.status_code == 200 and r2.headers["X-Consul-Index"] == index


async def test_unrelated_changes_do_not_wake_a_service_watch(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    r = await client.get("/v1/health/connect/db")
    index = r.headers["X-Consul-Index"]
    pending = asyncio.create_task(client.get(f"/v1/health/connect/db?index={index}&wait=300ms"))
    await _until_blocked(agent, 1)
    await register(client, {"Name": "other", "Port": 1})
    r2 = await pending
    assert r2.headers["X-Consul-Index"] == index


async def test_blocked_requests_wait_on_futures_not_polling(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    index = (await client.get("/v1/health/connect/db")).headers["X-Consul-Index"]
    tasks = [
        asyncio.create_task(client.get(f"/v1/health/connect/db?index={index}&wait=30s"))
        for _ in range(20)
    ]
    await _until_blocked(agent, 20)
    # Every blocked request is parked on one future in the notifier; nothing wakes them until
    # the watched topic changes.
    assert agent.state.notifier.waiting() == 20
    await register(client, {"Name": "db", "Port": 5432, "Connect": {"SidecarService": {}}})
    async with asyncio.timeout(5):
        results = await asyncio.gather(*tasks)
    assert all(int(r.headers["X-Consul-Index"]) > int(index) for r in results)
    assert agent.state.notifier.waiting() == 0


async def test_index_zero_is_never_returned(client: httpx.AsyncClient) -> None:
    for path in (
        "/v1/health/connect/nothing",
        "/v1/catalog/service/nothing",
        "/v1/agent/connect/ca/roots",
    ):
        r = await client.get(path + "?index=0")
        assert int(r.headers["X-Consul-Index"]) >= 1


@pytest.mark.parametrize(
    ("query", "status", "text"),
    [
        ("wait=300", 400, "Invalid wait time"),
        ("wait=abc", 400, "Invalid wait time"),
        ("index=abc", 400, "Invalid index"),
        ("index=-1", 400, "Invalid index"),
        ("stale&consistent", 400, "Cannot specify ?stale with ?consistent, conflicting semantics."),
        ("passing=maybe", 400, "Invalid value for ?passing"),
        ("dc=dc9", 500, "No path to datacenter"),
    ],
)
async def test_blocking_parameter_errors(
    client: httpx.AsyncClient, query: str, status: int, text: str
) -> None:
    r = await client.get(f"/v1/health/connect/db?{query}")
    assert r.status_code == status
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == text


async def test_wait_accepts_go_durations(client: httpx.AsyncClient) -> None:
    index = (await client.get("/v1/health/connect/db")).headers["X-Consul-Index"]
    for wait in ("10ms", "0.01s", "1ms", "1m", "1h"):
        query = f"index={index}&wait={wait}" if wait.endswith("s") else f"wait={wait}"
        r = await client.get(f"/v1/health/connect/db?{query}")
        assert r.status_code == 200, wait
    # `wait=0` is valid Go syntax and means "the default wait", as in Consul.
    assert (await client.get("/v1/health/connect/db?wait=0")).status_code == 200


# -- hash blocking -----------------------------------------------------------------------


async def test_agent_service_hash_blocking(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    r = await client.get("/v1/agent/service/web-sidecar-proxy")
    assert "X-Consul-Index" not in r.headers
    h = r.headers["X-Consul-ContentHash"]
    assert r.json()["ContentHash"] == h and re.fullmatch(r"[0-9a-f]{1,16}", h)
    # Unchanged: returns the same body and hash at its wait.
    same = await client.get(f"/v1/agent/service/web-sidecar-proxy?hash={h}&wait=50ms")
    assert same.headers["X-Consul-ContentHash"] == h
    # Changed while waiting: returns promptly with a new hash.
    pending = asyncio.create_task(
        client.get(f"/v1/agent/service/web-sidecar-proxy?hash={h}&wait=30s")
    )
    await _until_blocked(agent, 1)
    await register(
        client,
        {
            "Name": "web",
            "Port": 8080,
            "Connect": {
                "SidecarService": {
                    "Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}
                }
            },
        },
    )
    async with asyncio.timeout(5):
        changed = await pending
    assert changed.headers["X-Consul-ContentHash"] != h
    assert changed.json()["Proxy"]["Upstreams"][0]["DestinationName"] == "db"
    # A stale hash answers at once.
    stale = await client.get(
        "/v1/agent/service/web-sidecar-proxy?hash=deadbeef&wait=30s", timeout=2
    )
    assert stale.status_code == 200


async def test_unrelated_check_changes_do_not_change_the_hash(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await register(client, {"Name": "web", "Port": 8080, "Check": {"TTL": "30s"}})
    h = (await client.get("/v1/agent/service/web")).headers["X-Consul-ContentHash"]
    assert (await client.put("/v1/agent/check/pass/service:web")).status_code == 200
    assert (await client.get("/v1/agent/service/web")).headers["X-Consul-ContentHash"] == h


# -- sidecar registration ----------------------------------------------------------------


async def test_sidecar_defaults(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await register(
        client,
        {
            "Name": "web",
            "Port": 8080,
            "Tags": ["v1"],
            "Meta": {"team": "a"},
            "Connect": {
                "SidecarService": {
                    "Proxy": {
                        "Config": {"handshake_timeout_ms": 999},
                        "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
                    }
                }
            },
        },
    )
    svc = (await client.get("/v1/agent/service/web-sidecar-proxy")).json()
    assert svc["Kind"] == "connect-proxy"
    assert svc["ID"] == "web-sidecar-proxy" and svc["Service"] == "web-sidecar-proxy"
    assert svc["Port"] == 21000
    assert svc["Tags"] == ["v1"] and svc["Meta"] == {"team": "a"}
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    proxy = svc["Proxy"]
    assert proxy["DestinationServiceName"] == "web"
    assert proxy["DestinationServiceID"] == "web"
    assert proxy["LocalServiceAddress"] == "127.0.0.1"
    assert proxy["LocalServicePort"] == 8080
    assert proxy["Config"] == {"handshake_timeout_ms": 999}
    # Consul fills DestinationType at registration (issue 16).
    assert proxy["Upstreams"] == [
        {
            "DestinationName": "db",
            "LocalBindPort": 9191,
            "DestinationType": "service",
            "MeshGateway": {},
        }
    ]
    checks = (await client.get("/v1/agent/checks")).json()
    names = {c["Name"]: c for c in checks.values() if c["ServiceID"] == "web-sidecar-proxy"}
    assert set(names) == {"Connect Sidecar Listening", "Connect Sidecar Aliasing web"}
    assert names["Connect Sidecar Listening"]["Definition"]["TCP"] == "127.0.0.1:21000"
    # A second sidecar takes the next free port of the range.
    await register(client, {"Name": "api", "Port": 9000, "Connect": {"SidecarService": {}}})
    assert (await client.get("/v1/agent/service/api-sidecar-proxy")).json()["Port"] == 21001
    # Re-registering keeps the port it had.
    await register(client, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    assert (await client.get("/v1/agent/service/web-sidecar-proxy")).json()["Port"] == 21000
    # Deregistering the parent removes its sidecar.
    assert (await client.put("/v1/agent/service/deregister/web")).status_code == 200
    assert (await client.get("/v1/agent/service/web-sidecar-proxy")).status_code == 404


async def test_snake_case_registration_is_accepted(client: httpx.AsyncClient) -> None:
    await register(
        client,
        {
            "name": "web",
            "port": 8080,
            "connect": {
                "sidecar_service": {
                    "proxy": {"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}
                }
            },
        },
    )
    svc = (await client.get("/v1/agent/service/web-sidecar-proxy")).json()
    assert svc["Proxy"]["Upstreams"][0]["LocalBindPort"] == 9191


async def test_agent_services_and_catalog(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    services = (await client.get("/v1/agent/services")).json()
    assert set(services) == {"web", "web-sidecar-proxy"}
    assert "ContentHash" not in services["web"]
    catalog = (await client.get("/v1/catalog/service/web")).json()
    assert [c["ServiceID"] for c in catalog] == ["web"]
    assert catalog[0]["Node"] == "test-node" and catalog[0]["ServicePort"] == 8080
    connect = (await client.get("/v1/catalog/connect/web")).json()
    assert [c["ServiceID"] for c in connect] == ["web-sidecar-proxy"]
    assert connect[0]["ServiceProxy"]["DestinationServiceName"] == "web"


async def test_native_service_is_a_connect_endpoint(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "native", "Port": 7000, "Connect": {"Native": True}})
    (entry,) = (await client.get("/v1/health/connect/native")).json()
    assert entry["Service"]["Connect"] == {"Native": True}


# -- authorize ---------------------------------------------------------------------------


async def _intention(client: httpx.AsyncClient, src: str, dst: str, action: str) -> None:
    r = await client.put(
        f"/v1/connect/intentions/exact?source={src}&destination={dst}", json={"Action": action}
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("intentions", "source", "allowed", "reason"),
    [
        ([], "web", True, "Default behavior configured by ACLs"),
        (
            [("web", "db", "deny")],
            "web",
            False,
            "Matched L4 intention: default/web => default/db (Precedence: 9, Action: DENY)",
        ),
        (
            [("*", "db", "deny"), ("web", "db", "allow")],
            "web",
            True,
            "Precedence: 9, Action: ALLOW",
        ),
        (
            [("*", "db", "deny"), ("web", "db", "allow")],
            "api",
            False,
            "default/* => default/db (Precedence: 8, Action: DENY)",
        ),
        ([("web", "*", "deny"), ("*", "db", "allow")], "web", True, "Precedence: 8, Action: ALLOW"),
        (
            [("web", "*", "deny"), ("*", "*", "allow")],
            "web",
            False,
            "default/web => default/* (Precedence: 6, Action: DENY)",
        ),
        (
            [("*", "*", "deny")],
            "web",
            False,
            "default/* => default/* (Precedence: 5, Action: DENY)",
        ),
        ([("api", "db", "deny")], "web", True, "Default behavior configured by ACLs"),
    ],
)
async def test_authorize_precedence_table(
    agent: DevAgent,
    client: httpx.AsyncClient,
    intentions: list[tuple[str, str, str]],
    source: str,
    allowed: bool,
    reason: str,
) -> None:
    for src, dst, action in intentions:
        await _intention(client, src, dst, action)
    r = await authorize(client, "db", uri(agent, source))
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"Authorized", "Reason"}
    assert body["Authorized"] is allowed
    assert reason in body["Reason"]


async def test_authorize_l7_intention_denies(agent: DevAgent, client: httpx.AsyncClient) -> None:
    r = await client.put(
        "/v1/config",
        json={
            "Kind": "service-intentions",
            "Name": "db",
            "Sources": [
                {"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/"}}]}
            ],
        },
    )
    assert r.status_code == 200, r.text
    body = (await authorize(client, "db", uri(agent, "web"))).json()
    assert body == {
        "Authorized": False,
        "Reason": "Matched L7 intention: default/web => default/db (Precedence: 9, Permissions: 1)",
    }


async def test_authorize_legacy_intention_reason_carries_its_id(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    r = await client.post(
        "/v1/connect/intentions",
        json={
            "SourceName": "web",
            "DestinationName": "db",
            "Action": "allow",
            "SourceType": "consul",
        },
    )
    ixn_id = r.json()["ID"]
    body = (await authorize(client, "db", uri(agent, "web"))).json()
    assert (
        body["Reason"]
        == f"Matched L4 intention: default/web => default/db (ID: {ixn_id}, Precedence: 9, Action: ALLOW)"
    )


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_default_intention_policy(policy: str) -> None:
    async with (
        DevAgent(AgentConfig(node_name="n", http_port=0, default_intention_policy=policy)) as dev,
        httpx.AsyncClient(base_url=dev.url) as c,
    ):
        body = (await authorize(c, "db", uri(dev, "web"))).json()
        assert body == {"Authorized": policy == "allow", "Reason": "Default intention policy"}


async def test_authorize_refuses_another_trust_domain_before_intentions(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    # An allow intention would match web; the foreign trust domain is refused before it.
    await _intention(client, "web", "db", "allow")
    r = await authorize(client, "db", "spiffe://Other.consul/ns/default/dc/dc1/svc/web")
    assert r.status_code == 200
    assert r.json() == {
        "Authorized": False,
        "Reason": "Identity from an external trust domain: Other.consul",
    }
    assert (await authorize(client, "db", uri(agent, "web"))).json()["Authorized"] is True


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("{not json", "Request decode failed"),
        ("[]", "Request decode failed"),
        ('{"Target": 5}', "Request decode failed"),
        (
            '{"ClientCertURI": "spiffe://x.consul/ns/default/dc/dc1/svc/web"}',
            "Target service must be specified",
        ),
        (
            '{"Target": "db", "ClientCertURI": "https://x/y"}',
            "ClientCertURI not a valid Connect identifier",
        ),
        ('{"Target": "db", "ClientCertURI": ""}', "ClientCertURI not a valid Connect identifier"),
        (
            '{"Target": "db", "ClientCertURI": "spiffe://x.consul/agent/server/dc/dc1"}',
            "ClientCertURI not a valid Service identifier",
        ),
        (
            '{"target": "db", "clientcerturi": "spiffe://TD/ap/p1/ns/default/dc/dc1/svc/web"}',
            'Mismatched partitions: "p1" != "default"',
        ),
    ],
)
async def test_authorize_bad_input(
    agent: DevAgent, client: httpx.AsyncClient, body: str, text: str
) -> None:
    body = body.replace("TD", agent.state.ca.trust_domain)
    r = await client.post("/v1/agent/connect/authorize", content=body)
    assert r.status_code == 400
    assert text in r.text


async def test_intentions_crud(agent: DevAgent, client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/v1/connect/intentions",
        json={
            "SourceName": "web",
            "DestinationName": "db",
            "Action": "allow",
            "Description": "d",
            "Meta": {"k": "v"},
        },
    )
    assert created.status_code == 200
    ixn_id = created.json()["ID"]
    got = (await client.get(f"/v1/connect/intentions/{ixn_id}")).json()
    assert got["SourceName"] == "web" and got["DestinationName"] == "db"
    assert got["Action"] == "allow" and got["Precedence"] == 9 and got["Meta"] == {"k": "v"}
    dup = await client.post(
        "/v1/connect/intentions",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert dup.status_code == 500 and "duplicate intention found" in dup.text
    upd = await client.put(
        f"/v1/connect/intentions/{ixn_id}",
        json={"SourceName": "web", "DestinationName": "db", "Action": "deny"},
    )
    assert upd.status_code == 200
    assert (await client.get(f"/v1/connect/intentions/{ixn_id}")).json()["Action"] == "deny"
    listed = (await client.get("/v1/connect/intentions")).json()
    assert [i["ID"] for i in listed] == [ixn_id]
    check = (await client.get("/v1/connect/intentions/check?source=web&destination=db")).json()
    assert check == {"Allowed": False}
    match = (await client.get("/v1/connect/intentions/match?by=destination&name=db")).json()
    assert [i["SourceName"] for i in match["db"]] == ["web"]
    assert (await client.delete(f"/v1/connect/intentions/{ixn_id}")).status_code == 200
    assert (await client.get(f"/v1/connect/intentions/{ixn_id}")).status_code == 404
    assert (await authorize(client, "db", uri(agent, "web"))).json()["Authorized"] is True


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {"SourceName": "we*", "DestinationName": "db", "Action": "allow"},
            "wildcard character '*' cannot be used with partial values",
        ),
        (
            {"SourceName": "web", "DestinationName": "db", "Action": "maybe"},
            "Action must be set to 'allow' or 'deny'",
        ),
        ({"DestinationName": "db", "Action": "allow"}, "SourceName must be set"),
        ({"SourceName": "web", "Action": "allow"}, "DestinationName must be set"),
    ],
)
async def test_bad_intentions_are_refused(
    client: httpx.AsyncClient, body: dict[str, Any], text: str
) -> None:
    r = await client.post("/v1/connect/intentions", json=body)
    assert r.status_code == 400 and text in r.text


async def test_config_entry_intentions_take_effect_live(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    entry = {
        "Kind": "service-intentions",
        "Name": "db",
        "Sources": [{"Name": "web", "Action": "deny"}],
    }
    assert (await client.put("/v1/config", json=entry)).status_code == 200
    assert (await authorize(client, "db", uri(agent, "web"))).json()["Authorized"] is False
    got = (await client.get("/v1/config/service-intentions/db")).json()
    assert got["Sources"][0]["Precedence"] == 9 and got["Sources"][0]["Type"] == "consul"
    assert (await client.delete("/v1/config/service-intentions/db")).status_code == 200
    assert (await authorize(client, "db", uri(agent, "web"))).json()["Authorized"] is True


# -- prepared queries --------------------------------------------------------------------


async def test_prepared_query_connect_execute(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "db", "Port": 5432, "Connect": {"SidecarService": {}}})
    created = await client.post(
        "/v1/query", json={"Name": "db-query", "Service": {"Service": "db"}}
    )
    assert created.status_code == 200
    qid = created.json()["ID"]
    for ref in (qid, "db-query"):
        plain = (await client.get(f"/v1/query/{ref}/execute")).json()
        assert [n["Service"]["ID"] for n in plain["Nodes"]] == ["db"]
        connect = (await client.get(f"/v1/query/{ref}/execute?connect=true&stale")).json()
        assert connect["Service"] == "db" and connect["Datacenter"] == "dc1"
        assert [n["Service"]["ID"] for n in connect["Nodes"]] == []  # the sidecar TCP check fails
    agent.set_check_status("service:db-sidecar-proxy:1", "passing")
    connect = (await client.get(f"/v1/query/{qid}/execute?connect=true")).json()
    assert [n["Service"]["ID"] for n in connect["Nodes"]] == ["db-sidecar-proxy"]
    assert (await client.get("/v1/query/nope/execute")).status_code == 404
    assert (await client.get("/v1/query/nope/execute")).text == "Query not found"
    assert (await client.post("/v1/query", json={"Name": "x", "Service": {}})).status_code == 400


# -- legacy managed-proxy endpoint -------------------------------------------------------


async def test_legacy_managed_proxy_config(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await register(
        client,
        {
            "Name": "web",
            "Port": 8080,
            "Connect": {
                "SidecarService": {
                    "Proxy": {
                        "Config": {"local_connect_timeout_ms": 500},
                        "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
                    }
                }
            },
        },
    )
    r = await client.get("/v1/agent/connect/proxy/web-sidecar-proxy")
    assert r.status_code == 200
    body = r.json()
    assert body["ProxyServiceID"] == "web-sidecar-proxy"
    assert body["TargetServiceID"] == "web" and body["TargetServiceName"] == "web"
    assert body["Config"]["bind_port"] == 21000
    assert body["Config"]["bind_address"] == "127.0.0.1"
    assert body["Config"]["local_service_address"] == "127.0.0.1:8080"
    assert body["Config"]["local_connect_timeout_ms"] == 500
    assert body["Upstreams"][0]["DestinationName"] == "db"
    assert body["Upstreams"][0]["DestinationType"] == "service"
    h = r.headers["X-Consul-ContentHash"]
    assert body["ContentHash"] == h
    pending = asyncio.create_task(
        client.get(f"/v1/agent/connect/proxy/web-sidecar-proxy?hash={h}&wait=30s")
    )
    await _until_blocked(agent, 1)
    await register(client, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    async with asyncio.timeout(5):
        changed = await pending
    assert changed.headers["X-Consul-ContentHash"] != h
    assert changed.json()["Upstreams"] == []
    missing = await client.get("/v1/agent/connect/proxy/nope")
    assert missing.status_code == 404 and missing.text == "unknown proxy service ID: nope"


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "text"),
    [
        ("PUT", "/v1/agent/service/register", "{oops", 400, "Request decode failed"),
        ("PUT", "/v1/agent/service/register", "", 400, "Request decode failed"),
        (
            "PUT",
            "/v1/agent/service/register",
            '{"Name": "web", "Port": "80"}',
            400,
            "cannot unmarshal string into Go struct field ServiceDefinition.Port of type int",
        ),
        ("PUT", "/v1/agent/service/register", '{"Port": 80}', 400, "Missing service name"),
        (
            "PUT",
            "/v1/agent/service/register",
            '{"Name": "p", "Kind": "connect-proxy", "Port": 1}',
            400,
            "Proxy.DestinationServiceName must be non-empty",
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            '{"Name": "p", "Kind": "connect-proxy", "Proxy": {"DestinationServiceName": "web"}}',
            400,
            "Port or SocketPath must be set",
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            '{"Name": "p", "Kind": "connect-proxy", "Port": 1, "Proxy": {"DestinationServiceName": "web", "Upstreams": [{"DestinationName": "db"}]}}',
            400,
            "upstream local bind port",
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            '{"Name": "p", "Kind": "weird"}',
            400,
            "invalid service kind",
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            '{"Name": "w", "Check": {"TTL": "soon"}}',
            400,
            "Invalid check",
        ),
        ("PUT", "/v1/agent/service/deregister/nope", "", 404, 'Unknown service ID "nope"'),
        ("GET", "/v1/agent/service/nope", "", 404, "unknown service ID: nope"),
        ("GET", "/v1/agent/service/register", "", 405, "method GET not allowed"),
        ("POST", "/v1/agent/connect/ca/roots", "", 405, "method POST not allowed"),
        ("GET", "/v1/agent/connect/authorize", "", 405, "method GET not allowed"),
        ("GET", "/v1/snapshot", "", 404, "404 page not found"),
        ("PUT", "/v1/agent/check/pass/nope", "", 404, 'Unknown check ID "nope"'),
        ("GET", "/v1/connect/intentions/nope", "", 404, "Intention not found"),
        ("PUT", "/v1/config", '{"Name": "x"}', 400, "does not contain a kind/Kind key"),
    ],
)
async def test_bad_input_table(
    client: httpx.AsyncClient, method: str, path: str, body: str, status: int, text: str
) -> None:
    r = await client.request(method, path, content=body)
    assert r.status_code == status, r.text
    assert text in r.text
    assert r.headers["content-type"].startswith("text/plain")


async def test_huge_body_is_refused_and_agent_keeps_serving(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/agent/service/register", content=b"{" + b" " * (2 << 20) + b"}")
    assert r.status_code == 413
    assert (await client.get("/v1/agent/self")).status_code == 200


async def test_405_carries_allow_header(client: httpx.AsyncClient) -> None:
    r = await client.delete("/v1/agent/self")
    assert r.status_code == 405 and r.headers["Allow"] == "OPTIONS,GET"


async def test_agent_self_shape(agent: DevAgent, client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/agent/self")).json()
    assert body["Config"]["Datacenter"] == "dc1"
    assert body["Config"]["NodeName"] == "test-node"
    assert body["Config"]["NodeID"] == agent.state.node.id
    assert body["xDS"]["Ports"]["Plaintext"] == 8502
    assert body["DebugConfig"]["GRPCPort"] == 8502
    # The agent was bound to port 0: HTTPPort is the port it got.
    assert body["DebugConfig"]["HTTPPort"] == agent.http_port != 0


async def test_pretty_output(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/agent/connect/ca/roots?pretty")
    assert r.text.startswith("{\n    ")


async def test_close_releases_blocked_queries() -> None:
    dev = DevAgent(AgentConfig(node_name="n"))
    await dev.start("127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=dev.url) as c:
        index = (await c.get("/v1/health/connect/db")).headers["X-Consul-Index"]
        pending = asyncio.create_task(c.get(f"/v1/health/connect/db?index={index}&wait=60s"))
        await _until_blocked(dev, 1)
        async with asyncio.timeout(5):
            await dev.close()
            r = await pending
        assert r.status_code == 200
