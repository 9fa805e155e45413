"""`connect-proxy dev-agent` as a real subprocess: start-up banner, API, signals, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

START_DEADLINE = 20.0
EXIT_DEADLINE = 10.0
RUNNING = "==> Consul dev agent running!"

CONFIG: dict[str, Any] = {
    "datacenter": "dc1",
    "node_name": "cli-node",
    "data_dir": "/tmp/ignored",
    "service": {
        "name": "web",
        "port": 8080,
        "connect": {
            "sidecar_service": {
                "proxy": {"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}
            }
        },
    },
    "services": [{"name": "db", "port": 5432}],
}


@dataclass
class Agent:
    proc: asyncio.subprocess.Process
    banner: list[str]
    http_addr: str


def write_config(tmp_path: Path, data: Any = None, name: str = "agent.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(CONFIG if data is None else data))
    return path


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "dev-agent",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the process by its PID if it still runs, and reap it (closing its pipes)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(EXIT_DEADLINE):
            await proc.communicate()


async def read_banner(proc: asyncio.subprocess.Process) -> list[str]:
    """Stdout lines up to and including the 'running' line, under a deadline."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(START_DEADLINE):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                stderr = b""
                if proc.stderr is not None:
                    stderr = await proc.stderr.read()
                pytest.fail(
                    f"dev-agent exited before it was running: stdout={lines!r} "
                    f"stderr={stderr.decode(errors='replace')!r}"
                )
            line = raw.decode().rstrip("\n")
            lines.append(line)
            if line == RUNNING:
                return lines


def http_addr_of(banner: list[str]) -> str:
    for line in banner:
        label, sep, value = line.partition("HTTP API address:")
        if sep and not label.strip():
            return value.strip()
    raise AssertionError(f"no HTTP API address in {banner!r}")


@contextlib.asynccontextmanager
async def running_agent(*args: str) -> AsyncIterator[Agent]:
    proc = await spawn(*args)
    try:
        banner = await read_banner(proc)
        yield Agent(proc, banner, http_addr_of(banner))
    finally:
        await kill(proc)


async def stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> tuple[int, str, str]:
    os.kill(proc.pid, sig)
    async with asyncio.timeout(EXIT_DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_to_exit(*args: str) -> tuple[int, str, str]:
    proc = await spawn(*args)
    try:
        async with asyncio.timeout(START_DEADLINE):
            out, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()
    finally:
        await kill(proc)


async def get_services(http_addr: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://{http_addr}", timeout=10.0) as client:
        r = await client.get("/v1/agent/services")
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- running and stopping ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_dev_agent_serves_configured_services_and_exits_0_on_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    config = write_config(tmp_path)

    async with running_agent("-http-addr", "127.0.0.1:0", "-config-file", str(config)) as agent:
        host, _, port = agent.http_addr.rpartition(":")
        assert host == "127.0.0.1"
        assert int(port) > 0
        assert any(line.strip() == "Node name: 'cli-node'" for line in agent.banner)
        assert any(line.strip() == "Services: 3" for line in agent.banner)

        services = await get_services(agent.http_addr)
        assert set(services) == {"web", "web-sidecar-proxy", "db"}
        sidecar = services["web-sidecar-proxy"]
        assert sidecar["Kind"] == "connect-proxy"
        assert sidecar["Proxy"]["DestinationServiceName"] == "web"
        assert sidecar["Proxy"]["Upstreams"][0]["DestinationName"] == "db"
        assert sidecar["Proxy"]["Upstreams"][0]["LocalBindPort"] == 9191

        code, out, err = await stop(agent.proc, sig)

        assert code == 0, err
        assert "gracefully shutting down" in out


async def test_dev_agent_accepts_the_equals_form_of_flags(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    async with running_agent("-http-addr=127.0.0.1:0", f"-config-file={config}") as agent:
        services = await get_services(agent.http_addr)
        assert "web" in services

        code, _, err = await stop(agent.proc, signal.SIGINT)
        assert code == 0, err


async def test_dev_agent_without_config_runs_with_no_services(tmp_path: Path) -> None:
    async with running_agent("--http-addr", "127.0.0.1:0", "-node", "bare") as agent:
        assert any(line.strip() == "Node name: 'bare'" for line in agent.banner)
        assert await get_services(agent.http_addr) == {}

        code, _, err = await stop(agent.proc, signal.SIGTERM)
        assert code == 0, err


async def test_dev_agent_loads_hcl_and_several_config_files(tmp_path: Path) -> None:
    first = write_config(tmp_path, {"service": {"name": "web", "port": 8080}}, "1.json")
    second = tmp_path / "2.hcl"
    second.write_text('service {\n  name = "db"\n  port = 5432\n}\n')

    async with running_agent(
        "-http-addr", "127.0.0.1:0", "-config-file", str(first), "-config-file", str(second)
    ) as agent:
        assert set(await get_services(agent.http_addr)) == {"web", "db"}

        code, _, err = await stop(agent.proc, signal.SIGINT)
        assert code == 0, err


async def test_dev_agent_loads_a_config_dir(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    write_config(conf, {"service": {"name": "web"}}, "a.json")
    write_config(conf, {"service": {"name": "db"}}, "b.json")
    (conf / "notes.txt").write_text("not a config file")

    async with running_agent("-http-addr", "127.0.0.1:0", "-config-dir", str(conf)) as agent:
        assert set(await get_services(agent.http_addr)) == {"web", "db"}

        code, _, err = await stop(agent.proc, signal.SIGINT)
        assert code == 0, err


# -- errors --------------------------------------------------------------------------------


async def test_dev_agent_exits_1_on_an_invalid_config_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"service": {"name": "web", "colour": "red"}})

    code, out, err = await run_to_exit("-http-addr", "127.0.0.1:0", "-config-file", str(config))

    assert code == 1
    assert "invalid config key" in err
    assert "colour" in err
    assert str(config) in err
    assert RUNNING not in out


async def test_dev_agent_exits_1_on_an_unknown_top_level_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"not_a_consul_key": True})

    code, _, err = await run_to_exit("-http-addr", "127.0.0.1:0", "-config-file", str(config))

    assert code == 1
    assert "not_a_consul_key" in err


async def test_dev_agent_exits_1_on_a_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"

    code, out, err = await run_to_exit("-http-addr", "127.0.0.1:0", "-config-file", str(missing))

    assert code == 1
    assert str(missing) in err
    assert RUNNING not in out


async def test_dev_agent_exits_1_on_a_bad_http_addr() -> None:
    code, _, err = await run_to_exit("-http-addr", "no-port-here")

    assert code == 1
    assert "-http-addr" in err


async def test_dev_agent_exits_1_on_an_unknown_flag() -> None:
    code, _, err = await run_to_exit("-http-addr", "127.0.0.1:0", "-no-such-flag")

    assert code == 1
    assert "-no-such-flag" in err


async def test_dev_agent_exits_1_when_the_http_port_is_taken() -> None:
    holder = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = holder.sockets[0].getsockname()[1]
    try:
        code, out, err = await run_to_exit("-http-addr", f"127.0.0.1:{port}")
    finally:
        holder.close()
        await holder.wait_closed()

    assert code == 1
    assert "Error starting agent" in err
    assert RUNNING not in out


@pytest.mark.parametrize("flag", ["-help", "--help"])
async def test_dev_agent_help_exits_0_with_usage(flag: str) -> None:
    code, out, _ = await run_to_exit(flag)

    assert code == 0
    assert "Usage:" in out
    assert "dev-agent" in out
