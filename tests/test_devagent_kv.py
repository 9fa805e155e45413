"""The dev agent's KV store over raw HTTP: Consul's shapes, headers, status codes, texts,
blocking queries, locks with lock delays, and ACLs."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

ROOT = "root-secret-kv"


async def _session(client: httpx.AsyncClient, **body: object) -> str:
    r = await client.put("/v1/session/create", json=body)
    assert r.status_code == 200, r.text
    sid: str = r.json()["ID"]
    return sid


async def test_entry_shape_and_headers(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/kv/a/b?flags=7", content=b"hello")
    assert (r.status_code, r.json()) == (200, True)
    r = await client.get("/v1/kv/a/b")
    assert r.status_code == 200
    index = int(r.headers["X-Consul-Index"])
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"
    assert r.text == (
        '[{"LockIndex":0,"Key":"a/b","Flags":7,"Value":"aGVsbG8=",'
        f'"CreateIndex":{index},"ModifyIndex":{index}}}]'
    )


async def test_empty_value_is_null_and_unchanged_put_keeps_the_index(
    client: httpx.AsyncClient,
) -> None:
    await client.put("/v1/kv/empty")
    first = (await client.get("/v1/kv/empty")).json()[0]
    assert first["Value"] is None
    assert (await client.put("/v1/kv/empty")).json() is True
    assert (await client.get("/v1/kv/empty")).json()[0]["ModifyIndex"] == first["ModifyIndex"]


async def test_missing_key_is_404_with_index(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/present", content=b"x")
    r = await client.get("/v1/kv/absent")
    assert r.status_code == 404
    assert r.content == b""
    assert int(r.headers["X-Consul-Index"]) >= 1
    r = await client.get("/v1/kv/nothing/", params={"recurse": ""})
    assert r.status_code == 404
    assert "X-Consul-Index" in r.headers
    r = await client.get("/v1/kv/nothing/", params={"keys": ""})
    assert r.status_code == 404
    r = await client.get("/v1/kv/", params={"keys": ""})  # the root lists, even empty
    assert (r.status_code, r.json()) == (200, ["present"])


async def test_raw(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/page", content=b"<script>x</script>")
    r = await client.get("/v1/kv/page", params={"raw": ""})
    assert r.status_code == 200
    assert r.content == b"<script>x</script>"
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Security-Policy"] == "sandbox"
    assert "X-Consul-Index" in r.headers


async def test_keys_with_separator(client: httpx.AsyncClient) -> None:
    for key in ("web/a/1", "web/a/2", "web/b", "webx", "other"):
        await client.put(f"/v1/kv/{key}", content=b"v")
    r = await client.get("/v1/kv/web/", params={"keys": "", "separator": "/"})
    assert r.json() == ["web/a/", "web/b"]
    r = await client.get("/v1/kv/web", params={"keys": "", "seperator": "/"})
    assert r.json() == ["web/", "webx"]
    r = await client.get("/v1/kv/web", params={"keys": ""})
    assert r.json() == ["web/a/1", "web/a/2", "web/b", "webx"]


async def test_leading_slash_is_dropped(client: httpx.AsyncClient) -> None:
    assert (await client.put("/v1/kv//slashed", content=b"1")).json() is True
    assert (await client.get("/v1/kv/slashed")).json()[0]["Key"] == "slashed"


@pytest.mark.parametrize(
    ("method", "path", "status", "text"),
    [
        ("GET", "/v1/kv/", 400, "Missing key name"),
        ("PUT", "/v1/kv/", 400, "Missing key name"),
        ("DELETE", "/v1/kv/", 400, "Missing key name"),
        ("PUT", "/v1/kv/k?cas=1&acquire=s", 400, "Conflicting flags: acquire=s&cas=1"),
        ("PUT", "/v1/kv/k?release=s&acquire=s", 400, "Conflicting flags: acquire=s&release=s"),
        ("DELETE", "/v1/kv/k?recurse&cas=1", 400, "Conflicting flags: cas=1&recurse="),
        ("PUT", "/v1/kv/k?flags=x", 500, 'strconv.ParseUint: parsing "x": invalid syntax'),
        ("PUT", "/v1/kv/k?cas=-1", 500, 'strconv.ParseUint: parsing "-1": invalid syntax'),
        (
            "PUT",
            "/v1/kv/k?flags=18446744073709551616",
            500,
            'strconv.ParseUint: parsing "18446744073709551616": value out of range',
        ),
        ("PUT", "/v1/kv/k?acquire=", 500, "missing session"),
        ("PUT", "/v1/kv/k?acquire=nope", 500, 'invalid session "nope"'),
        ("POST", "/v1/kv/k", 405, "method POST not allowed"),
        ("GET", "/v1/kv/k?index=x", 400, "Invalid index"),
    ],
)
async def test_errors(
    client: httpx.AsyncClient, method: str, path: str, status: int, text: str
) -> None:
    r = await client.request(method, path)
    assert (r.status_code, r.text) == (status, text)


async def test_value_over_512_kib_is_413(client: httpx.AsyncClient) -> None:
    limit = 512 * 1024
    assert (await client.put("/v1/kv/big", content=b"x" * limit)).json() is True
    r = await client.put("/v1/kv/big", content=b"y" * (limit + 1))
    assert r.status_code == 413
    assert r.text == (
        f"Request body({limit + 1} bytes) too large, max size: {limit} bytes. See "
        "https://www.consul.io/docs/agent/config/config-files#kv_max_value_size."
    )

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(9):
            yield b"z" * 65536

    r = await client.put("/v1/kv/big", content=chunked())
    assert r.status_code == 413
    assert (await client.get("/v1/kv/big", params={"raw": ""})).content == b"x" * limit


async def test_delete_recurse_and_cas(client: httpx.AsyncClient) -> None:
    for key in ("t/1", "t/2", "u"):
        await client.put(f"/v1/kv/{key}", content=b"v")
    assert (await client.delete("/v1/kv/t", params={"recurse": ""})).json() is True
    assert (await client.get("/v1/kv/", params={"keys": ""})).json() == ["u"]
    # A missing key matches any cas index, as in Consul's state store.
    assert (await client.delete("/v1/kv/gone", params={"cas": "5"})).json() is True
    modify = (await client.get("/v1/kv/u")).json()[0]["ModifyIndex"]
    assert (await client.delete("/v1/kv/u", params={"cas": str(modify + 1)})).json() is False
    assert (await client.delete("/v1/kv/u", params={"cas": str(modify)})).json() is True


async def test_prefix_index_moves_on_delete(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/p/a", content=b"1")
    before = int((await client.get("/v1/kv/p/", params={"keys": ""})).headers["X-Consul-Index"])
    await client.delete("/v1/kv/p/a")
    r = await client.get("/v1/kv/p/", params={"keys": ""})
    assert r.status_code == 404
    assert int(r.headers["X-Consul-Index"]) > before  # the tombstone's index


async def test_blocking_keys_query(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/job/S/job", content=b"spec")
    r = await client.get("/v1/kv/job/S/", params={"keys": ""})
    index = r.headers["X-Consul-Index"]
    waiter = asyncio.create_task(
        client.get("/v1/kv/job/S/", params={"keys": "", "index": index, "wait": "5s"})
    )
    await asyncio.wait_for(agent.state.notifier.parked.reached(1), 5)
    await client.put("/v1/kv/unrelated", content=b"x")  # wakes the query, moves nothing
    await client.put("/v1/kv/job/S/node/ack")
    r = await asyncio.wait_for(waiter, 5)
    assert r.json() == ["job/S/job", "job/S/node/ack"]
    assert int(r.headers["X-Consul-Index"]) > int(index)


async def test_blocking_get_times_out_with_same_index(client: httpx.AsyncClient) -> None:
    await client.put("/v1/kv/still", content=b"1")
    index = (await client.get("/v1/kv/still")).headers["X-Consul-Index"]
    r = await client.get("/v1/kv/still", params={"index": index, "wait": "50ms"})
    assert r.status_code == 200
    assert r.headers["X-Consul-Index"] == index


async def test_lock_index_and_lock_delay(client: httpx.AsyncClient) -> None:
    s1 = await _session(client, LockDelay="10s")
    s2 = await _session(client, LockDelay="0s")
    assert (await client.put(f"/v1/kv/l?acquire={s1}", content=b"a")).json() is True
    assert (await client.get("/v1/kv/l")).json()[0]["LockIndex"] == 1
    await client.put(f"/v1/session/destroy/{s1}")
    entry = (await client.get("/v1/kv/l")).json()[0]
    assert "Session" not in entry  # released, not deleted
    assert entry["Value"] == base64.b64encode(b"a").decode()
    # s1's lock delay (10 s) holds the key against every session after the invalidation.
    assert (await client.put(f"/v1/kv/l?acquire={s2}")).json() is False
    # A plain release does not start a lock delay.
    assert (await client.put(f"/v1/kv/m?acquire={s2}")).json() is True
    assert (await client.put(f"/v1/kv/m?release={s2}")).json() is True
    s3 = await _session(client)
    assert (await client.put(f"/v1/kv/m?acquire={s3}")).json() is True
    assert (await client.get("/v1/kv/m")).json()[0]["LockIndex"] == 2


async def test_plain_put_keeps_the_lock_holder(client: httpx.AsyncClient) -> None:
    sid = await _session(client)
    await client.put(f"/v1/kv/held?acquire={sid}", content=b"1")
    await client.put("/v1/kv/held", content=b"2")
    entry = (await client.get("/v1/kv/held")).json()[0]
    assert (entry["Session"], entry["Value"]) == (sid, base64.b64encode(b"2").decode())


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


async def _token(c: httpx.AsyncClient, rules: str) -> str:
    root = {"X-Consul-Token": ROOT}
    r = await c.put("/v1/acl/policy", json={"Name": "p", "Rules": rules}, headers=root)
    assert r.status_code == 200, r.text
    r = await c.put("/v1/acl/token", json={"Policies": [{"Name": "p"}]}, headers=root)
    return str(r.json()["SecretID"])


async def test_acl_key_rules(acl_client: httpx.AsyncClient) -> None:
    c = acl_client
    root = {"X-Consul-Token": ROOT}
    for key in ("app/a", "app/secret/x", "other"):
        assert (await c.put(f"/v1/kv/{key}", content=b"v", headers=root)).json() is True
    token = await _token(
        c,
        'key_prefix "app/" { policy = "write" }\nkey_prefix "app/secret/" { policy = "deny" }',
    )
    h = {"X-Consul-Token": token}
    assert (await c.get("/v1/kv/app/a", headers=h)).status_code == 200
    r = await c.get("/v1/kv/other", headers=h)
    assert r.status_code == 403
    assert "lacks permission 'key:read' on \"other\"" in r.text
    r = await c.put("/v1/kv/other", content=b"x", headers=h)
    assert (r.status_code, "'key:write'" in r.text) == (403, True)
    # Lists are filtered, not refused.
    r = await c.get("/v1/kv/", params={"recurse": ""}, headers=h)
    assert [e["Key"] for e in r.json()] == ["app/a"]
    r = await c.get("/v1/kv/", params={"keys": ""}, headers=h)
    assert r.json() == ["app/a"]
    # A recursive delete needs write on everything under the prefix.
    r = await c.delete("/v1/kv/app/", params={"recurse": ""}, headers=h)
    assert (r.status_code, r.text) == (403, "Permission denied")
    assert (await c.delete("/v1/kv/app/a", headers=h)).json() is True
