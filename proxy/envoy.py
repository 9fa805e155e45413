"""`connect-proxy envoy`: Consul's `connect envoy`, with our own proxy as the fallback.

Owns: the Envoy bootstrap (a pure function of `BootstrapArgs`, shaped like the one Consul
prints, consul-envoy-exec-peering.md A.6-A.7), the agent look-ups that fill those arguments
(A.3, A.5), and the edges: finding Envoy, handing it the bootstrap, replacing this process
with it, or running connect-proxy itself when there is no Envoy binary.

How the bootstrap reaches Envoy: it holds the ACL token, so it never goes on argv and never
lies on disk. As Consul does today, Envoy gets `--config-path <fifo>`: a named pipe (mode
0600, in a fresh 0700 directory) that a small helper process (`connect-proxy envoy
pipe-bootstrap <fifo>`, fed through its stdin) writes once and then unlinks. A FIFO rather
than an inherited memory file (`/proc/self/fd/N`) because Envoy picks the config format from
the path's extension, and a `.json` name is what Envoy has accepted since 1.10.

Rule 1: `render_bootstrap` is pure; it runs on every OS (`-bootstrap` needs no Envoy).
Rule 2: the token appears only inside the bootstrap JSON; never in a log line or argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import console
from proxy.errors import AgentError, AgentResponseError, ConfigError

DEFAULT_ADMIN_BIND = "localhost:19000"
DEFAULT_XDS_PORT = 8502
HOT_RESTART_OPTIONS = (
    "--restart-epoch",
    "--hot-restart-version",
    "--drain-time-s",
    "--parent-shutdown-time-s",
)
# Envoy versions Consul's current `connect envoy` accepts (minor versions, end exclusive).
SUPPORTED_ENVOY = ((1, 25), (1, 30))

# Stats tag extractors Consul puts in every bootstrap (Envoy regexes over stat names).
DESTINATION_AND_UPSTREAM_TAGS: tuple[tuple[str, str], ...] = (
    (
        "consul.destination.custom_hash",
        "^cluster\\.(?:passthrough~)?((?:([^.]+)~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.service_subset",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:([^.]+)\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.service",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:[^.]+\\.)?([^.]+)\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.namespace",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.([^.]+)\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.partition",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:([^.]+)\\.)?[^.]+\\.internal[^.]*\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.datacenter",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?([^.]+)\\.internal[^.]*\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.peer",
        "^cluster\\.([^.]+\\.(?:[^.]+\\.)?([^.]+)\\.external\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.routing_type",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.([^.]+)\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.trust_domain",
        "^cluster\\.(?:passthrough~)?((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.([^.]+)\\.consul\\.)",
    ),
    (
        "consul.destination.target",
        "^cluster\\.(?:passthrough~)?(((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+)\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.destination.full_target",
        "^cluster\\.(?:passthrough~)?(((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+)\\.consul\\.)",
    ),
    (
        "consul.upstream.service",
        "^(?:tcp|http)\\.upstream(?:_peered)?\\.(([^.]+)(?:\\.[^.]+)?(?:\\.[^.]+)?\\.[^.]+\\.)",
    ),
    (
        "consul.upstream.datacenter",
        "^(?:tcp|http)\\.upstream\\.([^.]+(?:\\.[^.]+)?(?:\\.[^.]+)?\\.([^.]+)\\.)",
    ),
    ("consul.upstream.peer", "^(?:tcp|http)\\.upstream_peered\\.([^.]+(?:\\.[^.]+)?\\.([^.]+)\\.)"),
    (
        "consul.upstream.namespace",
        "^(?:tcp|http)\\.upstream(?:_peered)?\\.([^.]+(?:\\.([^.]+))?(?:\\.[^.]+)?\\.[^.]+\\.)",
    ),
    (
        "consul.upstream.partition",
        "^(?:tcp|http)\\.upstream\\.([^.]+(?:\\.[^.]+)?(?:\\.([^.]+))?\\.[^.]+\\.)",
    ),
)
# Pre-1.9 names, dropped with -omit-deprecated-tags.
DEPRECATED_TAGS: tuple[tuple[str, str], ...] = (
    (
        "consul.custom_hash",
        "^cluster\\.((?:([^.]+)~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.service_subset",
        "^cluster\\.((?:[^.]+~)?(?:([^.]+)\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.service",
        "^cluster\\.((?:[^.]+~)?(?:[^.]+\\.)?([^.]+)\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.namespace",
        "^cluster\\.((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.([^.]+)\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.datacenter",
        "^cluster\\.((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?([^.]+)\\.internal[^.]*\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.routing_type",
        "^cluster\\.((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.([^.]+)\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.trust_domain",
        "^cluster\\.((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.([^.]+)\\.consul\\.)",
    ),
    (
        "consul.target",
        "^cluster\\.(((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+)\\.[^.]+\\.[^.]+\\.consul\\.)",
    ),
    (
        "consul.full_target",
        "^cluster\\.(((?:[^.]+~)?(?:[^.]+\\.)?[^.]+\\.[^.]+\\.(?:[^.]+\\.)?[^.]+\\.[^.]+\\.[^.]+)\\.consul\\.)",
    ),
)


@dataclass(frozen=True, slots=True)
class BootstrapArgs:
    """Everything the bootstrap depends on."""

    proxy_id: str
    cluster: str  # the proxied service name (or the proxy ID when unknown)
    admin_address: str = "127.0.0.1"
    admin_port: int = 19000
    admin_access_log_path: str = "/dev/null"
    agent_address: str = "127.0.0.1"  # an IP: the local_agent cluster is STATIC
    agent_port: int = DEFAULT_XDS_PORT
    agent_socket: str = ""  # a Unix socket path instead of address:port
    agent_tls: bool = False
    agent_ca_pem: str = ""
    token: str = field(default="", repr=False)
    namespace: str = "default"
    partition: str = "default"
    datacenter: str = ""
    omit_deprecated_tags: bool = False
    proxy_config: Mapping[str, Any] = field(default_factory=dict)


def _json_fragment(raw: Any, key: str) -> list[Any]:
    """A `*_json` central-config value: one JSON object, or several separated by commas."""
    if not isinstance(raw, str):
        raise ConfigError(f"failed parsing Proxy.Config: {key} must be a string of JSON")
    try:
        value = json.loads(f"[{raw}]")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"failed parsing Proxy.Config: {key}: {exc}") from exc
    return list(value)


def _sink_address(url: str, key: str) -> dict[str, Any]:
    if url.startswith("$") and len(url) > 2:
        url = os.environ.get(url[1:], "")
    url = url.replace("${HOST_IP}", os.environ.get("HOST_IP", ""))
    if url.startswith("udp://"):
        host, _, port = url[len("udp://") :].rpartition(":")
        if not port.isdigit():
            raise ConfigError(f"failed parsing Proxy.Config: {key}: {url!r} has no port")
        return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
    if url.startswith("unix://") and key == "envoy_dogstatsd_url":
        return {"pipe": {"path": url[len("unix://") :]}}
    scheme = url.split("://", 1)[0] if "://" in url else url
    raise ConfigError(
        f"unsupported address protocol {scheme!r} for "
        f"{key.removeprefix('envoy_').removesuffix('_url')} sink"
    )


def _stats_tags(args: BootstrapArgs, user_tags: Sequence[Any]) -> list[dict[str, Any]]:
    tags: list[dict[str, Any]] = []
    user_names: set[str] = set()
    for raw in user_tags:
        text = str(raw)
        name, sep, value = text.partition("=")
        name = name.strip().lower()
        tags.append({"tag_name": name, "fixed_value": value if sep else "1"})
        user_names.add(name)
    regexes = DESTINATION_AND_UPSTREAM_TAGS + (() if args.omit_deprecated_tags else DEPRECATED_TAGS)
    tags += [{"regex": regex, "tag_name": name} for name, regex in regexes]
    for name, value in (
        ("local_cluster", args.cluster),
        ("consul.source.service", args.cluster),
        ("consul.source.namespace", args.namespace),
        ("consul.source.partition", args.partition),
        ("consul.source.datacenter", args.datacenter),
    ):
        if value and name not in user_names:
            tags.append({"tag_name": name, "fixed_value": value})
    return tags


def render_bootstrap(args: BootstrapArgs, *, central_config: bool = True) -> dict[str, Any]:
    """The Envoy bootstrap Consul's `connect envoy` renders for these arguments.

    Raises:
        ConfigError: a bootstrap key of `Proxy.Config` that cannot be used.
    """
    cfg = args.proxy_config if central_config else {}
    if args.agent_socket:
        agent_address: dict[str, Any] = {"pipe": {"path": args.agent_socket}}
    else:
        agent_address = {
            "socket_address": {"address": args.agent_address, "port_value": args.agent_port}
        }
    local_agent: dict[str, Any] = {
        "name": "local_agent",
        "ignore_health_on_host_removal": False,
        "connect_timeout": "1s",
        "type": "STATIC",
    }
    if args.agent_tls:
        local_agent["transport_socket"] = {
            "name": "tls",
            "typed_config": {
                "@type": (
                    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                    "UpstreamTlsContext"
                ),
                "common_tls_context": {
                    "validation_context": {"trusted_ca": {"inline_string": args.agent_ca_pem}}
                },
            },
        }
    local_agent["http2_protocol_options"] = {}
    local_agent["loadAssignment"] = {
        "clusterName": "local_agent",
        "endpoints": [{"lbEndpoints": [{"endpoint": {"address": agent_address}}]}],
    }
    clusters: list[Any] = [local_agent]
    if "envoy_extra_static_clusters_json" in cfg:
        clusters += _json_fragment(
            cfg["envoy_extra_static_clusters_json"], "envoy_extra_static_clusters_json"
        )
    static: dict[str, Any] = {"clusters": clusters}
    if "envoy_extra_static_listeners_json" in cfg:
        static["listeners"] = _json_fragment(
            cfg["envoy_extra_static_listeners_json"], "envoy_extra_static_listeners_json"
        )

    boot: dict[str, Any] = {
        "admin": {
            "access_log_path": args.admin_access_log_path,
            "address": {
                "socket_address": {"address": args.admin_address, "port_value": args.admin_port}
            },
        },
        "node": {
            "cluster": args.cluster,
            "id": args.proxy_id,
            "metadata": {
                "namespace": args.namespace or "default",
                "partition": args.partition or "default",
            },
        },
        "layered_runtime": {
            "layers": [
                {"name": "base", "static_layer": {"re2.max_program_size.error_level": 1048576}}
            ]
        },
        "static_resources": static,
    }
    sinks: list[Any] = []
    for key, name, kind in (
        ("envoy_statsd_url", "envoy.stat_sinks.statsd", "StatsdSink"),
        ("envoy_dogstatsd_url", "envoy.stat_sinks.dog_statsd", "DogStatsdSink"),
    ):
        if cfg.get(key):
            sinks.append(
                {
                    "name": name,
                    "typedConfig": {
                        "@type": f"type.googleapis.com/envoy.config.metrics.v3.{kind}",
                        "address": _sink_address(str(cfg[key]), key),
                    },
                }
            )
    if "envoy_extra_stats_sinks_json" in cfg:
        sinks += _json_fragment(cfg["envoy_extra_stats_sinks_json"], "envoy_extra_stats_sinks_json")
    if sinks:
        boot["stats_sinks"] = sinks
    if "envoy_stats_config_json" in cfg:
        (boot["stats_config"],) = _json_fragment(
            cfg["envoy_stats_config_json"], "envoy_stats_config_json"
        )
    else:
        user_tags = cfg.get("envoy_stats_tags") or []
        if not isinstance(user_tags, list):
            raise ConfigError("failed parsing Proxy.Config: envoy_stats_tags must be a list")
        boot["stats_config"] = {
            "stats_tags": _stats_tags(args, user_tags),
            "use_all_default_tags": True,
        }
    if cfg.get("envoy_stats_flush_interval"):
        boot["stats_flush_interval"] = str(cfg["envoy_stats_flush_interval"])
    if "envoy_tracing_json" in cfg:
        (boot["tracing"],) = _json_fragment(cfg["envoy_tracing_json"], "envoy_tracing_json")
    ads = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    boot["dynamic_resources"] = {
        "lds_config": dict(ads),
        "cds_config": dict(ads),
        "ads_config": {
            "api_type": "DELTA_GRPC",
            "transport_api_version": "V3",
            "grpc_services": {
                "initial_metadata": [{"key": "x-consul-token", "value": args.token}],
                "envoy_grpc": {"cluster_name": "local_agent"},
            },
        },
    }
    return boot


def format_bootstrap(boot: Mapping[str, Any]) -> str:
    """As Consul prints it: 2-space indentation, then a blank line."""
    return json.dumps(boot, indent=2, ensure_ascii=False) + "\n"


# -- the command ------------------------------------------------------------------------

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
    http: Any  # proxy.config.HTTPOptions


def _flag_set() -> Any:
    from proxy.cli import add_http_flags
    from proxy.goflags import FlagSet

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
    from proxy.config import load_http_options

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


async def _xds_address(agent: Any, options: EnvoyOptions, warn: Any) -> str:
    if options.grpc_addr:
        return options.grpc_addr
    try:
        me = (await agent.self()).body or {}
    except AgentError as exc:
        if "Permission denied" not in str(exc):
            warn(f"unable to look up the agent's gRPC port: {exc}")
        me = {}
    ports = (me.get("xDS") or {}).get("Ports") or {}
    if isinstance(ports.get("TLS"), int) and ports["TLS"] > 0:
        return f"https://localhost:{ports['TLS']}"
    if isinstance(ports.get("Plaintext"), int) and ports["Plaintext"] > 0:
        return f"http://localhost:{ports['Plaintext']}"
    grpc = (me.get("DebugConfig") or {}).get("GRPCPort")
    if isinstance(grpc, int):
        if grpc < 0:
            raise ConfigError("agent has grpc disabled")
        if grpc > 0:
            return f"http://localhost:{grpc}"
    warn(
        "-grpc-addr not provided and unable to discover a gRPC address for xDS. "
        f"Defaulting to localhost:{DEFAULT_XDS_PORT}"
    )
    return f"localhost:{DEFAULT_XDS_PORT}"


async def prepare(options: EnvoyOptions, agent: Any, warn: Any) -> tuple[str, BootstrapArgs]:
    """Resolve the proxy ID and everything the bootstrap needs from the agent (A.3, A.5).

    Returns:
        (proxy ID, bootstrap arguments)

    Raises:
        ConfigError: with Consul's messages.
    """
    from proxy.addr import split_host_port
    from proxy.sources import lookup_proxy_id_for_sidecar

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
        svc = (await agent.agent_service(proxy_id)).body or {}
    except AgentError as exc:
        raise ConfigError(f"failed fetch proxy config from local agent: {exc}") from exc
    proxy = svc.get("Proxy")
    if not isinstance(proxy, Mapping):
        raise ConfigError("service is not a Connect proxy or gateway")
    cluster = proxy.get("DestinationServiceName") or svc.get("Service") or proxy_id
    config = proxy.get("Config") or {}
    return proxy_id, BootstrapArgs(
        proxy_id=proxy_id,
        cluster=cluster,
        admin_address=admin_ip,
        admin_port=admin_port,
        admin_access_log_path=options.admin_access_log_path,
        agent_address=host,
        agent_port=port,
        agent_socket=socket_path,
        agent_tls=tls,
        agent_ca_pem=ca_pem,
        token=options.http.token,
        namespace=svc.get("Namespace") or "default",
        partition=svc.get("Partition") or "default",
        datacenter=svc.get("Datacenter") or options.http.datacenter,
        omit_deprecated_tags=options.omit_deprecated_tags,
        proxy_config=config if isinstance(config, Mapping) else {},
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
    from proxy.agent import AgentClient
    from proxy.cli import ProxyOptions, run_with_signals
    from proxy.goflags import FlagError, HelpRequested

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
