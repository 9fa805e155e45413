"""`connect-proxy envoy`: Consul's `connect envoy`, with our own proxy as the fallback.

Owns the flags, the agent look-ups that fill the bootstrap's arguments
(Consul's `command/connect/envoy/envoy.go`; the bootstrap itself is `proxy.envoy.bootstrap`), and
the edges: finding Envoy, handing it the bootstrap, replacing this process
with it, or running connect-proxy itself when there is no Envoy binary.

How the bootstrap reaches Envoy: it holds the ACL token, so it never goes on argv and never
lies on disk. As Consul does today, Envoy gets `--config-path <fifo>`: a named pipe (mode
0600, in a fresh 0700 directory) that a small helper process (`connect-proxy envoy
pipe-bootstrap <fifo>`, fed through its stdin) writes once and then unlinks. A FIFO rather
than an inherited memory file (`/proc/self/fd/N`) because Envoy picks the config format from
the path's extension, and a `.json` name is what Envoy has accepted since 1.10.

Rule 1: Envoy's absence is not an error unless -no-fallback: the fallback is our proxy.
Rule 2: the token appears only inside the bootstrap JSON; never in a log line or argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from proxy import console
from proxy.addr import split_host_port
from proxy.agent import AgentClient
from proxy.answers import XDSPorts, proxy_registration
from proxy.command import run_with_signals
from proxy.envoy.bootstrap import (
    DEFAULT_XDS_PORT,
    BootstrapArgs,
    format_bootstrap,
    render_bootstrap,
)
from proxy.errors import AgentError, AgentResponseError, ConfigError
from proxy.goflags import FlagError, FlagSet, HelpRequested
from proxy.httpflags import HTTPOptions, add_http_flags, load_http_options
from proxy.proxyargs import ProxyOptions
from proxy.sources import lookup_proxy_id_for_sidecar

DEFAULT_ADMIN_BIND = "localhost:19000"
HOT_RESTART_OPTIONS = (
    "--restart-epoch",
    "--hot-restart-version",
    "--drain-time-s",
    "--parent-shutdown-time-s",
)
# Envoy versions Consul's current `connect envoy` accepts (minor versions, end exclusive).
SUPPORTED_ENVOY = ((1, 25), (1, 30))


ENVOY_HELP = """\
Usage: connect-proxy envoy [options] [-- pass-through options]

  Generates the bootstrap configuration for Envoy as a Connect sidecar and
  replaces this process with Envoy, as `consul connect envoy` does. When no
  Envoy binary is found, runs connect-proxy's own proxy for the same proxy ID
  instead (unless -no-fallback).

      $ connect-proxy envoy -sidecar-for web
      $ connect-proxy envoy -sidecar-for web -bootstrap > bootstrap.json

Options:
"""


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    proxy_id: str
    sidecar_for: str
    envoy_binary: str
    admin_bind: str
    admin_access_log_path: str
    bootstrap: bool
    grpc_addr: str
    grpc_ca_file: str
    grpc_ca_path: str
    no_central_config: bool
    omit_deprecated_tags: bool
    ignore_envoy_compatibility: bool
    no_fallback: bool
    passthrough: tuple[str, ...]
    http: HTTPOptions


def _flag_set() -> FlagSet:
    fs = FlagSet()
    fs.string("proxy-id", "", "The proxy's ID on the local agent (CONNECT_PROXY_ID).")
    fs.string(
        "sidecar-for",
        "",
        "The ID of a service instance whose sidecar proxy to run (CONNECT_SIDECAR_FOR).",
    )
    fs.string(
        "envoy-binary", "", "The full path to the envoy binary to run. By default searches $PATH."
    )
    fs.string("admin-bind", DEFAULT_ADMIN_BIND, "The host:port to bind Envoy's admin HTTP API.")
    fs.string(
        "admin-access-log-path",
        "/dev/null",
        "The path to write the access log for the administration server.",
    )
    fs.boolean("bootstrap", False, "Generate the bootstrap.json but don't exec envoy.")
    fs.string("grpc-addr", "", "Set the agent's gRPC address and port (CONSUL_GRPC_ADDR).")
    fs.string("grpc-ca-file", "", "CA file for the agent's gRPC TLS (CONSUL_GRPC_CACERT).")
    fs.string("grpc-ca-path", "", "CA directory for the agent's gRPC TLS (CONSUL_GRPC_CAPATH).")
    fs.boolean("no-central-config", False, "Don't use the bootstrap keys of the proxy's Config.")
    fs.boolean("omit-deprecated-tags", False, "Omit the pre-1.9 consul.* stats tags.")
    fs.boolean("ignore-envoy-compatibility", False, "Skip the Envoy version check.")
    fs.string("envoy-version", "", "Accepted for compatibility; unused.")
    fs.boolean(
        "no-fallback", False, "Fail, as Consul does, when no Envoy binary is found (no fallback)."
    )
    add_http_flags(fs)
    return fs


def parse_envoy_args(args: Sequence[str], env: Mapping[str, str]) -> EnvoyOptions:
    """Raises FlagError, HelpRequested or ConfigError."""
    passthrough: list[str] = []
    if "--" in args:
        cut = list(args).index("--")
        args, passthrough = list(args[:cut]), list(args[cut + 1 :])
    values, rest = _flag_set().parse(args)
    if rest:
        raise ConfigError("Should have no non-flag arguments.")

    def text(name: str, var: str = "") -> str:
        value = values.get(name, "")
        if isinstance(value, str) and value:
            return value
        return env.get(var, "") if var else ""

    return EnvoyOptions(
        proxy_id=text("proxy-id", "CONNECT_PROXY_ID"),
        sidecar_for=text("sidecar-for", "CONNECT_SIDECAR_FOR"),
        envoy_binary=text("envoy-binary"),
        admin_bind=text("admin-bind") or DEFAULT_ADMIN_BIND,
        admin_access_log_path=text("admin-access-log-path") or "/dev/null",
        bootstrap=values.get("bootstrap") is True,
        grpc_addr=text("grpc-addr", "CONSUL_GRPC_ADDR"),
        grpc_ca_file=text("grpc-ca-file", "CONSUL_GRPC_CACERT"),
        grpc_ca_path=text("grpc-ca-path", "CONSUL_GRPC_CAPATH"),
        no_central_config=values.get("no-central-config") is True,
        omit_deprecated_tags=values.get("omit-deprecated-tags") is True,
        ignore_envoy_compatibility=values.get("ignore-envoy-compatibility") is True,
        no_fallback=values.get("no-fallback") is True,
        passthrough=tuple(passthrough),
        http=load_http_options(values, env),
    )


def _resolve_ip(host: str, what: str) -> str:
    try:
        infos = socket.getaddrinfo(host or "localhost", None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"Failed to resolve {what}: {exc}") from exc
    # Prefer IPv4, as Go's resolver does for a name like localhost.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def _read_pems(ca_file: str, ca_path: str) -> str:
    pems: list[str] = []
    try:
        if ca_file:
            with open(ca_file, encoding="utf-8") as f:
                pems.append(f.read().strip())
        if ca_path:
            for name in sorted(os.listdir(ca_path)):
                full = os.path.join(ca_path, name)
                if os.path.isfile(full):
                    with open(full, encoding="utf-8") as f:
                        pems.append(f.read().strip())
    except OSError as exc:
        raise ConfigError(f"Error loading CA for the xDS connection: {exc}") from exc
    return "\n".join(p for p in pems if p) + ("\n" if pems else "")


Warn = Callable[[str], None]


async def _xds_address(agent: AgentClient, options: EnvoyOptions, warn: Warn) -> str:
    if options.grpc_addr:
        return options.grpc_addr
    try:
        ports = await agent.xds_ports()
    except AgentError as exc:
        if "Permission denied" not in str(exc):
            warn(f"unable to look up the agent's gRPC port: {exc}")
        ports = XDSPorts(tls=0, plaintext=0, grpc=None)
    if ports.tls:
        return f"https://localhost:{ports.tls}"
    if ports.plaintext:
        return f"http://localhost:{ports.plaintext}"
    if ports.grpc is not None:
        if ports.grpc < 0:
            raise ConfigError("agent has grpc disabled")
        if ports.grpc > 0:
            return f"http://localhost:{ports.grpc}"
    warn(
        "-grpc-addr not provided and unable to discover a gRPC address for xDS. "
        f"Defaulting to localhost:{DEFAULT_XDS_PORT}"
    )
    return f"localhost:{DEFAULT_XDS_PORT}"


async def prepare(
    options: EnvoyOptions, agent: AgentClient, warn: Warn
) -> tuple[str, BootstrapArgs]:
    """Resolve the proxy ID and everything the bootstrap needs from the agent (as `envoy.go` does).

    Returns:
        (proxy ID, bootstrap arguments)

    Raises:
        ConfigError: with Consul's messages.
    """
    proxy_id = options.proxy_id
    if not proxy_id and options.sidecar_for:
        proxy_id = await lookup_proxy_id_for_sidecar(agent, options.sidecar_for)
    if not proxy_id:
        raise ConfigError(
            "No proxy ID specified. One of -proxy-id, -sidecar-for, or -gateway is required"
        )

    addr = await _xds_address(agent, options, warn)
    tls = addr.lower().startswith("https://")
    socket_path = ""
    host, port = "", DEFAULT_XDS_PORT
    if addr.startswith("unix://"):
        socket_path = addr[len("unix://") :]
        tls = bool(options.grpc_ca_file or options.grpc_ca_path)
    else:
        bare = re.sub(r"^https?://", "", addr, flags=re.IGNORECASE)
        try:
            host, port = split_host_port(bare, "-grpc-addr")
        except ConfigError as exc:
            raise ConfigError(f"Invalid Consul HTTP address: {exc}") from None
        host = _resolve_ip(host, "agent address")
        if not options.bootstrap:
            try:
                with socket.create_connection((host, port), timeout=3):
                    pass
            except OSError as exc:
                warn(f"There was an error dialing the xDS address: {exc}")
    admin_host, admin_port = split_host_port(options.admin_bind, "-admin-bind")
    admin_ip = _resolve_ip(admin_host, "admin bind address")
    ca_pem = ""
    if tls:
        ca_pem = _read_pems(options.grpc_ca_file, options.grpc_ca_path) or _read_pems(
            options.http.ca_file, options.http.ca_path
        )

    try:
        await agent.acl_token_self()
    except AgentResponseError as exc:
        if "ACL not found" in str(exc) and not options.http.token:
            warn(
                "No ACL token was provided to Envoy. Because the ACL system is enabled, pass a "
                "suitable ACL token for this service to Envoy to avoid potential communication "
                "failure."
            )
    except AgentError:
        pass

    try:
        registration = proxy_registration(await agent.agent_service(proxy_id))
    except AgentError as exc:
        raise ConfigError(f"failed fetch proxy config from local agent: {exc}") from exc
    if registration is None:
        raise ConfigError("service is not a Connect proxy or gateway")
    return proxy_id, BootstrapArgs(
        proxy_id=proxy_id,
        cluster=registration.cluster or proxy_id,
        admin_address=admin_ip,
        admin_port=admin_port,
        admin_access_log_path=options.admin_access_log_path,
        agent_address=host,
        agent_port=port,
        agent_socket=socket_path,
        agent_tls=tls,
        agent_ca_pem=ca_pem,
        token=options.http.token,
        namespace=registration.namespace,
        partition=registration.partition,
        datacenter=registration.datacenter or options.http.datacenter,
        omit_deprecated_tags=options.omit_deprecated_tags,
        proxy_config=registration.config,
    )


def envoy_argv(binary: str, config_path: str, passthrough: Sequence[str]) -> list[str]:
    """Envoy's argv: the config path, `--disable-hot-restart` unless hot restart is asked for."""
    argv = [binary, "--config-path", config_path]
    hot = any(
        a == opt or a.startswith(opt + "=") for a in passthrough for opt in HOT_RESTART_OPTIONS
    )
    if not hot:
        argv.append("--disable-hot-restart")
    return argv + list(passthrough)


def check_envoy_version(binary: str) -> str | None:
    """None if Envoy's version is supported, else the message to refuse it with."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Couldn't get envoy version for compatibility check: {exc}"
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        return "unable to parse Envoy version from output"
    major, minor = int(match.group(1)), int(match.group(2))
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_ENVOY
    if not (lo_major, lo_minor) <= (major, minor) < (hi_major, hi_minor):
        return (
            f"Envoy version {match.group(0)} is not supported. If there is a reason you need to "
            "use this version of envoy use the ignore-envoy-compatibility flag. Using an "
            "unsupported version of Envoy is not recommended and your experience may vary. "
            f"Supported versions: 1.{lo_minor}.x to 1.{hi_minor - 1}.x"
        )
    return None


def deliver_through_fifo(bootstrap: str) -> str:
    """Create the FIFO and start the helper that writes `bootstrap` into it once.

    Returns:
        The FIFO's path, for Envoy's --config-path.
    """
    directory = tempfile.mkdtemp(prefix="connect-proxy-envoy-")  # 0700
    path = os.path.join(directory, f"envoy-{secrets.token_hex(8)}-bootstrap.json")
    os.mkfifo(path, 0o600)
    helper = subprocess.Popen(
        [sys.executable, "-m", "proxy", "envoy", "pipe-bootstrap", path],
        stdin=subprocess.PIPE,
        close_fds=True,
    )
    assert helper.stdin is not None
    helper.stdin.write(bootstrap.encode())
    helper.stdin.close()
    return path


def pipe_bootstrap_main(args: Sequence[str]) -> int:
    """`connect-proxy envoy pipe-bootstrap <fifo>`: internal helper; see the module docstring."""
    if len(args) != 1:
        print("Expecting named pipe path as argument", file=sys.stderr)
        return 1
    path = args[0]
    data = sys.stdin.buffer.read()

    def give_up(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        os._exit(99)

    # If Envoy never opens the pipe, do not leave it (or ourselves) behind.
    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(10)
    with open(path, "wb") as fifo:  # blocks until Envoy opens it for reading
        fifo.write(data)
    signal.alarm(0)
    print("Bootstrap sent, unlinking named pipe", file=sys.stderr)
    with contextlib.suppress(OSError):
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    return 0


def envoy_main(args: Sequence[str], env: Mapping[str, str]) -> int:
    """`connect-proxy envoy`."""
    if args and args[0] == "pipe-bootstrap":
        return pipe_bootstrap_main(args[1:])
    try:
        options = parse_envoy_args(args, env)
    except HelpRequested:
        print(ENVOY_HELP + _flag_set().usage())
        return 0
    except FlagError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except ConfigError as exc:
        console.error(str(exc))
        return 1

    def warn(message: str) -> None:
        print(f"[WARN] {message}", file=sys.stderr, flush=True)

    async def generate() -> tuple[str, BootstrapArgs]:
        agent = AgentClient(options.http)
        try:
            return await prepare(options, agent, warn)
        finally:
            await agent.aclose()

    try:
        proxy_id, boot_args = asyncio.run(generate())
        bootstrap = format_bootstrap(
            render_bootstrap(boot_args, central_config=not options.no_central_config)
        )
    except ConfigError as exc:
        console.error(str(exc))
        return 1
    if options.bootstrap:
        print(bootstrap)  # Consul's UI.Output adds a newline after the template's own
        return 0

    binary = options.envoy_binary or shutil.which("envoy") or ""
    if not binary or not os.access(binary, os.X_OK):
        reason = (
            f'exec: "{options.envoy_binary}": not an executable file'
            if options.envoy_binary
            else 'exec: "envoy": executable file not found in $PATH'
        )
        if options.no_fallback:
            console.error(f"Couldn't find envoy binary: {reason}")
            return 1
        console.output(
            f"No Envoy binary found ({reason}); running connect-proxy's built-in proxy for "
            f"proxy ID {proxy_id} instead."
        )
        return run_with_signals(
            ProxyOptions(
                mode="agent",
                proxy_id=proxy_id,
                sidecar_for="",
                legacy=False,
                http=options.http,
                static=None,
                register=False,
                register_id="",
                listen="",
                service_addr="",
                log_level="INFO",
                log_json=False,
                drain_timeout=10.0,
            )
        )
    if sys.platform not in ("linux", "darwin"):
        console.error(
            "Directly running Envoy is only supported on linux and macOS since envoy itself "
            "doesn't build on other platforms currently."
        )
        console.error(
            "Use the -bootstrap option to generate the JSON to use when running envoy on a "
            "supported OS or via a container or VM."
        )
        return 1
    if not options.ignore_envoy_compatibility:
        problem = check_envoy_version(binary)
        if problem is not None:
            console.error(problem)
            return 1
    fifo = deliver_through_fifo(bootstrap)
    argv = envoy_argv(binary, fifo, options.passthrough)
    try:
        os.execve(binary, argv, dict(os.environ))
    except OSError as exc:
        console.error(f"Failed to exec envoy: {exc}")
        return 1
