"""The per-upstream blocking watch that replaces Consul's per-connection health query."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import httpx
import pytest

from proxy.agent import AgentClient
from proxy.devagent import DevAgent
from proxy.errors import AgentError
from proxy.httpflags import HTTPOptions
from proxy.resolve import WatchingResolver
from tests.conftest import wait_until


async def _register_proxy(agent: DevAgent, sid: str, port: int) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put(
            "/v1/agent/service/register",
            json={
                "Kind": "connect-proxy",
                "ID": sid,
                "Name": "db-sidecar-proxy",
                "Port": port,
                "Address": "127.0.0.1",
                "Proxy": {"DestinationServiceName": "db"},
            },
        )
        assert r.status_code == 200


async def test_connections_read_the_watched_instances(agent: DevAgent) -> None:
    await _register_proxy(agent, "db-1", 7001)
    client = AgentClient(HTTPOptions(address=agent.http_addr))
    resolver = WatchingResolver(client, "db", backoff_base=0.01)
    try:
        async with asyncio.timeout(5):
            first = await resolver.resolve()
            assert [(h, p, e.service) for h, p, e in first] == [("127.0.0.1", 7001, "db")]
            # Many resolutions, one watch: the agent holds exactly one parked query for it.
            for _ in range(20):
                assert len(await resolver.resolve()) == 1
            await agent.state.notifier.parked.reached(1)
            assert agent.state.notifier.waiting() == 1
            assert resolver.updates.value == 1
            # A new instance shows up through the blocking query, with no new poll.
            await _register_proxy(agent, "db-2", 7002)
            await resolver.updates.reached(2)
            assert sorted(p for _, p, _ in await resolver.resolve()) == [7001, 7002]
            # An instance failing its check drops out.
            async with httpx.AsyncClient(base_url=agent.url) as c:
                r = await c.put(
                    "/v1/agent/check/register",
                    json={
                        "Name": "down",
                        "CheckID": "down",
                        "ServiceID": "db-1",
                        "TTL": "1h",
                        "Status": "critical",
                    },
                )
                assert r.status_code == 200
            await resolver.updates.reached(3)
            assert [p for _, p, _ in await resolver.resolve()] == [7002]
    finally:
        await resolver.aclose()
        await client.aclose()


async def test_unreachable_agent_before_any_answer_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        client = AgentClient(HTTPOptions(address=f"127.0.0.1:{port}"))
        resolver = WatchingResolver(client, "db", backoff_base=10)
        try:
            async with asyncio.timeout(5):
                with pytest.raises(AgentError):
                    await resolver.resolve()
        finally:
            await resolver.aclose()
            await client.aclose()


async def test_the_last_instances_stay_in_use_while_the_agent_is_away(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.upstream")
    await _register_proxy(agent, "db-1", 7001)
    client = AgentClient(HTTPOptions(address=agent.http_addr))
    resolver = WatchingResolver(client, "db", backoff_base=0.01)

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    try:
        async with asyncio.timeout(5):
            assert len(await resolver.resolve()) == 1
            await agent.close()
            await wait_until(lambda: len(lines("Watch still failing")) >= 2)
            assert [(h, p) for h, p, _ in await resolver.resolve()] == [("127.0.0.1", 7001)]
    finally:
        await resolver.aclose()
        await client.aclose()
    # The one watch loop's line, with the upstream named, once for the whole outage.
    (errored,) = lines("Watch errored")
    assert re.fullmatch(
        r"Watch errored type=health_connect service=db "
        r"error=error talking to the agent: \w+: .* retry=0\.0s",
        errored,
    )
