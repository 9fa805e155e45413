"""The dev agent's KV, sessions, locks and events driven by py-consul (`consul.aio`), a real
Consul client, against the real agent on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator

import consul
import consul.aio
import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough


@pytest.fixture
def agent_config() -> AgentConfig:
    # Consul's own `session_ttl_min`, lowered so a TTL session expires within a second.
    return AgentConfig(node_name="test-node", session_ttl_min=0.05)


@pytest.fixture
async def c(agent: DevAgent) -> AsyncIterator[consul.aio.Consul]:
    # py-consul 1.8 builds its aiohttp connector with the deprecated `ssl_context`
    # argument; only that warning, only here, is let through.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ssl_context is deprecated", DeprecationWarning)
        client = consul.aio.Consul(host=agent.http_host, port=agent.http_port)
    try:
        yield client
    finally:
        await client.close()


async def test_kv_put_get_list_delete(c: consul.aio.Consul) -> None:
    assert await c.kv.put("app/config/a", "1") is True
    assert await c.kv.put("app/config/b", b"\x00\xff", flags=42) is True
    assert await c.kv.put("app/other", "x") is True
    index, entry = await c.kv.get("app/config/b")
    assert entry["Value"] == b"\x00\xff"
    assert entry["Flags"] == 42
    assert int(index) == entry["ModifyIndex"]
    _, entries = await c.kv.get("app/", recurse=True)
    assert [e["Key"] for e in entries] == ["app/config/a", "app/config/b", "app/other"]
    _, keys = await c.kv.get("app/", keys=True, separator="/")
    assert keys == ["app/config/", "app/other"]
    assert await c.kv.delete("app/config", recurse=True) is True
    _, keys = await c.kv.get("app/", keys=True)
    assert keys == ["app/other"]
    _, missing = await c.kv.get("app/config/a")
    assert missing is None


async def test_kv_cas(c: consul.aio.Consul) -> None:
    assert await c.kv.put("k", "v1", cas=0) is True
    assert await c.kv.put("k", "v2", cas=0) is False  # cas 0: only if absent
    _, entry = await c.kv.get("k")
    stale = entry["ModifyIndex"]
    assert await c.kv.put("k", "v2", cas=stale) is True
    assert await c.kv.put("k", "v3", cas=stale) is False
    assert await c.kv.delete("k", cas=stale) is False
    _, entry = await c.kv.get("k")
    assert entry["Value"] == b"v2"
    assert await c.kv.delete("k", cas=entry["ModifyIndex"]) is True


async def test_kv_blocking_get_wakes_on_write(c: consul.aio.Consul, agent: DevAgent) -> None:
    await c.kv.put("watched", "1")
    index, _ = await c.kv.get("watched")
    waiter = asyncio.create_task(c.kv.get("watched", index=index, wait="5s"))
    await asyncio.wait_for(agent.state.notifier.parked.reached(1), 5)
    await c.kv.put("watched", "2")
    new_index, entry = await asyncio.wait_for(waiter, 5)
    assert int(new_index) > int(index)
    assert entry["Value"] == b"2"


async def test_session_lock_acquire_release(c: consul.aio.Consul) -> None:
    s1 = await c.session.create(name="one", lock_delay=0)
    s2 = await c.session.create(name="two", lock_delay=0)
    assert await c.kv.put("lock", "a", acquire=s1) is True
    assert await c.kv.put("lock", "b", acquire=s2) is False  # held by s1
    assert await c.kv.put("lock", "c", acquire=s1) is True  # the holder again
    _, entry = await c.kv.get("lock")
    assert (entry["Session"], entry["LockIndex"], entry["Value"]) == (s1, 1, b"c")
    assert await c.kv.put("lock", "d", release=s2) is False  # not the holder
    assert await c.kv.put("lock", "e", release=s1) is True
    _, entry = await c.kv.get("lock")
    assert "Session" not in entry
    assert entry["LockIndex"] == 1
    assert await c.kv.put("lock", "f", acquire=s2) is True
    _, entry = await c.kv.get("lock")
    assert (entry["Session"], entry["LockIndex"]) == (s2, 2)


async def test_session_info_list_node_renew_destroy(c: consul.aio.Consul) -> None:
    sid = await c.session.create(name="web-lock", behavior="delete", ttl=30)
    _, info = await c.session.info(sid)
    assert info["Name"] == "web-lock"
    assert info["Behavior"] == "delete"
    assert info["TTL"] == "30s"
    assert info["Node"] == "test-node"
    assert info["NodeChecks"] == ["serfHealth"]
    _, listed = await c.session.list()
    assert [s["ID"] for s in listed] == [sid]
    _, on_node = await c.session.node("test-node")
    assert [s["ID"] for s in on_node] == [sid]
    renewed = await c.session.renew(sid)
    assert renewed["ID"] == sid
    assert await c.session.destroy(sid) is True
    _, gone = await c.session.info(sid)
    assert gone is None
    with pytest.raises(consul.NotFound):
        await c.session.renew(sid)


async def test_session_delete_behavior_removes_held_keys(c: consul.aio.Consul) -> None:
    sid = await c.session.create(behavior="delete", lock_delay=0)
    assert await c.kv.put("_rexec/job", "spec", acquire=sid) is True
    await c.kv.put("_rexec/free", "not held")
    await c.session.destroy(sid)
    _, keys = await c.kv.get("_rexec/", keys=True)
    assert keys == ["_rexec/free"]


async def _short_session(client: httpx.AsyncClient, ttl: str) -> str:
    # py-consul refuses a TTL under 10 s before sending it (Consul's default minimum), so
    # sessions shorter than that are created over plain HTTP; the rest goes through it.
    r = await client.put("/v1/session/create", json={"TTL": ttl, "LockDelay": "0s"})
    assert r.status_code == 200, r.text
    sid: str = r.json()["ID"]
    return sid


async def test_session_ttl_expiry_releases_the_lock(
    c: consul.aio.Consul, client: httpx.AsyncClient
) -> None:
    # TTL 0.1 s: Consul invalidates after TTL x 2 without a renew; the test blocks on the
    # session list until that happens.
    sid = await _short_session(client, "0.1s")
    assert await c.kv.put("held", "v", acquire=sid) is True
    index, _ = await c.session.list()
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, sessions = await asyncio.wait_for(c.session.list(index=index, wait="5s"), 5)
    elapsed = loop.time() - started
    assert sessions == []
    assert 0.15 <= elapsed < 2.0
    _, entry = await c.kv.get("held")
    assert "Session" not in entry  # behavior release: the key stays, unlocked


async def test_session_renew_keeps_it_alive(
    c: consul.aio.Consul, client: httpx.AsyncClient
) -> None:
    sid = await _short_session(client, "0.2s")
    other = await _short_session(client, "0.2s")
    # Renew `sid` whenever `other` is still alive; once `other` has expired (0.4 s after
    # its create), `sid` must still be there because it was renewed meanwhile.
    index, _ = await c.session.list()
    for _ in range(100):  # bounded: each pass waits on a change of the session table
        await c.session.renew(sid)
        index, listed = await c.session.list(index=index, wait="0.1s")
        if other not in [s["ID"] for s in listed]:
            break
    assert [s["ID"] for s in listed] == [sid]


async def test_events_fire_and_list(c: consul.aio.Consul) -> None:
    event = await c.event.fire("deploy", "v1.2")
    assert event["Name"] == "deploy"
    assert event["Version"] == 1
    await c.event.fire("other")
    index, events = await c.event.list(name="deploy")
    assert [e["ID"] for e in events] == [event["ID"]]
    assert events[0]["Payload"] == b"v1.2"
    # Consul's event index: the halves of the last event's UUID xor-ed.
    halves = events[-1]["ID"].replace("-", "")
    assert int(index) == int(halves[:16], 16) ^ int(halves[16:], 16)


async def test_events_list_blocks_until_a_new_event(c: consul.aio.Consul, agent: DevAgent) -> None:
    await c.event.fire("deploy", "first")
    index, _ = await c.event.list()
    waiter = asyncio.create_task(c.event.list(index=index, wait="5s"))
    await asyncio.wait_for(agent.state.notifier.parked.reached(1), 5)
    second = await c.event.fire("deploy", "second")
    new_index, events = await asyncio.wait_for(waiter, 5)
    assert new_index != index
    assert events[-1]["ID"] == second["ID"]
