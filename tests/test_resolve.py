"""proxy.resolve and `answers.endpoints_from_entries`: ServiceEntry -> (host, port, expected
identity), and the agent resolvers.

The entries are the dev agent's real `/v1/health/...` answers where possible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from proxy.agent import AgentClient
from proxy.answers import endpoints_from_entries
from proxy.devagent import DevAgent
from proxy.errors import AgentResponseError
from proxy.identity import SpiffeIDService
from proxy.resolve import AgentResolver, StaticResolver
from tests.conftest import register
from tests.proxyfix import agent_client


def _want(service: str, datacenter: str = "dc1") -> SpiffeIDService:
    return SpiffeIDService(host="", namespace="default", datacenter=datacenter, service=service)


def _proxy(
    name: str, port: int, *, address: str = "", destination: str = "db", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Kind": "connect-proxy",
        "Name": name,
        "ID": name,
        "Port": port,
        "Proxy": {"DestinationServiceName": destination, "LocalServicePort": 5432},
        **extra,
    }
    if address:
        body["Address"] = address
    return body


@pytest.fixture
async def http(agent: DevAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agent.url, timeout=10.0) as c:
        yield c


@pytest.fixture
async def consul(agent: DevAgent) -> AsyncIterator[AgentClient]:
    client = agent_client(agent)
    yield client
    await client.aclose()


async def _entries(http: httpx.AsyncClient, path: str) -> list[dict[str, Any]]:
    r = await http.get(path)
    assert r.status_code == 200, r.text
    body: list[dict[str, Any]] = r.json()
    return body


# -- endpoints_from_entries on the agent's own answers ------------------------------------


async def test_proxy_entries_expect_the_destination_service(
    agent: DevAgent, http: httpx.AsyncClient
) -> None:
    await register(http, _proxy("db-proxy-a", 21001, address="10.0.0.5"))
    await register(http, _proxy("db-proxy-b", 21002))  # no Service.Address: Node.Address
    entries = await _entries(http, "/v1/health/connect/db")
    assert {e["Service"]["Address"] for e in entries} == {"10.0.0.5", ""}
    assert {e["Node"]["Address"] for e in entries} == {"127.0.0.1"}

    assert sorted(endpoints_from_entries(entries)) == [
        ("10.0.0.5", 21001, _want("db")),
        ("127.0.0.1", 21002, _want("db")),
    ]


async def test_connect_native_entries_expect_their_own_name(
    agent: DevAgent, http: httpx.AsyncClient
) -> None:
    await register(
        http, {"Name": "db", "ID": "db-native", "Port": 5432, "Connect": {"Native": True}}
    )
    entries = await _entries(http, "/v1/health/connect/db")
    assert [e["Service"]["ID"] for e in entries] == ["db-native"]
    assert endpoints_from_entries(entries) == [("127.0.0.1", 5432, _want("db"))]


async def test_sidecar_entries_from_sidecar_service_registration(
    agent: DevAgent, http: httpx.AsyncClient
) -> None:
    await register(
        http, {"Name": "db", "Port": 5432, "Connect": {"SidecarService": {"Address": "10.1.1.1"}}}
    )
    entries = await _entries(http, "/v1/health/connect/db")
    (entry,) = entries
    assert entry["Service"]["ID"] == "db-sidecar-proxy"
    (endpoint,) = endpoints_from_entries(entries)
    assert endpoint == ("10.1.1.1", entry["Service"]["Port"], _want("db"))


async def test_entries_that_are_neither_proxy_nor_native_are_skipped(
    agent: DevAgent, http: httpx.AsyncClient
) -> None:
    await register(http, {"Name": "db", "ID": "db-plain", "Port": 5432})
    await register(http, _proxy("db-proxy", 21001))
    plain = await _entries(http, "/v1/health/service/db")
    assert [e["Service"]["ID"] for e in plain] == ["db-plain"]
    assert endpoints_from_entries(plain) == []
    # A proxy entry under its own name (not through /connect/) is still a proxy for db.
    proxy_entries = await _entries(http, "/v1/health/service/db-proxy")
    assert endpoints_from_entries(proxy_entries) == [("127.0.0.1", 21001, _want("db"))]


NODE = {"Node": "n1", "Address": "192.0.2.1", "Datacenter": "dc2"}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param(
            {
                "Node": NODE,
                "Service": {
                    "Kind": "connect-proxy",
                    "Service": "db-proxy",
                    "Address": "198.51.100.7",
                    "Port": 20000,
                    "Proxy": {"DestinationServiceName": "db"},
                },
            },
            [("198.51.100.7", 20000, _want("db", "dc2"))],
            id="service-address-and-node-datacenter",
        ),
        pytest.param(
            {
                "Node": NODE,
                "Service": {
                    "Kind": "connect-proxy",
                    "Service": "db-proxy",
                    "Port": 20000,
                    "Proxy": {"DestinationServiceName": "db"},
                },
            },
            [("192.0.2.1", 20000, _want("db", "dc2"))],
            id="node-address-fallback",
        ),
        pytest.param(
            {
                "Node": NODE,
                "Service": {
                    "Service": "db",
                    "Address": "",
                    "Port": 5432,
                    "Connect": {"Native": True},
                },
            },
            [("192.0.2.1", 5432, _want("db", "dc2"))],
            id="native",
        ),
        pytest.param(
            {"Node": NODE, "Service": {"Service": "db", "Port": 5432, "Connect": {}}},
            [],
            id="plain-service",
        ),
        pytest.param(
            {
                "Node": NODE,
                "Service": {"Kind": "connect-proxy", "Service": "p", "Port": 1, "Proxy": {}},
            },
            [],
            id="proxy-without-destination",
        ),
        pytest.param(
            {
                "Node": NODE,
                "Service": {"Kind": "mesh-gateway", "Service": "gw", "Port": 8443},
            },
            [],
            id="gateway",
        ),
        pytest.param(
            {
                "Node": NODE,
                "Service": {
                    "Kind": "connect-proxy",
                    "Service": "db-proxy",
                    "Port": 0,
                    "Proxy": {"DestinationServiceName": "db"},
                },
            },
            [],
            id="no-port",
        ),
        pytest.param(
            {
                "Node": {"Node": "n1", "Address": "", "Datacenter": "dc2"},
                "Service": {
                    "Kind": "connect-proxy",
                    "Service": "db-proxy",
                    "Port": 20000,
                    "Proxy": {"DestinationServiceName": "db"},
                },
            },
            [],
            id="no-address-anywhere",
        ),
    ],
)
def test_endpoints_from_entries_table(
    entry: dict[str, Any], expected: list[tuple[str, int, SpiffeIDService]]
) -> None:
    assert endpoints_from_entries([entry]) == expected


def test_expected_identity_keeps_namespace_and_partition_with_an_empty_host() -> None:
    entry = {
        "Node": NODE,
        "Service": {
            "Kind": "connect-proxy",
            "Service": "db-proxy",
            "Port": 20000,
            "Namespace": "ns1",
            "Partition": "p1",
            "Proxy": {"DestinationServiceName": "db"},
        },
    }
    ((_, _, ident),) = endpoints_from_entries([entry])
    assert ident == SpiffeIDService("", "ns1", "dc2", "db", partition="p1")
    assert ident.uri() == "spiffe:///ap/p1/ns/ns1/dc/dc2/svc/db"


# -- AgentResolver against the dev agent --------------------------------------------------


async def test_service_resolver_returns_only_passing_instances(
    agent: DevAgent, http: httpx.AsyncClient, consul: AgentClient
) -> None:
    await register(http, _proxy("db-proxy-a", 21001))
    await register(http, _proxy("db-proxy-b", 21002, address="127.0.0.2"))
    await register(
        http,
        _proxy("db-proxy-c", 21003, Check={"CheckID": "db-proxy-c-ttl", "TTL": "30s"}),
    )
    await register(http, _proxy("cache-proxy", 21009, destination="cache"))
    resolver = AgentResolver(consul, "db")

    endpoints = await resolver.resolve()
    assert sorted(endpoints) == [
        ("127.0.0.1", 21001, _want("db")),
        ("127.0.0.2", 21002, _want("db")),
    ]

    agent.set_check_status("db-proxy-c-ttl", "passing")
    endpoints = await resolver.resolve()
    assert sorted(e[1] for e in endpoints) == [21001, 21002, 21003]


async def test_service_resolver_with_no_instances_returns_nothing(consul: AgentClient) -> None:
    assert await AgentResolver(consul, "nothing-here").resolve() == []


async def test_service_resolver_for_another_datacenter_surfaces_the_agent_error(
    consul: AgentClient,
) -> None:
    resolver = AgentResolver(consul, "db", datacenter="dc9")
    with pytest.raises(AgentResponseError, match="Unexpected response code: 500"):
        await resolver.resolve()


async def test_prepared_query_resolver_executes_the_query_for_connect(
    agent: DevAgent, http: httpx.AsyncClient, consul: AgentClient
) -> None:
    await register(http, {"Name": "db", "ID": "db-1", "Port": 5432})  # the app, not Connect
    await register(http, _proxy("db-proxy-a", 21001, address="127.0.0.3"))
    r = await http.post("/v1/query", json={"Name": "db-query", "Service": {"Service": "db"}})
    assert r.status_code == 200, r.text
    query_id = r.json()["ID"]

    by_name = await AgentResolver(consul, "db-query", destination_type="prepared_query").resolve()
    by_id = await AgentResolver(consul, query_id, destination_type="prepared_query").resolve()

    assert by_name == by_id == [("127.0.0.3", 21001, _want("db"))]


async def test_resolver_type_other_than_prepared_query_is_a_service(
    agent: DevAgent, http: httpx.AsyncClient, consul: AgentClient
) -> None:
    await register(http, _proxy("db-proxy-a", 21001))
    endpoints = await AgentResolver(consul, "db", destination_type="junk").resolve()
    assert endpoints == [("127.0.0.1", 21001, _want("db"))]


async def test_static_resolver_returns_its_endpoints() -> None:
    endpoints = [("127.0.0.1", p, _want("db")) for p in (1, 2, 3)]
    resolver = StaticResolver(endpoints)
    got = await resolver.resolve()
    assert sorted(got) == endpoints
    assert resolver.endpoints == endpoints  # shuffling never reorders the source
