"""proxy.admin: the admin endpoint over real HTTP, in front of a real proxy on the dev agent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

import proxy.admin
from proxy.admin import REDACTED, AdminServer, redact
from proxy.admin_page import RefusalRow, StatusView, render_status
from proxy.agent import AgentClient
from proxy.answers import Answer, aggregated_status, health_instances
from proxy.config import ProxyConfig, PublicListenerConfig, UpstreamConfig
from proxy.devagent import DevAgent
from proxy.httpflags import HTTPOptions
from proxy.identity import encode_serial
from proxy.observe import ProxyMetrics
from proxy.runner import RunState, run
from proxy.supervisor import ProxySettings
from tests.conftest import wait_until
from tests.proxyfix import EchoApp, agent_client, client_ctx, echo_app

# -- a proxy under run(), with its admin endpoint -------------------------------------------


class QueueSource:
    """Configs handed over by the test, one at a time (the first one whenever it wants)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ProxyConfig] = asyncio.Queue()

    async def configs(self) -> AsyncIterator[ProxyConfig]:
        while True:
            yield await self.queue.get()


@dataclass
class Running:
    admin: AdminServer
    http: httpx.AsyncClient
    state: RunState
    metrics: ProxyMetrics
    source: QueueSource
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    def start(self, agent: DevAgent, config: ProxyConfig, drain_timeout: float = 10.0) -> None:
        """Run the proxy (in a task of the test) and hand it its first config."""
        settings = ProxySettings(watch_backoff=0.05, drain_timeout=drain_timeout)
        client = agent_client(agent)

        async def serve() -> None:
            try:
                await run(
                    client,
                    self.source,
                    self.stop,
                    settings,
                    metrics=self.metrics,
                    state=self.state,
                )
            finally:
                await client.aclose()

        self.task = asyncio.create_task(serve())
        self.source.queue.put_nowait(config)

    async def ready(self) -> None:
        await wait_until(lambda: self.state.not_ready() == "")

    def public_port(self) -> int:
        assert self.state.proxy is not None and self.state.proxy.public is not None
        return self.state.proxy.public.port


@contextlib.asynccontextmanager
async def admin_running(
    settings: Mapping[str, Any] = {},  # read only
    agent: AgentClient | None = None,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    state = RunState()
    metrics = ProxyMetrics(access_log=False)
    admin = AdminServer(
        "127.0.0.1", 0, state=state, metrics=metrics, settings=settings, agent=agent, **kwargs
    )
    await admin.start()
    running = Running(admin, httpx.AsyncClient(), state, metrics, QueueSource(), asyncio.Event())
    running.http = httpx.AsyncClient(base_url=f"http://{admin.address}", timeout=5.0)
    try:
        yield running
    finally:
        running.stop.set()
        if running.task is not None:
            async with asyncio.timeout(15):
                await running.task
        await running.http.aclose()
        await admin.aclose()


def db_config(app: EchoApp, **extra: Any) -> ProxyConfig:
    return ProxyConfig(
        service="db",
        public_listener=PublicListenerConfig(
            bind_address="127.0.0.1",
            bind_port=0,
            local_service_host="127.0.0.1",
            local_service_port=app.port,
        ),
        **extra,
    )


@contextlib.asynccontextmanager
async def held_connection(port: int, ctx: ssl.SSLContext) -> AsyncIterator[None]:
    """An mTLS connection through the public listener: 11 bytes there and back, held open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None)
    try:
        writer.write(b"hello admin")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readexactly(11) == b"hello admin"
        yield
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()


# -- /ready ---------------------------------------------------------------------------------


async def test_ready_is_503_until_the_first_config_and_certificates_then_200_then_503_draining(
    agent: DevAgent,
) -> None:
    async with echo_app() as app, admin_running() as r:
        before = await r.http.get("/ready")
        assert (before.status_code, before.text) == (503, "starting\n")
        r.start(agent, db_config(app), drain_timeout=10.0)
        await r.ready()
        ready = await r.http.get("/ready")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        async with held_connection(r.public_port(), client_ctx(agent, "web")):
            r.stop.set()  # the held connection keeps the drain going
            await wait_until(lambda: r.state.phase == "draining")
            draining = await r.http.get("/ready")
            assert (draining.status_code, draining.text) == (503, "draining\n")
        assert r.task is not None
        async with asyncio.timeout(5):
            await r.task
        after = await r.http.get("/ready")
        assert (after.status_code, after.text) == (503, "stopped\n")


# -- /certs ---------------------------------------------------------------------------------


async def test_certs_shows_the_leaf_the_agent_issued_and_never_a_key(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    async with echo_app() as app, admin_running() as r:
        early = await r.http.get("/certs")
        assert early.status_code == 503
        assert early.json() == {"error": "no certificates yet"}
        r.start(agent, db_config(app))
        await r.ready()
        got = await r.http.get("/certs")
        issued = (await client.get("/v1/agent/connect/ca/leaf/db")).json()
        roots = (await client.get("/v1/agent/connect/ca/roots")).json()
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/json"
    assert "PRIVATE KEY" not in got.text
    cert = x509.load_pem_x509_certificate(issued["CertPEM"].encode())
    body = got.json()
    assert body["serial"] == issued["SerialNumber"] == encode_serial(cert.serial_number)
    assert body["spiffe_id"] == issued["ServiceURI"]
    assert body["spiffe_id"].endswith("/ns/default/dc/dc1/svc/db")
    assert body["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert body["not_before"] == cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    left = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
    # The answer was computed a moment before `left`: up to a second more (it is truncated).
    assert left - 60 < body["expires_in_seconds"] <= left + 1
    assert body["root_ids"] == [root["ID"] for root in roots["Roots"]]
    assert body["service"] == "db"


# -- /config --------------------------------------------------------------------------------


async def test_config_redacts_tokens_in_settings_and_telemetry(agent: DevAgent) -> None:
    settings = {
        "token": "s3cret-flag-token",
        "token_file": "",
        "http_addr": agent.http_addr,
        "nested": {"ACLToken": "s3cret-nested", "tokens": ["a"], "count": 3},
    }
    telemetry = {"circonus_api_token": "s3cret-circonus", "metrics_prefix": "consul"}
    async with echo_app() as app, admin_running(settings) as r:
        empty = await r.http.get("/config")
        assert empty.json()["proxy"] is None
        config = db_config(app, telemetry=telemetry, upstreams=(UpstreamConfig("cache", 0),))
        r.start(agent, config)
        await r.ready()
        got = await r.http.get("/config")
    assert got.status_code == 200
    assert "s3cret" not in got.text
    body = got.json()
    assert body["settings"] == {
        "token": REDACTED,
        "token_file": "",
        "http_addr": agent.http_addr,
        "nested": {"ACLToken": REDACTED, "tokens": ["a"], "count": 3},
    }
    proxy = body["proxy"]
    assert proxy["service"] == "db"
    assert proxy["telemetry"] == {"circonus_api_token": REDACTED, "metrics_prefix": "consul"}
    assert proxy["public_listener"]["local_service_port"] == app.port
    assert [u["destination_name"] for u in proxy["upstreams"]] == ["cache"]
    assert proxy["authorize"] == {
        "cache": False,
        "reauthorize": False,
        "intentions_watch": None,
        "cache_counts": {
            "hits": 0,
            "shared": 0,
            "misses": 0,
            "bypasses": 0,
            "discarded": 0,
            "disagreed": 0,
            "entries": 0,
        },
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"token": "x"}, {"token": REDACTED}),
        ({"Token": ""}, {"Token": ""}),
        ({"token": 5}, {"token": 5}),
        ({"a": [{"agent_token": "x"}, "token"]}, {"a": [{"agent_token": REDACTED}, "token"]}),
        ({"a": {"b": {"c": {"TOKEN_x": "y"}}}}, {"a": {"b": {"c": {"TOKEN_x": REDACTED}}}}),
        ("token", "token"),
    ],
)
def test_redact(value: Any, expected: Any) -> None:
    assert redact(value) == expected


# -- /connections and /metrics --------------------------------------------------------------


async def test_connections_lists_a_held_connection_with_exact_bytes_and_metrics_count_it(
    agent: DevAgent,
) -> None:
    async with echo_app() as app, admin_running() as r:
        r.start(agent, db_config(app))
        await r.ready()
        assert (await r.http.get("/connections")).json() == []
        async with held_connection(r.public_port(), client_ctx(agent, "web")):
            rows = (await r.http.get("/connections")).json()
        assert r.state.proxy is not None and r.state.proxy.public is not None
        public = r.state.proxy.public
        async with asyncio.timeout(5):
            await public.until_idle()
        scrape = await r.http.get("/metrics")
    (row,) = rows
    assert row["direction"] == "inbound"
    assert row["listener"] == "public_listener"
    assert row["peer"].endswith("/ns/default/dc/dc1/svc/web")
    assert row["dst"] == f"127.0.0.1:{app.port}"
    assert (row["bytes_to_dst"], row["bytes_to_src"]) == (11, 11)
    assert row["src"].startswith("127.0.0.1:")
    assert 0 <= row["age_seconds"] < 10
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scrape.text)
        for s in family.samples
    }
    key = (
        "connect_proxy_connections_total",
        (("direction", "inbound"), ("listener", "public_listener"), ("outcome", "forwarded")),
    )
    assert samples[key] == 1


# -- the status page ------------------------------------------------------------------------


async def test_status_page_says_agent_unreachable_when_the_agent_does_not_answer(
    agent: DevAgent,
) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        dead_addr = f"127.0.0.1:{dead.getsockname()[1]}"
        nowhere = AgentClient(HTTPOptions(address=dead_addr))
        try:
            async with echo_app() as app, admin_running(agent=nowhere, agent_timeout=1.0) as r:
                r.start(agent, db_config(app, upstreams=(UpstreamConfig("cache", 0),)))
                await r.ready()
                page = await r.http.get("/")
        finally:
            await nowhere.aclose()
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in page.headers["content-security-policy"]
    assert "agent unreachable" in page.text
    assert '<dd class="service">db</dd>' in page.text


def test_status_page_escapes_hostile_values() -> None:
    hostile = '<script>alert("x")</script>'
    view = StatusView(
        now=0.0,
        service=f"db{hostile}",
        spiffe_id=f"spiffe://x/{hostile}",
        refusals=(
            RefusalRow(
                at=0.0,
                direction="inbound",
                listener="public_listener",
                source="127.0.0.1:1",
                peer=f"spiffe://x/<img src=x onerror=alert(1)>{hostile}",
                reason=f"denied {hostile}",
                detail="</td></tr></table><h1>owned</h1>",
            ),
        ),
    )
    page = render_status(view)
    assert "<script" not in page
    assert "<img" not in page
    assert "<h1>owned" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;&lt;h1&gt;owned&lt;/h1&gt;" in page


# -- the agent's instances ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], "passing"),
        ([("serfHealth", "passing"), ("c", "passing")], "passing"),
        ([("a", "passing"), ("b", "warning")], "warning"),
        ([("a", "warning"), ("b", "critical"), ("c", "passing")], "critical"),
        ([("_node_maintenance", "critical"), ("a", "passing")], "maintenance"),
        ([("_service_maintenance:web-1", "critical"), ("b", "critical")], "maintenance"),
        ([("a", "passing"), ("b", "bogus")], ""),
    ],
)
def test_aggregated_status(statuses: list[tuple[str, str]], expected: str) -> None:
    checks = [{"CheckID": cid, "Status": status} for cid, status in statuses]
    assert aggregated_status(checks) == expected


def test_health_instances_reads_every_entry_and_skips_unusable_ones() -> None:
    body = [
        {
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": "db-proxy-1", "Port": 21000, "Address": ""},
            "Checks": [{"CheckID": "a", "Status": "critical"}],
        },
        {
            "Node": {"Node": "n2", "Address": "10.0.0.2"},
            "Service": {"ID": "db-proxy-2", "Port": 21001, "Address": "::1"},
            "Checks": None,
        },
        {"Node": {"Node": "n3"}, "Service": {"ID": "no-port"}, "Checks": []},
        "not an entry",
        {"Node": "x", "Service": {}, "Checks": []},
    ]
    got = health_instances("/v1/health/connect/db", Answer(body, 7, ""))
    assert got.index == 7
    assert [(i.node, i.service_id, i.address, i.status) for i in got.instances] == [
        ("n1", "db-proxy-1", "10.0.0.1:21000", "critical"),
        ("n2", "db-proxy-2", "[::1]:21001", "passing"),
    ]


# -- HTTP: methods, bad input, limits, keep-alive -------------------------------------------


@contextlib.asynccontextmanager
async def bare_admin(**kwargs: Any) -> AsyncIterator[AdminServer]:
    admin = AdminServer("127.0.0.1", 0, state=RunState(), metrics=ProxyMetrics(), **kwargs)
    await admin.start()
    try:
        yield admin
    finally:
        await admin.aclose()


async def _raw(admin: AdminServer, data: bytes) -> bytes:
    """Send `data`, read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_unknown_path_404_other_method_405_with_allow_and_head_without_body() -> None:
    async with bare_admin() as admin, httpx.AsyncClient(base_url=f"http://{admin.address}") as c:
        missing = await c.get("/nope")
        assert (missing.status_code, missing.text) == (404, "not found: /nope\n")
        for method in ("POST", "PUT", "DELETE"):
            wrong = await c.request(method, "/ready")
            assert wrong.status_code == 405
            assert wrong.headers["allow"] == "GET, HEAD"
        get = await c.get("/ready")
        head = await c.head("/ready")
        assert (head.status_code, head.content) == (503, b"")
        assert head.headers["content-length"] == get.headers["content-length"] == "9"
        query = await c.get("/ready?verbose=1")
        assert query.text == "starting\n"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"NOT-HTTP\r\n\r\n",
    ],
)
async def test_garbage_bytes_get_400_and_the_server_keeps_serving(garbage: bytes) -> None:
    async with bare_admin() as admin:
        answer = await _raw(admin, garbage)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        again = await _raw(admin, b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert again.startswith(b"HTTP/1.1 503 ")


async def test_oversized_head_gets_431_and_oversized_body_413() -> None:
    async with bare_admin() as admin:
        big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await _raw(admin, big_header)).startswith(b"HTTP/1.1 431 ")
        # Never ending headers: refused once past the bound, not buffered for ever.
        endless = b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 5000
        assert (await _raw(admin, endless)).startswith(b"HTTP/1.1 431 ")
        body = b"x" * 40000
        big_body = b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 40000\r\n\r\n" + body
        assert (await _raw(admin, big_body)).startswith(b"HTTP/1.1 413 ")


async def test_a_silent_client_is_dropped_after_the_read_timeout() -> None:
    async with bare_admin(read_timeout=0.2) as admin:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        try:
            writer.write(b"GET /ready HTTP/1.1\r\n")  # and never the rest
            await writer.drain()
            async with asyncio.timeout(5):
                assert await reader.read(-1) == b""
        finally:
            writer.close()


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with bare_admin() as admin:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        try:
            request = b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"
            for _ in range(3):
                writer.write(request)
                await writer.drain()
                async with asyncio.timeout(5):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 503 ")
                    assert b"content-length: 9\r\n" in head.lower()
                    assert await reader.readexactly(9) == b"starting\n"
        finally:
            writer.close()


async def test_admin_port_taken_raises_oserror_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        admin = AdminServer("127.0.0.1", port, state=RunState(), metrics=ProxyMetrics())
        with pytest.raises(OSError) as raised:
            await admin.start()
        await admin.aclose()
    assert str(port) in str(raised.value)
    assert "127.0.0.1" in str(raised.value)


async def test_aclose_is_idempotent_and_closes_open_connections() -> None:
    async with bare_admin() as admin:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        await admin.aclose()
        await admin.aclose()
        async with asyncio.timeout(5):
            assert await reader.read(-1) == b""
        writer.close()


async def test_a_trickling_client_is_dropped_after_the_request_deadline() -> None:
    """One byte every 50 ms keeps every single read short; the request's deadline still
    ends it (per request, not per read)."""
    async with bare_admin(read_timeout=0.3) as admin:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
        try:
            closed = asyncio.ensure_future(reader.read(-1))
            async with asyncio.timeout(5):
                for byte in b"GET /ready HTTP/1.1\r\nX-Slow: " + b"a" * 1000:
                    if closed.done():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.wait({closed}, timeout=0.05)
                # Dropped: an EOF, or a reset when the server closed with trickled bytes
                # still unread (the kernel answers those with RST).
                with contextlib.suppress(ConnectionResetError):
                    assert await closed == b""
        finally:
            writer.close()


async def test_status_page_renders_before_any_config() -> None:
    async with bare_admin() as admin, httpx.AsyncClient(base_url=f"http://{admin.address}") as c:
        page = await c.get("/")
    assert page.status_code == 200
    assert '<dd class="ready bad">not ready: starting</dd>' in page.text
    assert '<p class="listeners empty">no listeners</p>' in page.text


async def test_connections_past_the_cap_are_closed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.admin, "MAX_CONNECTIONS", 3)
    async with bare_admin() as admin:
        held = [await asyncio.open_connection("127.0.0.1", admin.port) for _ in range(3)]
        try:
            await wait_until(lambda: len(admin._tasks) == 3)
            reader, writer = await asyncio.open_connection("127.0.0.1", admin.port)
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    assert await reader.read(-1) == b""
            writer.close()
            # The held ones are still served.
            first_reader, first_writer = held[0]
            first_writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await first_reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 503")
        finally:
            for _, w in held:
                w.close()
