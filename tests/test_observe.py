"""Metrics and the access log after real traffic through a real proxy pair on the dev agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from listeners.events import NullObserver, Refusal
from proxy.config import ProxyConfig, PublicListenerConfig, UpstreamConfig
from proxy.demo import ReservedPorts
from proxy.devagent import DevAgent
from proxy.devagent.ca import CertificateAuthority
from proxy.observe import ProxyMetrics
from proxy.supervisor import Proxy
from proxy.throttle import Throttle
from tests.certs import load_chain
from tests.conftest import wait_until
from tests.proxyfix import (
    EchoApp,
    client_ctx,
    custom_leaf,
    db_sidecar,
    echo_app,
    local_port,
    plain_exchange,
    register_proxy,
    running_proxy,
    tls_exchange,
    upstream,
)


@contextlib.asynccontextmanager
async def mesh(
    agent: DevAgent, app: EchoApp, metrics: ProxyMetrics
) -> AsyncIterator[tuple[Proxy, Proxy]]:
    config = ProxyConfig(service="web", upstreams=(upstream("db"),))
    async with (
        db_sidecar(agent, app, metrics) as db,
        running_proxy(agent, config, metrics) as web,
    ):
        yield web, db


def access(records: list[logging.LogRecord], name: str) -> list[logging.LogRecord]:
    """The access-log records of one logger (`proxy.inbound` or `proxy.upstream`)."""
    return [r for r in records if r.name == name and hasattr(r, "fields")]


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    metrics.flush()
    return metrics.registry.get_sample_value(name, labels)


def scraped(metrics: ProxyMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text exposition, parsed back: what a Prometheus server reads."""
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _idle(proxy: Proxy) -> None:
    async with asyncio.timeout(5):
        for listener in [*proxy.upstreams.values(), *([proxy.public] if proxy.public else [])]:
            await listener.until_idle()


async def test_one_11_byte_echo_counts_exactly(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, mesh(agent, app, metrics) as (web, db):
        reader, writer = await asyncio.open_connection("127.0.0.1", local_port(web))
        try:
            writer.write(b"hello world")
            assert await reader.readexactly(11) == b"hello world"
            # Open: one forwarding connection each way, 11 bytes each way already counted.
            for direction, listener in (("upstream", "db"), ("inbound", "public_listener")):
                labels = {"direction": direction, "listener": listener}
                assert sample(metrics, "connect_proxy_active_connections", **labels) == 1
                for toward in ("destination", "source"):
                    got = sample(metrics, "connect_proxy_bytes_total", toward=toward, **labels)
                    assert got == 11
        finally:
            writer.close()
        await _idle(web)
        await _idle(db)
    rows = scraped(metrics)
    for direction, listener in (("upstream", "db"), ("inbound", "public_listener")):
        labels = (("direction", direction), ("listener", listener))
        assert rows[("connect_proxy_active_connections", labels)] == 0
        for toward in ("destination", "source"):
            key = tuple(sorted((*labels, ("toward", toward))))
            assert rows[("connect_proxy_bytes_total", key)] == 11
        key = tuple(sorted((*labels, ("outcome", "forwarded"))))
        assert rows[("connect_proxy_connections_total", key)] == 1
        key = tuple(sorted(labels))
        assert rows[("connect_proxy_dial_seconds_count", key)] == 1
        assert rows[("connect_proxy_connection_duration_seconds_count", key)] == 1
    for direction in ("inbound", "upstream"):
        assert rows[("connect_proxy_tls_handshake_seconds_count", (("direction", direction),))] == 1
    assert rows[("connect_proxy_authorize_seconds_count", ())] == 1
    assert not any(name == "connect_proxy_refused_connections_total" for name, _ in rows)


@pytest.mark.tls_engines()
async def test_resumed_handshakes_are_counted_on_both_sides_of_a_chain(agent: DevAgent) -> None:
    """Our upstream resumes its sessions with our public listener, and both count it."""
    metrics = ProxyMetrics()
    async with echo_app() as app, mesh(agent, app, metrics) as (web, db):
        for _ in range(6):
            reader, writer = await asyncio.open_connection("127.0.0.1", local_port(web))
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            await _idle(web)
            await _idle(db)
    rows = scraped(metrics)

    def completed(direction: str, resumed: str) -> float:
        labels = (("direction", direction), ("resumed", resumed))
        return rows[("connect_proxy_tls_handshakes_completed_total", labels)]

    for direction in ("inbound", "upstream"):
        assert completed(direction, "false") + completed(direction, "true") == 6
        assert completed(direction, "true") >= 1, rows  # a session ticket came and was used
    # What the client side resumed, the server side saw resumed: the same connections.
    assert completed("inbound", "true") == completed("upstream", "true")


@pytest.mark.tls_engines("openssl")
async def test_peer_chain_checks_are_counted(agent: DevAgent, tls_engine: str) -> None:
    """Full handshakes from one client leaf: its chain is checked against the roots once,
    then known; a client of another CA is refused."""
    metrics = ProxyMetrics()

    def checks() -> dict[str, float]:
        rows = scraped(metrics)
        return {
            result: rows[("connect_proxy_tls_chain_checks_total", (("result", result),))]
            for result in ("known", "verified", "refused")
        }

    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        before = checks()  # the proxy's own check of its contexts at start is counted too
        ctx = client_ctx(agent, "web")  # no session kept: a full handshake each time
        for _ in range(3):
            assert await tls_exchange(db.public.port, ctx, b"x") == b"x"
        once = checks()
        stranger = CertificateAuthority().sign_leaf("web", datacenter="dc1")
        foreign = client_ctx(agent, None)
        load_chain(foreign, stranger.cert_pem, stranger.private_key_pem)
        assert await tls_exchange(db.public.port, foreign, b"x") == b""
        await _idle(db)
    after = checks()
    assert once["verified"] - before["verified"] == 1
    assert once["known"] - before["known"] >= 2  # the second and third handshakes
    assert once["refused"] == before["refused"]
    assert after["refused"] - once["refused"] >= 1
    assert after["verified"] == once["verified"] and after["known"] == once["known"]


async def test_leaf_expiry_gauge_follows_the_leaf_in_use(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    assert sample(metrics, "connect_proxy_leaf_expiry_seconds") != sample(
        metrics, "connect_proxy_leaf_expiry_seconds"
    )  # NaN before any leaf
    async with running_proxy(agent, ProxyConfig(service="web"), metrics) as web:
        material = web.tls.material
        assert material is not None
        expiry = sample(metrics, "connect_proxy_leaf_expiry_seconds")
        assert expiry is not None
        lifetime = material.not_after - material.not_before
        # The dev agent's leaves live 72 h; the gauge counts down from there.
        assert lifetime - 120 < expiry <= lifetime


async def test_access_log_line_per_connection(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = ProxyMetrics()
    caplog.set_level(logging.INFO)
    async with echo_app() as app, mesh(agent, app, metrics) as (web, db):
        reader, writer = await asyncio.open_connection("127.0.0.1", local_port(web))
        writer.write(b"hello world")
        assert await reader.readexactly(11) == b"hello world"
        source = f"127.0.0.1:{writer.get_extra_info('sockname')[1]}"
        writer.close()
        await _idle(web)
        await _idle(db)
        assert db.public is not None
    lines = {name: access(caplog.records, name)[0] for name in ("proxy.inbound", "proxy.upstream")}
    up = lines["proxy.upstream"].fields  # type: ignore[attr-defined]
    assert lines["proxy.upstream"].getMessage() == "connection forwarded"
    assert lines["proxy.upstream"].levelno == logging.INFO
    assert up["src"] == source
    assert up["dst"] == f"127.0.0.1:{db.public.port}"
    assert up["peer"].endswith("/ns/default/dc/dc1/svc/db")
    assert (up["bytes_to_dst"], up["bytes_to_src"], up["decision"]) == (11, 11, "forwarded")
    assert up["dial_ms"] > 0 and up["handshake_ms"] > 0 and up["duration_ms"] >= up["dial_ms"]
    inbound = lines["proxy.inbound"].fields  # type: ignore[attr-defined]
    assert inbound["peer"].endswith("/ns/default/dc/dc1/svc/web")
    assert inbound["dst"] == f"127.0.0.1:{app.port}"
    assert (inbound["bytes_to_dst"], inbound["bytes_to_src"]) == (11, 11)
    assert inbound["authorize_ms"] > 0 and inbound["reason"] == ""


async def test_tcp_health_check_is_not_a_failure(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent's "Connect Sidecar Listening" check connects and closes without a byte."""
    metrics = ProxyMetrics()
    caplog.set_level(logging.DEBUG)
    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        _, writer = await asyncio.open_connection("127.0.0.1", db.public.port)
        writer.close()
        await writer.wait_closed()
        await db.public.accepted.reached(1)
        await _idle(db)
        labels = {"direction": "inbound", "listener": "public_listener"}
        assert sample(metrics, "connect_proxy_connections_total", outcome="closed", **labels) == 1
        assert sample(metrics, "connect_proxy_connections_total", outcome="refused", **labels) == 0
    (record,) = access(caplog.records, "proxy.inbound")
    assert record.levelno == logging.DEBUG
    assert record.getMessage() == "connection closed"
    assert not [
        r for r in caplog.records if r.levelno >= logging.INFO and "handshake" in r.getMessage()
    ]


async def _deny_web(agent: DevAgent) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put(
            "/v1/connect/intentions/exact?source=web&destination=db", json={"Action": "deny"}
        )
        assert r.status_code == 200, r.text


async def test_refusals_are_counted_by_reason(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        port = db.public.port
        assert await tls_exchange(port, client_ctx(agent, None), b"x") == b""
        await _deny_web(agent)
        assert await tls_exchange(port, client_ctx(agent, "web"), b"x") == b""
        await _idle(db)
        assert app.connections == 0
    labels = {"direction": "inbound", "listener": "public_listener"}
    refused = "connect_proxy_refused_connections_total"
    assert sample(metrics, refused, reason=Refusal.NO_CLIENT_CERTIFICATE, **labels) == 1
    assert sample(metrics, refused, reason=Refusal.DENIED, **labels) == 1
    assert [c.refusal for c in metrics.recent_refusals] == [
        Refusal.NO_CLIENT_CERTIFICATE,
        Refusal.DENIED,
    ]


async def test_upstream_without_instances_is_refused_as_no_healthy_instance(
    agent: DevAgent,
) -> None:
    metrics = ProxyMetrics()
    config = ProxyConfig(service="web", upstreams=(upstream("nothing", connect_timeout=2.0),))
    async with running_proxy(agent, config, metrics) as web:
        reader, writer = await asyncio.open_connection("127.0.0.1", local_port(web))
        assert await reader.read() == b""
        writer.close()
        await _idle(web)
    labels = {"direction": "upstream", "listener": "nothing"}
    got = sample(
        metrics,
        "connect_proxy_refused_connections_total",
        reason=Refusal.NO_HEALTHY_INSTANCE,
        **labels,
    )
    assert got == 1


async def test_identical_refusals_are_logged_once_then_summarized(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    clock = {"now": 0.0}
    metrics = ProxyMetrics(throttle_window=5.0)
    metrics.throttle = Throttle(5.0, clock=lambda: clock["now"])
    caplog.set_level(logging.INFO)
    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        await _deny_web(agent)
        ctx = client_ctx(agent, "web")
        for _ in range(4):
            assert await tls_exchange(db.public.port, ctx, b"x") == b""
        labels = {"direction": "inbound", "listener": "public_listener"}
        refused = "connect_proxy_refused_connections_total"
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value(
                    refused, {"reason": "denied_by_intention", **labels}
                )
                == 4
            )
        )
        refusals = access(caplog.records, "proxy.inbound")
        assert [r.getMessage() for r in refusals] == ["connection refused"]
        assert refusals[0].fields["reason"] == "denied_by_intention"  # type: ignore[attr-defined]
        clock["now"] = 5.0
        metrics.flush()
        summary = access(caplog.records, "proxy.inbound")[1:]
        assert [r.getMessage() for r in summary] == [
            "3 more connections refused like the last one in 5s"
        ]
        # Nothing more suppressed: the next window ends quietly, and the next refusal after
        # it is logged in full again.
        clock["now"] = 10.0
        metrics.flush()
        clock["now"] = 15.0
        metrics.flush()
        assert await tls_exchange(db.public.port, ctx, b"x") == b""
        await _idle(db)
    lines = [r.getMessage() for r in access(caplog.records, "proxy.inbound")]
    assert lines[2:] == ["connection refused"]


def test_throttle_counts_per_kind_and_forgets_quiet_ones() -> None:
    clock = {"now": 0.0}
    throttle: Throttle[str] = Throttle(5.0, max_keys=2, clock=lambda: clock["now"])
    assert throttle.admit("a") is True
    assert throttle.admit("a") is False
    assert throttle.admit("b") is True
    assert list(throttle.summaries()) == []  # windows not over yet
    clock["now"] = 6.0
    assert list(throttle.summaries()) == [("a", 1, 6.0)]  # b had nothing suppressed: dropped
    assert throttle.admit("b") is True
    assert throttle.admit("c") is True  # over max_keys: the oldest kind (a) is dropped
    assert throttle.admit("a") is True


async def test_metrics_off_leaves_every_listener_without_an_observer(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    """CONNECT_PROXY_METRICS=off (the bench's baseline): nothing counted, nothing logged."""
    metrics = ProxyMetrics()
    caplog.set_level(logging.DEBUG)
    async with echo_app() as app:
        public = PublicListenerConfig(
            bind_address="127.0.0.1", bind_port=0, local_service_port=app.port
        )
        db_config = ProxyConfig(service="db", public_listener=public)
        web_config = ProxyConfig(service="web", upstreams=(upstream("db"),))
        async with (
            running_proxy(agent, db_config, metrics, observe=False) as db,
            running_proxy(agent, web_config, metrics, observe=False) as web,
        ):
            assert db.public is not None
            await register_proxy(agent, "db-sidecar-proxy", db.public.port, "db", app.port)
            listeners = [db.public, *web.upstreams.values()]
            assert all(isinstance(lst.observer, NullObserver) for lst in listeners)
            assert await plain_exchange(local_port(web), b"hello world") == b"hello world"
            await _idle(web)
            await _idle(db)
    assert access(caplog.records, "proxy.inbound") == []
    assert access(caplog.records, "proxy.upstream") == []
    assert "connect_proxy_connections_total{" not in metrics.exposition().decode()


# -- every refusal reason, each from a real connection -------------------------------------


def refused_count(metrics: ProxyMetrics, direction: str, listener: str, reason: str) -> float:
    labels = {"direction": direction, "listener": listener, "reason": reason}
    return sample(metrics, "connect_proxy_refused_connections_total", **labels) or 0.0


INBOUND_LABELS = ("inbound", "public_listener")


async def test_inbound_refusal_reasons(agent: DevAgent) -> None:
    """handshake_timeout, handshake_failure (a foreign CA), not_spiffe (no URI SAN),
    app_dial_failed (nothing listens at the app's port)."""
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, handshake_timeout=0.2) as db:
        assert db.public is not None
        port = db.public.port
        # A client that starts a handshake and stops: one byte of a ClientHello.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16")
        assert await reader.read() == b""  # closed by the proxy after 0.2 s
        writer.close()
        foreign = client_ctx(agent, None)
        other = DevAgent().state.ca.sign_leaf("web", datacenter="dc1")
        load_chain(foreign, other.cert_pem, other.private_key_pem)
        assert await tls_exchange(port, foreign, b"x") == b""
        no_uri = client_ctx(agent, None)
        load_chain(no_uri, *custom_leaf(agent, serial=77, uri=None, cn="web"))
        assert await tls_exchange(port, no_uri, b"x") == b""
        await _idle(db)
        assert app.connections == 0
    expected = {
        Refusal.HANDSHAKE_TIMEOUT: 1,
        Refusal.HANDSHAKE_FAILURE: 1,
        Refusal.NOT_SPIFFE: 1,
    }
    for reason, count in expected.items():
        assert refused_count(metrics, *INBOUND_LABELS, reason) == count, reason
    closed_app = ProxyMetrics()
    async with echo_app() as gone:
        pass  # its port is closed now
    async with db_sidecar(agent, gone, closed_app) as db:
        assert db.public is not None
        assert await tls_exchange(db.public.port, client_ctx(agent, "web"), b"x") == b""
        await _idle(db)
    assert refused_count(closed_app, *INBOUND_LABELS, Refusal.APP_DIAL_FAILED) == 1


async def test_authorize_failed_when_the_agent_is_gone(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        await agent.close()  # certificates are loaded; the authorize call has nowhere to go
        assert await tls_exchange(db.public.port, client_ctx(agent, "web"), b"x") == b""
        await _idle(db)
        assert app.connections == 0
    assert refused_count(metrics, *INBOUND_LABELS, Refusal.AUTHORIZE_FAILED) == 1


async def test_upstream_refusal_reasons(agent: DevAgent, ports: ReservedPorts) -> None:
    """wrong_server_identity (an `api` certificate behind a `db` registration), and
    upstream_dial_failed (a `cache` instance whose port nothing listens on)."""
    metrics = ProxyMetrics()
    api_public = PublicListenerConfig(bind_address="127.0.0.1", local_service_port=1)
    async with running_proxy(agent, ProxyConfig(service="api", public_listener=api_public)) as api:
        assert api.public is not None
        await register_proxy(agent, "db-impostor", api.public.port, "db", 1)
        async with echo_app() as gone:
            pass
        await register_proxy(agent, "cache-sidecar-proxy", gone.port, "cache", 1)
        config = ProxyConfig(
            service="web",
            upstreams=(
                UpstreamConfig(destination_name="db", local_bind_port=ports.take()),
                UpstreamConfig(destination_name="cache", local_bind_port=ports.take()),
            ),
        )
        async with running_proxy(agent, config, metrics) as web:
            bound = {lst.name: lst.port for lst in web.upstreams.values()}
            assert await plain_exchange(bound["db"], b"secret") == b""
            assert await plain_exchange(bound["cache"], b"x") == b""
            await _idle(web)
    assert refused_count(metrics, "upstream", "db", Refusal.WRONG_SERVER_IDENTITY) == 1
    assert refused_count(metrics, "upstream", "cache", Refusal.UPSTREAM_DIAL_FAILED) == 1
