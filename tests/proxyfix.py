"""Fixtures for proxy tests: echo apps, a proxy pair on the dev agent, raw mTLS clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx

from proxy.agent import AgentClient
from proxy.config import ProxyConfig, PublicListenerConfig, UpstreamConfig
from proxy.devagent import DevAgent
from proxy.httpflags import HTTPOptions
from proxy.observe import ProxyMetrics
from proxy.supervisor import Proxy, ProxySettings
from tests.certs import issue_leaf, load_chain


@dataclass
class EchoApp:
    """A TCP echo server that records how many connections it ever saw."""

    server: asyncio.Server | None = None
    port: int = 0
    connections: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def start(self) -> None:
        # A real app server's backlog: bursts of hundreds of dials must not lose SYNs (with
        # asyncio's default of 100 they are retried after 1 s, past the 1 s app dial timeout).
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self.writers):
                w.close()
            await self.server.wait_closed()


@contextlib.asynccontextmanager
async def echo_app() -> AsyncIterator[EchoApp]:
    app = EchoApp()
    await app.start()
    try:
        yield app
    finally:
        await app.close()


def agent_client(agent: DevAgent, token: str = "") -> AgentClient:
    return AgentClient(HTTPOptions(address=agent.http_addr, token=token))


async def register_proxy(
    agent: DevAgent, name: str, port: int, destination: str, app_port: int
) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put(
            "/v1/agent/service/register",
            json={
                "Kind": "connect-proxy",
                "Name": name,
                "ID": name,
                "Port": port,
                "Address": "127.0.0.1",
                "Proxy": {"DestinationServiceName": destination, "LocalServicePort": app_port},
            },
        )
        assert r.status_code == 200, r.text


# The TLS engine of the proxies started here, set for each test by tests/conftest.py
# (None: the product's default).
TLS_ENGINE: str | None = None


@contextlib.asynccontextmanager
async def running_proxy(
    agent: DevAgent, config: ProxyConfig, metrics: ProxyMetrics | None = None, **kwargs: object
) -> AsyncIterator[Proxy]:
    if TLS_ENGINE is not None:
        kwargs.setdefault("tls_engine", TLS_ENGINE)
    settings = ProxySettings(watch_backoff=0.05, **kwargs)  # type: ignore[arg-type]
    proxy = Proxy(agent_client(agent), config, settings, metrics)
    await proxy.start()
    try:
        async with asyncio.timeout(5):
            await proxy.wait_ready()
        yield proxy
    finally:
        await proxy.close(drain_timeout=1.0)
        await proxy.agent.aclose()


@contextlib.asynccontextmanager
async def db_sidecar(
    agent: DevAgent, app: EchoApp, metrics: ProxyMetrics | None = None, **public: object
) -> AsyncIterator[Proxy]:
    """The `db` proxy: public listener on 127.0.0.1:0 in front of `app`, registered."""
    # The app runs on the test's own loop. On a loaded 2-core CI machine (the browser test
    # on the other worker) its accept once took over Consul's default second, and the
    # proxy refused the connection (app_dial_failed): give the dial more room here.
    public.setdefault("local_connect_timeout", 10.0)
    cfg = ProxyConfig(
        service="db",
        public_listener=PublicListenerConfig(
            bind_address="127.0.0.1",
            bind_port=0,
            local_service_host="127.0.0.1",
            local_service_port=app.port,
            **public,  # type: ignore[arg-type]
        ),
    )
    async with running_proxy(agent, ProxyConfig(service="db"), metrics) as proxy:
        await proxy.apply(cfg, force=True)
        async with asyncio.timeout(5):
            await proxy.wait_ready()
        assert proxy.public is not None
        await register_proxy(agent, "db-sidecar-proxy", proxy.public.port, "db", app.port)
        yield proxy


def upstream(name: str = "db", **kwargs: object) -> UpstreamConfig:
    return UpstreamConfig(destination_name=name, local_bind_port=0, **kwargs)  # type: ignore[arg-type]


def local_port(proxy: Proxy) -> int:
    (listener,) = proxy.upstreams.values()
    return listener.port


def client_ctx(agent: DevAgent, service: str | None) -> ssl.SSLContext:
    """An mTLS client context with a leaf for `service` from the agent's CA (None: no cert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(r.cert_pem for r in agent.state.ca.roots))
    if service is not None:
        leaf = agent.state.ca.sign_leaf(service, datacenter="dc1")
        load_chain(ctx, leaf.cert_pem, leaf.private_key_pem)
    return ctx


def custom_leaf(
    agent: DevAgent, *, serial: int, uri: str | None, cn: str | None = None
) -> tuple[str, str]:
    """A leaf signed by the agent's active root with a chosen serial and SAN (tests only)."""
    root = agent.state.ca.active_root
    return issue_leaf(root.cert, root.key, uri=uri, serial=serial, cn=cn)


async def tls_exchange(
    port: int, ctx: ssl.SSLContext, payload: bytes, *, half_close: bool = False
) -> bytes:
    """Connect with asyncio's TLS, send `payload`, read until EOF (or an error: b'' so far)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None)
    received = b""
    try:
        writer.write(payload)
        await writer.drain()
        while len(received) < len(payload):
            chunk = await reader.read(65536)
            if not chunk:
                break
            received += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()
    return received


async def plain_exchange(port: int, payload: bytes, *, half_close: bool = True) -> bytes:
    """Send `payload` to 127.0.0.1:port, optionally shut down writing, read until EOF.

    A reset counts as the end of the stream: a proxy that refuses a connection closes it
    with the request unread, which the kernel turns into a reset.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        writer.write(payload)
        if half_close:
            writer.write_eof()
        await writer.drain()
        while True:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            received += chunk
            if not half_close and len(received) >= len(payload):
                break
    except ConnectionResetError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return bytes(received)


class LogWaiter(logging.Handler):
    """Resolves `wait_for(text)` when a log record containing `text` is emitted.

    For waiting on what another component reports (a listener started or stopped, a watch
    failed) without polling.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._waiters: list[tuple[str, asyncio.Future[None]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for text, fut in list(self._waiters):
            if text in line and not fut.done():
                fut.set_result(None)

    async def wait_for(self, text: str) -> None:
        if any(text in line for line in self.lines):
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((text, fut))
        try:
            await fut
        finally:
            self._waiters.remove((text, fut))


@contextlib.contextmanager
def log_waiter() -> Iterator[LogWaiter]:
    waiter = LogWaiter()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(waiter)
    root.setLevel(logging.DEBUG)
    try:
        yield waiter
    finally:
        root.removeHandler(waiter)
        root.setLevel(old_level)
