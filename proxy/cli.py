"""The `connect-proxy` command: argv in, exit code out.

Owns argument parsing, logging set-up, the choice of event loop (uvloop when installed),
signal handling and exit codes. It decides nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__
from proxy.errors import ConfigError

_LOG_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERR": logging.ERROR,
    "ERROR": logging.ERROR,
}

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


class _Parser(argparse.ArgumentParser):
    """Go-flag style: `-flag value`, `-flag=value`, `--flag`; errors exit with code 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{message}\n")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), **kwargs)  # type: ignore[arg-type]


def _setup_logging(level: str, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(
            logging.Formatter(
                '{"@timestamp":"%(asctime)s","@level":"%(levelname)s","@module":"%(name)s",'
                '"@message":%(message)r}'
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LOG_LEVELS.get(level.upper(), logging.INFO))


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _split_addr(value: str) -> tuple[str, int]:
    addr = value.removeprefix("http://")
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"-http-addr must be host:port, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def dev_agent_main(argv: Sequence[str]) -> int:
    """`connect-proxy dev-agent`: run the embedded agent until SIGINT/SIGTERM."""
    from proxy.devagent import DevAgent, load_files
    from proxy.devagent.config import AgentConfig
    from proxy.devagent.decode import parse_duration

    parser = _Parser(prog="connect-proxy dev-agent", usage=DEV_AGENT_HELP, add_help=False)
    _flag(parser, "help", action="store_true")
    _flag(parser, "http-addr", default="127.0.0.1:8500", help="address of the HTTP API")
    _flag(
        parser,
        "config-file",
        action="append",
        default=[],
        help="Consul agent config file (JSON or HCL); repeatable",
    )
    _flag(
        parser,
        "config-dir",
        action="append",
        default=[],
        help="directory of .json/.hcl config files; repeatable",
    )
    _flag(parser, "datacenter", default=None)
    _flag(parser, "node", default=None)
    _flag(parser, "log-level", default="INFO")
    _flag(parser, "dev", action="store_true", help="accepted for familiarity; always on")
    _flag(
        parser,
        "sidecar-check-interval",
        default=None,
        help="interval of sidecar TCP checks (dev agent only)",
    )
    _flag(
        parser,
        "ca-intermediate",
        action="store_true",
        help="sign leaves through an intermediate CA",
    )
    args, rest = parser.parse_known_args(list(argv))
    if args.help:
        print(DEV_AGENT_HELP)
        return 0
    if rest:
        print(f"unknown arguments: {' '.join(rest)}", file=sys.stderr)
        return 1
    _setup_logging(args.log_level)
    try:
        files: list[str] = list(args.config_file)
        for directory in args.config_dir:
            d = Path(directory)
            if not d.is_dir():
                raise ConfigError(f"-config-dir {directory}: not a directory")
            files += sorted(str(p) for p in d.iterdir() if p.suffix in (".json", ".hcl"))
        config = load_files(files, AgentConfig())
        host, port = _split_addr(args.http_addr)
        overrides: dict[str, object] = {"http_host": host, "http_port": port}
        if args.datacenter:
            overrides["datacenter"] = args.datacenter
        if args.node:
            overrides["node_name"] = args.node
        if args.ca_intermediate:
            overrides["use_intermediate"] = True
        if args.sidecar_check_interval:
            try:
                overrides["sidecar_check_interval"] = parse_duration(args.sidecar_check_interval)
            except ValueError as exc:
                raise ConfigError(f"-sidecar-check-interval: {exc}") from exc
        from dataclasses import replace

        config = replace(config, **overrides)  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"==> {exc}", file=sys.stderr)
        return 1
    for key in config.ignored_keys:
        logging.getLogger("devagent").info("config key %s is not used by the dev agent", key)

    async def run() -> int:
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

    _install_uvloop()
    return asyncio.run(run())


MAIN_HELP = f"""\
Usage: connect-proxy [command] [options]

connect-proxy {__version__}: Consul's built-in Connect proxy, in Python.

Commands:
    dev-agent    Run the embedded Consul-compatible dev agent
    version      Print the version
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dev-agent":
        return dev_agent_main(args[1:])
    if args and args[0] in ("version", "-version", "--version"):
        print(f"connect-proxy {__version__}")
        return 0
    if args and args[0] in ("-h", "-help", "--help", "help"):
        print(MAIN_HELP)
        return 0
    print(MAIN_HELP, file=sys.stderr)
    print("The proxy itself is not implemented yet; only `dev-agent` runs.", file=sys.stderr)
    return 1
