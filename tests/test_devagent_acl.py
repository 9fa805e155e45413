"""ACLs in the dev agent: 403 texts, token sources, identities and policies."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent
from proxy.devagent.acl import ANONYMOUS_ACCESSOR, PolicyError, parse_rules

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

ROOT = "root-secret-0123"


@pytest.fixture
async def acl_agent() -> AsyncIterator[DevAgent]:
    dev = DevAgent(
        AgentConfig(
            node_name="n", acl_enabled=True, acl_default_policy="deny", acl_initial_management=ROOT
        )
    )
    await dev.start("127.0.0.1", 0)
    try:
        yield dev
    finally:
        await dev.close()


@pytest.fixture
async def c(acl_agent: DevAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=acl_agent.url) as client:
        yield client


def uri(agent: DevAgent, service: str) -> str:
    return f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/{service}"


async def _token(c: httpx.AsyncClient, body: dict[str, object]) -> str:
    r = await c.put("/v1/acl/token", json=body, headers={"X-Consul-Token": ROOT})
    assert r.status_code == 200, r.text
    return str(r.json()["SecretID"])


async def test_missing_token_gets_consul_403_text(c: httpx.AsyncClient) -> None:
    r = await c.get("/v1/agent/connect/ca/leaf/web")
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == (
        f"Permission denied: token with AccessorID '{ANONYMOUS_ACCESSOR}' lacks permission "
        "'service:write' on \"web\""
    )


async def test_unknown_token_is_acl_not_found(c: httpx.AsyncClient) -> None:
    r = await c.get("/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "nope"})
    assert (r.status_code, r.text) == (403, "ACL not found")


async def test_roots_need_no_token(c: httpx.AsyncClient) -> None:
    assert (await c.get("/v1/agent/connect/ca/roots")).status_code == 200


@pytest.mark.parametrize("how", ["header", "query", "bearer"])
async def test_token_sources(c: httpx.AsyncClient, how: str) -> None:
    headers, params = {}, {}
    if how == "header":
        headers["X-Consul-Token"] = ROOT
    elif how == "query":
        params["token"] = ROOT
    else:
        headers["Authorization"] = f"Bearer {ROOT}"
    r = await c.get("/v1/agent/connect/ca/leaf/web", headers=headers, params=params)
    assert r.status_code == 200


async def test_service_identity_token(acl_agent: DevAgent, c: httpx.AsyncClient) -> None:
    secret = await _token(c, {"Description": "web", "ServiceIdentities": [{"ServiceName": "web"}]})
    h = {"X-Consul-Token": secret}
    assert (await c.get("/v1/agent/connect/ca/leaf/web", headers=h)).status_code == 200
    denied = await c.get("/v1/agent/connect/ca/leaf/db", headers=h)
    assert denied.status_code == 403
    assert "lacks permission 'service:write' on \"db\"" in denied.text
    accessor = (await c.get("/v1/acl/token/self", headers=h)).json()["AccessorID"]
    assert f"AccessorID '{accessor}'" in denied.text
    assert secret not in denied.text
    # Registering its own sidecar works; authorize needs service:write on the target.
    reg = await c.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}},
        headers=h,
    )
    assert reg.status_code == 200, reg.text
    ok = await c.post(
        "/v1/agent/connect/authorize",
        json={"Target": "web", "ClientCertURI": uri(acl_agent, "api")},
        headers=h,
    )
    assert ok.status_code == 200
    # Default deny and no intention: the ACL default decides.
    assert ok.json() == {"Authorized": False, "Reason": "Default behavior configured by ACLs"}
    no = await c.post(
        "/v1/agent/connect/authorize",
        json={"Target": "db", "ClientCertURI": uri(acl_agent, "web")},
        headers=h,
    )
    assert no.status_code == 403


async def test_policy_rules_read_is_not_write(c: httpx.AsyncClient) -> None:
    r = await c.put(
        "/v1/acl/policy",
        json={
            "Name": "db-read",
            "Rules": 'service "db" { policy = "read" }\nnode_prefix "" { policy = "read" }',
        },
        headers={"X-Consul-Token": ROOT},
    )
    assert r.status_code == 200, r.text
    secret = await _token(c, {"Policies": [{"Name": "db-read"}]})
    h = {"X-Consul-Token": secret}
    await c.put(
        "/v1/agent/service/register",
        json={"Name": "db", "Port": 5432},
        headers={"X-Consul-Token": ROOT},
    )
    await c.put(
        "/v1/agent/service/register",
        json={"Name": "secret", "Port": 1},
        headers={"X-Consul-Token": ROOT},
    )
    assert (await c.get("/v1/agent/service/db", headers=h)).status_code == 200
    assert (await c.get("/v1/agent/connect/ca/leaf/db", headers=h)).status_code == 403
    listed = await c.get("/v1/agent/services", headers=h)
    assert set(listed.json()) == {"db"}
    assert listed.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert [
        e["Service"]["ID"] for e in (await c.get("/v1/health/service/db", headers=h)).json()
    ] == ["db"]
    assert (await c.get("/v1/health/service/secret", headers=h)).json() == []


async def test_acl_writes_need_acl_write(c: httpx.AsyncClient) -> None:
    r = await c.put("/v1/acl/token", json={"Description": "x"})
    assert r.status_code == 403 and "'acl:write'" in r.text


async def test_acl_endpoints_without_acls() -> None:
    async with (
        DevAgent(AgentConfig(node_name="n", http_port=0)) as dev,
        httpx.AsyncClient(base_url=dev.url) as c,
    ):
        r = await c.get("/v1/acl/token/self")
        assert (r.status_code, r.text) == (401, "ACL support disabled")


async def test_tokens_never_logged(
    acl_agent: DevAgent, c: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await c.get("/v1/agent/connect/ca/leaf/web", params={"token": ROOT})
    await c.get("/v1/agent/connect/ca/leaf/web", headers={"X-Consul-Token": "wrong-secret-xyz"})
    # Only what the agent logs counts here: the test's own HTTP client logs its URLs.
    agent_lines = [
        r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    ]
    assert agent_lines is not None
    assert not any(ROOT in line or "wrong-secret-xyz" in line for line in agent_lines)


@pytest.mark.parametrize(
    ("rules", "resource", "name", "level", "allowed"),
    [
        ('service "web" { policy = "write" }', "service", "web", "write", True),
        ('service "web" { policy = "read" }', "service", "web", "write", False),
        ('service_prefix "w" { policy = "write" }', "service", "web", "write", True),
        (
            'service_prefix "" { policy = "write" }\nservice "web" { policy = "deny" }',
            "service",
            "web",
            "read",
            False,
        ),
        (
            'service_prefix "" { policy = "read" }\nservice_prefix "we" { policy = "write" }',
            "service",
            "web",
            "write",
            True,
        ),
        ('service "db" { policy = "read" }', "intention", "db", "read", True),
        ('service "db" { policy = "read" intentions = "write" }', "intention", "db", "write", True),
        ('{"service": {"db": {"policy": "write"}}}', "service", "db", "write", True),
        ('operator = "read"', "operator", "", "read", True),
    ],
)
def test_rule_evaluation(rules: str, resource: str, name: str, level: str, allowed: bool) -> None:
    from proxy.devagent.acl import Authorizer

    authz = Authorizer(enabled=True, default_allow=False, rules=parse_rules(rules))
    assert authz.allowed(resource, name, level) is allowed  # type: ignore[arg-type]


def test_bad_rules_are_refused() -> None:
    with pytest.raises(PolicyError, match="Invalid service policy"):
        parse_rules('service "web" { policy = "owner" }')
