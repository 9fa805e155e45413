"""Dev-agent shapes real clients meet (issue 14's py-consul list and issue 16's Go-client list).

Each fix is driven through py-consul (`consul`, PyPI) where py-consul exposes it, and checked
byte for byte with raw HTTP where the exact shape matters. py-consul is synchronous, so its
calls run in a thread while the in-process agent serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import consul
import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

T = TypeVar("T")
ROOT = "root-secret"
AUTHORIZE = "/v1/agent/connect/authorize"


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A py-consul call, off the loop the agent serves on."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def py_consul(agent: DevAgent, token: str | None = None) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=agent.http_port, token=token)


def svc_uri(agent: DevAgent, service: str) -> str:
    return f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/{service}"


# -- /v1/agent/self Stats ------------------------------------------------------------------


async def test_agent_self_stats_sections_as_consul(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await client.put(
        "/v1/agent/service/register",
        json={"Name": "web", "Port": 8080, "Check": {"TTL": "30s"}},
    )
    me = await call(py_consul(agent).agent.self)
    stats = me["Stats"]
    assert set(stats) >= {"agent", "build", "consul", "runtime"}
    # Every value is a string, as Consul's map[string]map[string]string.
    assert all(isinstance(v, str) for section in stats.values() for v in section.values())
    assert stats["consul"] == {
        "acl": "disabled",
        "bootstrap": "true",
        "known_datacenters": "1",
        "leader": "true",
        "leader_addr": "127.0.0.1:8300",
        "server": "true",
    }
    # The leader address is the one /v1/status/leader gives.
    assert stats["consul"]["leader_addr"] == await call(py_consul(agent).status.leader)
    assert stats["agent"] == {
        "check_monitors": "0",
        "check_ttls": "1",
        "checks": "1",
        "services": "1",
    }
    assert stats["build"]["version"] == me["Config"]["Version"]
    assert stats["build"]["revision"] == me["Config"]["Revision"][:8]
    runtime = stats["runtime"]
    assert set(runtime) == {"arch", "cpu_count", "goroutines", "max_procs", "os", "version"}
    assert runtime["os"] == "linux" and runtime["version"].startswith("python3.")
    assert runtime["cpu_count"] == str(os.cpu_count())
    assert 1 <= int(runtime["max_procs"]) <= int(runtime["cpu_count"])
    assert int(runtime["goroutines"]) >= 1  # at least the task serving this request


async def test_agent_self_stats_acl_enabled() -> None:
    config = AgentConfig(acl_enabled=True, acl_default_policy="deny", acl_initial_management=ROOT)
    # py-consul's agent.self() sends no token, so raw HTTP here.
    async with (
        DevAgent(config) as dev,
        httpx.AsyncClient(base_url=dev.url, headers={"X-Consul-Token": ROOT}) as c,
    ):
        me = (await c.get("/v1/agent/self")).json()
    assert me["Stats"]["consul"]["acl"] == "enabled"


# -- TaggedAddresses ------------------------------------------------------------------------


async def test_tagged_addresses_are_normalised_to_address_and_port(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    c = py_consul(agent)
    await call(
        c.agent.service.register,
        "web",
        port=8080,
        tagged_addresses={
            "lan": {"address": "10.0.0.1", "port": 8080},
            "wan": {"ADDRESS": "1.2.3.4"},
        },
    )
    want = {"lan": {"Address": "10.0.0.1", "Port": 8080}, "wan": {"Address": "1.2.3.4", "Port": 0}}
    assert (await call(c.agent.services))["web"]["TaggedAddresses"] == want
    assert (await client.get("/v1/agent/service/web")).json()["TaggedAddresses"] == want
    _, nodes = await call(c.catalog.service, "web")
    assert nodes[0]["ServiceTaggedAddresses"] == want
    _, health = await call(c.health.service, "web")
    assert health[0]["Service"]["TaggedAddresses"] == want


@pytest.mark.parametrize(
    ("tagged", "text"),
    [
        (
            {"lan": "10.0.0.1"},
            "json: cannot unmarshal string into Go struct field "
            "ServiceDefinition.TaggedAddresses of type structs.ServiceAddress",
        ),
        (
            {"lan": {"address": "10.0.0.1", "port": "80"}},
            "json: cannot unmarshal string into Go struct field "
            "ServiceDefinition.TaggedAddresses.Port of type int",
        ),
        (
            ["lan"],
            "json: cannot unmarshal array into Go struct field "
            "ServiceDefinition.TaggedAddresses of type map[string]structs.ServiceAddress",
        ),
    ],
)
async def test_tagged_addresses_of_the_wrong_type_are_400(
    client: httpx.AsyncClient, tagged: Any, text: str
) -> None:
    r = await client.put(
        "/v1/agent/service/register", json={"Name": "web", "TaggedAddresses": tagged}
    )
    assert (r.status_code, r.text) == (400, f"Request decode failed: {text}")


# -- config entries with ?cas= -----------------------------------------------------------------


def _defaults(protocol: str) -> dict[str, Any]:
    return {"Kind": "service-defaults", "Name": "web", "Protocol": protocol}


async def test_config_put_cas(agent: DevAgent, client: httpx.AsyncClient) -> None:
    c = py_consul(agent)
    # cas=0 creates only: the first write goes in, a second create-only does not.
    assert await call(c.config.set, "service-defaults", "web", {"Protocol": "http"}, cas=0) is True
    entry = await call(c.config.get, "service-defaults", "web")
    index = entry["ModifyIndex"]
    assert await call(c.config.set, "service-defaults", "web", {"Protocol": "tcp"}, cas=0) is False
    # A stale index answers false and changes nothing, index included.
    r = await client.put(f"/v1/config?cas={index - 1}", json=_defaults("grpc"))
    assert (r.status_code, r.json()) == (200, False)
    after = (await client.get("/v1/config/service-defaults/web")).json()
    assert (after["Protocol"], after["ModifyIndex"]) == ("http", index)
    # The current index writes, and moves the index on.
    r = await client.put(f"/v1/config?cas={index}", json=_defaults("grpc"))
    assert r.json() is True
    after = (await client.get("/v1/config/service-defaults/web")).json()
    assert after["Protocol"] == "grpc" and after["ModifyIndex"] > index
    # A non-zero index for an entry that does not exist writes nothing.
    r = await client.put("/v1/config?cas=5", json={**_defaults("tcp"), "Name": "db"})
    assert r.json() is False
    assert (await client.get("/v1/config/service-defaults/db")).status_code == 404
    # Without cas, a plain upsert as before.
    assert (await client.put("/v1/config", json=_defaults("tcp"))).json() is True


async def test_config_delete_cas(agent: DevAgent, client: httpx.AsyncClient) -> None:
    c = py_consul(agent)
    await client.put("/v1/config", json=_defaults("http"))
    index = (await client.get("/v1/config/service-defaults/web")).json()["ModifyIndex"]
    assert await call(c.config.delete, "service-defaults", "web", cas=index + 1) is False
    r = await client.delete(f"/v1/config/service-defaults/web?cas={index - 1}")
    assert (r.status_code, r.json()) == (200, False)
    assert (await client.get("/v1/config/service-defaults/web")).status_code == 200
    assert await call(c.config.delete, "service-defaults", "web", cas=index) is True
    assert (await client.get("/v1/config/service-defaults/web")).status_code == 404
    # A CAS delete of nothing is false; a plain delete answers an empty object, as Consul.
    r = await client.delete("/v1/config/service-defaults/web?cas=0")
    assert r.json() is False
    r = await client.delete("/v1/config/service-defaults/web")
    assert (r.status_code, r.json()) == (200, {})
    assert await call(c.config.delete, "service-defaults", "web") is True


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("x", 'strconv.ParseUint: parsing "x": invalid syntax'),
        ("-1", 'strconv.ParseUint: parsing "-1": invalid syntax'),
        (
            "18446744073709551616",
            'strconv.ParseUint: parsing "18446744073709551616": value out of range',
        ),
    ],
)
async def test_config_cas_that_is_no_uint64_is_consuls_500(
    client: httpx.AsyncClient, raw: str, text: str
) -> None:
    r = await client.put(f"/v1/config?cas={raw}", json=_defaults("http"))
    assert (r.status_code, r.text) == (500, text)
    r = await client.delete(f"/v1/config/service-defaults/web?cas={raw}")
    assert (r.status_code, r.text) == (500, text)
    assert (await client.get("/v1/config/service-defaults/web")).status_code == 404


# -- prepared queries: Template and Service.Connect ------------------------------------------


async def test_query_template_has_consuls_fields(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    c = py_consul(agent)
    # py-consul sends every query as a template ({"type": "name_prefix_match", ...}).
    created = await call(c.query.create, "web", name="web-q", regexp="^web-(.*)$")
    (query,) = await call(c.query.get, created["ID"])
    assert query["Template"] == {
        "Type": "name_prefix_match",
        "Regexp": "^web-(.*)$",
        "RemoveEmptyTags": False,
    }
    r = await client.post(
        "/v1/query", json={"Name": "plain", "Service": {"Service": "web"}, "Template": {"type": ""}}
    )
    (plain,) = (await client.get(f"/v1/query/{r.json()['ID']}")).json()
    assert plain["Template"] == {"Type": "", "Regexp": "", "RemoveEmptyTags": False}
    r = await client.post(
        "/v1/query",
        json={"Name": "bad", "Service": {"Service": "web"}, "Template": {"RemoveEmptyTags": "yes"}},
    )
    assert (r.status_code, r.text) == (
        400,
        "Request decode failed: json: cannot unmarshal string into Go struct field "
        "PreparedQuery.Template.RemoveEmptyTags of type bool",
    )


async def test_query_service_connect_is_a_bool(agent: DevAgent, client: httpx.AsyncClient) -> None:
    # What HashiCorp's Go client sends on Create: "Connect": false, always.
    r = await client.post(
        "/v1/query", json={"Name": "q", "Service": {"Service": "web", "Connect": False}}
    )
    assert r.status_code == 200, r.text
    (query,) = (await client.get(f"/v1/query/{r.json()['ID']}")).json()
    assert query["Service"]["Connect"] is False
    # Without the field it is false too, a bool, never an object.
    r = await client.post("/v1/query", json={"Name": "q2", "Service": {"Service": "web"}})
    (query,) = await call(py_consul(agent).query.get, r.json()["ID"])
    assert query["Service"]["Connect"] is False
    # Consul's ServiceQuery.Connect is a bool: the object form was never Consul's.
    r = await client.post(
        "/v1/query",
        json={"Name": "q3", "Service": {"Service": "web", "Connect": {"Enabled": True}}},
    )
    assert (r.status_code, r.text) == (
        400,
        "Request decode failed: json: cannot unmarshal object into Go struct field "
        "PreparedQuery.Service.Connect of type bool",
    )


async def test_query_connect_true_executes_against_proxies(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await client.put("/v1/agent/service/register", json={"Name": "db", "Port": 5432})
    await client.put(
        "/v1/agent/service/register",
        json={
            "Name": "db-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": "db"},
        },
    )
    plain = await client.post("/v1/query", json={"Name": "p", "Service": {"Service": "db"}})
    mesh = await client.post(
        "/v1/query", json={"Name": "m", "Service": {"Service": "db", "Connect": True}}
    )
    c = py_consul(agent)
    (found,) = (await call(c.query.execute, plain.json()["ID"]))["Nodes"]
    assert found["Service"]["Port"] == 5432
    (found,) = (await call(c.query.execute, mesh.json()["ID"]))["Nodes"]
    assert (found["Service"]["Kind"], found["Service"]["Port"]) == ("connect-proxy", 21000)


# -- sidecar upstreams: DestinationType --------------------------------------------------------


async def test_upstream_without_destination_type_comes_back_as_service(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await call(
        py_consul(agent).agent.service.register,
        "web",
        port=8080,
        connect={
            "SidecarService": {
                "Proxy": {
                    "Upstreams": [
                        {"DestinationName": "db", "LocalBindPort": 9191},
                        {
                            "DestinationName": "geo",
                            "DestinationType": "prepared_query",
                            "LocalBindPort": 9192,
                        },
                    ]
                }
            }
        },
    )
    svc = (await client.get("/v1/agent/service/web-sidecar-proxy")).json()
    types = {u["DestinationName"]: u["DestinationType"] for u in svc["Proxy"]["Upstreams"]}
    assert types == {"db": "service", "geo": "prepared_query"}
    # The catalog and health views carry the same record.
    (entry,) = (await client.get("/v1/health/connect/web")).json()
    assert entry["Service"]["Proxy"]["Upstreams"][0]["DestinationType"] == "service"
    # A proxy registered directly (not as a sidecar) gets the same default.
    await client.put(
        "/v1/agent/service/register",
        json={
            "Name": "api-proxy",
            "Kind": "connect-proxy",
            "Port": 21001,
            "Proxy": {
                "DestinationServiceName": "api",
                "Upstreams": [{"destination_name": "db", "local_bind_port": 9300}],
            },
        },
    )
    svc = (await client.get("/v1/agent/service/api-proxy")).json()
    assert svc["Proxy"]["Upstreams"][0]["DestinationType"] == "service"


# -- 405 and OPTIONS ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        (AUTHORIZE, "OPTIONS,POST"),
        ("/v1/agent/self", "OPTIONS,GET"),
        ("/v1/config", "OPTIONS,PUT"),
        ("/v1/config/service-defaults/web", "OPTIONS,GET,DELETE"),
        ("/v1/connect/intentions/exact", "OPTIONS,GET,PUT,DELETE"),
        ("/v1/query/some-id", "OPTIONS,GET,PUT,DELETE"),
        ("/v1/query/some-id/execute", "OPTIONS,GET"),
    ],
)
async def test_options_answers_200_with_allow(
    client: httpx.AsyncClient, path: str, allow: str
) -> None:
    r = await client.options(path)
    assert (r.status_code, r.headers["Allow"], r.content) == (200, allow, b"")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", AUTHORIZE, "OPTIONS,POST"),
        ("GET", AUTHORIZE, "OPTIONS,POST"),
        ("POST", "/v1/agent/service/register", "OPTIONS,PUT"),
        ("PATCH", "/v1/connect/ca/configuration", "OPTIONS,GET,PUT"),
        # Consul's query handler checks these itself: its 405 lists no OPTIONS.
        ("POST", "/v1/query/some-id", "GET,PUT,DELETE"),
        ("PUT", "/v1/query/some-id/execute", "GET"),
    ],
)
async def test_405_allow_is_consuls(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    r = await client.request(method, path)
    assert (r.status_code, r.headers["Allow"], r.text) == (
        405,
        allow,
        f"method {method} not allowed",
    )


async def test_py_consul_authorize_meets_consuls_405(agent: DevAgent) -> None:
    # py-consul's authorize() sends PUT; Consul registers the endpoint for POST only.
    with pytest.raises(consul.ConsulException, match="405 method PUT not allowed"):
        await call(py_consul(agent).agent.connect.authorize, "db", svc_uri(agent, "web"), "0e")


# -- authorize with default_policy = deny -------------------------------------------------------


@pytest.fixture
async def deny_agent() -> AsyncIterator[DevAgent]:
    config = AgentConfig(acl_enabled=True, acl_default_policy="deny", acl_initial_management=ROOT)
    async with DevAgent(config) as dev:
        yield dev


async def _authorize(dev: DevAgent, target: str, source: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=dev.url, headers={"X-Consul-Token": ROOT}) as c:
        r = await c.post(AUTHORIZE, json={"Target": target, "ClientCertURI": svc_uri(dev, source)})
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result


async def test_management_token_gets_the_acl_default_deny(deny_agent: DevAgent) -> None:
    # Consul's TestAgentConnectAuthorize_defaultDeny: the management token, no intention.
    assert await _authorize(deny_agent, "db", "web") == {
        "Authorized": False,
        "Reason": "Default behavior configured by ACLs",
    }
    c = py_consul(deny_agent, ROOT)
    assert await call(c.connect.intentions.check, "web", "db") is False
    # A matching allow intention still decides first.
    async with httpx.AsyncClient(base_url=deny_agent.url, headers={"X-Consul-Token": ROOT}) as http:
        r = await http.put(
            "/v1/connect/intentions/exact?source=web&destination=db", json={"Action": "allow"}
        )
        assert r.status_code == 200, r.text
    result = await _authorize(deny_agent, "db", "web")
    assert result["Authorized"] is True
    assert result["Reason"].startswith("Matched L4 intention:")
    assert (await _authorize(deny_agent, "db", "api"))["Authorized"] is False


async def test_management_token_gets_the_acl_default_allow() -> None:
    config = AgentConfig(acl_enabled=True, acl_default_policy="allow", acl_initial_management=ROOT)
    async with DevAgent(config) as dev:
        assert await _authorize(dev, "db", "web") == {
            "Authorized": True,
            "Reason": "Default behavior configured by ACLs",
        }
