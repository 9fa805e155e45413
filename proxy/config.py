"""Proxy configuration: frozen values, parsed and validated once.

Owns the mapping from what the agent says (`/v1/agent/service/:id`, consul-spec.md 4.2-4.3)
to `ProxyConfig`, with Consul's defaults.

Rule 1: pure. `load_*` returns a valid object or raises ConfigError naming the field.
Rule 2: durations are float seconds. `*_timeout_ms` values are honoured whether JSON gives an
int, a float or a numeric string (Go honours only ints for `connect_timeout_ms`, 4.3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import ConfigError


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


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(addr: str, name: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`; the host may be empty.

    Raises:
        ConfigError: no port, or a port that is not 0-65535.
    """
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise ConfigError(f"{name}: missing port in address {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{name}: too many colons in address {addr!r}")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{name}: invalid port in address {addr!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{name}: port out of range in address {addr!r}")
    return host, number


@dataclass(frozen=True, slots=True)
class PublicListenerConfig:
    """The inbound mTLS listener (`ProxyConfig.public_listener` None: none; port 0: any free)."""

    bind_address: str = "0.0.0.0"
    bind_port: int = 0
    local_service_address: str = ""  # host:port of the app
    local_connect_timeout: float = 1.0
    handshake_timeout: float = 10.0


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

    @property
    def identity(self) -> str:
        """`<addr>:<port>-><type>:<partition>/<ns>/<name>`, as Consul's proxy logs it."""
        return (
            f"{join_host_port(self.local_bind_address, self.local_bind_port)}->"
            f"{self.destination_type}:{self.destination_partition}/"
            f"{self.destination_namespace}/{self.destination_name}"
        )


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything one proxy instance serves."""

    service: str  # the proxied (destination) service name: the identity of the leaf
    public_listener: PublicListenerConfig | None = None
    upstreams: tuple[UpstreamConfig, ...] = ()


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
    return UpstreamConfig(
        destination_name=name,
        local_bind_port=port,
        destination_type=dtype,
        destination_namespace=raw.get("DestinationNamespace") or "default",
        destination_partition=raw.get("DestinationPartition") or "default",
        datacenter=raw.get("Datacenter") or "",
        local_bind_address=raw.get("LocalBindAddress") or "127.0.0.1",
        connect_timeout=timeout_ms(
            config.get("connect_timeout_ms"), f"{where}: connect_timeout_ms", 10000
        ),
        config=dict(config),
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
    public: PublicListenerConfig | None = None
    port = service.get("Port") or 0
    if port:
        local_host = proxy.get("LocalServiceAddress") or "127.0.0.1"
        local_port = proxy.get("LocalServicePort") or 0
        public = PublicListenerConfig(
            bind_address=service.get("Address") or "0.0.0.0",
            bind_port=int(port),
            local_service_address=join_host_port(local_host, int(local_port)),
            local_connect_timeout=timeout_ms(
                config.get("local_connect_timeout_ms"), "local_connect_timeout_ms", 1000
            ),
            handshake_timeout=timeout_ms(
                config.get("handshake_timeout_ms"), "handshake_timeout_ms", 10000
            ),
        )
    upstreams = tuple(load_upstream(u) for u in proxy.get("Upstreams") or [])
    return ProxyConfig(service=name, public_listener=public, upstreams=upstreams)


def upstream_key(upstream: UpstreamConfig) -> tuple[str, int]:
    """Upstreams are told apart by where they listen, as Consul validates them."""
    return (upstream.local_bind_address, upstream.local_bind_port)


def plan_upstreams(
    running: Mapping[tuple[str, int], UpstreamConfig], wanted: tuple[UpstreamConfig, ...]
) -> tuple[list[tuple[str, int]], list[UpstreamConfig]]:
    """Which upstream listeners to stop and which to start to go from `running` to `wanted`.

    An upstream whose settings changed is stopped and started again (rebound); an unchanged
    one is left alone, with its connections. Consul's Go proxy does not diff: it only ever
    adds listeners (consul-spec.md 5.1).

    Returns:
        (keys to stop, configs to start)
    """
    wanted_by_key = {upstream_key(u): u for u in wanted}
    stop = [key for key, cfg in running.items() if wanted_by_key.get(key) != cfg]
    start = [cfg for key, cfg in wanted_by_key.items() if running.get(key) != cfg]
    return stop, start
