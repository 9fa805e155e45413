"""Observability of `connect-proxy` as a real process: SIGUSR1, JSON access lines."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from proxy.demo import ReservedPorts
from proxy.devagent import DevAgent
from tests.proxyfix import EchoApp, client_ctx, echo_app
from tests.test_scenario_process import SECRET, Proc, spawn

pytestmark = pytest.mark.one_loop  # the subject is a child process


def inbound_args(agent: DevAgent, port: int, app: EchoApp, *extra: str) -> list[str]:
    return [
        *("-service", "db", "-listen", f"127.0.0.1:{port}"),
        *("-service-addr", f"127.0.0.1:{app.port}", "-http-addr", agent.http_addr),
        *extra,
    ]


async def echo_once(agent: DevAgent, port: int) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx(agent, "web"), server_hostname=None
    )
    try:
        writer.write(b"hello world")
        assert await reader.readexactly(11) == b"hello world"
    finally:
        writer.close()


async def read_line(p: Proc, stream: asyncio.StreamReader, text: str) -> str:
    """The first line of `stream` containing `text` (within 20 s)."""
    async with asyncio.timeout(20):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"stream ended before {text!r}: {''.join(p.out)}"
            p.out.append(line)
            if text in line:
                return line


async def test_sigusr1_prints_the_metrics_to_stderr(agent: DevAgent, ports: ReservedPorts) -> None:
    async with echo_app() as app:
        port = ports.take()
        async with spawn(*inbound_args(agent, port, app)) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            await echo_once(agent, port)
            assert p.proc.stdout is not None and p.proc.stderr is not None
            # The access line says the connection is over, so its bytes are counted.
            await read_line(p, p.proc.stdout, "connection forwarded")
            p.proc.send_signal(signal.SIGUSR1)
            # In the order of the exposition.
            forwarded = await read_line(p, p.proc.stderr, "connect_proxy_connections_total{")
            assert 'outcome="forwarded"' in forwarded and forwarded.rstrip().endswith(" 1.0")
            line = await read_line(
                p, p.proc.stderr, 'connect_proxy_bytes_total{direction="inbound"'
            )
            assert line.rstrip().endswith(" 11.0")
            p.proc.send_signal(signal.SIGTERM)
            code, _, _ = await p.finish()
            assert code == 0


async def test_log_json_access_line_is_one_object(agent: DevAgent, ports: ReservedPorts) -> None:
    async with echo_app() as app:
        port = ports.take()
        async with spawn(*inbound_args(agent, port, app, "-log-json")) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            await echo_once(agent, port)
            assert p.proc.stdout is not None
            line = await read_line(p, p.proc.stdout, '"connection forwarded"')
            entry = json.loads(line)
            assert entry["@level"] == "info" and entry["@module"] == "proxy.inbound"
            assert entry["direction"] == "inbound" and entry["decision"] == "forwarded"
            assert entry["peer"].endswith("/svc/web")
            assert entry["dst"] == f"127.0.0.1:{app.port}"
            assert (entry["bytes_to_dst"], entry["bytes_to_src"]) == (11, 11)
            assert entry["handshake_ms"] > 0 and entry["authorize_ms"] > 0
            p.proc.send_signal(signal.SIGTERM)
            code, _, _ = await p.finish()
            assert code == 0


async def test_access_log_off_keeps_the_metrics(agent: DevAgent, ports: ReservedPorts) -> None:
    async with echo_app() as app:
        port = ports.take()
        async with spawn(*inbound_args(agent, port, app, "-access-log=false")) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            await echo_once(agent, port)
            assert p.proc.stderr is not None
            # No line says the connection is over; ask until the counter shows it.
            for _ in range(50):
                p.proc.send_signal(signal.SIGUSR1)
                line = await read_line(p, p.proc.stderr, "connect_proxy_connections_total{")
                if line.rstrip().endswith(" 1.0"):
                    break
            else:
                raise AssertionError("the forwarded connection was never counted")
            p.proc.send_signal(signal.SIGTERM)
            code, stdout, _ = await p.finish()
            assert code == 0
            assert "connection forwarded" not in stdout


async def test_admin_port_taken_is_a_clear_start_up_error(
    agent: DevAgent, ports: ReservedPorts
) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    try:
        admin = f"127.0.0.1:{taken.sockets[0].getsockname()[1]}"
        async with echo_app() as app:
            args = inbound_args(agent, ports.take(), app, "-admin-bind", admin)
            async with spawn(*args) as p:
                code, stdout, stderr = await p.finish()
        assert code == 1
        assert f"==> Failed to start admin endpoint on {admin}: " in stderr
        assert "starting" not in stdout
    finally:
        taken.close()
        await taken.wait_closed()


async def test_admin_endpoint_of_a_real_process(agent: DevAgent, ports: ReservedPorts) -> None:
    """-admin-bind from the environment; /ready, /config without the token, the banner."""
    admin = f"127.0.0.1:{ports.take()}"
    async with echo_app() as app:
        args = inbound_args(agent, ports.take(), app, "-token", SECRET)
        async with spawn(*args, env={"CONNECT_PROXY_ADMIN_BIND": admin}) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            ports.release()
            async with httpx.AsyncClient(base_url=f"http://{admin}") as c:
                ready = await c.get("/ready")
                config = await c.get("/config")
                metrics = await c.get("/metrics")
            assert (ready.status_code, ready.text) == (200, "ready\n")
            assert config.json()["settings"]["http"]["token"] == "<redacted>"
            assert config.json()["settings"]["admin_bind"] == admin
            assert SECRET not in config.text
            assert "connect_proxy_ready 1.0" in metrics.text
            p.proc.send_signal(signal.SIGTERM)
            code, stdout, stderr = await p.finish()
    assert code == 0
    assert f"    Admin endpoint: http://{admin}/" in stdout
    assert SECRET not in stdout + stderr
