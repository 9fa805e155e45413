"""The `connect-proxy` configuration modes end to end against the dev agent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from listeners.tls.contexts import describe_engine
from proxy.command import proxy_main, serve
from proxy.demo import ReservedPorts
from proxy.devagent import AgentConfig, DevAgent
from proxy.proxyargs import ProxyOptions, parse_proxy_args
from tests.proxyfix import (
    EchoApp,
    LogWaiter,
    client_ctx,
    echo_app,
    log_waiter,
    plain_exchange,
    tls_exchange,
)


@contextlib.asynccontextmanager
async def serving(options: ProxyOptions, **kwargs: Any) -> AsyncIterator[asyncio.Task[int]]:
    """Run `serve()` in a task; on exit, stop it and expect exit code 0."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(options, stop, watch_backoff=0.05, **kwargs))
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(10):
            code = await task
        assert code == 0


async def _register(agent: DevAgent, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put("/v1/agent/service/register", json=body)
        assert r.status_code == 200, r.text


@pytest.fixture
def logs() -> Iterator[LogWaiter]:
    with log_waiter() as waiter:
        yield waiter


async def _wait_listening(logs: LogWaiter, port: int) -> None:
    await logs.wait_for(f"bind_addr=127.0.0.1:{port}")


def _sidecar(
    name: str, app: EchoApp, port: int, upstreams: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    proxy: dict[str, Any] = {"Upstreams": upstreams} if upstreams else {}
    return {
        "Name": name,
        "Port": app.port,
        "Connect": {"SidecarService": {"Port": port, "Address": "127.0.0.1", "Proxy": proxy}},
    }


async def test_sidecar_mode_end_to_end_with_live_upstream_changes(
    agent: DevAgent, logs: LogWaiter, ports: ReservedPorts
) -> None:
    async with echo_app() as db_app, echo_app() as cache_app:
        db_port, web_port, cache_port = ports.take(), ports.take(), ports.take()
        up_db, up_cache = ports.take(), ports.take()
        await _register(agent, _sidecar("db", db_app, db_port))
        await _register(agent, _sidecar("cache", cache_app, cache_port))
        await _register(
            agent,
            _sidecar("web", db_app, web_port, [{"DestinationName": "db", "LocalBindPort": up_db}]),
        )
        env = {"CONSUL_HTTP_ADDR": agent.http_addr}
        db = parse_proxy_args(["-sidecar-for", "db"], env)
        cache = parse_proxy_args(["-sidecar-for", "cache"], env)
        web = parse_proxy_args(["-sidecar-for", "WEB"], env)  # case-insensitive, as Consul
        async with serving(db), serving(cache), serving(web):
            async with asyncio.timeout(10):
                await _wait_listening(logs, up_db)
                await _wait_listening(logs, db_port)
                await _wait_listening(logs, cache_port)
                # The db sidecar's TCP check must pass before web can discover it.
                async with httpx.AsyncClient(base_url=agent.url) as c:
                    index = "0"
                    while not (
                        r := await c.get(f"/v1/health/connect/db?passing&index={index}&wait=5s")
                    ).json():
                        index = r.headers["X-Consul-Index"]
                assert await plain_exchange(up_db, b"to db") == b"to db"
                # Add an upstream live: a listener appears on its port.
                await _register(
                    agent,
                    _sidecar(
                        "web",
                        db_app,
                        web_port,
                        [
                            {"DestinationName": "db", "LocalBindPort": up_db},
                            {"DestinationName": "cache", "LocalBindPort": up_cache},
                        ],
                    ),
                )
                await _wait_listening(logs, up_cache)
                async with httpx.AsyncClient(base_url=agent.url) as c:
                    index = "0"
                    while not (
                        r := await c.get(f"/v1/health/connect/cache?passing&index={index}&wait=5s")
                    ).json():
                        index = r.headers["X-Consul-Index"]
                assert await plain_exchange(up_cache, b"to cache") == b"to cache"
                # Remove the db upstream live: its port stops accepting.
                await _register(
                    agent,
                    _sidecar(
                        "web",
                        db_app,
                        web_port,
                        [{"DestinationName": "cache", "LocalBindPort": up_cache}],
                    ),
                )
                # The listening socket is closed in the same step that logs this line, so
                # no connection can race with the close (see the note in Listener).
                await logs.wait_for(f"stopping upstream listener 127.0.0.1:{up_db}->")
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection("127.0.0.1", up_db)
                assert await plain_exchange(up_cache, b"still") == b"still"


async def test_proxy_id_mode_serves_public_listener(
    agent: DevAgent, logs: LogWaiter, ports: ReservedPorts
) -> None:
    async with echo_app() as app:
        port = ports.take()
        await _register(agent, _sidecar("db", app, port))
        options = parse_proxy_args(
            ["-proxy-id", "db-sidecar-proxy", "-http-addr", agent.http_addr], {}
        )
        async with serving(options):
            async with asyncio.timeout(10):
                await _wait_listening(logs, port)
            assert await tls_exchange(port, client_ctx(agent, "web"), b"hello") == b"hello"


async def test_legacy_managed_proxy_mode_from_env(logs: LogWaiter, ports: ReservedPorts) -> None:
    async with (
        DevAgent(AgentConfig(node_name="n", http_port=0, emulate_consul_1_2=True)) as agent,
        echo_app() as app,
    ):
        port = ports.take()
        await _register(agent, _sidecar("db", app, port))
        env = {
            "CONSUL_HTTP_ADDR": agent.http_addr,
            "CONNECT_PROXY_ID": "db-sidecar-proxy",
            "CONNECT_PROXY_TOKEN": "managed-proxy-token",
        }
        options = parse_proxy_args([], env)
        assert options.legacy
        async with serving(options):
            async with asyncio.timeout(10):
                await _wait_listening(logs, port)
            assert await tls_exchange(port, client_ctx(agent, "web"), b"legacy") == b"legacy"


async def test_falls_back_to_managed_proxy_endpoint_on_404(
    logs: LogWaiter, ports: ReservedPorts
) -> None:
    async with (
        DevAgent(AgentConfig(node_name="n", http_port=0, emulate_consul_1_2=True)) as agent,
        echo_app() as app,
    ):
        port = ports.take()
        await _register(agent, _sidecar("db", app, port))
        options = parse_proxy_args(
            ["-proxy-id", "db-sidecar-proxy", "-http-addr", agent.http_addr], {}
        )
        assert not options.legacy
        async with serving(options):
            async with asyncio.timeout(10):
                await _wait_listening(logs, port)
            assert await tls_exchange(port, client_ctx(agent, "web"), b"fallback") == b"fallback"
        assert any("trying the managed-proxy endpoint" in line for line in logs.lines)


async def test_flags_mode_with_register_lifecycle(
    agent: DevAgent, logs: LogWaiter, ports: ReservedPorts
) -> None:
    async with echo_app() as app:
        port = ports.take()
        options = parse_proxy_args(
            [
                "-service",
                "db",
                "-listen",
                f"127.0.0.1:{port}",
                "-service-addr",
                f"127.0.0.1:{app.port}",
                "-register",
                "-register-id",
                "one",
                "-http-addr",
                agent.http_addr,
            ],
            {},
        )
        async with httpx.AsyncClient(base_url=agent.url) as c:
            async with serving(options, register_periods=(0.3, 0.3)):
                async with asyncio.timeout(10):
                    index = "0"
                    while True:
                        r = await c.get(f"/v1/health/service/db-proxy?index={index}&wait=5s")
                        if r.json():
                            break
                        index = r.headers["X-Consul-Index"]
                (entry,) = r.json()
                svc = entry["Service"]
                assert (svc["ID"], svc["Kind"], svc["Port"]) == (
                    "db-proxy-one",
                    "connect-proxy",
                    port,
                )
                assert svc["Proxy"]["DestinationServiceName"] == "db"
                check = next(ch for ch in entry["Checks"] if ch["CheckID"] == "db-proxy-one-ttl")
                assert check["Status"] == "passing" and check["Name"] == "proxy heartbeat"
                # A check forced to critical comes back through the heartbeats (TTL/3).
                agent.set_check_status("db-proxy-one-ttl", "critical")
                async with asyncio.timeout(10):
                    index = r.headers["X-Consul-Index"]
                    while True:
                        r = await c.get(
                            f"/v1/health/service/db-proxy?passing&index={index}&wait=5s"
                        )
                        if r.json():
                            break
                        index = r.headers["X-Consul-Index"]
                assert await tls_exchange(port, client_ctx(agent, "web"), b"flags") == b"flags"
            # Deregistered on shutdown.
            assert (await c.get("/v1/agent/service/db-proxy-one")).status_code == 404


async def test_unreachable_agent_then_up(logs: LogWaiter, ports: ReservedPorts) -> None:
    agent_port = ports.take()
    async with echo_app() as app:
        port = ports.take()
        options = parse_proxy_args(
            [
                "-service",
                "db",
                "-listen",
                f"127.0.0.1:{port}",
                "-service-addr",
                f"127.0.0.1:{app.port}",
                "-http-addr",
                f"127.0.0.1:{agent_port}",
            ],
            {},
        )
        async with serving(options):
            # The proxy retries; the agent comes up on the address it was given.
            async with asyncio.timeout(10):
                await logs.wait_for("Watch errored")
            async with DevAgent(AgentConfig(node_name="n", http_port=agent_port)) as agent:
                async with asyncio.timeout(15):
                    await _wait_listening(logs, port)
                assert await tls_exchange(port, client_ctx(agent, "web"), b"up") == b"up"


async def test_403_is_explained_and_the_token_never_printed(
    logs: LogWaiter, capsys: pytest.CaptureFixture[str], ports: ReservedPorts
) -> None:
    secret = "weak-token-8d7c"
    cfg = AgentConfig(
        node_name="n",
        http_port=0,
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management="root",
    )
    async with DevAgent(cfg) as agent:
        async with httpx.AsyncClient(base_url=agent.url, headers={"X-Consul-Token": "root"}) as c:
            r = await c.put(
                "/v1/acl/policy",
                json={"Name": "ro", "Rules": 'service_prefix "" { policy = "read" }'},
            )
            assert r.status_code == 200
            r = await c.put(
                "/v1/acl/token", json={"SecretID": secret, "Policies": [{"Name": "ro"}]}
            )
            assert r.status_code == 200
        options = parse_proxy_args(
            [
                "-service",
                "db",
                "-upstream",
                f"x:{ports.take()}",
                "-http-addr",
                agent.http_addr,
                "-token",
                secret,
            ],
            {},
        )
        async with serving(options):
            async with asyncio.timeout(10):
                await logs.wait_for("lacks permission 'service:write'")
        text = "\n".join(logs.lines)
        assert "the proxy's ACL token lacks a permission (it needs service:write on 'db')" in text
    out = capsys.readouterr()
    assert secret not in text and secret not in out.out and secret not in out.err


async def test_proxy_id_of_a_service_that_is_not_a_proxy_is_an_error(
    agent: DevAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    await _register(agent, {"Name": "web", "Port": 8080})
    options = parse_proxy_args(["-proxy-id", "web", "-http-addr", agent.http_addr], {})
    async with asyncio.timeout(10):
        code = await serve(options, asyncio.Event(), watch_backoff=0.05)
    assert code == 1
    err = capsys.readouterr().err
    assert "Failed running proxy: service 'web' is not a valid connect proxy" in err
    assert "want 'connect-proxy'" in err


async def test_unusable_update_keeps_the_last_good_config(
    agent: DevAgent, logs: LogWaiter, ports: ReservedPorts
) -> None:
    async with echo_app() as app:
        port, up = ports.take(), ports.take()
        await _register(
            agent, _sidecar("web", app, port, [{"DestinationName": "db", "LocalBindPort": up}])
        )
        options = parse_proxy_args(["-sidecar-for", "web", "-http-addr", agent.http_addr], {})
        async with serving(options):
            async with asyncio.timeout(10):
                await _wait_listening(logs, up)
                # An upstream timeout that is not a number makes the new config unusable.
                bad = [
                    {
                        "DestinationName": "db",
                        "LocalBindPort": up,
                        "Config": {"connect_timeout_ms": "soon"},
                    }
                ]
                await _register(agent, _sidecar("web", app, port, bad))
                await logs.wait_for("ignoring unusable configuration from the agent")
            assert any("connect_timeout_ms" in line for line in logs.lines)
            assert not any(
                f"stopping upstream listener 127.0.0.1:{up}" in line for line in logs.lines
            )


@pytest.mark.parametrize("engine", ["ssl", "openssl"])
async def test_tls_engine_comes_from_the_environment_and_is_logged_at_start(
    agent: DevAgent, logs: LogWaiter, engine: str, ports: ReservedPorts
) -> None:
    async with echo_app() as app:
        port = ports.take()
        await _register(agent, _sidecar("db", app, port))
        options = parse_proxy_args(
            ["-sidecar-for", "db", "-http-addr", agent.http_addr],
            {"CONNECT_PROXY_TLS_ENGINE": engine},
        )
        assert options.tls_engine == engine
        async with serving(options):
            async with asyncio.timeout(10):
                await _wait_listening(logs, port)
                assert await tls_exchange(port, client_ctx(agent, "web"), b"hi") == b"hi"
        # Which engine, and which OpenSSL (the system's, or the one cryptography bundles).
        (line,) = [line for line in logs.lines if line.startswith("TLS engine: ")]
        assert line == f"TLS engine: {describe_engine(engine)}"
        assert ("cryptography" in line) == (engine == "openssl")


def test_unknown_tls_engine_stops_the_start_naming_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = proxy_main(
        ["-service", "web", "-upstream", "db:8181"], {"CONNECT_PROXY_TLS_ENGINE": "boringssl"}
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "CONNECT_PROXY_TLS_ENGINE='boringssl' is not a TLS engine" in err
    assert "use ssl (" in err and "or openssl (" in err
