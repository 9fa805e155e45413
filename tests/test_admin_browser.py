"""The admin status page in a real browser: Debian's headless Chromium renders it.

Chromium runs as a child process (`--headless --dump-dom`), the proxy and the dev agent in
this test's event loop. Skipped only when Chromium is absent and CI is unset: in CI
(`CI=1`, set by `.ci/run`) a missing browser fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from proxy.admin import AdminServer
from proxy.config import ProxyConfig, PublicListenerConfig
from proxy.devagent import DevAgent
from proxy.observe import ProxyMetrics
from proxy.runner import RunState, run
from proxy.supervisor import ProxySettings
from tests.conftest import wait_until
from tests.proxyfix import (
    EchoApp,
    agent_client,
    custom_leaf,
    db_sidecar,
    echo_app,
    upstream,
)

CHROMIUM = os.environ.get("CONNECT_PROXY_CHROMIUM", "/usr/bin/chromium")
BROWSER_TIMEOUT = 60.0  # a cold Chromium start on a busy 2-core machine takes seconds
HOSTILE = "<b>evil</b>"


def chromium() -> str:
    """The browser to drive; skips the test when there is none, unless in CI."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and no Chromium at {CHROMIUM}: .ci/run installs it")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return path


async def browse(url: str, *, screenshot: Path | None = None) -> str:
    """The DOM Chromium rendered for `url` (or a screenshot of it, then "")."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        args = [
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
        ]
        if screenshot is not None:
            args += ["--hide-scrollbars", "--window-size=1100,760", f"--screenshot={screenshot}"]
        else:
            args.append("--dump-dom")
        proc = await asyncio.create_subprocess_exec(
            chromium(),
            *args,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(BROWSER_TIMEOUT):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()  # our own child, by its handle
                await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


class Cells(HTMLParser):
    """The text of every element with a class, by class: {"spiffe": ["spiffe://..."], ...}.

    Also records every tag seen, so a test can tell text from markup."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.by_class: dict[str, list[str]] = {}
        self.tags: list[str] = []
        self._open: list[tuple[str, list[str], list[str]]] = []  # tag, classes, text
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("meta", "br", "link"):
            return
        classes = (dict(attrs).get("class") or "").split()
        self._open.append((tag, classes, []))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, classes, text = self._open.pop()
            joined = "".join(text).strip()
            for cls in classes:
                self.by_class.setdefault(cls, []).append(joined)
            if self._open:
                self._open[-1][2].append("".join(text))
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][2].append(data)


@dataclass
class Scene:
    url: str
    web_public_port: int
    upstream_port: int
    agent: DevAgent
    metrics: ProxyMetrics


@contextlib.asynccontextmanager
async def status_scene(agent: DevAgent, app: EchoApp) -> AsyncIterator[Scene]:
    """`web` under run() with its admin endpoint: a public listener in front of `app` and an
    upstream to `db` (a sidecar in front of `app` too), both serving."""
    state = RunState()
    metrics = ProxyMetrics(access_log=False)
    stop = asyncio.Event()
    client = agent_client(agent)
    admin = AdminServer("127.0.0.1", 0, state=state, metrics=metrics, settings={"mode": "test"})
    config = ProxyConfig(
        service="web",
        public_listener=PublicListenerConfig(
            bind_address="127.0.0.1",
            bind_port=0,
            local_service_host="127.0.0.1",
            local_service_port=app.port,
        ),
        upstreams=(upstream("db"),),
    )

    class One:
        async def configs(self) -> AsyncIterator[ProxyConfig]:
            yield config
            await asyncio.Event().wait()

    async with db_sidecar(agent, app):
        await admin.start()
        task = asyncio.create_task(
            run(
                client,
                One(),
                stop,
                ProxySettings(watch_backoff=0.05, drain_timeout=1.0),
                metrics=metrics,
                state=state,
            )
        )
        try:
            await wait_until(lambda: state.not_ready() == "")
            proxy = state.proxy
            assert proxy is not None and proxy.public is not None
            (up,) = proxy.upstreams.values()
            yield Scene(f"http://{admin.address}/", proxy.public.port, up.port, agent, metrics)
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await task
            await client.aclose()
            await admin.aclose()


@contextlib.asynccontextmanager
async def traffic(scene: Scene) -> AsyncIterator[None]:
    """One connection through the `db` upstream, 11 bytes each way, held open; and one
    refused inbound connection, whose client certificate has a hostile SPIFFE ID."""
    reader, writer = await asyncio.open_connection("127.0.0.1", scene.upstream_port)
    try:
        writer.write(b"hello world")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readexactly(11) == b"hello world"
        await refused_connection(scene)
        yield
    finally:
        writer.close()


async def refused_connection(scene: Scene) -> None:
    ca = scene.agent.state.ca
    uri = f"spiffe://{ca.trust_domain}/ns/default/dc/dc1/svc/{HOSTILE}"
    cert, key = custom_leaf(scene.agent, serial=4242, uri=uri)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(r.cert_pem for r in ca.roots))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "leaf.pem").write_text(cert + key)
        ctx.load_cert_chain(Path(tmp) / "leaf.pem")
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", scene.web_public_port, ssl=ctx, server_hostname=None
    )
    try:
        writer.write(b"let me in")
        async with asyncio.timeout(5):
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await reader.read(100) == b""  # closed without a byte forwarded
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, OSError):
            await writer.wait_closed()


async def test_status_page_renders_identity_upstreams_connections_and_refusals(
    agent: DevAgent,
) -> None:
    browser = chromium()
    assert browser
    async with echo_app() as app, status_scene(agent, app) as scene, traffic(scene):
        await wait_until(lambda: len(scene.metrics.recent_refusals) == 1)
        dom = await browse(scene.url)
    page = Cells(dom)
    td = agent.state.ca.trust_domain
    assert page.by_class["service"] == ["web"]
    assert page.by_class["spiffe"] == [f"spiffe://{td}/ns/default/dc/dc1/svc/web"]
    assert page.by_class["ready"] == ["ready"]
    # The listeners: the public one and the upstream, both bound; one open connection.
    assert page.by_class["kind"] == ["public", "upstream"]
    assert page.by_class["bound"] == ["bound", "bound"]
    assert page.by_class["open"] == ["0", "1"]
    assert page.by_class["total-open"] == ["1"]
    # The upstream's one instance, from the agent, with its health.
    assert page.by_class["upstream"] == ["db"]
    assert page.by_class["instance"] == ["db-sidecar-proxy"]
    assert page.by_class["health"] == ["passing"]
    # The refusal, its hostile SPIFFE ID shown as text: no <b> element came from it.
    assert page.by_class["reason"] == ["not_spiffe"]
    assert page.by_class["direction"] == ["inbound"]
    assert page.by_class["peer"] == [f"spiffe://{td}/ns/default/dc/dc1/svc/{HOSTILE}"]
    assert "b" not in page.tags
