"""The agent's answers: status, JSON and shape, read into typed results.

Owns how one response of the local agent becomes a value: a non-200 status becomes Consul's
Go-client error text (`Unexpected response code: <code> (<body>)`), a body that is not JSON
or not of the expected shape becomes an `AgentResponseError`, and a well-formed body becomes
a small frozen result (`Roots`, `Leaf`, `AuthorizeResult`, `Endpoints`, `Instances`,
`AgentService`, `IntentionMatch`).
Fields are read as Go's `json.Unmarshal` reads them into Consul's api structs: a missing or
null field is its zero value, a field of another type is an error.

Rule 1: pure: no I/O, no awaits, no logging.
Rule 2: a hostile body raises `AgentResponseError` and nothing else; only Connect service
entries are lenient: an entry that is not a usable Connect endpoint is skipped, not fatal.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.addr import join_host_port
from proxy.errors import AgentResponseError
from proxy.identity import Endpoint, SpiffeIDService

# The text of an authorize answer that is not {"Authorized": <bool>, ...}: a denial reason
# users read in the log ("connect: authz call failed: unexpected answer from the agent").
UNEXPECTED = "unexpected answer from the agent"


@dataclass(frozen=True, slots=True)
class Answer:
    """A decoded JSON body with the blocking metadata of its response."""

    body: Any
    index: int
    content_hash: str


@dataclass(frozen=True, slots=True)
class Roots:
    """`/v1/agent/connect/ca/roots`: each root's PEM, and the blocking index."""

    pems: tuple[str, ...]
    index: int


@dataclass(frozen=True, slots=True)
class Leaf:
    """`/v1/agent/connect/ca/leaf/:service`: the leaf (it may carry intermediates), its key."""

    cert_pem: str
    key_pem: str
    index: int


@dataclass(frozen=True, slots=True)
class AuthorizeResult:
    """`/v1/agent/connect/authorize`: the agent's decision and its reason, as it gave them."""

    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Endpoints:
    """`/v1/health/connect/:service`: the Connect endpoints it lists, and the blocking index."""

    endpoints: tuple[Endpoint, ...]
    index: int


@dataclass(frozen=True, slots=True)
class AgentService:
    """A proxy service's body as the agent gave it, and its content hash.

    From `/v1/agent/service/:id`, or the legacy `/v1/agent/connect/proxy/:id` (Consul
    1.2-1.5); turning it into a ProxyConfig (`proxy.config.load_*`) is the caller's step.
    """

    body: dict[str, Any]
    content_hash: str


def status_error(status: int, content: bytes) -> AgentResponseError:
    """The error for a non-200 answer, in the text of Consul's Go client."""
    text = content.decode("utf-8", "replace").strip()
    return AgentResponseError(f"Unexpected response code: {status} ({text})", status=status)


def json_body(path: str, content: bytes) -> Any:
    """The decoded JSON body (None for an empty one).

    Raises:
        AgentResponseError: not JSON (or nested too deep to decode).
    """
    if not content:
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise AgentResponseError(f"the agent answered {path} with invalid JSON: {exc}") from exc


def decode(path: str, status: int, headers: Mapping[str, str], content: bytes) -> Answer:
    """Decode a response as Go's client would, or raise with its text.

    `headers`: with lower-case names (httpx's headers and the pool's both look up that way).
    """
    if status != 200:
        raise status_error(status, content)
    raw_index = headers.get("x-consul-index", "0")
    return Answer(
        body=json_body(path, content),
        index=int(raw_index) if raw_index.isdigit() else 0,
        content_hash=headers.get("x-consul-contenthash", ""),
    )


def _unexpected(path: str, what: str) -> AgentResponseError:
    return AgentResponseError(f"{UNEXPECTED} to {path}: {what}")


def _object(path: str, value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _unexpected(path, f"{what} is not a JSON object")
    return value


def _list(path: str, value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _unexpected(path, f"{what} is not a JSON array")
    return value


def _string(path: str, body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _unexpected(path, f"{key} is not a string")
    return value


def roots_from(path: str, answer: Answer) -> Roots:
    """`{"Roots": [{"RootCert": <pem>}, ...]}` as Roots (no roots, or none yet: empty).

    Raises:
        AgentResponseError: a body of another shape.
    """
    body = _object(path, answer.body, "the body")
    pems = tuple(
        _string(path, _object(path, root, "a root"), "RootCert")
        for root in _list(path, body.get("Roots"), "Roots")
    )
    return Roots(pems, answer.index)


def leaf_from(path: str, answer: Answer) -> Leaf:
    """`{"CertPEM": ..., "PrivateKeyPEM": ...}` as a Leaf.

    Raises:
        AgentResponseError: a body of another shape.
    """
    body = _object(path, answer.body, "the body")
    return Leaf(_string(path, body, "CertPEM"), _string(path, body, "PrivateKeyPEM"), answer.index)


def authorize_result(path: str, status: int, content: bytes) -> AuthorizeResult:
    """An authorize response (status and body) as an AuthorizeResult.

    Reads only what the decision needs: this runs once per inbound connection.

    Raises:
        AgentResponseError: a non-200 status, a body that is not JSON, or one without a
            boolean `Authorized` (its text is then exactly `UNEXPECTED`).
    """
    if status != 200:
        raise status_error(status, content)
    return _authorize_answer(path, content)


# The agent gives a client identity the same body every time (its decision and the reason
# naming the intention or the default), so few distinct bodies come: each is decoded once.
# A failure is raised, never kept. Decoding took 1.9 µs a call in a loop, a lookup 0.1.
@functools.lru_cache(maxsize=256)
def _authorize_answer(path: str, content: bytes) -> AuthorizeResult:
    body = json_body(path, content)
    if not isinstance(body, dict):
        raise AgentResponseError(UNEXPECTED)
    allowed = body.get("Authorized")
    if not isinstance(allowed, bool):
        raise AgentResponseError(UNEXPECTED)
    return AuthorizeResult(allowed, str(body.get("Reason", "")))


@dataclass(frozen=True, slots=True)
class IntentionRule:
    """One intention as far as re-authorization cares: what it is and when it last changed."""

    id: str
    source: str  # SourceNS/SourceName ("*" wildcards as Consul writes them)
    action: str  # "allow", "deny", or "" for an L7 intention (Permissions)
    precedence: int
    modify_index: int


@dataclass(frozen=True, slots=True)
class IntentionMatch:
    """`/v1/connect/intentions/match?by=destination&name=<name>`: the rules, and the index."""

    rules: tuple[IntentionRule, ...]
    index: int


def intention_match(path: str, name: str, answer: Answer) -> IntentionMatch:
    """`{"<name>": [<intention>, ...]}` as an IntentionMatch (a missing name: no rules).

    Raises:
        AgentResponseError: a body of another shape.
    """
    body = _object(path, answer.body, "the body")
    rules = []
    for raw in _list(path, body.get(name), name):
        ixn = _object(path, raw, "an intention")
        numbers = [ixn.get(key) or 0 for key in ("Precedence", "ModifyIndex")]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise _unexpected(path, "Precedence or ModifyIndex is not a number")
        namespace = _string(path, ixn, "SourceNS")
        source = _string(path, ixn, "SourceName")
        rules.append(
            IntentionRule(
                id=_string(path, ixn, "ID"),
                source=f"{namespace}/{source}" if namespace else source,
                action=_string(path, ixn, "Action"),
                precedence=numbers[0],
                modify_index=numbers[1],
            )
        )
    return IntentionMatch(tuple(rules), answer.index)


def _text_fields(mapping: Mapping[str, Any], *keys: str) -> tuple[str, ...] | None:
    """The string fields `keys` ("" when missing or null), or None if one is not a string."""
    values = tuple("" if mapping.get(key) is None else mapping[key] for key in keys)
    return values if all(isinstance(v, str) for v in values) else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    if value is None:
        return {}
    return value if isinstance(value, Mapping) else None


def endpoints_from_entries(entries: Iterable[Any]) -> list[Endpoint]:
    """(host, port, expected identity) for each Connect-capable ServiceEntry.

    An instance's address is `Service.Address`, else `Node.Address`; the expected identity is
    the proxy's destination service (or the service itself for Connect-native instances) in
    the instance's datacenter (Consul's `connect/resolver.go`). Entries that are not usable Connect
    endpoints (plain services, gateways, no port or address, fields of the wrong type) are
    skipped.
    """
    out: list[Endpoint] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        svc = _mapping(entry.get("Service"))
        node = _mapping(entry.get("Node"))
        if svc is None or node is None:
            continue
        proxy = _mapping(svc.get("Proxy"))
        connect = _mapping(svc.get("Connect"))
        if proxy is None or connect is None:
            continue
        if svc.get("Kind") == "connect-proxy" and proxy.get("DestinationServiceName"):
            service = proxy["DestinationServiceName"]
        elif connect.get("Native"):
            service = svc.get("Service") or ""
        else:
            continue
        texts = _text_fields(svc, "Address", "Namespace", "Partition")
        node_texts = _text_fields(node, "Address", "Datacenter")
        if texts is None or node_texts is None or not isinstance(service, str):
            continue
        address, namespace, partition = texts
        node_address, datacenter = node_texts
        host = address or node_address
        port = svc.get("Port")
        if not service or not host or type(port) is not int or port <= 0:  # bool: not a port
            continue
        out.append(
            (
                host,
                port,
                SpiffeIDService(
                    host="",
                    namespace=namespace or "default",
                    datacenter=datacenter,
                    service=service,
                    partition=partition or "default",
                ),
            )
        )
    return out


def health_endpoints(path: str, answer: Answer) -> Endpoints:
    """A `/v1/health/connect/:service` list of ServiceEntries as Endpoints.

    Raises:
        AgentResponseError: a body that is not a list.
    """
    entries = _list(path, answer.body, "the body")
    return Endpoints(tuple(endpoints_from_entries(entries)), answer.index)


# Consul's check IDs of maintenance mode (node-wide, and per service with a suffix).
_NODE_MAINTENANCE = "_node_maintenance"
_SERVICE_MAINTENANCE = "_service_maintenance:"


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of a Connect service, healthy or not, for people to read (status page).

    `status` aggregates the entry's checks as Consul's `HealthChecks.AggregatedStatus` does:
    maintenance, else critical, else warning, else passing (no checks: passing); a check with
    a status Consul does not know makes it "" (unknown).
    """

    node: str
    service_id: str
    address: str  # host:port the instance serves on
    status: str


@dataclass(frozen=True, slots=True)
class Instances:
    """`/v1/health/connect/:service` without `passing`: every instance and its health."""

    instances: tuple[Instance, ...]
    index: int


def aggregated_status(checks: Iterable[Any]) -> str:
    """The one health word of a list of check objects (entries that are not objects, or
    whose fields are not strings, are skipped)."""
    seen: set[str] = set()
    for check in checks:
        if not isinstance(check, Mapping):
            continue
        fields = _text_fields(check, "CheckID", "Status")
        if fields is None:
            continue
        check_id, status = fields
        if check_id == _NODE_MAINTENANCE or check_id.startswith(_SERVICE_MAINTENANCE):
            seen.add("maintenance")
        elif status in ("passing", "warning", "critical"):
            seen.add(status)
        else:
            return ""
    for word in ("maintenance", "critical", "warning"):
        if word in seen:
            return word
    return "passing"


def health_instances(path: str, answer: Answer) -> Instances:
    """A `/v1/health/connect/:service` list of ServiceEntries as Instances, whatever their
    health. Entries without a usable address and port are skipped, as for endpoints.

    Raises:
        AgentResponseError: a body that is not a list.
    """
    out: list[Instance] = []
    for entry in _list(path, answer.body, "the body"):
        if not isinstance(entry, Mapping):
            continue
        svc = _mapping(entry.get("Service"))
        node = _mapping(entry.get("Node"))
        checks = entry.get("Checks")
        if svc is None or node is None or not isinstance(checks, list | None):
            continue
        texts = _text_fields(svc, "ID", "Address")
        node_texts = _text_fields(node, "Node", "Address")
        port = svc.get("Port")
        if texts is None or node_texts is None or type(port) is not int or port <= 0:
            continue
        service_id, address = texts
        node_name, node_address = node_texts
        host = address or node_address
        if not host:
            continue
        out.append(
            Instance(
                node=node_name,
                service_id=service_id,
                address=join_host_port(host, port),
                status=aggregated_status(checks or ()),
            )
        )
    return Instances(tuple(out), answer.index)


def query_endpoints(path: str, answer: Answer) -> list[Endpoint]:
    """A prepared query's `{"Nodes": [ServiceEntry, ...]}` as endpoints.

    Raises:
        AgentResponseError: a body of another shape.
    """
    body = _object(path, answer.body, "the body")
    return endpoints_from_entries(_list(path, body.get("Nodes"), "Nodes"))


def agent_service_from(path: str, answer: Answer) -> AgentService:
    """A service body (an object; null reads as {}) with its content hash.

    Raises:
        AgentResponseError: a body that is not a JSON object.
    """
    return AgentService(_object(path, answer.body, "the body"), answer.content_hash)


def services_from(path: str, answer: Answer) -> dict[str, dict[str, Any]]:
    """`/v1/agent/services`: service ID -> service body.

    Raises:
        AgentResponseError: not an object of objects.
    """
    body = _object(path, answer.body, "the body")
    return {sid: _object(path, svc, f"service {sid!r}") for sid, svc in body.items()}


def catalog_entries_from(path: str, answer: Answer) -> list[dict[str, Any]]:
    """`/v1/catalog/service/:name`: the catalog's entries.

    Raises:
        AgentResponseError: not an array of objects.
    """
    return [_object(path, entry, "an entry") for entry in _list(path, answer.body, "the body")]


@dataclass(frozen=True, slots=True)
class XDSPorts:
    """The agent's gRPC ports for Envoy, as `/v1/agent/self` tells them (0: not told).

    `grpc` is `DebugConfig.GRPCPort` (older agents): negative when gRPC is disabled, None
    when the agent does not say.
    """

    tls: int
    plaintext: int
    grpc: int | None


def _port(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def xds_ports_from(answer: Answer) -> XDSPorts:
    """`{"xDS": {"Ports": {"TLS", "Plaintext"}}, "DebugConfig": {"GRPCPort"}}`; anything
    else reads as "not told" (the caller then falls back to the default port, as Consul)."""
    body = _mapping(answer.body) or {}
    ports = _mapping((_mapping(body.get("xDS")) or {}).get("Ports")) or {}
    grpc = (_mapping(body.get("DebugConfig")) or {}).get("GRPCPort")
    return XDSPorts(
        tls=_port(ports.get("TLS")),
        plaintext=_port(ports.get("Plaintext")),
        grpc=grpc if isinstance(grpc, int) and not isinstance(grpc, bool) else None,
    )


@dataclass(frozen=True, slots=True)
class ProxyRegistration:
    """What `connect envoy` needs of a proxy's registration (`/v1/agent/service/:id`)."""

    cluster: str  # the destination service's name, else the service's own name
    config: Mapping[str, Any]  # Proxy.Config: the central-config bootstrap keys
    namespace: str
    partition: str
    datacenter: str


def proxy_registration(service: AgentService) -> ProxyRegistration | None:
    """The registration of a Connect proxy or gateway, or None when the service has no
    `Proxy` block (a plain service)."""
    body = service.body
    proxy = body.get("Proxy")
    if not isinstance(proxy, Mapping):
        return None

    def text(mapping: Mapping[str, Any], key: str) -> str:
        value = mapping.get(key)
        return value if isinstance(value, str) else ""

    return ProxyRegistration(
        cluster=text(proxy, "DestinationServiceName") or text(body, "Service"),
        config=_mapping(proxy.get("Config")) or {},
        namespace=text(body, "Namespace") or "default",
        partition=text(body, "Partition") or "default",
        datacenter=text(body, "Datacenter"),
    )
