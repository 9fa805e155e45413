"""Live re-authorization: a real mTLS client through a real db sidecar on the dev agent,
then a deny intention or a root removed while its connection is open."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator

import httpx
import pytest

from listeners.events import Refusal
from proxy.answers import Answer, IntentionRule, intention_match
from proxy.config import ProxyConfig, load_agent_service
from proxy.devagent import DevAgent
from proxy.errors import AgentResponseError, ConfigError
from proxy.observe import ProxyMetrics
from proxy.supervisor import Proxy
from tests.conftest import wait_until
from tests.proxyfix import client_ctx, db_sidecar, echo_app, tls_exchange

REFUSED = "connect_proxy_refused_connections_total"
LABELS = {"direction": "inbound", "listener": "public_listener"}


async def _intention(agent: DevAgent, action: str) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put(
            "/v1/connect/intentions/exact?source=web&destination=db", json={"Action": action}
        )
        assert r.status_code == 200, r.text


@contextlib.asynccontextmanager
async def open_client(
    port: int, ctx: ssl.SSLContext
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(5):
        return await reader.readexactly(len(data))


async def _closed(reader: asyncio.StreamReader) -> bool:
    """Read until the proxy ends the connection (EOF or a reset): True once it has."""
    try:
        return await reader.read(65536) == b""
    except (ConnectionError, ssl.SSLError):
        return True


async def _forwarding(proxy: Proxy, n: int) -> None:
    assert proxy.public is not None
    public = proxy.public
    await wait_until(lambda: len(public.forwarding()) == n)


async def test_deny_intention_closes_an_open_connection_within_1s(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, reauthorize=True) as db:
        assert db.public is not None and db.reauthorizer is not None
        reauth = db.reauthorizer
        await wait_until(lambda: reauth.passes >= 1)  # the watch has its first answer
        async with open_client(db.public.port, client_ctx(agent, "web")) as (reader, writer):
            assert await _echo(reader, writer, b"hello") == b"hello"
            await _forwarding(db, 1)
            await _intention(agent, "deny")
            denied_at = asyncio.get_running_loop().time()
            async with asyncio.timeout(5):
                assert await _closed(reader)
            took = asyncio.get_running_loop().time() - denied_at
        assert took < 1.0, f"closed {took:.3f}s after the deny"
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value(
                    REFUSED, {"reason": Refusal.REVOKED.value, **LABELS}
                )
                == 1
            )
        )
        assert reauth.revoked == 1
        assert db.public.forwarding() == []
    lines = [r for r in caplog.records if r.name == "proxy.inbound" and hasattr(r, "fields")]
    revoked = [r for r in lines if r.fields["reason"] == "revoked_by_intention"]  # type: ignore[attr-defined]
    assert len(revoked) == 1
    assert revoked[0].getMessage() == "connection refused"
    assert revoked[0].fields["peer"].endswith("/svc/web")  # type: ignore[attr-defined]


async def test_allowed_connections_stay_open_after_an_unrelated_change(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app, reauthorize=True) as db:
        assert db.public is not None and db.reauthorizer is not None
        reauth = db.reauthorizer
        await wait_until(lambda: reauth.passes >= 1)
        async with open_client(db.public.port, client_ctx(agent, "web")) as (reader, writer):
            assert await _echo(reader, writer, b"a") == b"a"
            await _forwarding(db, 1)
            await _intention(agent, "allow")
            await wait_until(lambda: reauth.passes >= 2)
            assert await _echo(reader, writer, b"still here") == b"still here"
        assert reauth.revoked == 0


async def test_switch_off_keeps_the_connection_open(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app) as db:
        assert db.public is not None
        assert db.reauthorizer is None
        ctx = client_ctx(agent, "web")
        async with open_client(db.public.port, ctx) as (reader, writer):
            assert await _echo(reader, writer, b"before") == b"before"
            await _intention(agent, "deny")
            # The deny is in force for new connections...
            assert await tls_exchange(db.public.port, ctx, b"x") == b""
            # ...and the established one still carries bytes both ways.
            assert await _echo(reader, writer, b"after") == b"after"


async def test_removed_root_closes_connections_that_chained_to_it(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, reauthorize=True) as db:
        assert db.public is not None and db.reauthorizer is not None
        old_ctx = client_ctx(agent, "web")  # a leaf of the first root
        async with open_client(db.public.port, old_ctx) as (reader, writer):
            assert await _echo(reader, writer, b"x") == b"x"
            await _forwarding(db, 1)
            rotations = db.tls.rotations.value
            agent.state.connect_ca.rotate()
            # The proxy takes the new roots and its new leaf (both roots still trusted).
            async with asyncio.timeout(5):
                await db.tls.rotations.reached(rotations + 2)
            assert await _echo(reader, writer, b"y") == b"y"
            # The old root is pruned (the dev agent keeps it; Consul drops it in time).
            active = [r.cert_pem for r in agent.state.ca.roots if r.active]
            removed_at = asyncio.get_running_loop().time()
            assert db.tls.set_roots(active)
            async with asyncio.timeout(5):
                assert await _closed(reader)
            assert asyncio.get_running_loop().time() - removed_at < 1.0
        assert db.reauthorizer.root_removed == 1
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value(
                    REFUSED, {"reason": Refusal.ROOT_REMOVED.value, **LABELS}
                )
                == 1
            )
        )


def test_intention_match_reads_the_rules_of_the_name() -> None:
    body = {
        "db": [
            {
                "ID": "a",
                "SourceNS": "default",
                "SourceName": "web",
                "Action": "deny",
                "Precedence": 9,
                "ModifyIndex": 12,
            },
            {"ID": "b", "SourceName": "*", "Action": "allow", "Precedence": 6},
        ]
    }
    match = intention_match("/m", "db", Answer(body, 12, ""))
    assert match.index == 12
    assert match.rules == (
        IntentionRule("a", "default/web", "deny", 9, 12),
        IntentionRule("b", "*", "allow", 6, 0),
    )
    assert intention_match("/m", "db", Answer({}, 3, "")).rules == ()
    with pytest.raises(AgentResponseError, match="Precedence or ModifyIndex is not a number"):
        intention_match("/m", "db", Answer({"db": [{"Precedence": "x"}]}, 1, ""))
    with pytest.raises(AgentResponseError, match="db is not a JSON array"):
        intention_match("/m", "db", Answer({"db": {}}, 1, ""))


async def test_devagent_match_blocks_until_an_intention_changes(agent: DevAgent) -> None:
    async with httpx.AsyncClient(base_url=agent.url, timeout=10) as c:
        params = {"by": "destination", "name": "db"}
        first = await c.get("/v1/connect/intentions/match", params=params)
        assert first.status_code == 200
        index = int(first.headers["X-Consul-Index"])
        waiting = asyncio.create_task(
            c.get("/v1/connect/intentions/match", params={**params, "index": str(index)})
        )
        await asyncio.sleep(0)
        assert not waiting.done()  # answered only after the change below
        await _intention(agent, "deny")
        async with asyncio.timeout(5):
            second = await waiting
        assert int(second.headers["X-Consul-Index"]) > index
        assert [i["Action"] for i in second.json()["db"]] == ["deny"]


def _service(config: dict[str, object]) -> ProxyConfig:
    return load_agent_service(
        {
            "Kind": "connect-proxy",
            "ID": "db-sidecar-proxy",
            "Port": 1,
            "Proxy": {"DestinationServiceName": "db", "LocalServicePort": 2, "Config": config},
        }
    )


@pytest.mark.parametrize(
    ("value", "expected"), [(True, True), (False, False), ("true", True), (None, None)]
)
def test_config_key(value: object, expected: bool | None) -> None:
    loaded = _service({} if value is None else {"reauthorize": value})
    assert loaded.public_listener is not None
    assert loaded.public_listener.reauthorize is expected


def test_config_key_rejects_other_values() -> None:
    with pytest.raises(ConfigError, match="reauthorize must be true or false, got 1"):
        _service({"reauthorize": 1})
