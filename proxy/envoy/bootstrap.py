"""The Envoy bootstrap of `connect-proxy envoy`: a pure function of `BootstrapArgs`.

Shaped like the bootstrap Consul's `connect envoy` prints (Consul's
`command/connect/envoy/bootstrap_tpl.go` and `bootstrap_config.go`): admin listener, the
`local_agent` xDS cluster (TCP or Unix socket, TLS with the agent's CA), the ACL token as
xDS metadata, stats tags, and the bootstrap keys of the proxy's central config
(`envoy_*_json`, stats sinks, tracing).

Rule 1: no I/O but reading the environment for `$VAR` and `${HOST_IP}` in stats sink URLs,
as Consul does; it runs on every OS (`-bootstrap` needs no Envoy) and touches no agent.
Rule 2: the token appears only inside the bootstrap JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import ConfigError

DEFAULT_XDS_PORT = 8502
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
