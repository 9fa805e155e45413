"""Proxy configuration: frozen values, parsed and validated once.

Owns the mapping from what the agent says (`/v1/agent/service/:id`; Consul's
`connect/proxy/config.go`) to `ProxyConfig`, with Consul's defaults.

Rule 1: pure. `load_*` returns a valid object or raises ConfigError naming the field.
Rule 2: durations are float seconds. `*_timeout_ms` values are honoured whether JSON gives an
int, a float or a numeric string (Go honours only ints for `connect_timeout_ms`, 4.3).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# The engines are the listeners' (listeners.tls.engine imports nothing of the project); the
# configuration names them, and re-exports the names (`X as X`: explicit for mypy --strict).
from listeners.tls.engine import DEFAULT_TLS_ENGINE as DEFAULT_TLS_ENGINE  # noqa: PLC0414
from listeners.tls.engine import TLS_ENGINES as TLS_ENGINES  # noqa: PLC0414
from proxy.addr import join_host_port, split_host_port
from proxy.errors import ConfigError
from proxy.goflags import parse_go_int


def timeout_ms(value: Any, name: str, default_ms: float) -> float:
    """A `*_timeout_ms` value as seconds.

    Raises:
        ConfigError: not a positive number (or numeric string).
    """
    if value is None:
        return default_ms / 1000
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number of milliseconds, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number of milliseconds, got {value!r}") from None
    if not isinstance(value, int | float) or math.isnan(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of milliseconds, got {value!r}")
    return float(value) / 1000


def max_inbound_connections(value: Any) -> int | None:
    """`max_inbound_connections` of a proxy's Config: None when absent.

    Raises:
        ConfigError: not a positive whole number (JSON number or numeric string).
    """
    if value is None:
        return None
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"max_inbound_connections must be a positive whole number, got {value!r}")
    return number


def switch(value: Any, name: str) -> bool | None:
    """A true/false key of a proxy's Config (`reauthorize`, `authorize_cache`): None when absent.

    Raises:
        ConfigError: not a boolean (JSON true/false, or the strings "true"/"false").
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def reauthorize(value: Any) -> bool | None:
    """`reauthorize` of a proxy's Config: None when absent (see `switch`)."""
    return switch(value, "reauthorize")


def authorize_cache(value: Any) -> bool | None:
    """`authorize_cache` of a proxy's Config: None when absent (see `switch`)."""
    return switch(value, "authorize_cache")


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicListenerConfig:
    """The inbound mTLS listener (`ProxyConfig.public_listener` None: none; port 0: any free)."""

    bind_address: str = "0.0.0.0"
    bind_port: int = 0
    local_service_host: str = "127.0.0.1"  # the app, parsed once at load
    local_service_port: int = 0
    local_connect_timeout: float = 1.0
    handshake_timeout: float = 10.0
    # `max_inbound_connections` of Proxy.Config (Consul passes it to Envoy); None: not set,
    # the -max-inbound-connections flag or the descriptor-derived default applies.
    max_inbound_connections: int | None = None
    # `reauthorize` of Proxy.Config (not in Consul): re-check open connections when
    # intentions or roots change; None: not set, the -reauthorize flag applies.
    reauthorize: bool | None = None
    # `authorize_cache` of Proxy.Config (not in Consul): reuse the agent's decision per client
    # identity until intentions or roots change; None: not set, -authorize-cache applies.
    authorize_cache: bool | None = None

    @property
    def local_service_address(self) -> str:
        """The app's `host:port`."""
        return join_host_port(self.local_service_host, self.local_service_port)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One upstream: a local plain listener forwarding to a Connect service or query."""

    destination_name: str
    local_bind_port: int
    destination_type: str = "service"
    destination_namespace: str = "default"
    destination_partition: str = "default"
    datacenter: str = ""
    local_bind_address: str = "127.0.0.1"
    connect_timeout: float = 10.0
    config: Mapping[str, Any] = field(default_factory=dict, compare=True, hash=False)
    # `DestinationPeer`: the local name of the peer that exports the service ("" : local).
    destination_peer: str = ""

    @property
    def label(self) -> str:
        """`<addr>:<port>-><type>:<partition>/<ns>/<name>`, as Consul's proxy logs it, with
        `@<peer>` after the name for a peered upstream."""
        peer = f"@{self.destination_peer}" if self.destination_peer else ""
        return (
            f"{join_host_port(self.local_bind_address, self.local_bind_port)}->"
            f"{self.destination_type}:{self.destination_partition}/"
            f"{self.destination_namespace}/{self.destination_name}{peer}"
        )


# Consul's peer names (`agent/rpc/peering/validate.go`).
_PEER_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")


def destination_peer(value: Any, where: str, *, dtype: str, datacenter: str) -> str:
    """An upstream's `DestinationPeer`: "" when absent.

    Raises:
        ConfigError: not a valid peer name, or given with a prepared query or a datacenter.
    """
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not _PEER_NAME.match(value):
        raise ConfigError(
            f"{where}: destination_peer {value!r} is not a valid peer name: lower case "
            "alphanumeric characters or '-', starting and ending with an alphanumeric character"
        )
    if dtype == "prepared_query":
        raise ConfigError(f"{where}: destination_peer cannot be used with a prepared query")
    if datacenter:
        raise ConfigError(f"{where}: destination_peer and datacenter cannot both be set")
    return value


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything one proxy instance serves."""

    service: str  # the proxied (destination) service name: the identity of the leaf
    public_listener: PublicListenerConfig | None = None
    upstreams: tuple[UpstreamConfig, ...] = ()
    # `Proxy.Config.telemetry` as given (read by `proxy.telemetry`). As in Consul, only the
    # first config's telemetry is used: a change needs a restart.
    telemetry: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def load_upstream(raw: Mapping[str, Any], where: str = "upstream") -> UpstreamConfig:
    """An `api.Upstream` object (CamelCase, as the agent renders it) with Consul's defaults.

    Raises:
        ConfigError: missing name or port, socket paths (unsupported, as in Consul's proxy).
    """
    name = raw.get("DestinationName") or ""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: DestinationName must be set")
    where = f"upstream {name}"
    if raw.get("LocalBindSocketPath"):
        raise ConfigError(
            f"{where}: local_bind_socket_path is not supported with this proxy implementation"
        )
    port = raw.get("LocalBindPort")
    if isinstance(port, float) and port.is_integer():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"{where}: upstream has no local_bind_port")
    dtype = raw.get("DestinationType") or "service"
    # Consul's proxy treats any type other than prepared_query as a service (4.2).
    dtype = "prepared_query" if dtype == "prepared_query" else "service"
    config = raw.get("Config") or {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: Config must be an object")
    datacenter = raw.get("Datacenter") or ""
    peer = destination_peer(raw.get("DestinationPeer"), where, dtype=dtype, datacenter=datacenter)
    return UpstreamConfig(
        destination_name=name,
        local_bind_port=port,
        destination_type=dtype,
        destination_namespace=raw.get("DestinationNamespace") or "default",
        destination_partition=raw.get("DestinationPartition") or "default",
        datacenter=datacenter,
        local_bind_address=raw.get("LocalBindAddress") or "127.0.0.1",
        connect_timeout=timeout_ms(
            config.get("connect_timeout_ms"), f"{where}: connect_timeout_ms", 10000
        ),
        config=dict(config),
        destination_peer=peer,
    )


def load_agent_service(service: Mapping[str, Any]) -> ProxyConfig:
    """A `connect-proxy` service from `/v1/agent/service/:id` as a ProxyConfig.

    Raises:
        ConfigError: not a connect-proxy, or a field that cannot be used.
    """
    if service.get("Kind") != "connect-proxy":
        raise ConfigError(
            f"service {service.get('ID')!r} is not a valid connect proxy "
            f"(Kind is {service.get('Kind') or 'typical'!r}, want 'connect-proxy')"
        )
    proxy = service.get("Proxy") or {}
    name = proxy.get("DestinationServiceName") or ""
    if not name:
        raise ConfigError("Proxy.DestinationServiceName must be set")
    config = proxy.get("Config") or {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"Proxy.Config must be an object, got {config!r}")
    public: PublicListenerConfig | None = None
    port = service.get("Port") or 0
    if port:
        local_host = proxy.get("LocalServiceAddress") or "127.0.0.1"
        local_port = proxy.get("LocalServicePort") or 0
        public = PublicListenerConfig(
            bind_address=service.get("Address") or "0.0.0.0",
            bind_port=int(port),
            local_service_host=local_host,
            local_service_port=int(local_port),
            local_connect_timeout=timeout_ms(
                config.get("local_connect_timeout_ms"), "local_connect_timeout_ms", 1000
            ),
            handshake_timeout=timeout_ms(
                config.get("handshake_timeout_ms"), "handshake_timeout_ms", 10000
            ),
            max_inbound_connections=max_inbound_connections(config.get("max_inbound_connections")),
            reauthorize=reauthorize(config.get("reauthorize")),
            authorize_cache=authorize_cache(config.get("authorize_cache")),
        )
    upstreams = tuple(load_upstream(u) for u in proxy.get("Upstreams") or [])
    return ProxyConfig(
        service=name,
        public_listener=public,
        upstreams=upstreams,
        telemetry=_telemetry(config),
    )


def _telemetry(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `telemetry` map of a proxy's `Config` (empty when absent).

    Raises:
        ConfigError: it is there but not an object.
    """
    raw = config.get("telemetry")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"Config.telemetry must be an object, got {raw!r}")
    return dict(raw)


def upstream_key(upstream: UpstreamConfig) -> tuple[str, int]:
    """Upstreams are told apart by where they listen, as Consul validates them."""
    return (upstream.local_bind_address, upstream.local_bind_port)


def plan_upstreams(
    running: Mapping[tuple[str, int], UpstreamConfig], wanted: tuple[UpstreamConfig, ...]
) -> tuple[list[tuple[str, int]], list[UpstreamConfig]]:
    """Which upstream listeners to stop and which to start to go from `running` to `wanted`.

    An upstream whose settings changed is stopped and started again (rebound); an unchanged
    one is left alone, with its connections. Consul's Go proxy does not diff: it only ever
    adds listeners (`connect/proxy/proxy.go`).

    Returns:
        (keys to stop, configs to start)
    """
    wanted_by_key = {upstream_key(u): u for u in wanted}
    stop = [key for key, cfg in running.items() if wanted_by_key.get(key) != cfg]
    start = [cfg for key, cfg in wanted_by_key.items() if running.get(key) != cfg]
    return stop, start


# -- command line and environment ---------------------------------------------------------


def parse_upstream_flag(value: str) -> UpstreamConfig:
    """One `-upstream` value: `name:port`, `name:host:port`, `name.query:port`, ...

    Ours (not Consul's): `name@peer:port` (or `name@peer:host:port`) is a service imported
    from the peer named `peer` (`destination_peer`).

    Raises:
        ValueError: with Consul's message for that input (ours for a bad peer).
    """
    name, sep, rest = value.partition(":")
    if not sep:
        raise ValueError(f'Upstream value should be name:addr in "{value}"')
    host = ""
    if ":" in rest:
        host, _, rest = rest.partition(":")
    name, at, peer = name.partition("@")
    if at and not peer:
        raise ValueError(f'Upstream peer name is empty in "{value}" (want name@peer:port)')
    dtype = "service"
    if "." in name:
        name, _, kind = name.partition(".")
        if kind in ("", "service"):
            dtype = "service"
        elif kind == "query":
            dtype = "prepared_query"
        else:
            raise ValueError(f"Upstream type must be blank, 'service', or 'query'. Got: \"{kind}\"")
    port = parse_go_int(rest)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range 1-65535")
    try:
        peer = destination_peer(peer, f"upstream {name}", dtype=dtype, datacenter="")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return UpstreamConfig(
        destination_name=name,
        local_bind_port=port,
        destination_type=dtype,
        local_bind_address=host or "127.0.0.1",
        destination_peer=peer,
    )


def flags_config(
    service: str, listen: str, service_addr: str, upstreams: Mapping[str, UpstreamConfig]
) -> ProxyConfig:
    """The ProxyConfig of flags mode (`-service`, `-listen`, `-service-addr`, `-upstream`).

    Upstreams are keyed by name (a repeated name overrides, as in Consul) and sorted.

    Raises:
        ConfigError: with Consul's messages.
    """
    public = None
    if listen:
        host, port = split_host_port(listen, "-listen")
        if not service_addr:
            raise ConfigError(
                "-service-addr must be specified with -listen so the proxy knows the "
                "backend service address."
            )
        app_host, app_port = split_host_port(service_addr, "-service-addr")
        public = PublicListenerConfig(
            bind_address=host or "0.0.0.0",
            bind_port=port,
            local_service_host=app_host,
            local_service_port=app_port,
        )
    return ProxyConfig(
        service=service,
        public_listener=public,
        upstreams=tuple(upstreams[name] for name in sorted(upstreams)),
    )


def load_managed_proxy(body: Mapping[str, Any]) -> ProxyConfig:
    """The legacy `/v1/agent/connect/proxy/:id` answer (Consul 1.2-1.5) as a ProxyConfig.

    Raises:
        ConfigError: a field that cannot be used.
    """
    name = body.get("TargetServiceName") or ""
    if not name:
        raise ConfigError("managed proxy config has no TargetServiceName")
    config = body.get("Config") or {}
    if not isinstance(config, Mapping):
        raise ConfigError("managed proxy Config must be an object")
    public = None
    port = config.get("bind_port") or 0
    if isinstance(port, float) and port.is_integer():
        port = int(port)
    if port:
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"bind_port must be a port number, got {port!r}")
        local = config.get("local_service_address") or ""
        if not isinstance(local, str) or not local:
            raise ConfigError("local_service_address must be set")
        app_host, app_port = split_host_port(local, "local_service_address")
        public = PublicListenerConfig(
            bind_address=str(config.get("bind_address") or "0.0.0.0"),
            bind_port=port,
            local_service_host=app_host,
            local_service_port=app_port,
            local_connect_timeout=timeout_ms(
                config.get("local_connect_timeout_ms"), "local_connect_timeout_ms", 1000
            ),
            handshake_timeout=timeout_ms(
                config.get("handshake_timeout_ms"), "handshake_timeout_ms", 10000
            ),
            max_inbound_connections=max_inbound_connections(config.get("max_inbound_connections")),
            reauthorize=reauthorize(config.get("reauthorize")),
            authorize_cache=authorize_cache(config.get("authorize_cache")),
        )
    raw_upstreams = body.get("Upstreams")
    if raw_upstreams is None:
        # Consul 1.2 kept upstreams in Config with snake_case keys.
        raw_upstreams = [
            {
                "DestinationName": u.get("destination_name"),
                "DestinationType": u.get("destination_type"),
                "DestinationNamespace": u.get("destination_namespace"),
                "Datacenter": u.get("destination_datacenter"),
                "LocalBindAddress": u.get("local_bind_address"),
                "LocalBindPort": u.get("local_bind_port"),
                "Config": {"connect_timeout_ms": u.get("connect_timeout_ms")}
                if u.get("connect_timeout_ms") is not None
                else {},
            }
            for u in config.get("upstreams") or []
            if isinstance(u, Mapping)
        ]
    upstreams = tuple(load_upstream(u) for u in raw_upstreams or [])
    return ProxyConfig(
        service=name,
        public_listener=public,
        upstreams=upstreams,
        telemetry=_telemetry(config),
    )


# Names one of TLS_ENGINES: ssl, CPython's ssl module on the OpenSSL the interpreter links
# (the system's); openssl, pyOpenSSL on the OpenSSL bundled by the cryptography wheel.
TLS_ENGINE_VAR = "CONNECT_PROXY_TLS_ENGINE"


def load_tls_engine(env: Mapping[str, str]) -> str:
    """The TLS engine named by CONNECT_PROXY_TLS_ENGINE (`DEFAULT_TLS_ENGINE` if unset).

    Raises:
        ConfigError: a value that names no engine.
    """
    value = env.get(TLS_ENGINE_VAR, "")
    if value == "":
        return DEFAULT_TLS_ENGINE
    if value not in TLS_ENGINES:
        raise ConfigError(
            f"{TLS_ENGINE_VAR}={value!r} is not a TLS engine: use ssl (CPython's ssl module) "
            "or openssl (pyOpenSSL on the OpenSSL bundled by cryptography)"
        )
    return value
