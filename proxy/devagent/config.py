"""The dev agent's configuration, and loading of Consul agent config files (JSON or HCL).

Owns: the `AgentConfig` value and the mapping from Consul's config-file keys onto it. Reads
the keys a Connect dev setup uses (`service`, `services`, `config_entries.bootstrap`,
`datacenter`, `node_name`, `ports` (with `grpc_tls`, the peering port), `addresses`,
`client_addr`, `acl`, `connect.ca_config`, `peering.enabled`,
`default_intention_policy`, `session_ttl_min`, `disable_remote_exec`); other Consul keys
are reported as ignored, and an unknown key inside a service definition is an error naming
it, as Consul's own loader does.

Rule 1: pure apart from reading the named files. Returns a valid object or raises ConfigError.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxy.devagent import decode, schemas
from proxy.devagent.ca import DEFAULT_LEAF_TTL
from proxy.errors import ConfigError

_IGNORED_TOP = {
    "data_dir",
    "server",
    "bootstrap",
    "bootstrap_expect",
    "log_level",
    "log_json",
    "ui",
    "ui_config",
    "bind_addr",
    "advertise_addr",
    "retry_join",
    "enable_script_checks",
    "enable_local_script_checks",
    "encrypt",
    "telemetry",
    "performance",
    "limits",
    "dns_config",
    "recursors",
    "domain",
    "primary_datacenter",
    "disable_update_check",
    "enable_debug",
    "leave_on_terminate",
    "log_file",
    "pid_file",
    "raft_protocol",
    "tls",
    "verify_incoming",
    "verify_outgoing",
    "auto_encrypt",
    "auto_config",
    "license_path",
    "node_meta",
}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything a `DevAgent` is started with. Durations are float seconds."""

    datacenter: str = "dc1"
    node_name: str = field(default_factory=lambda: socket.gethostname() or "dev-agent")
    node_id: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8500
    grpc_port: int = 8502
    # Consul's `ports.grpc_tls`: the peering port (-1: none, so no tokens and no
    # establishing; 0: any free port). The dev agent speaks its own channel there.
    grpc_tls_port: int = -1
    # Consul's `peering { enabled = true }` (its default).
    peering_enabled: bool = True
    # Seconds between peering-stream heartbeats (Consul: 15 s); a dev-agent option.
    peering_heartbeat: float = 15.0
    acl_enabled: bool = False
    acl_default_policy: str = "allow"
    acl_initial_management: str = ""
    acl_default_token: str = ""
    acl_agent_token: str = ""
    default_intention_policy: str | None = None
    cluster_id: str | None = None
    leaf_cert_ttl: float = DEFAULT_LEAF_TTL
    private_key_type: str = "ec"
    private_key_bits: int = 256
    private_key_pem: str | None = None
    use_intermediate: bool = False
    sidecar_min_port: int = 21000
    sidecar_max_port: int = 21255
    sidecar_check_interval: float = 10.0
    # Consul's `session_ttl_min`: the shortest session TTL the agent accepts (tests lower it
    # so a session expires in a fraction of a second).
    session_ttl_min: float = 10.0
    # Act like Consul 1.2, which had no /v1/agent/service/:id (proxies then read the
    # managed-proxy endpoint). A dev-agent option for testing that fallback.
    emulate_consul_1_2: bool = False
    # Consul's `disable_remote_exec`: true (its default) makes the agent ignore `_rexec`
    # events; only `false` lets `exec` run commands here (see `devagent/remote_exec.py`).
    disable_remote_exec: bool = True
    services: tuple[Mapping[str, Any], ...] = ()
    config_entries: tuple[Mapping[str, Any], ...] = ()
    ignored_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.acl_default_policy not in ("allow", "deny"):
            raise ConfigError(
                f'acl.default_policy must be "allow" or "deny", got "{self.acl_default_policy}"'
            )
        if self.default_intention_policy not in (None, "allow", "deny"):
            raise ConfigError(
                'default_intention_policy must be "allow" or "deny", '
                f'got "{self.default_intention_policy}"'
            )
        if not 0 < self.sidecar_min_port <= self.sidecar_max_port < 65536:
            raise ConfigError(
                "ports.sidecar_min_port and ports.sidecar_max_port must give a range within "
                f"1-65535, got {self.sidecar_min_port}-{self.sidecar_max_port}"
            )
        if self.leaf_cert_ttl <= 0:
            raise ConfigError("connect.ca_config.leaf_cert_ttl must be a positive duration")
        if self.sidecar_check_interval <= 0:
            raise ConfigError("sidecar check interval must be a positive duration")
        if not -1 <= self.grpc_tls_port < 65536:
            raise ConfigError(f"ports.grpc_tls must be -1 or a port, got {self.grpc_tls_port}")
        if self.peering_heartbeat <= 0:
            raise ConfigError("the peering heartbeat must be a positive duration")
        if self.session_ttl_min < 0:
            raise ConfigError("session_ttl_min must not be negative")


def parse_file(path: str | Path) -> dict[str, Any]:
    """Read one config file: JSON when it ends in .json, HCL when in .hcl, else by content.

    Raises:
        ConfigError: unreadable or unparsable, naming the file.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"Error reading config file {p}: {exc.strerror or exc}") from exc
    as_json = p.suffix == ".json" or (p.suffix != ".hcl" and text.lstrip().startswith("{"))
    try:
        data = json.loads(text) if as_json else decode.load_hcl(text)
    except (json.JSONDecodeError, ValueError) as exc:
        kind = "JSON" if as_json else "HCL"
        raise ConfigError(f"Error parsing {p} as {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Error parsing {p}: the top level must be an object")
    return data


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _sub(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}{key} must be an object")
    return value


def _typed(value: Any, kind: type, name: str) -> Any:
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}")
    return value


def _duration(value: Any, name: str) -> float:
    try:
        return decode.duration_seconds(value, name)
    except decode.DecodeError as exc:
        raise ConfigError(str(exc)) from exc


def apply_file(config: AgentConfig, data: Mapping[str, Any], source: str) -> AgentConfig:
    """Merge one parsed config file onto `config` (later files win, services accumulate).

    Raises:
        ConfigError: a key or value the agent cannot use; the message starts with `source`.
    """
    try:
        return _apply(config, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _decode_object(raw: Any, schema: decode.Schema, where: str) -> tuple[dict[str, Any], list[str]]:
    """One object of a config file, decoded, and the keys `schema` does not know."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object")
    unknown: list[str] = []
    try:
        return decode.decode(raw, schema, unknown=unknown, _path=where), unknown
    except decode.DecodeError as exc:
        raise ConfigError(str(exc)) from exc


def _services(key: str, value: Any) -> list[Mapping[str, Any]]:
    # `service` (one, or a list of them) and `services` (a list): each a full definition,
    # where an unknown key is an error, as in Consul's loader.
    out: list[Mapping[str, Any]] = []
    for n, raw in enumerate(_as_list(value)):
        where = f"{key}[{n}]" if key == "services" or isinstance(value, list) else key
        svc, unknown = _decode_object(raw, schemas.SERVICE, where)
        if unknown:
            raise ConfigError(f"invalid config key {unknown[0]}")
        out.append(svc)
    return out


def _bootstrap_entries(block: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    # `config_entries { bootstrap = [...] }`: service-intentions entries are decoded (an
    # unknown key is an error); other kinds are kept as written, with Kind and Name folded.
    out: list[Mapping[str, Any]] = []
    for n, raw in enumerate(_as_list(block.get("bootstrap"))):
        entry, unknown = _decode_object(raw, schemas.CONFIG_ENTRY, f"config_entries.bootstrap[{n}]")
        if entry.get("Kind") == "service-intentions" and unknown:
            raise ConfigError(f"invalid config key {unknown[0]}")
        if entry.get("Kind") == "exported-services":
            entry, unknown = _decode_object(
                raw, schemas.EXPORTED_SERVICES, f"config_entries.bootstrap[{n}]"
            )
            if unknown:
                raise ConfigError(f"invalid config key {unknown[0]}")
        elif entry.get("Kind") != "service-intentions":
            entry = {**raw, "Kind": entry.get("Kind"), "Name": entry.get("Name")}
        out.append(entry)
    return out


def _str(value: Any, name: str) -> Any:
    return _typed(value, str, name)


def _int(value: Any, name: str) -> Any:
    return _typed(value, int, name)


def _bool(value: Any, name: str) -> Any:
    return _typed(value, bool, name)


def _host(value: Any, name: str) -> Any:
    # `client_addr` and `addresses.http` may list several addresses; the agent serves the first.
    return _typed(value, str, name).split()[0]


@dataclass(frozen=True, slots=True)
class _Key:
    """Where one config-file key goes: a field of `AgentConfig`, and how to decode its value."""

    field: str
    decode: Callable[[Any, str], Any]
    # A null value leaves the field as it is (instead of failing the type check).
    skip_null: bool = False


# Every config key the agent reads: a top-level key maps to its field, or (a block) each
# dotted path inside it maps to one. Within a block the rows apply in this order, so of two
# spellings of one field (acl.tokens.initial_management, acl.tokens.master) the later wins.
_KEYS: dict[str, _Key | dict[str, _Key]] = {
    "datacenter": _Key("datacenter", _str),
    "node_name": _Key("node_name", _str),
    "node_id": _Key("node_id", _str),
    "client_addr": _Key("http_host", _host),
    "default_intention_policy": _Key("default_intention_policy", _str),
    "session_ttl_min": _Key("session_ttl_min", _duration),
    "disable_remote_exec": _Key("disable_remote_exec", _bool),
    "addresses": {"http": _Key("http_host", _host, skip_null=True)},
    "ports": {
        "http": _Key("http_port", _int),
        "grpc": _Key("grpc_port", _int),
        "grpc_tls": _Key("grpc_tls_port", _int),
        "sidecar_min_port": _Key("sidecar_min_port", _int),
        "sidecar_max_port": _Key("sidecar_max_port", _int),
    },
    "acl": {
        "enabled": _Key("acl_enabled", _bool),
        "default_policy": _Key("acl_default_policy", _str),
        "tokens.initial_management": _Key("acl_initial_management", _str),
        "tokens.master": _Key("acl_initial_management", _str),
        "tokens.default": _Key("acl_default_token", _str),
        "tokens.agent": _Key("acl_agent_token", _str),
    },
    "peering": {"enabled": _Key("peering_enabled", _bool)},
    "connect": {
        "ca_config.leaf_cert_ttl": _Key("leaf_cert_ttl", _duration),
        "ca_config.private_key_type": _Key("private_key_type", _str),
        "ca_config.private_key_bits": _Key("private_key_bits", _int),
        "ca_config.private_key": _Key("private_key_pem", _str),
        "ca_config.cluster_id": _Key("cluster_id", _str),
    },
}


def _apply_block(
    key: str, block: Mapping[str, Any], rows: Mapping[str, _Key], changes: dict[str, Any]
) -> None:
    for path, row in rows.items():
        *parents, leaf = path.split(".")
        where, inner = f"{key}.", block
        for parent in parents:
            inner = _sub(inner, parent, where)
            where += f"{parent}."
        if leaf in inner and not (row.skip_null and inner[leaf] is None):
            changes[row.field] = row.decode(inner[leaf], where + leaf)


def _apply(config: AgentConfig, data: Mapping[str, Any]) -> AgentConfig:
    changes: dict[str, Any] = {}
    ignored = list(config.ignored_keys)
    services = list(config.services)
    entries = list(config.config_entries)
    for key, value in data.items():
        target = _KEYS.get(key)
        if isinstance(target, _Key):
            changes[target.field] = target.decode(value, key)
        elif target is not None:
            _apply_block(key, _sub(data, key, ""), target, changes)
        elif key in ("service", "services"):
            services += _services(key, value)
        elif key == "config_entries":
            entries += _bootstrap_entries(_sub(data, key, ""))
        elif key in _IGNORED_TOP:
            ignored.append(key)
        else:
            raise ConfigError(f"invalid config key {key}")
    return replace(
        config,
        **changes,
        services=tuple(services),
        config_entries=tuple(entries),
        ignored_keys=tuple(ignored),
    )


def load_files(paths: Iterable[str | Path], base: AgentConfig | None = None) -> AgentConfig:
    """Load Consul agent config files in order onto `base` (or the defaults)."""
    config = base or AgentConfig()
    for path in paths:
        config = apply_file(config, parse_file(path), str(path))
    return config
