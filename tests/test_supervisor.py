"""proxy.supervisor: live config changes of a running Proxy, and what it reports."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from proxy.config import ProxyConfig, PublicListenerConfig
from proxy.devagent import DevAgent
from tests.proxyfix import echo_app, running_proxy, upstream


def _public(port: int, app_port: int) -> PublicListenerConfig:
    return PublicListenerConfig(
        bind_address="127.0.0.1",
        bind_port=port,
        local_service_host="127.0.0.1",
        local_service_port=app_port,
    )


async def test_a_public_listener_that_cannot_bind_on_a_live_change_is_logged_as_an_error(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        async with echo_app() as app, running_proxy(agent, ProxyConfig(service="db")) as proxy:
            with caplog.at_level(logging.ERROR, logger="proxy"):
                await proxy.apply(
                    ProxyConfig(service="db", public_listener=_public(busy_port, app.port))
                )
                with pytest.raises(OSError):
                    async with asyncio.timeout(5):
                        await proxy.wait_ready()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(
        m.startswith(f"failed to start public listener 127.0.0.1:{busy_port}:") for m in errors
    ), errors


async def test_a_changed_upstream_is_rebound_and_an_unchanged_one_keeps_its_listener(
    agent: DevAgent,
) -> None:
    first = ProxyConfig(
        service="web", upstreams=(upstream("db"), upstream("cache", local_bind_address="127.0.0.2"))
    )
    async with running_proxy(agent, first) as proxy:
        before = proxy.upstreams
        assert len(before) == 2
        db_key = next(k for k in before if k[0] == "127.0.0.1")
        cache_key = next(k for k in before if k[0] == "127.0.0.2")
        changed = ProxyConfig(
            service="web",
            upstreams=(
                upstream("db"),
                upstream("cache", local_bind_address="127.0.0.2", connect_timeout=2.5),
            ),
        )
        await proxy.apply(changed)
        after = proxy.upstreams
        assert after[db_key] is before[db_key]
        assert after[cache_key] is not before[cache_key]
        await proxy.apply(ProxyConfig(service="web", upstreams=(upstream("db"),)))
        assert list(proxy.upstreams) == [db_key]
        # The stopped upstream's port no longer accepts.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.2", before[cache_key].port)
