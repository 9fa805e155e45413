"""`connect-proxy envoy`: golden bootstraps, flag combinations, exec through a FIFO, fallback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.agent import AgentClient
from proxy.devagent import DevAgent
from proxy.envoy.bootstrap import BootstrapArgs, format_bootstrap, render_bootstrap
from proxy.envoy.command import envoy_argv, parse_envoy_args, prepare
from proxy.errors import ConfigError
from tests.proxyfix import client_ctx, echo_app, tls_exchange

pytestmark = pytest.mark.one_loop  # the command runs on its own loop, envoy is a child process

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "c9a52720-bf6c-4aa6-b8bc-66881a5ade95"


def golden(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


async def _register(agent: DevAgent, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.put("/v1/agent/service/register", json=body)
        assert r.status_code == 200, r.text


async def _test_proxy(agent: DevAgent, config: dict[str, Any] | None = None) -> None:
    """The registration behind Consul's goldens: `test-proxy`, a proxy for `test`."""
    await _register(
        agent,
        {
            "Kind": "connect-proxy",
            "ID": "test-proxy",
            "Name": "test-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": "test", "Config": config or {}},
        },
    )


async def bootstrap_for(
    agent: DevAgent, *args: str, env: dict[str, str] | None = None
) -> dict[str, Any]:
    options = parse_envoy_args(["-http-addr", agent.http_addr, "-bootstrap", *args], env or {})
    client = AgentClient(options.http)
    warnings: list[str] = []
    try:
        _, boot_args = await prepare(options, client, warnings.append)
    finally:
        await client.aclose()
    return render_bootstrap(boot_args, central_config=not options.no_central_config)


def test_render_matches_consuls_golden_byte_for_byte() -> None:
    boot = render_bootstrap(
        BootstrapArgs(proxy_id="test-proxy", cluster="test", token=TOKEN, datacenter="dc1")
    )
    assert boot == golden("consul-token-arg.golden.json")
    # As printed by the CLI (print() adds the newline Consul's UI.Output adds).
    assert format_bootstrap(boot) + "\n" == (FIXTURES / "consul-token-arg.golden.json").read_text()


def test_fields_shared_with_the_consul_1_3_golden() -> None:
    old = golden("consul-1.3-defaults.golden.json")
    new = render_bootstrap(BootstrapArgs(proxy_id="test-proxy", cluster="test-proxy"))
    assert new["admin"] == old["admin"]
    assert (
        new["node"]["id"] == old["node"]["id"] and new["node"]["cluster"] == old["node"]["cluster"]
    )
    (old_cluster,) = old["static_resources"]["clusters"]
    (new_cluster,) = new["static_resources"]["clusters"]
    for key in ("name", "connect_timeout", "type", "http2_protocol_options"):
        assert new_cluster[key] == old_cluster[key]
    endpoint = new_cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"][
        "address"
    ]
    assert endpoint == old_cluster["hosts"][0]
    old_ads, new_ads = (
        old["dynamic_resources"]["ads_config"],
        new["dynamic_resources"]["ads_config"],
    )
    assert new_ads["grpc_services"] == old_ads["grpc_services"]  # token metadata present, empty
    assert set(new["dynamic_resources"]) == set(old["dynamic_resources"])


async def test_bootstrap_from_the_agent_matches_the_golden(agent: DevAgent) -> None:
    await _test_proxy(agent)
    boot = await bootstrap_for(agent, "-proxy-id", "test-proxy", "-token", TOKEN)
    assert boot == golden("consul-token-arg.golden.json")


@pytest.mark.parametrize("how", ["token-file-flag", "env", "env-file"])
async def test_token_sources_end_up_in_initial_metadata(
    agent: DevAgent, tmp_path: Path, how: str
) -> None:
    await _test_proxy(agent)
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    args, env = ["-proxy-id", "test-proxy"], {}
    if how == "token-file-flag":
        args += ["-token-file", str(token_file)]
    elif how == "env":
        env["CONSUL_HTTP_TOKEN"] = TOKEN
    else:
        env["CONSUL_HTTP_TOKEN_FILE"] = str(token_file)
    boot = await bootstrap_for(agent, *args, env=env)
    assert boot == golden("consul-token-arg.golden.json")


async def test_admin_bind_grpc_addr_and_unix_socket(agent: DevAgent) -> None:
    await _test_proxy(agent)
    boot = await bootstrap_for(
        agent,
        "-proxy-id",
        "test-proxy",
        "-admin-bind",
        "localhost:19001",
        "-grpc-addr",
        "127.0.0.1:9999",
    )
    assert boot["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19001,
    }
    cluster = boot["static_resources"]["clusters"][0]
    assert cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "127.0.0.1", "port_value": 9999}
    }
    boot = await bootstrap_for(
        agent, "-proxy-id", "test-proxy", "-grpc-addr", "unix:///var/run/consul.sock"
    )
    cluster = boot["static_resources"]["clusters"][0]
    assert cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"] == {
        "pipe": {"path": "/var/run/consul.sock"}
    }
    assert "transport_socket" not in cluster


async def test_grpc_tls_inlines_the_ca(agent: DevAgent, tmp_path: Path) -> None:
    await _test_proxy(agent)
    ca = tmp_path / "ca.pem"
    ca.write_text(agent.state.ca.active_root.cert_pem)
    boot = await bootstrap_for(
        agent,
        "-proxy-id",
        "test-proxy",
        "-grpc-addr",
        "https://127.0.0.1:8503",
        "-grpc-ca-file",
        str(ca),
    )
    tls = boot["static_resources"]["clusters"][0]["transport_socket"]
    assert tls["name"] == "tls"
    inline = tls["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"][
        "inline_string"
    ]
    assert inline.strip() == agent.state.ca.active_root.cert_pem.strip()


async def test_central_config_keys_and_no_central_config(agent: DevAgent) -> None:
    await _test_proxy(
        agent,
        {
            "envoy_statsd_url": "udp://127.0.0.1:9125",
            "envoy_stats_tags": ["team=payments", "canary"],
            "envoy_stats_flush_interval": "5s",
            "envoy_extra_static_clusters_json": '{"name": "extra", "type": "STATIC"}',
        },
    )
    boot = await bootstrap_for(agent, "-proxy-id", "test-proxy", "-omit-deprecated-tags")
    assert boot["stats_sinks"] == [
        {
            "name": "envoy.stat_sinks.statsd",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.config.metrics.v3.StatsdSink",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9125}},
            },
        }
    ]
    tags = boot["stats_config"]["stats_tags"]
    assert tags[:2] == [
        {"tag_name": "team", "fixed_value": "payments"},
        {"tag_name": "canary", "fixed_value": "1"},
    ]
    assert not any(t.get("tag_name") == "consul.service" for t in tags)  # deprecated tags omitted
    assert boot["stats_flush_interval"] == "5s"
    assert [c["name"] for c in boot["static_resources"]["clusters"]] == ["local_agent", "extra"]
    plain = await bootstrap_for(agent, "-proxy-id", "test-proxy", "-no-central-config")
    assert "stats_sinks" not in plain and len(plain["static_resources"]["clusters"]) == 1


async def test_unsupported_sink_scheme_is_a_clear_error(agent: DevAgent) -> None:
    await _test_proxy(agent, {"envoy_statsd_url": "tcp://127.0.0.1:9125"})
    with pytest.raises(ConfigError, match="unsupported address protocol 'tcp' for statsd sink"):
        await bootstrap_for(agent, "-proxy-id", "test-proxy")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "No proxy ID specified. One of -proxy-id, -sidecar-for, or -gateway is required"),
        (["-sidecar-for", "nothing"], "No sidecar proxy registered for nothing"),
        (["-proxy-id", "plain"], "service is not a Connect proxy or gateway"),
        (
            ["-proxy-id", "missing"],
            "failed fetch proxy config from local agent: Unexpected response code: 404",
        ),
    ],
)
async def test_resolution_errors(agent: DevAgent, args: list[str], message: str) -> None:
    await _register(agent, {"Name": "plain", "Port": 1})
    with pytest.raises(ConfigError) as info:
        await bootstrap_for(agent, *args)
    assert str(info.value).startswith(message)


async def test_sidecar_for_resolves_the_proxy_and_its_cluster(agent: DevAgent) -> None:
    await _register(agent, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    boot = await bootstrap_for(agent, "-sidecar-for", "web")
    assert boot["node"]["id"] == "web-sidecar-proxy" and boot["node"]["cluster"] == "web"


@pytest.mark.parametrize(
    ("passthrough", "disable_hot_restart"),
    [
        ([], True),
        (["--log-level", "debug"], True),
        (["--restart-epoch", "1"], False),
        (["--restart-epoch=2"], False),
        (["--drain-time-s", "5"], False),
    ],
)
def test_envoy_argv(passthrough: list[str], disable_hot_restart: bool) -> None:
    argv = envoy_argv("/usr/bin/envoy", "/tmp/x/envoy-1-bootstrap.json", passthrough)
    assert argv[:3] == ["/usr/bin/envoy", "--config-path", "/tmp/x/envoy-1-bootstrap.json"]
    assert ("--disable-hot-restart" in argv) is disable_hot_restart
    if passthrough:
        assert argv[-len(passthrough) :] == passthrough


FAKE_ENVOY = """#!{python}
import json, os, stat, sys
if "--version" in sys.argv:
    print("envoy  version: 0000/{version}/Clean/RELEASE/BoringSSL")
    sys.exit(0)
path = sys.argv[sys.argv.index("--config-path") + 1]
mode = os.stat(path).st_mode
with open(path) as f:
    text = f.read()
with open(os.environ["FAKE_ENVOY_REPORT"], "w") as f:
    json.dump({{"argv": sys.argv, "path": path, "fifo": stat.S_ISFIFO(mode),
               "regular": stat.S_ISREG(mode), "perm": oct(mode & 0o777), "config": json.loads(text)}}, f)
"""


def fake_envoy(tmp_path: Path, version: str = "1.28.0") -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    envoy = bin_dir / "envoy"
    envoy.write_text(FAKE_ENVOY.format(python=sys.executable, version=version))
    envoy.chmod(0o755)
    return bin_dir


@contextlib.asynccontextmanager
async def spawn(*args: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "envoy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_exec_hands_envoy_the_bootstrap_through_a_fifo(
    agent: DevAgent, tmp_path: Path
) -> None:
    await _register(agent, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    report = tmp_path / "report.json"
    env = {
        "PATH": f"{fake_envoy(tmp_path)}{os.pathsep}/usr/bin:/bin",
        "FAKE_ENVOY_REPORT": str(report),
    }
    async with spawn(
        "-sidecar-for",
        "web",
        "-http-addr",
        agent.http_addr,
        "-token",
        TOKEN,
        "--",
        "--log-level",
        "debug",
        env=env,
    ) as proc:
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    # The helper reports after Envoy has read the pipe, then unlinks it.
    assert "Bootstrap sent, unlinking named pipe" in stderr.decode()
    seen = json.loads(report.read_text())
    assert seen["fifo"] is True and seen["regular"] is False and seen["perm"] == "0o600"
    assert seen["path"].endswith("-bootstrap.json")
    assert seen["argv"][1:] == [
        "--config-path",
        seen["path"],
        "--disable-hot-restart",
        "--log-level",
        "debug",
    ]
    assert TOKEN not in " ".join(seen["argv"])  # the token is only inside the pipe's content
    metadata = seen["config"]["dynamic_resources"]["ads_config"]["grpc_services"][
        "initial_metadata"
    ]
    assert metadata == [{"key": "x-consul-token", "value": TOKEN}]
    assert not os.path.exists(seen["path"]) and not os.path.exists(os.path.dirname(seen["path"]))


async def test_hot_restart_options_pass_through(agent: DevAgent, tmp_path: Path) -> None:
    await _register(agent, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    report = tmp_path / "report.json"
    env = {
        "PATH": f"{fake_envoy(tmp_path)}{os.pathsep}/usr/bin:/bin",
        "FAKE_ENVOY_REPORT": str(report),
    }
    async with spawn(
        "-sidecar-for", "web", "-http-addr", agent.http_addr, "--", "--restart-epoch", "3", env=env
    ) as proc:
        async with asyncio.timeout(30):
            await proc.communicate()
    assert proc.returncode == 0
    argv = json.loads(report.read_text())["argv"]
    assert "--disable-hot-restart" not in argv and argv[-2:] == ["--restart-epoch", "3"]


async def test_unsupported_envoy_version_is_refused(agent: DevAgent, tmp_path: Path) -> None:
    await _register(agent, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    env = {
        "PATH": f"{fake_envoy(tmp_path, '1.9.0')}{os.pathsep}/usr/bin:/bin",
        "FAKE_ENVOY_REPORT": str(tmp_path / "r"),
    }
    async with spawn("-sidecar-for", "web", "-http-addr", agent.http_addr, env=env) as proc:
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert "Envoy version 1.9.0 is not supported" in stderr.decode()
    async with spawn(
        "-sidecar-for", "web", "-http-addr", agent.http_addr, "-ignore-envoy-compatibility", env=env
    ) as proc:
        async with asyncio.timeout(30):
            await proc.communicate()
    assert proc.returncode == 0


async def test_no_fallback_gives_consuls_error(agent: DevAgent) -> None:
    await _register(agent, {"Name": "web", "Port": 8080, "Connect": {"SidecarService": {}}})
    async with spawn(
        "-sidecar-for",
        "web",
        "-http-addr",
        agent.http_addr,
        "-no-fallback",
        env={"PATH": "/nonexistent"},
    ) as proc:
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert (
        'Couldn\'t find envoy binary: exec: "envoy": executable file not found in $PATH'
        in stderr.decode()
    )


async def test_fallback_runs_our_proxy_and_carries_traffic(agent: DevAgent) -> None:
    async with echo_app() as app:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await _register(
            agent,
            {
                "Name": "db",
                "Port": app.port,
                "Connect": {"SidecarService": {"Port": port, "Address": "127.0.0.1"}},
            },
        )
        async with spawn(
            "-sidecar-for",
            "db",
            "-http-addr",
            agent.http_addr,
            "-token",
            TOKEN,
            env={"PATH": "/nonexistent"},
        ) as proc:
            assert proc.stdout is not None
            lines: list[str] = []
            async with asyncio.timeout(20):
                while not any("Proxy loaded config and ready to serve" in line for line in lines):
                    line = (await proc.stdout.readline()).decode()
                    assert line, "".join(lines)
                    lines.append(line)
            assert any(
                "No Envoy binary found" in line and "db-sidecar-proxy" in line for line in lines
            )
            assert (
                await tls_exchange(port, client_ctx(agent, "web"), b"via fallback")
                == b"via fallback"
            )
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                out, err = await proc.communicate()
        assert proc.returncode == 0
        assert TOKEN not in "".join(lines) + out.decode() + err.decode()
