"""The dev agent's sessions and user events over raw HTTP (Consul's shapes, texts, blocking,
invalidation by checks, ACLs), and the in-process event subscription."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent
from proxy.devagent.acl import Authorizer
from proxy.devagent.state.events import (
    EventSubscription,
    SubscriptionClosed,
    UserEvent,
    id_to_index,
)
from tests.conftest import register

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

ROOT = "root-secret-sessions"


async def _create(client: httpx.AsyncClient, body: object = None) -> httpx.Response:
    if body is None:
        return await client.put("/v1/session/create")
    return await client.put("/v1/session/create", json=body)


async def test_session_defaults_and_shape(client: httpx.AsyncClient) -> None:
    r = await _create(client)
    assert r.status_code == 200
    sid = r.json()["ID"]
    assert list(r.json()) == ["ID"]
    r = await client.get(f"/v1/session/info/{sid}")
    index = int(r.headers["X-Consul-Index"])
    assert r.json() == [
        {
            "ID": sid,
            "Name": "",
            "Node": "test-node",
            "LockDelay": 15_000_000_000,
            "Behavior": "release",
            "TTL": "",
            "NodeChecks": ["serfHealth"],
            "ServiceChecks": None,
            "CreateIndex": index,
            "ModifyIndex": index,
        }
    ]


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        ({"LockDelay": 5}, "LockDelay", 5_000_000_000),  # below 1000: seconds
        ({"lockdelay": "250ms"}, "LockDelay", 250_000_000),
        ({"LockDelay": 2_000_000_000}, "LockDelay", 2_000_000_000),
        ({"Checks": []}, "NodeChecks", []),
        ({"NodeChecks": []}, "NodeChecks", []),
        ({"behavior": "delete", "name": "n"}, "Behavior", "delete"),
        ({"TTL": "0s"}, "TTL", "0s"),
    ],
)
async def test_session_body_fields(
    client: httpx.AsyncClient, body: dict[str, object], field: str, expected: object
) -> None:
    sid = (await _create(client, body)).json()["ID"]
    assert (await client.get(f"/v1/session/info/{sid}")).json()[0][field] == expected


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Behavior": "keep"}, 500, "Invalid Behavior setting 'keep'"),
        ({"TTL": "5s"}, 500, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]"),
        (
            {"TTL": "25h"},
            500,
            "Invalid Session TTL '90000000000000', must be between [10s=24h0m0s]",
        ),
        ({"TTL": "soon"}, 500, "Session TTL 'soon' invalid: time: invalid duration \"soon\""),
        ({"Node": "elsewhere"}, 500, "Missing node registration"),
        ({"Node": ""}, 500, "Must provide Node"),
        ({"NodeChecks": ["nope"]}, 500, "Missing check 'nope' registration"),
        ({"LockDelay": "later"}, 400, 'Request decode failed: time: invalid duration "later"'),
        (
            {"Name": 5},
            400,
            "Request decode failed: json: cannot unmarshal number into Go struct field "
            "Session.Name of type string",
        ),
        (
            [1],
            400,
            "Request decode failed: json: cannot unmarshal array into Go value of type structs.Session",
        ),
    ],
)
async def test_session_create_errors(
    client: httpx.AsyncClient, body: object, status: int, text: str
) -> None:
    r = await _create(client, body)
    assert (r.status_code, r.text) == (status, text)


@pytest.mark.parametrize(
    ("method", "path", "status", "text"),
    [
        ("PUT", "/v1/session/destroy/", 400, "Missing session"),
        ("PUT", "/v1/session/renew/", 400, "Missing session"),
        ("GET", "/v1/session/info/", 400, "Missing session"),
        ("GET", "/v1/session/node/", 400, "Missing node name"),
        ("PUT", "/v1/session/renew/abc", 404, "Session id 'abc' not found"),
        ("GET", "/v1/session/create", 405, "method GET not allowed"),
        ("GET", "/v1/session/list?dc=dc9", 500, "No path to datacenter"),
    ],
)
async def test_session_route_errors(
    client: httpx.AsyncClient, method: str, path: str, status: int, text: str
) -> None:
    r = await client.request(method, path)
    assert (r.status_code, r.text) == (status, text)


async def test_unknown_session_reads_and_destroy(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/session/info/abc")
    assert (r.status_code, r.json()) == (200, [])
    assert "X-Consul-Index" in r.headers
    assert (await client.put("/v1/session/destroy/abc")).json() is True
    assert (await client.get("/v1/session/list")).json() == []
    assert (await client.get("/v1/session/node/other")).json() == []


async def test_critical_check_refuses_and_invalidates(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    r = await client.put(
        "/v1/agent/check/register", json={"Name": "disk", "TTL": "30s", "Status": "passing"}
    )
    assert r.status_code == 200, r.text
    sid = (
        await _create(client, {"NodeChecks": ["serfHealth", "disk"], "Behavior": "delete"})
    ).json()["ID"]
    assert (await client.put(f"/v1/kv/owned?acquire={sid}")).json() is True
    index = (await client.get("/v1/session/list")).headers["X-Consul-Index"]
    waiter = asyncio.create_task(client.get("/v1/session/list", params={"index": index}))
    await asyncio.wait_for(agent.state.notifier.parked.reached(1), 5)
    assert (await client.put("/v1/agent/check/fail/disk")).status_code == 200
    r = await asyncio.wait_for(waiter, 5)
    assert r.json() == []
    assert (await client.get("/v1/kv/owned")).status_code == 404  # behavior delete
    r = await _create(client, {"NodeChecks": ["disk"]})
    assert (r.status_code, r.text) == (500, "Check 'disk' is in critical state")


async def test_deregistered_check_invalidates(client: httpx.AsyncClient) -> None:
    await register(
        client,
        {
            "Name": "web",
            "Port": 80,
            "Check": {"CheckID": "web-ttl", "TTL": "30s", "Status": "passing"},
        },
    )
    r = await _create(client, {"ServiceChecks": [{"ID": "web-ttl"}]})
    assert r.status_code == 200, r.text
    sid = r.json()["ID"]
    info = (await client.get(f"/v1/session/info/{sid}")).json()[0]
    assert info["ServiceChecks"] == [{"ID": "web-ttl", "Namespace": ""}]
    await client.put("/v1/agent/service/deregister/web")
    assert (await client.get(f"/v1/session/info/{sid}")).json() == []


async def test_renew_answers_the_session_without_index(client: httpx.AsyncClient) -> None:
    sid = (await _create(client, {"TTL": "10s"})).json()["ID"]
    r = await client.put(f"/v1/session/renew/{sid}")
    assert r.status_code == 200
    assert [s["ID"] for s in r.json()] == [sid]
    assert "X-Consul-Index" not in r.headers


# -- events ------------------------------------------------------------------------------


async def test_fire_shape(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/event/fire/deploy", params={"node": "test"}, content=b"v1")
    assert r.status_code == 200
    event = r.json()
    assert list(event) == [
        "ID",
        "Name",
        "Payload",
        "NodeFilter",
        "ServiceFilter",
        "TagFilter",
        "Version",
        "LTime",
    ]
    assert (event["Name"], event["Payload"], event["NodeFilter"]) == ("deploy", "djE=", "test")
    assert (event["Version"], event["LTime"]) == (1, 0)
    r = await client.put("/v1/event/fire/empty")
    assert r.json()["Payload"] is None


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        ("/v1/event/fire/", 400, "Missing name"),
        ("/v1/event/fire/x?tag=a", 500, "Cannot provide tag filter without service filter"),
        ("/v1/event/fire/x?dc=dc2", 500, "No path to datacenter"),
    ],
)
async def test_fire_errors(client: httpx.AsyncClient, path: str, status: int, text: str) -> None:
    r = await client.put(path)
    assert (r.status_code, r.text) == (status, text)


async def test_fire_bad_regex(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/event/fire/x", params={"node": "("})
    assert r.status_code == 500
    assert r.text.startswith("Invalid node filter: error parsing regexp: ")


async def test_list_ring_filters_and_index(client: httpx.AsyncClient) -> None:
    await register(client, {"ID": "web-1", "Name": "web", "Port": 80, "Tags": ["v2"]})
    fired = {}
    for name, params in [
        ("a", {}),
        ("b", {"node": "^test-"}),
        ("c", {"node": "^other$"}),  # not this node: never received
        ("d", {"service": "^web-", "tag": "^v2$"}),
        ("e", {"service": "^web-", "tag": "^v1$"}),  # no such tag: not received
        ("f", {"service": "^web$"}),  # service filters match IDs, not names
    ]:
        fired[name] = (await client.put(f"/v1/event/fire/{name}", params=params)).json()
    r = await client.get("/v1/event/list")
    events = r.json()
    assert [e["Name"] for e in events] == ["a", "b", "d"]
    assert [e["LTime"] for e in events] == sorted(e["LTime"] for e in events)
    assert int(r.headers["X-Consul-Index"]) == id_to_index(fired["d"]["ID"])
    assert "X-Consul-KnownLeader" not in r.headers
    r = await client.get("/v1/event/list", params={"name": "b"})
    assert [e["ID"] for e in r.json()] == [fired["b"]["ID"]]
    r = await client.get("/v1/event/list", params={"name": "zzz"})
    assert (r.json(), r.headers["X-Consul-Index"]) == ([], "1")


async def test_ring_keeps_the_last_256(client: httpx.AsyncClient) -> None:
    for n in range(260):
        await client.put(f"/v1/event/fire/e{n}")
    names = [e["Name"] for e in (await client.get("/v1/event/list")).json()]
    assert names == [f"e{n}" for n in range(4, 260)]


async def test_list_blocks_while_the_index_is_unchanged(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await client.put("/v1/event/fire/first")
    index = (await client.get("/v1/event/list", params={"name": "watched"})).headers[
        "X-Consul-Index"
    ]
    assert index == "1"
    waiter = asyncio.create_task(
        client.get("/v1/event/list", params={"name": "watched", "index": index, "wait": "5s"})
    )
    await asyncio.wait_for(agent.state.notifier.parked.reached(1), 5)
    await client.put("/v1/event/fire/other")  # wakes it, but its index is unchanged
    watched = (await client.put("/v1/event/fire/watched")).json()
    r = await asyncio.wait_for(waiter, 5)
    assert [e["ID"] for e in r.json()] == [watched["ID"]]
    r = await client.get("/v1/event/list", params={"index": index, "wait": "20ms"})
    assert r.status_code == 200  # index differs from the current one: answers at once


async def test_rexec_events_go_to_subscribers_not_the_ring(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    with agent.state.events.subscribe("_rexec") as rexec, agent.state.events.subscribe() as every:
        payload = b'{"Prefix":"_rexec","Session":"s"}'
        fired = (await client.put("/v1/event/fire/_rexec", content=payload)).json()
        await client.put("/v1/event/fire/_rexec", params={"node": "^nobody$"})  # not for us
        await client.put("/v1/event/fire/deploy")
        got = await asyncio.wait_for(rexec.get(), 5)
        assert (got.id, got.name, got.payload, got.ltime > 0) == (
            fired["ID"],
            "_rexec",
            payload,
            True,
        )
        assert [(await asyncio.wait_for(every.get(), 5)).name for _ in range(2)] == [
            "_rexec",
            "deploy",
        ]
        assert rexec.dropped == 0
    assert [e["Name"] for e in (await client.get("/v1/event/list")).json()] == ["deploy"]


async def test_subscription_close_and_overflow(agent: DevAgent) -> None:
    events = agent.state.events
    allow = Authorizer(enabled=False, default_allow=True)
    sub = events.subscribe(maxsize=2)
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    events.fire("one", None, allow)
    assert (await asyncio.wait_for(waiter, 5)).name == "one"
    for name in ("two", "three", "four"):
        events.fire(name, None, allow)
    assert sub.dropped == 1
    assert [e.name async for e in _take(sub, 2)] == ["three", "four"]
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0)
    sub.close()
    with pytest.raises(SubscriptionClosed):
        await asyncio.wait_for(waiter, 5)
    # The agent's shutdown ends every subscription.
    other = events.subscribe()
    await agent.close()
    assert [e async for e in other] == []


async def _take(sub: EventSubscription, n: int) -> AsyncIterator[UserEvent]:
    for _ in range(n):
        yield await asyncio.wait_for(sub.get(), 5)


# -- ACLs --------------------------------------------------------------------------------


@pytest.fixture
async def acl_client() -> AsyncIterator[httpx.AsyncClient]:
    dev = DevAgent(
        AgentConfig(
            node_name="n", acl_enabled=True, acl_default_policy="deny", acl_initial_management=ROOT
        )
    )
    await dev.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=dev.url) as c:
            yield c
    finally:
        await dev.close()


async def _token(c: httpx.AsyncClient, rules: str, name: str = "p") -> dict[str, str]:
    root = {"X-Consul-Token": ROOT}
    r = await c.put("/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=root)
    assert r.status_code == 200, r.text
    r = await c.put("/v1/acl/token", json={"Policies": [{"Name": name}]}, headers=root)
    return {"X-Consul-Token": str(r.json()["SecretID"])}


async def test_acl_sessions(acl_client: httpx.AsyncClient) -> None:
    c = acl_client
    r = await c.put("/v1/session/create")
    assert r.status_code == 403
    assert "lacks permission 'session:write' on \"n\"" in r.text
    sid = (await c.put("/v1/session/create", headers={"X-Consul-Token": ROOT})).json()["ID"]
    reader = await _token(c, 'session "n" { policy = "read" }')
    r = await c.get("/v1/session/list", headers=reader)
    assert [s["ID"] for s in r.json()] == [sid]
    assert (await c.put(f"/v1/session/destroy/{sid}", headers=reader)).status_code == 403
    stranger = await _token(c, 'session "other" { policy = "write" }', name="q")
    r = await c.get("/v1/session/list", headers=stranger)
    assert (r.json(), r.headers["X-Consul-Results-Filtered-By-ACLs"]) == ([], "true")
    r = await c.get(f"/v1/session/info/{sid}", headers=stranger)
    assert r.json() == []


async def test_acl_events(acl_client: httpx.AsyncClient) -> None:
    c = acl_client
    r = await c.put("/v1/event/fire/deploy")
    assert (r.status_code, r.text) == (403, "Permission denied")
    root = {"X-Consul-Token": ROOT}
    await c.put("/v1/event/fire/deploy", headers=root)
    await c.put("/v1/event/fire/secret", headers=root)
    token = await _token(c, 'event_prefix "dep" { policy = "write" }')
    assert (await c.put("/v1/event/fire/deploy", headers=token)).status_code == 200
    r = await c.get("/v1/event/list", headers=token)
    assert [e["Name"] for e in r.json()] == ["deploy", "deploy"]
    assert r.headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
