"""Service and check definitions made into the records the tables store: pure preparation.

A definition from `PUT /v1/agent/service/register`, `PUT /v1/agent/check/register` or a
config file is validated and filled with Consul's defaults here (sidecar name, ID, port,
proxy destination and checks; check IDs, intervals and definitions), with Consul's error
texts. Nothing is stored: the catalog and checks tables store what this returns.

Rule 1: pure. What depends on the stored services (the next free sidecar port) or on the
agent (node name, sidecar check interval) is passed in.
Rule 2: an invalid definition raises `BadRequest` with Consul's text; the definitions passed
in are never changed (a sidecar block is copied before its defaults are filled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.addr import join_host_port
from proxy.devagent import decode
from proxy.devagent.state.records import CONNECT_PROXY, CRITICAL, STATUS_RANK, BadRequest

MIN_CHECK_INTERVAL = 1.0
# Marks the checks the agent itself adds to sidecars: their interval is the agent's setting.
AGENT_DEFINED = "_agent_defined"

_KINDS = (
    "",
    CONNECT_PROXY,
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
    "api-gateway",
)
UNSUPPORTED_CHECKS = {
    "GRPC": "gRPC",
    "H2PING": "H2PING",
    "DockerContainerID": "Docker",
    "UDP": "UDP",
    "OSService": "OS service",
}


@dataclass(slots=True)
class CheckSpec:
    """What a check runs, kept beside its public HealthCheck record."""

    kind: str  # "ttl", "tcp", "http", "alias", "none"
    ttl: float = 0.0
    interval: float = 0.0
    timeout: float = 10.0
    target: str = ""  # TCP address or HTTP URL
    method: str = "GET"
    header: dict[str, Any] = field(default_factory=dict)
    body: str = ""
    tls_skip_verify: bool = False
    disable_redirects: bool = False
    alias_service: str = ""


def prepare_service(
    definition: Mapping[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """A service record, its check definitions and its `SidecarService` block (if any).

    Raises:
        BadRequest: the definition is invalid (Consul's texts).
    """
    d = dict(definition)
    name = d.get("Name") or ""
    if not name:
        raise BadRequest("Missing service name")
    kind = d.get("Kind") or ""
    if kind not in _KINDS:
        raise BadRequest(f'Validation failed: invalid service kind "{kind}"')
    svc: dict[str, Any] = {
        "ID": d.get("ID") or name,
        "Service": name,
        "Tags": list(d.get("Tags") or []),
        "Meta": dict(d.get("Meta") or {}),
        "Port": int(d.get("Port") or 0),
        "Address": d.get("Address") or "",
    }
    if kind:
        svc["Kind"] = kind
    if d.get("SocketPath"):
        svc["SocketPath"] = d["SocketPath"]
    if d.get("TaggedAddresses"):
        # Decoded case-insensitively into Consul's ServiceAddress: always both fields.
        svc["TaggedAddresses"] = {
            name: {
                "Address": (addr or {}).get("Address") or "",
                "Port": (addr or {}).get("Port") or 0,
            }
            for name, addr in d["TaggedAddresses"].items()
        }
    weights = d.get("Weights") or {}
    svc["Weights"] = {
        "Passing": weights.get("Passing", 1),
        "Warning": weights.get("Warning", 1),
    }
    svc["EnableTagOverride"] = bool(d.get("EnableTagOverride"))
    connect = d.get("Connect") or {}
    if kind == CONNECT_PROXY:
        svc["Proxy"] = _prepare_proxy(d.get("Proxy") or {}, svc)
        if connect.get("Native"):
            raise BadRequest(
                "Validation failed: A Proxy cannot also be Connect Native, only typical services"
            )
    elif d.get("Proxy"):
        raise BadRequest(
            "Validation failed: Proxy configuration is only valid for the connect-proxy kind"
        )
    if connect.get("Native"):
        svc["Connect"] = {"Native": True}
    checks = [d["Check"]] if d.get("Check") else []
    checks += list(d.get("Checks") or [])
    return svc, checks, connect.get("SidecarService")


def _prepare_proxy(proxy: Mapping[str, Any], svc: Mapping[str, Any]) -> dict[str, Any]:
    if not proxy.get("DestinationServiceName"):
        raise BadRequest(
            "Validation failed: Proxy.DestinationServiceName must be non-empty for Connect "
            "proxy services"
        )
    if not svc["Port"] and not svc.get("SocketPath"):
        raise BadRequest("Validation failed: Port or SocketPath must be set for a connect-proxy")
    out: dict[str, Any] = {
        k: v
        for k, v in proxy.items()
        if v not in (None, "", 0, {}, []) and k not in ("Upstreams", "MeshGateway", "Expose")
    }
    upstreams = []
    seen: set[str] = set()
    for up in proxy.get("Upstreams") or []:
        if not up.get("DestinationName"):
            raise BadRequest("Validation failed: upstream destination name cannot be empty")
        dtype = up.get("DestinationType") or ""
        if dtype not in ("", "service", "prepared_query"):
            raise BadRequest(f'Validation failed: unknown upstream destination type: "{dtype}"')
        if not up.get("LocalBindPort") and not up.get("LocalBindSocketPath"):
            raise BadRequest(
                "Validation failed: upstream local bind port or local socket path must be "
                "defined and nonzero"
            )
        addr = up.get("LocalBindSocketPath") or join_host_port(
            up.get("LocalBindAddress") or "127.0.0.1", up.get("LocalBindPort")
        )
        if addr in seen:
            raise BadRequest(
                "Validation failed: upstreams cannot contain duplicates by local bind address "
                f"and port or unix path; {addr} is repeated"
            )
        seen.add(addr)
        rendered = {k: v for k, v in up.items() if v not in (None, "", 0, {}, False)}
        # Consul fills the type at registration (`ServiceDefinition.NodeService`).
        rendered["DestinationType"] = dtype or "service"
        rendered["DestinationName"] = up["DestinationName"]
        rendered["MeshGateway"] = up.get("MeshGateway") or {}
        upstreams.append(rendered)
    if upstreams:
        out["Upstreams"] = upstreams
    out["MeshGateway"] = proxy.get("MeshGateway") or {}
    out["Expose"] = proxy.get("Expose") or {}
    return out


def prepare_sidecar(
    parent: Mapping[str, Any],
    sidecar_def: Mapping[str, Any],
    *,
    free_port: Callable[[str], int],
    check_interval: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Fill a `connect.sidecar_service` block with Consul's `agent/sidecar_service.go` defaults.

    Args:
        parent: the prepared record of the service the sidecar serves.
        sidecar_def: the `SidecarService` block.
        free_port: gives the sidecar ID a port when the block names none.
        check_interval: the interval of the agent-defined "Listening" check.

    Raises:
        BadRequest: "Invalid SidecarService: ..." (Consul's texts).
    """
    if parent.get("Kind"):
        raise BadRequest(
            "Invalid SidecarService: sidecar_service is only valid for typical services"
        )
    d = dict(sidecar_def)
    if (d.get("Connect") or {}).get("SidecarService"):
        raise BadRequest(
            "Invalid SidecarService: sidecar_service can't have a nested sidecar_service"
        )
    if d.get("Kind") not in (None, "", CONNECT_PROXY):
        raise BadRequest(
            "Invalid SidecarService: sidecar_service can't specify Kind other than connect-proxy"
        )
    d["Kind"] = CONNECT_PROXY
    d["ID"] = d.get("ID") or f"{parent['ID']}-sidecar-proxy"
    d["Name"] = d.get("Name") or f"{parent['Service']}-sidecar-proxy"
    if not d.get("Tags"):
        d["Tags"] = list(parent["Tags"])
    if not d.get("Meta"):
        d["Meta"] = dict(parent["Meta"])
    if not d.get("Port"):
        d["Port"] = free_port(d["ID"])
    proxy = dict(d.get("Proxy") or {})
    proxy.setdefault("DestinationServiceName", parent["Service"])
    proxy.setdefault("DestinationServiceID", parent["ID"])
    proxy["DestinationServiceName"] = proxy["DestinationServiceName"] or parent["Service"]
    proxy["DestinationServiceID"] = proxy["DestinationServiceID"] or parent["ID"]
    if not proxy.get("LocalServiceAddress"):
        proxy["LocalServiceAddress"] = "127.0.0.1"
    if not proxy.get("LocalServicePort") and not proxy.get("LocalServiceSocketPath"):
        proxy["LocalServicePort"] = parent["Port"]
    d["Proxy"] = proxy
    try:
        svc, checks, _ = prepare_service(d)
    except BadRequest as exc:
        raise BadRequest(f"Invalid SidecarService: {exc}") from exc
    if not checks:
        checks = [
            {
                "Name": "Connect Sidecar Listening",
                "TCP": join_host_port(svc["Address"] or "127.0.0.1", svc["Port"]),
                "Interval": f"{check_interval:g}s",
                AGENT_DEFINED: True,
            },
            {"Name": f"Connect Sidecar Aliasing {parent['ID']}", "AliasService": parent["ID"]},
        ]
    return svc, checks


def prepare_checks(
    svc: Mapping[str, Any], checks: list[dict[str, Any]], node_name: str
) -> list[tuple[dict[str, Any], CheckSpec]]:
    """The check records and specs of service `svc`, IDs and names defaulted as Consul does."""
    out = []
    for n, check in enumerate(checks, start=1):
        check_id = check.get("CheckID") or (
            f"service:{svc['ID']}" if len(checks) == 1 else f"service:{svc['ID']}:{n}"
        )
        name = check.get("Name") or f"Service '{svc['Service']}' check"
        record, spec = prepare_check(
            check, check_id, name, node_name, internal=bool(check.get(AGENT_DEFINED))
        )
        record.update(
            ServiceID=svc["ID"], ServiceName=svc["Service"], ServiceTags=list(svc["Tags"])
        )
        out.append((record, spec))
    return out


def prepare_check(
    check: Mapping[str, Any],
    check_id: str,
    name: str,
    node_name: str,
    *,
    internal: bool = False,
) -> tuple[dict[str, Any], CheckSpec]:
    """A check record (the public HealthCheck shape) and what runs it.

    Raises:
        BadRequest: an unsupported check type, or a missing TTL/interval (Consul's texts).
    """
    if check.get("ScriptArgs") or check.get("Shell"):
        raise BadRequest(
            "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' "
            "or 'enable_local_script_checks' to true"
        )
    for key, label in UNSUPPORTED_CHECKS.items():
        if check.get(key):
            raise BadRequest(f"Invalid check: {label} checks are not run by the dev agent")

    def seconds(key: str, default: float = 0.0) -> float:
        value = check.get(key)
        if value is None or value == "":
            return default
        try:
            return decode.duration_seconds(value, key)
        except decode.DecodeError as exc:
            raise BadRequest(f"Invalid check: {exc}") from exc

    if check.get("TTL"):
        spec = CheckSpec("ttl", ttl=seconds("TTL"))
        if spec.ttl <= 0:
            raise BadRequest("Invalid check: TTL must be > 0 for TTL checks")
        ctype = "ttl"
    elif check.get("TCP") or check.get("HTTP"):
        ctype = "tcp" if check.get("TCP") else "http"
        spec = CheckSpec(
            ctype,
            interval=seconds("Interval"),
            timeout=seconds("Timeout", 10.0),
            target=check.get("TCP") or check.get("HTTP") or "",
            method=check.get("Method") or "GET",
            header=dict(check.get("Header") or {}),
            body=check.get("Body") or "",
            tls_skip_verify=bool(check.get("TLSSkipVerify")),
            disable_redirects=bool(check.get("DisableRedirects")),
        )
        if spec.interval <= 0:
            raise BadRequest(
                "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or "
                "GRPC checks"
            )
        if not internal:
            # Consul raises intervals below one second to one second.
            spec.interval = max(spec.interval, MIN_CHECK_INTERVAL)
    elif check.get("AliasService"):
        spec = CheckSpec("alias", alias_service=check["AliasService"])
        ctype = "alias"
    elif check.get("AliasNode"):
        spec = CheckSpec("none")
        ctype = "alias"
    else:
        raise BadRequest(
            "Invalid check: TTL must be > 0 for TTL checks, or Interval must be > 0 for "
            "HTTP or TCP checks, or an alias must be set"
        )
    status = check.get("Status") or CRITICAL
    if status not in STATUS_RANK:
        raise BadRequest(f'Invalid check status "{status}"')
    definition: dict[str, Any] = {}
    if spec.interval:
        definition["Interval"] = f"{spec.interval:g}s"
        definition["Timeout"] = f"{spec.timeout:g}s"
    if spec.kind == "tcp":
        definition["TCP"] = spec.target
    if spec.kind == "http":
        definition["HTTP"] = spec.target
    record = {
        "Node": node_name,
        "CheckID": check_id,
        "Name": name,
        "Status": status,
        "Notes": check.get("Notes") or "",
        "Output": "",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": ctype,
        "Interval": definition.get("Interval", ""),
        "Timeout": definition.get("Timeout", ""),
        "ExposedPort": 0,
        "Definition": definition,
    }
    return record, spec
