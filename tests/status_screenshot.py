"""Make the README's screenshot of the admin status page: `python -m tests.status_screenshot`.

Runs the browser test's scene (the dev agent, `web` with a public listener and a `db`
upstream, `db`'s sidecar, all in this process on 127.0.0.1), holds a connection through
the upstream, gets one inbound connection denied by an intention, and has headless
Chromium take a screenshot of the page (default: tests/fixtures/status-page.png).
Not collected by pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import httpx

from proxy.devagent import AgentConfig, DevAgent
from tests.conftest import wait_until
from tests.proxyfix import client_ctx, echo_app
from tests.test_admin_browser import Scene, browse, status_scene

DEFAULT = Path(__file__).resolve().parent / "fixtures" / "status-page.png"


async def _denied(scene: Scene) -> None:
    """An inbound connection from `billing`, which an intention denies."""
    async with httpx.AsyncClient(base_url=scene.agent.url) as c:
        r = await c.put(
            "/v1/connect/intentions/exact?source=billing&destination=web",
            json={"Action": "deny"},
        )
        r.raise_for_status()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        scene.web_public_port,
        ssl=client_ctx(scene.agent, "billing"),
        server_hostname=None,
    )
    try:
        writer.write(b"let me in")
        with contextlib.suppress(OSError):
            async with asyncio.timeout(5):
                await reader.read(100)
    finally:
        writer.close()


async def main(out: Path) -> None:
    agent = DevAgent(AgentConfig(node_name="node-1", sidecar_check_interval=0.3))
    await agent.start("127.0.0.1", 0)
    try:
        async with echo_app() as app, status_scene(agent, app) as scene:
            reader, writer = await asyncio.open_connection("127.0.0.1", scene.upstream_port)
            try:
                writer.write(b"hello world")
                await writer.drain()
                async with asyncio.timeout(5):
                    await reader.readexactly(11)
                await _denied(scene)
                await wait_until(lambda: len(scene.metrics.recent_refusals) == 1)
                await browse(scene.url, screenshot=out.resolve())
            finally:
                writer.close()
    finally:
        await agent.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT))
