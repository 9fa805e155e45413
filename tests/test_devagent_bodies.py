"""The dev agent's authorize trust-domain check, and bad JSON bodies on every kind of route.

Issue 12 items 1 and 5: an identity from another trust domain is a 200 `Authorized: false`
with Consul 1.2's reason; any bad body is a 400 "Request decode failed: ..." and the agent
stays up (never a 500 from a RecursionError).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent
from proxy.devagent.acl import PolicyError, parse_rules
from proxy.devagent.http.wire import MAX_DEPTH

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

AUTHORIZE = "/v1/agent/connect/authorize"
ROOT = "root-secret"


def svc_uri(host: str, service: str = "web") -> str:
    return f"spiffe://{host}/ns/default/dc/dc1/svc/{service}"


async def authorize(client: httpx.AsyncClient, uri: str, token: str = "") -> httpx.Response:
    headers = {"X-Consul-Token": token} if token else {}
    return await client.post(
        AUTHORIZE, json={"Target": "db", "ClientCertURI": uri}, headers=headers
    )


# -- item 1: the trust domain ---------------------------------------------------------------


async def test_own_trust_domain_is_authorized_in_any_case(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    own = agent.state.ca.trust_domain
    for host in (own, own.upper()):
        r = await authorize(client, svc_uri(host))
        assert (r.status_code, r.json()) == (
            200,
            {"Authorized": True, "Reason": "Default behavior configured by ACLs"},
        )


@pytest.mark.parametrize(
    "host", ["other.consul", "OTHER.consul", "", "11111111-2222-3333-4444-555555555555.consul"]
)
async def test_another_trust_domain_is_refused_with_consul_reason(
    client: httpx.AsyncClient, host: str
) -> None:
    r = await authorize(client, svc_uri(host))
    assert r.status_code == 200
    assert r.headers["X-Cache"] == "HIT"
    assert r.json() == {
        "Authorized": False,
        "Reason": f"Identity from an external trust domain: {host}",
    }


async def test_trust_domain_that_only_extends_ours_is_refused(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    for host in (agent.state.ca.trust_domain + ".evil", "x" + agent.state.ca.trust_domain):
        assert (await authorize(client, svc_uri(host))).json()["Authorized"] is False


async def test_unparsable_uri_is_400_before_the_trust_domain(client: httpx.AsyncClient) -> None:
    for uri, text in [
        ("not a uri", "ClientCertURI not a valid Connect identifier"),
        ("spiffe://other.consul/what/ever", "ClientCertURI not a valid Connect identifier"),
        (
            "spiffe://other.consul/agent/server/dc/dc1",
            "ClientCertURI not a valid Service identifier",
        ),
    ]:
        r = await authorize(client, uri)
        assert (r.status_code, r.text) == (400, text)


async def test_peer_trust_domains_hook_admits_a_peer(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    assert agent.state.connect_ca.trust_domains() == frozenset({agent.state.ca.trust_domain})
    agent.state.connect_ca.peer_trust_domains.add("peer.consul")
    assert (await authorize(client, svc_uri("Peer.consul"))).json()["Authorized"] is True
    assert (await authorize(client, svc_uri("other.consul"))).json()["Authorized"] is False


async def test_no_trust_domain_is_500_not_bootstrapped(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    agent.state.ca.trust_domain = ""
    r = await authorize(client, svc_uri("other.consul"))
    assert (r.status_code, r.text) == (500, "Connect CA not bootstrapped yet")


@pytest.fixture
async def acl_client() -> AsyncIterator[httpx.AsyncClient]:
    config = AgentConfig(
        node_name="n", acl_enabled=True, acl_default_policy="deny", acl_initial_management=ROOT
    )
    async with DevAgent(config) as dev, httpx.AsyncClient(base_url=dev.url) as c:
        yield c


async def test_acl_is_checked_before_the_trust_domain(acl_client: httpx.AsyncClient) -> None:
    r = await authorize(acl_client, svc_uri("other.consul"))
    assert r.status_code == 403
    r = await authorize(acl_client, svc_uri("other.consul"), token=ROOT)
    assert r.json() == {
        "Authorized": False,
        "Reason": "Identity from an external trust domain: other.consul",
    }


# -- item 5: bad bodies ---------------------------------------------------------------------

DEEP_ARRAY = b"[" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000
BAD_BODIES = [
    pytest.param(DEEP_ARRAY, "invalid character '[' exceeded max depth", id="deep-array"),
    pytest.param(DEEP_OBJECT, "invalid character '{' exceeded max depth", id="deep-object"),
    pytest.param(
        b'{"Meta": ' + b"[" * 600 + b"]" * 600 + b"}",
        "invalid character '[' exceeded max depth",
        id="deep-inside",
    ),
    pytest.param(b'{"Target": "\xff\xfe"}', "invalid UTF-8 at byte 12", id="invalid-utf8"),
    pytest.param(
        b'{"Target": 1e400}',
        "json: cannot unmarshal number 1e400 into Go value of type float64",
        id="float-too-large",
    ),
    pytest.param(
        b'{"Target": -' + b"9" * 5000 + b"}",
        "json: cannot unmarshal number -" + "9" * 5000 + " into Go value of type float64",
        id="int-5000-digits",
    ),
    pytest.param(
        b'{"Target": NaN}', "invalid character 'N' looking for beginning of value", id="nan"
    ),
    pytest.param(
        b'{"Target": -Infinity}',
        "invalid character 'I' looking for beginning of value",
        id="infinity",
    ),
    pytest.param(
        b'{"Target": "db"', "Expecting ',' delimiter: line 1 column 16 (char 15)", id="truncated"
    ),
]
# (method, path, Go struct named on a wrong top-level type; None: the route takes any object)
ROUTES = [
    ("POST", AUTHORIZE, "ConnectAuthorizeRequest"),
    ("PUT", "/v1/agent/service/register", "ServiceDefinition"),
    ("POST", "/v1/connect/intentions", "Intention"),
    ("PUT", "/v1/agent/check/update/none", None),
]


@pytest.mark.parametrize(("method", "path", "struct"), ROUTES)
@pytest.mark.parametrize(("raw", "text"), BAD_BODIES)
async def test_bad_body_is_400_with_consul_text(
    agent: DevAgent,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    struct: str | None,
    raw: bytes,
    text: str,
) -> None:
    with caplog.at_level(logging.ERROR):
        r = await client.request(method, path, content=raw)
    assert (r.status_code, r.text) == (400, f"Request decode failed: {text}")
    assert [rec for rec in caplog.records if rec.levelno >= logging.ERROR] == []
    # The agent is still up and still answers correctly.
    assert (await client.get("/v1/agent/self")).status_code == 200
    assert (await authorize(client, svc_uri(agent.state.ca.trust_domain))).status_code == 200


@pytest.mark.parametrize(("method", "path", "struct"), ROUTES)
@pytest.mark.parametrize(
    ("raw", "go_type"), [(b"[]", "array"), (b'"s"', "string"), (b"5", "number"), (b"true", "bool")]
)
async def test_wrong_top_level_type_names_the_struct(
    client: httpx.AsyncClient, method: str, path: str, struct: str | None, raw: bytes, go_type: str
) -> None:
    r = await client.request(method, path, content=raw)
    assert (r.status_code, r.text) == (
        400,
        f"Request decode failed: json: cannot unmarshal {go_type} into Go value of type "
        f"structs.{struct or 'object'}",
    )


async def test_empty_and_null_bodies_as_go(client: httpx.AsyncClient) -> None:
    r = await client.post(AUTHORIZE, content=b"")
    assert (r.status_code, r.text) == (400, "Request decode failed: EOF")
    # `null` leaves Go's struct empty: the first check that fails is the missing target.
    r = await client.post(AUTHORIZE, content=b"null")
    assert (r.status_code, r.text) == (400, "Target service must be specified")


async def test_depth_limit_is_exact_and_ignores_brackets_in_strings(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    # The object is depth 1, so MAX_DEPTH - 1 arrays inside it reach exactly MAX_DEPTH.
    n = MAX_DEPTH - 1
    inside = b'{"Target": ' + b"[" * n + b"]" * n + b"}"
    r = await client.post(AUTHORIZE, content=inside)
    assert (r.status_code, r.text) == (
        400,
        "Request decode failed: json: cannot unmarshal array into Go struct field "
        "ConnectAuthorizeRequest.Target of type string",
    )
    over = b'{"Target": ' + b"[" * (n + 1) + b"]" * (n + 1) + b"}"
    r = await client.post(AUTHORIZE, content=over)
    assert (r.status_code, r.text) == (
        400,
        "Request decode failed: invalid character '[' exceeded max depth",
    )
    # 100,000 brackets and an escaped quote inside a string are data, not nesting.
    target = "[{" * 50_000 + '\\"'
    uri = svc_uri(agent.state.ca.trust_domain)
    r = await client.post(
        AUTHORIZE, content=f'{{"Target": "{target}", "ClientCertURI": "{uri}"}}'.encode()
    )
    assert (r.status_code, r.json()["Authorized"]) == (200, True)


async def test_int_field_beyond_int64_is_400(client: httpx.AsyncClient) -> None:
    big = 1 << 63
    r = await client.put("/v1/agent/service/register", content=f'{{"Name": "a", "Port": {big}}}')
    assert (r.status_code, r.text) == (
        400,
        f"Request decode failed: json: cannot unmarshal number {big} into Go struct field "
        "ServiceDefinition.Port of type int",
    )
    r = await client.put(
        "/v1/agent/service/register", content=f'{{"Name": "a", "Port": {big - 1}}}'
    )
    assert (r.status_code, r.text) == (200, "")


def test_acl_rules_nested_too_deeply_are_a_policy_error() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_rules("[" * 100_000)
    assert str(caught.value) == "Failed to parse ACL rules: nested too deeply"
