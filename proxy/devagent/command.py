"""`connect-proxy dev-agent`: run the embedded agent until SIGINT/SIGTERM.

Flags are parsed with the same Go-flag parser as every other command (`-flag value`,
`-flag=value`, `--flag`, Go's messages); `-config-file` and `-config-dir` repeat as in
`consul agent`.

Rule 1: this is the dev agent's only contact with a terminal; the agent itself logs through
`logging` and prints nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import console
from proxy.addr import split_host_port
from proxy.devagent.agent import DevAgent
from proxy.devagent.config import AgentConfig, load_files
from proxy.errors import ConfigError
from proxy.goflags import FlagError, FlagSet, HelpRequested, parse_duration

DEV_AGENT_HELP = """\
Usage: connect-proxy dev-agent [options]

  Runs the embedded Consul-compatible dev agent: the agent HTTP API a Connect
  proxy uses (services, health, CA roots and leaves, authorize, intentions,
  prepared queries), with a built-in CA, in memory.

  Start an agent with a web service and its sidecar:

      $ connect-proxy dev-agent -config-file web.json

  where web.json is a Consul agent config file, for example:

      {"service": {"name": "web", "port": 8080,
                   "connect": {"sidecar_service": {"proxy": {"upstreams": [
                       {"destination_name": "db", "local_bind_port": 9191}]}}}}}
"""


def _flag_set(config_files: list[str], config_dirs: list[str]) -> FlagSet:
    fs = FlagSet()
    fs.string("http-addr", "127.0.0.1:8500", "Address of the HTTP API.")
    fs.repeated(
        "config-file", "Consul agent config file (JSON or HCL); repeatable.", config_files.append
    )
    fs.repeated(
        "config-dir", "Directory of .json/.hcl config files; repeatable.", config_dirs.append
    )
    fs.string("datacenter", "", "Datacenter name.")
    fs.string("node", "", "Node name.")
    fs.string("log-level", "INFO", "Log level.")
    fs.boolean("dev", False, "Accepted for familiarity; always on.")
    fs.string("sidecar-check-interval", "", "Interval of sidecar TCP checks (dev agent only).")
    fs.boolean("ca-intermediate", False, "Sign leaves through an intermediate CA.")
    fs.string(
        "grpc-tls-port",
        "",
        "The peering port (Consul's gRPC TLS port; 0 picks a free one). Unset: no peering port.",
    )
    return fs


def _load_config(
    values: dict[str, str | bool], config_files: list[str], config_dirs: list[str]
) -> AgentConfig:
    """Config files, then the flags over them.

    Raises:
        ConfigError: a file, directory or flag value that cannot be used.
    """

    def text(name: str) -> str:
        value = values.get(name, "")
        return value if isinstance(value, str) else ""

    files = list(config_files)
    for directory in config_dirs:
        d = Path(directory)
        if not d.is_dir():
            raise ConfigError(f"-config-dir {directory}: not a directory")
        files += sorted(str(p) for p in d.iterdir() if p.suffix in (".json", ".hcl"))
    config = load_files(files, AgentConfig())
    host, port = split_host_port(
        (text("http-addr") or "127.0.0.1:8500").removeprefix("http://"), "-http-addr"
    )
    overrides: dict[str, object] = {"http_host": host or "127.0.0.1", "http_port": port}
    if text("datacenter"):
        overrides["datacenter"] = text("datacenter")
    if text("node"):
        overrides["node_name"] = text("node")
    if values.get("ca-intermediate") is True:
        overrides["use_intermediate"] = True
    if text("grpc-tls-port"):
        raw = text("grpc-tls-port")
        if not raw.lstrip("-").isdigit() or not -1 <= int(raw) < 65536:
            raise ConfigError(f"-grpc-tls-port: not a port: {raw}")
        overrides["grpc_tls_port"] = int(raw)
    if text("sidecar-check-interval"):
        try:
            overrides["sidecar_check_interval"] = parse_duration(text("sidecar-check-interval"))
        except ValueError as exc:
            raise ConfigError(f"-sidecar-check-interval: {exc}") from exc
    return dataclasses.replace(config, **overrides)  # type: ignore[arg-type]


async def _run(config: AgentConfig) -> int:
    agent = DevAgent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except OSError as exc:
        print(f"==> Error starting agent: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"==> Error starting agent: {exc or type(exc).__name__}", file=sys.stderr)
        await agent.close()
        return 1
    print("==> Starting Consul dev agent (connect-proxy)...")
    for label, value in (
        ("Datacenter", f"'{agent.state.datacenter}'"),
        ("Node name", f"'{agent.state.node_name}'"),
        ("HTTP API address", agent.http_addr),
        ("Trust domain", agent.state.ca.trust_domain),
        (
            "Peering port",
            str(agent.peering.port) if agent.peering is not None else "none (-grpc-tls-port)",
        ),
        ("Services", str(len(agent.state.services))),
    ):
        print(f"{label:>20}: {value}")
    print("==> Consul dev agent running!", flush=True)
    try:
        await stop.wait()
        print("==> Caught signal, gracefully shutting down agent...", flush=True)
    finally:
        await agent.close()
    return 0


def dev_agent_main(argv: Sequence[str]) -> int:
    """`connect-proxy dev-agent [options]`; returns the exit code."""
    config_files: list[str] = []
    config_dirs: list[str] = []
    try:
        values, rest = _flag_set(config_files, config_dirs).parse(argv)
    except HelpRequested:
        print(DEV_AGENT_HELP)
        return 0
    except FlagError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if rest:
        print(f"unknown arguments: {' '.join(rest)}", file=sys.stderr)
        return 1
    level = values.get("log-level")
    console.setup_logging(level if isinstance(level, str) and level else "INFO")
    try:
        config = _load_config(values, config_files, config_dirs)
    except ConfigError as exc:
        print(f"==> {exc}", file=sys.stderr)
        return 1
    for key in config.ignored_keys:
        logging.getLogger("devagent").info("config key %s is not used by the dev agent", key)
    console.install_uvloop()
    return asyncio.run(_run(config))
