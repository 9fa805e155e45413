"""The dev agent's state: catalog, checks, intentions, prepared queries, CA and leaves.

One node, one datacenter: the agent is its own server, so the agent-local view
(`/v1/agent/...`) and the catalog (`/v1/catalog/...`, `/v1/health/...`) are two renderings of
the same records, as they are on a real single-node `consul agent -dev` once anti-entropy has
run.

Blocking: every mutation takes the next Raft-like index and wakes the waiters of the topics it
touched (`services`, `checks`, `svc:<name>`, `connect:<name>`, `intentions`, `roots`,
`leaf:<name>`, ...). A waiter holds a future, not a timer: a blocked request costs nothing
until something it watches changes or its deadline passes.

Rule 1: no HTTP here. Errors are raised as `StateError` subclasses carrying the status code
and the plain-text body Consul would send; the HTTP layer only renders them.
Rule 2: nothing here runs health checks or timers; the agent drives those and reports results
through `update_check`, so every state change goes through one place that bumps indexes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.devagent import decode
from proxy.devagent.acl import ACLStore, Authorizer, PermissionDenied, Token
from proxy.devagent.ca import CertificateAuthority, Leaf
from proxy.errors import IdentityError
from proxy.identity import SpiffeIDService, parse_spiffe_id

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
_STATUS_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2, MAINTENANCE: 3}
CONNECT_PROXY = "connect-proxy"
MIN_CHECK_INTERVAL = 1.0
# Marks the checks the agent itself adds to sidecars: their interval is the agent's setting.
_AGENT_DEFINED = "_agent_defined"
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


class StateError(Exception):
    """A request the state refuses; `status` and `str()` are what the client receives."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(StateError):
    status = 400


class NotFound(StateError):
    status = 404


def fnv64a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def content_hash(value: Mapping[str, Any]) -> str:
    """An opaque hash of a rendered object, formatted like Consul's (`%x` of 64 bits)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return f"{fnv64a(data):x}"


def worst_status(statuses: Iterable[str]) -> str:
    worst = PASSING
    for s in statuses:
        if _STATUS_RANK.get(s, 2) > _STATUS_RANK[worst]:
            worst = s
    return worst


def _now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Notifier:
    """Wakes blocked queries when the topics they watch change."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._parked: asyncio.Event | None = None
        self.closed = False

    def watch(self, topics: Iterable[str]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_result(None)
            return fut
        for t in topics:
            self._waiters.setdefault(t, set()).add(fut)
        if self._parked is not None:
            self._parked.set()
        return fut

    def unwatch(self, fut: asyncio.Future[None], topics: Iterable[str]) -> None:
        for t in topics:
            waiters = self._waiters.get(t)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[t]

    def notify(self, topics: Iterable[str]) -> None:
        for t in topics:
            for fut in self._waiters.pop(t, ()):
                if not fut.done():
                    fut.set_result(None)

    def close(self) -> None:
        """Release every waiter now and every future one at once (agent shutdown)."""
        self.closed = True
        self.notify(list(self._waiters))

    def waiting(self) -> int:
        """How many blocked queries are parked right now."""
        return len({f for ws in self._waiters.values() for f in ws})

    async def until_waiting(self, count: int) -> None:
        """Return once at least `count` queries are parked (callers bound it with a timeout)."""
        while self.waiting() < count:
            self._parked = asyncio.Event()
            try:
                await self._parked.wait()
            finally:
                self._parked = None


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


@dataclass(slots=True)
class LeafEntry:
    leaf: Leaf
    create_index: int
    modify_index: int

    def to_api(self) -> dict[str, object]:
        return self.leaf.to_api(self.create_index, self.modify_index)


@dataclass(frozen=True, slots=True)
class IntentionView:
    """One intention, as the legacy API and authorize see it (a source of a config entry)."""

    id: str
    source: str
    destination: str
    action: str
    permissions: tuple[Any, ...]
    precedence: int
    description: str
    meta: Mapping[str, str]
    create_index: int
    modify_index: int
    created_at: str
    updated_at: str

    def describe(self) -> str:
        # Newer Consul: "default/web => default/db (ID: ..., Precedence: 9, Action: ALLOW)".
        id_part = f"ID: {self.id}, " if self.id else ""
        detail = (
            f"Permissions: {len(self.permissions)}"
            if self.permissions
            else f"Action: {self.action.upper()}"
        )
        return (
            f"default/{self.source} => default/{self.destination} "
            f"({id_part}Precedence: {self.precedence}, {detail})"
        )

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ID": self.id,
            "Description": self.description,
            "SourceNS": "default",
            "SourceName": self.source,
            "DestinationNS": "default",
            "DestinationName": self.destination,
            "SourcePartition": "default",
            "DestinationPartition": "default",
            "SourceType": "consul",
            "Meta": dict(self.meta),
            "Precedence": self.precedence,
            "CreatedAt": self.created_at,
            "UpdatedAt": self.updated_at,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.permissions:
            out["Permissions"] = list(self.permissions)
        else:
            out["Action"] = self.action
        if not self.id:
            del out["ID"]
        return out


def _unknown_check(check_id: str) -> NotFound:
    return NotFound(
        f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
    )


def precedence(source: str, destination: str) -> int:
    """Intention precedence with namespaces fixed to `default` (exact names beat `*`)."""
    top = 9 if destination != "*" else 6
    return top - (0 if source != "*" else 1)


def _validate_name(field_name: str, value: str) -> None:
    if value != "*" and "*" in value:
        raise BadRequest(f"{field_name}: wildcard character '*' cannot be used with partial values")


class State:
    """Everything the agent knows. Mutations are synchronous and bump the index."""

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        acl: ACLStore,
        datacenter: str = "dc1",
        node_name: str = "dev-agent",
        node_id: str | None = None,
        node_address: str = "127.0.0.1",
        default_intention_policy: str | None = None,
        sidecar_port_range: tuple[int, int] = (21000, 21255),
        sidecar_check_interval: float = 10.0,
    ) -> None:
        if default_intention_policy not in (None, "allow", "deny"):
            raise ValueError('default_intention_policy must be "allow" or "deny"')
        self.ca = ca
        self.acl = acl
        self.datacenter = datacenter
        self.node_name = node_name
        self.node_id = node_id or str(uuid.uuid4())
        self.node_address = node_address
        self.default_intention_policy = default_intention_policy
        self.sidecar_port_range = sidecar_port_range
        self.sidecar_check_interval = sidecar_check_interval
        self.notifier = Notifier()
        self.index = 1
        self.table_index: dict[str, int] = {}
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.check_specs: dict[str, CheckSpec] = {}
        self.config_entries: dict[tuple[str, str], dict[str, Any]] = {}
        self.queries: dict[str, dict[str, Any]] = {}
        self.leaves: dict[str, LeafEntry] = {}
        self.ca_modify_index = 1
        # The agent subscribes here to start and stop check runners and leaf timers.
        self.check_listeners: list[Callable[[set[str], set[str]], None]] = []
        self.leaf_listeners: list[Callable[[str, LeafEntry], None]] = []
        self.node_created = self.index
        self._bump(("services", "checks", "roots", "nodes"))

    # -- indexes and blocking ------------------------------------------------------------

    def _bump(self, topics: Iterable[str]) -> int:
        self.index += 1
        topics = tuple(topics)
        for t in topics:
            self.table_index[t] = self.index
        self.notifier.notify(topics)
        return self.index

    def index_of(self, *topics: str, fallback: str | None = None) -> int:
        found = [self.table_index[t] for t in topics if t in self.table_index]
        if not found and fallback:
            found = [self.table_index.get(fallback, 1)]
        return max(max(found, default=1), 1)

    async def block_on_index(
        self, topics: tuple[str, ...], min_index: int, timeout: float, current: Callable[[], int]
    ) -> None:
        """Return once `current()` exceeds `min_index`, or at the deadline, or at shutdown."""
        if min_index <= 0:
            return
        await self._block(topics, lambda: current() > min_index, timeout)

    async def block_on_hash(
        self, topics: tuple[str, ...], last_hash: str, timeout: float, current: Callable[[], str]
    ) -> None:
        if not last_hash:
            return
        await self._block(topics, lambda: current() != last_hash, timeout)

    async def _block(
        self, topics: tuple[str, ...], done: Callable[[], bool], timeout: float
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Each pass either returns or awaits a change: the number of passes is bounded by the
        # number of changes to the watched topics before the deadline.
        while not done() and not self.notifier.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            fut = self.notifier.watch(topics)
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                return
            finally:
                self.notifier.unwatch(fut, topics)

    # -- services ------------------------------------------------------------------------

    def _service_topics(self, svc: Mapping[str, Any]) -> list[str]:
        topics = ["services", f"svc:{svc['Service']}", f"sid:{svc['ID']}"]
        proxy = svc.get("Proxy") or {}
        if svc.get("Kind") == CONNECT_PROXY and proxy.get("DestinationServiceName"):
            topics.append(f"connect:{proxy['DestinationServiceName']}")
        if (svc.get("Connect") or {}).get("Native"):
            topics.append(f"connect:{svc['Service']}")
        return topics

    def register_service(
        self,
        definition: Mapping[str, Any],
        authz: Authorizer,
        *,
        replace_existing_checks: bool = False,
    ) -> None:
        """Register a service as `PUT /v1/agent/service/register` does, sidecar included.

        Raises:
            BadRequest: the definition is invalid (Consul's texts).
            PermissionDenied: the token may not write the service (or the proxy's destination).
        """
        svc, checks, sidecar = self._prepare_service(definition)
        authz.require("service", svc["Service"], "write")
        if svc.get("Kind") == CONNECT_PROXY:
            authz.require("service", svc["Proxy"]["DestinationServiceName"], "write")
        sidecar_prepared = None
        if sidecar is not None:
            sidecar_prepared = self._prepare_sidecar(svc, sidecar)
            authz.require("service", sidecar_prepared[0]["Service"], "write")
        self._store_service(svc, checks, replace_existing_checks)
        if sidecar_prepared is not None:
            self._store_service(*sidecar_prepared, replace_existing_checks)

    def _prepare_service(
        self, definition: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
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
            svc["TaggedAddresses"] = d["TaggedAddresses"]
        weights = d.get("Weights") or {}
        svc["Weights"] = {
            "Passing": weights.get("Passing", 1),
            "Warning": weights.get("Warning", 1),
        }
        svc["EnableTagOverride"] = bool(d.get("EnableTagOverride"))
        connect = d.get("Connect") or {}
        if kind == CONNECT_PROXY:
            svc["Proxy"] = self._prepare_proxy(d.get("Proxy") or {}, svc)
            if connect.get("Native"):
                raise BadRequest(
                    "Validation failed: A Proxy cannot also be Connect Native, only typical "
                    "services"
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

    def _prepare_proxy(self, proxy: Mapping[str, Any], svc: Mapping[str, Any]) -> dict[str, Any]:
        if not proxy.get("DestinationServiceName"):
            raise BadRequest(
                "Validation failed: Proxy.DestinationServiceName must be non-empty for Connect "
                "proxy services"
            )
        if not svc["Port"] and not svc.get("SocketPath"):
            raise BadRequest(
                "Validation failed: Port or SocketPath must be set for a connect-proxy"
            )
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
            addr = up.get("LocalBindSocketPath") or (
                f"{up.get('LocalBindAddress') or '127.0.0.1'}:{up.get('LocalBindPort')}"
            )
            if addr in seen:
                raise BadRequest(
                    "Validation failed: upstreams cannot contain duplicates by local bind address "
                    f"and port or unix path; {addr} is repeated"
                )
            seen.add(addr)
            rendered = {k: v for k, v in up.items() if v not in (None, "", 0, {}, False)}
            rendered["DestinationName"] = up["DestinationName"]
            rendered["MeshGateway"] = up.get("MeshGateway") or {}
            upstreams.append(rendered)
        if upstreams:
            out["Upstreams"] = upstreams
        out["MeshGateway"] = proxy.get("MeshGateway") or {}
        out["Expose"] = proxy.get("Expose") or {}
        return out

    def _prepare_sidecar(
        self, parent: Mapping[str, Any], sidecar_def: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Fill a `connect.sidecar_service` block with Consul's defaults (consul-spec.md 1.2)."""
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
                "Invalid SidecarService: "
                "sidecar_service can't specify Kind other than connect-proxy"
            )
        d["Kind"] = CONNECT_PROXY
        d["ID"] = d.get("ID") or f"{parent['ID']}-sidecar-proxy"
        d["Name"] = d.get("Name") or f"{parent['Service']}-sidecar-proxy"
        if not d.get("Tags"):
            d["Tags"] = list(parent["Tags"])
        if not d.get("Meta"):
            d["Meta"] = dict(parent["Meta"])
        if not d.get("Port"):
            d["Port"] = self._sidecar_port(d["ID"])
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
            svc, checks, _ = self._prepare_service(d)
        except BadRequest as exc:
            raise BadRequest(f"Invalid SidecarService: {exc}") from exc
        if not checks:
            check_addr = svc["Address"] or "127.0.0.1"
            host = f"[{check_addr}]" if ":" in check_addr else check_addr
            checks = [
                {
                    "Name": "Connect Sidecar Listening",
                    "TCP": f"{host}:{svc['Port']}",
                    "Interval": f"{self.sidecar_check_interval:g}s",
                    _AGENT_DEFINED: True,
                },
                {"Name": f"Connect Sidecar Aliasing {parent['ID']}", "AliasService": parent["ID"]},
            ]
        return svc, checks

    def _sidecar_port(self, sidecar_id: str) -> int:
        existing = self.services.get(sidecar_id)
        if existing and existing.get("Port"):
            return int(existing["Port"])
        used = {int(s.get("Port") or 0) for s in self.services.values()}
        low, high = self.sidecar_port_range
        for port in range(low, high + 1):
            if port not in used:
                return port
        raise BadRequest(
            "Invalid SidecarService: no port provided for sidecar and none left in the "
            "configured range"
        )

    def _prepare_checks(
        self, svc: Mapping[str, Any], checks: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], CheckSpec]]:
        out = []
        for n, check in enumerate(checks, start=1):
            check_id = check.get("CheckID") or (
                f"service:{svc['ID']}" if len(checks) == 1 else f"service:{svc['ID']}:{n}"
            )
            name = check.get("Name") or f"Service '{svc['Service']}' check"
            record, spec = self._prepare_check(
                check, check_id, name, internal=bool(check.get(_AGENT_DEFINED))
            )
            record.update(
                ServiceID=svc["ID"], ServiceName=svc["Service"], ServiceTags=list(svc["Tags"])
            )
            out.append((record, spec))
        return out

    def _prepare_check(
        self, check: Mapping[str, Any], check_id: str, name: str, *, internal: bool = False
    ) -> tuple[dict[str, Any], CheckSpec]:
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
        if status not in _STATUS_RANK:
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
            "Node": self.node_name,
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

    def _store_service(
        self, svc: dict[str, Any], checks: list[dict[str, Any]], replace_existing_checks: bool
    ) -> None:
        prepared = self._prepare_checks(svc, checks)
        old = self.services.get(svc["ID"])
        index = self.index + 1
        svc["CreateIndex"] = old["CreateIndex"] if old else index
        svc["ModifyIndex"] = index
        topics = set(self._service_topics(svc)) | {"checks"}
        if old is not None:
            topics |= set(self._service_topics(old))
        removed: set[str] = set()
        new_ids = {record["CheckID"] for record, _ in prepared}
        if replace_existing_checks or old is None or checks:
            removed = {
                cid
                for cid, c in self.checks.items()
                if c["ServiceID"] == svc["ID"] and cid not in new_ids
            }
        for cid in removed:
            del self.checks[cid]
            self.check_specs.pop(cid, None)
        added: set[str] = set()
        for record, spec in prepared:
            existing = self.checks.get(record["CheckID"])
            if existing is not None and existing["Definition"] == record["Definition"]:
                record["Status"], record["Output"] = existing["Status"], existing["Output"]
                record["CreateIndex"] = existing["CreateIndex"]
            else:
                record["CreateIndex"] = index
                added.add(record["CheckID"])
            record["ModifyIndex"] = index
            self.checks[record["CheckID"]] = record
            self.check_specs[record["CheckID"]] = spec
        self.services[svc["ID"]] = svc
        self._bump(topics)
        self._refresh_aliases()
        for listener in self.check_listeners:
            listener(added, removed)

    def deregister_service(self, service_id: str, authz: Authorizer) -> None:
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFound(
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name."
            )
        authz.require("service", svc["Service"], "write")
        sidecars = [
            s["ID"]
            for s in self.services.values()
            if s.get("Kind") == CONNECT_PROXY
            and (s.get("Proxy") or {}).get("DestinationServiceID") == service_id
            and s["ID"] == f"{service_id}-sidecar-proxy"
        ]
        for sid in [service_id, *sidecars]:
            gone = self.services.pop(sid, None)
            if gone is None:
                continue
            removed = {cid for cid, c in self.checks.items() if c["ServiceID"] == sid}
            for cid in removed:
                del self.checks[cid]
                self.check_specs.pop(cid, None)
            self._bump([*self._service_topics(gone), "checks"])
            for listener in self.check_listeners:
                listener(set(), removed)
        self._refresh_aliases()

    # -- checks --------------------------------------------------------------------------

    def register_check(self, check: Mapping[str, Any], authz: Authorizer) -> None:
        """`PUT /v1/agent/check/register`: a node check, or a check on a local service."""
        name = check.get("Name") or ""
        if not name:
            raise BadRequest("Missing check name")
        service_id = check.get("ServiceID") or ""
        check_id = check.get("CheckID") or name
        record, spec = self._prepare_check(check, check_id, name)
        topics = ["checks"]
        if service_id:
            svc = self.services.get(service_id)
            if svc is None:
                raise NotFound(f'ServiceID "{service_id}" does not exist')
            authz.require("service", svc["Service"], "write")
            record.update(
                ServiceID=svc["ID"], ServiceName=svc["Service"], ServiceTags=list(svc["Tags"])
            )
            topics += self._service_topics(svc)
        else:
            authz.require("node", self.node_name, "write")
            topics.append("nodes")
        index = self.index + 1
        old = self.checks.get(check_id)
        if old is not None and not check.get("Status"):
            # Consul keeps a re-registered check's last result unless a status is given.
            record["Status"], record["Output"] = old["Status"], old["Output"]
        record["CreateIndex"] = old["CreateIndex"] if old else index
        record["ModifyIndex"] = index
        self.checks[check_id] = record
        self.check_specs[check_id] = spec
        self._bump(topics)
        self._refresh_aliases()
        for listener in self.check_listeners:
            listener({check_id}, set())

    def deregister_check(self, check_id: str, authz: Authorizer) -> None:
        check = self.checks.get(check_id)
        if check is None:
            raise _unknown_check(check_id)
        self._require_check_write(check, authz)
        del self.checks[check_id]
        self.check_specs.pop(check_id, None)
        self._bump(self._check_topics(check))
        self._refresh_aliases()
        for listener in self.check_listeners:
            listener(set(), {check_id})

    def _require_check_write(self, check: Mapping[str, Any], authz: Authorizer) -> None:
        if check["ServiceName"]:
            authz.require("service", check["ServiceName"], "write")
        else:
            authz.require("node", self.node_name, "write")

    def _check_topics(self, check: Mapping[str, Any]) -> list[str]:
        topics = ["checks"]
        svc = self.services.get(check["ServiceID"]) if check["ServiceID"] else None
        if svc is not None:
            topics += self._service_topics(svc)
        else:
            topics.append("nodes")
        return topics

    def ttl_update(self, check_id: str, status: str, output: str, authz: Authorizer) -> None:
        """`PUT /v1/agent/check/pass|warn|fail/:id` and `/v1/agent/check/update/:id`."""
        check = self.checks.get(check_id)
        if check is None:
            raise _unknown_check(check_id)
        self._require_check_write(check, authz)
        if self.check_specs[check_id].kind != "ttl":
            raise StateError(f'CheckID "{check_id}" does not have associated TTL')
        self.update_check(check_id, status, output)
        for listener in self.check_listeners:
            listener({check_id}, set())  # re-arms the TTL timer

    def update_check(self, check_id: str, status: str, output: str) -> bool:
        """Record a check result. Returns whether anything changed (and indexes moved)."""
        check = self.checks.get(check_id)
        if check is None:
            return False
        if status not in _STATUS_RANK:
            raise BadRequest(f'Invalid check status "{status}"')
        if check["Status"] == status and check["Output"] == output:
            return False
        check["Status"], check["Output"] = status, output
        check["ModifyIndex"] = self._bump(self._check_topics(check))
        self._refresh_aliases()
        return True

    def _refresh_aliases(self) -> None:
        # Alias checks mirror the worst status of the aliased service's checks and of the
        # node's own checks, as Consul's CheckAlias does. Two passes settle an alias of an
        # alias; longer chains converge on later changes.
        for _ in range(2):
            changed = False
            for cid, spec in self.check_specs.items():
                if spec.kind != "alias" or not spec.alias_service:
                    continue
                target = self.services.get(spec.alias_service)
                if target is None:
                    status, output = CRITICAL, f'Service "{spec.alias_service}" could not be found'
                else:
                    aliased = [
                        c
                        for c in self.checks.values()
                        if c["CheckID"] != cid and c["ServiceID"] in (spec.alias_service, "")
                    ]
                    status = worst_status(c["Status"] for c in aliased)
                    failing = next((c for c in aliased if c["Status"] == status), None)
                    if not aliased:
                        output = "No checks found."
                    elif status == PASSING or failing is None:
                        output = "All checks passing."
                    else:
                        output = f'Aliased check "{failing["Name"]}" failing: {failing["Output"]}'

                check = self.checks[cid]
                if check["Status"] != status or check["Output"] != output:
                    check["Status"], check["Output"] = status, output
                    check["ModifyIndex"] = self._bump(self._check_topics(check))
                    changed = True
            if not changed:
                return

    # -- rendering -----------------------------------------------------------------------

    def agent_service(self, service_id: str) -> dict[str, Any]:
        """The `AgentService` object of `/v1/agent/service/:id`, ContentHash included."""
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFound(f"unknown service ID: {service_id}")
        out = {k: v for k, v in svc.items() if k not in ("CreateIndex", "ModifyIndex")}
        out["Datacenter"] = self.datacenter
        out["ContentHash"] = content_hash(
            {k: v for k, v in out.items() if k not in ("Datacenter", "Namespace", "Partition")}
        )
        return out

    def agent_service_hash(self, service_id: str) -> str:
        try:
            return str(self.agent_service(service_id)["ContentHash"])
        except NotFound:
            return ""

    def agent_services(self, authz: Authorizer) -> dict[str, dict[str, Any]]:
        out = {}
        for sid, svc in self.services.items():
            if authz.allowed("service", svc["Service"], "read"):
                rendered = {k: v for k, v in svc.items() if k not in ("CreateIndex", "ModifyIndex")}
                rendered["Datacenter"] = self.datacenter
                out[sid] = rendered
        return out

    def node(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node_name,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self.node_address,
                "lan_ipv4": self.node_address,
                "wan": self.node_address,
                "wan_ipv4": self.node_address,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_created,
            "ModifyIndex": self.node_created,
        }

    def serf_check(self) -> dict[str, Any]:
        return {
            "Node": self.node_name,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": PASSING,
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.node_created,
            "ModifyIndex": self.node_created,
        }

    def _entry_checks(self, svc: Mapping[str, Any]) -> list[dict[str, Any]]:
        node_checks = [c for c in self.checks.values() if not c["ServiceID"]]
        own = [c for c in self.checks.values() if c["ServiceID"] == svc["ID"]]
        return [self.serf_check(), *node_checks, *own]

    def service_entry(self, svc: Mapping[str, Any]) -> dict[str, Any]:
        return {"Node": self.node(), "Service": dict(svc), "Checks": self._entry_checks(svc)}

    def catalog_entry(self, svc: Mapping[str, Any]) -> dict[str, Any]:
        node = self.node()
        return {
            "ID": node["ID"],
            "Node": node["Node"],
            "Address": node["Address"],
            "Datacenter": node["Datacenter"],
            "TaggedAddresses": node["TaggedAddresses"],
            "NodeMeta": node["Meta"],
            "ServiceKind": svc.get("Kind", ""),
            "ServiceID": svc["ID"],
            "ServiceName": svc["Service"],
            "ServiceTags": svc["Tags"],
            "ServiceAddress": svc["Address"],
            "ServiceTaggedAddresses": svc.get("TaggedAddresses"),
            "ServiceWeights": svc["Weights"],
            "ServiceMeta": svc["Meta"],
            "ServicePort": svc["Port"],
            "ServiceSocketPath": svc.get("SocketPath", ""),
            "ServiceEnableTagOverride": svc["EnableTagOverride"],
            "ServiceProxy": svc.get("Proxy", {"MeshGateway": {}, "Expose": {}}),
            "ServiceConnect": svc.get("Connect", {}),
            "CreateIndex": svc["CreateIndex"],
            "ModifyIndex": svc["ModifyIndex"],
        }

    def services_named(self, name: str, *, connect: bool = False) -> list[dict[str, Any]]:
        """Instances of `name`, or with `connect` the endpoints that serve it over Connect."""
        if not connect:
            return [s for s in self.services.values() if s["Service"] == name]
        return [
            s
            for s in self.services.values()
            if (
                s.get("Kind") == CONNECT_PROXY
                and (s.get("Proxy") or {}).get("DestinationServiceName") == name
            )
            or (s["Service"] == name and (s.get("Connect") or {}).get("Native"))
        ]

    def health_entries(
        self,
        name: str,
        authz: Authorizer,
        *,
        connect: bool,
        passing: bool,
        tags: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        if not authz.allowed("service", name, "read") or not authz.allowed(
            "node", self.node_name, "read"
        ):
            return []
        wanted = list(tags)
        out = []
        for svc in self.services_named(name, connect=connect):
            if wanted and not all(t in svc["Tags"] for t in wanted):
                continue
            entry = self.service_entry(svc)
            if passing and any(c["Status"] != PASSING for c in entry["Checks"]):
                continue
            out.append(entry)
        return out

    @staticmethod
    def health_topic(name: str, *, connect: bool) -> str:
        return f"connect:{name}" if connect else f"svc:{name}"

    def health_index(self, name: str, *, connect: bool) -> int:
        # Per service name, so a watch on one service is not woken by changes to others. A
        # name never registered has index 1; its first registration moves it past that.
        return self.index_of(self.health_topic(name, connect=connect))

    # -- intentions and config entries ---------------------------------------------------

    def _intentions_changed(self) -> None:
        self._bump(("intentions", "config"))

    def intentions(self) -> list[IntentionView]:
        out = []
        for (kind, name), entry in self.config_entries.items():
            if kind != "service-intentions":
                continue
            for src in entry.get("Sources") or []:
                out.append(
                    IntentionView(
                        id=src.get("LegacyID") or "",
                        source=src["Name"],
                        destination=name,
                        action=src.get("Action") or "",
                        permissions=tuple(src.get("Permissions") or ()),
                        precedence=src["Precedence"],
                        description=src.get("Description") or "",
                        meta=src.get("LegacyMeta") or {},
                        create_index=entry["CreateIndex"],
                        modify_index=entry["ModifyIndex"],
                        created_at=src.get("LegacyCreateTime") or entry["_created"],
                        updated_at=src.get("LegacyUpdateTime") or entry["_updated"],
                    )
                )
        out.sort(key=lambda i: (-i.precedence, "default", i.source, "default", i.destination))
        return out

    def _check_source(self, src: dict[str, Any], destination: str) -> None:
        _validate_name("SourceName", src.get("Name") or "")
        if not src.get("Name"):
            raise BadRequest("Sources[].Name is required")
        perms = src.get("Permissions") or []
        action = src.get("Action") or ""
        if perms and action:
            raise BadRequest(
                f'Sources[].Action must be omitted if Permissions are specified for "{src["Name"]}"'
            )
        if not perms and action not in ("allow", "deny"):
            raise BadRequest(
                f"Sources[].Action must be set to 'allow' or 'deny' for \"{src['Name']}\""
            )
        if (src.get("Type") or "consul") != "consul":
            raise BadRequest(f"Sources[].Type must be set to 'consul' for \"{src['Name']}\"")
        src["Type"] = "consul"
        src["Precedence"] = precedence(src["Name"], destination)

    def put_config_entry(self, entry: Mapping[str, Any], authz: Authorizer) -> None:
        """`PUT /v1/config` and `config_entries.bootstrap`. service-intentions are validated."""
        kind = entry.get("Kind") or ""
        name = entry.get("Name") or ""
        if not kind:
            raise BadRequest(
                "Request decoding failed: Payload does not contain a kind/Kind key at the top level"
            )
        if not name:
            raise BadRequest(
                "Request decoding failed: Payload does not contain a name/Name key at the top level"
            )
        stored = dict(entry)
        if kind == "service-intentions":
            _validate_name("Name", name)
            authz.require("intention", name, "write")
            sources = [dict(s) for s in stored.get("Sources") or []]
            seen = set()
            for src in sources:
                self._check_source(src, name)
                if src["Name"] in seen:
                    raise BadRequest(f'Sources[].Name "{src["Name"]}" is duplicated')
                seen.add(src["Name"])
            stored["Sources"] = sources
        else:
            authz.require("operator", "", "write")
        old = self.config_entries.get((kind, name))
        index = self.index + 1
        now = _now_rfc3339()
        stored["CreateIndex"] = old["CreateIndex"] if old else index
        stored["ModifyIndex"] = index
        stored["_created"] = old["_created"] if old else now
        stored["_updated"] = now
        self.config_entries[(kind, name)] = stored
        self._bump(("config", f"config:{kind}", "intentions"))

    def delete_config_entry(self, kind: str, name: str, authz: Authorizer) -> None:
        if kind == "service-intentions":
            authz.require("intention", name, "write")
        else:
            authz.require("operator", "", "write")
        if self.config_entries.pop((kind, name), None) is not None:
            self._bump(("config", f"config:{kind}", "intentions"))

    def config_entry(self, kind: str, name: str) -> dict[str, Any]:
        entry = self.config_entries.get((kind, name))
        if entry is None:
            raise NotFound(f"Config entry not found for {kind!r} / {name!r}")
        return {k: v for k, v in entry.items() if not k.startswith("_")}

    def create_intention(
        self, body: Mapping[str, Any], authz: Authorizer, *, exact: tuple[str, str] | None = None
    ) -> str:
        """The legacy `/v1/connect/intentions` API, stored as a source of a config entry.

        Returns:
            The new intention's ID (empty for `exact` upserts, which Consul 1.9+ does not ID).
        """
        src_name = exact[0] if exact else (body.get("SourceName") or "")
        dst_name = exact[1] if exact else (body.get("DestinationName") or "")
        if not src_name:
            raise BadRequest("SourceName must be set")
        if not dst_name:
            raise BadRequest("DestinationName must be set")
        _validate_name("SourceName", src_name)
        _validate_name("DestinationName", dst_name)
        authz.require("intention", dst_name, "write")
        entry = self.config_entries.get(("service-intentions", dst_name))
        sources = [dict(s) for s in (entry or {}).get("Sources") or []]
        existing = next((s for s in sources if s["Name"] == src_name), None)
        if existing is not None and not exact:
            found = next(
                i for i in self.intentions() if (i.source, i.destination) == (src_name, dst_name)
            )
            raise StateError(f"duplicate intention found: {found.describe()}")
        now = _now_rfc3339()
        new_id = "" if exact else str(uuid.uuid4())
        src: dict[str, Any] = {
            "Name": src_name,
            "Action": body.get("Action") or "",
            "Description": body.get("Description") or "",
            "Type": body.get("SourceType") or "consul",
        }
        if body.get("Permissions"):
            src["Permissions"] = body["Permissions"]
        if new_id:
            src.update(
                LegacyID=new_id,
                LegacyMeta=dict(body.get("Meta") or {}),
                LegacyCreateTime=now,
                LegacyUpdateTime=now,
            )
        if existing is not None:
            sources.remove(existing)
            for key in ("LegacyID", "LegacyMeta", "LegacyCreateTime"):
                if key in existing:
                    src[key] = existing[key]
            if "LegacyID" in existing:
                src["LegacyUpdateTime"] = now
        self._check_source(src, dst_name)
        sources.append(src)
        new_entry = dict(entry or {"Kind": "service-intentions", "Name": dst_name})
        new_entry["Sources"] = sources
        self.put_config_entry(
            {
                k: v
                for k, v in new_entry.items()
                if k not in ("CreateIndex", "ModifyIndex") and not k.startswith("_")
            },
            authz,
        )
        return new_id

    def find_intention(self, intention_id: str) -> IntentionView:
        for ixn in self.intentions():
            if ixn.id and ixn.id == intention_id:
                return ixn
        raise NotFound("Intention not found")

    def update_intention(
        self, intention_id: str, body: Mapping[str, Any], authz: Authorizer
    ) -> None:
        ixn = self.find_intention(intention_id)
        self.delete_intention(ixn.source, ixn.destination, authz)
        try:
            self.create_intention(body, authz)
        finally:
            # Keep the ID stable across the update, as Consul does.
            entry = self.config_entries.get(
                ("service-intentions", body.get("DestinationName") or ixn.destination)
            )
            for src in (entry or {}).get("Sources") or []:
                if src["Name"] == (body.get("SourceName") or ixn.source) and src.get("LegacyID"):
                    src["LegacyID"] = intention_id

    def delete_intention(self, source: str, destination: str, authz: Authorizer) -> None:
        authz.require("intention", destination, "write")
        entry = self.config_entries.get(("service-intentions", destination))
        if entry is None:
            raise NotFound("Intention not found")
        sources = [s for s in entry.get("Sources") or [] if s["Name"] != source]
        if len(sources) == len(entry.get("Sources") or []):
            raise NotFound("Intention not found")
        if sources:
            new_entry = {
                k: v
                for k, v in entry.items()
                if k not in ("CreateIndex", "ModifyIndex") and not k.startswith("_")
            }
            new_entry["Sources"] = sources
            self.put_config_entry(new_entry, authz)
        else:
            self.delete_config_entry("service-intentions", destination, authz)

    def matching_intentions(self, destination: str) -> list[IntentionView]:
        return [i for i in self.intentions() if i.destination in (destination, "*")]

    def authorize(self, target: str, client_uri: str, authz: Authorizer) -> tuple[bool, str]:
        """`POST /v1/agent/connect/authorize` (consul-spec.md section 1.6).

        Raises:
            BadRequest: missing target or an unusable ClientCertURI.
            PermissionDenied: the token lacks service:write on the target.
        """
        if not target:
            raise BadRequest("Target service must be specified")
        try:
            ident = parse_spiffe_id(client_uri)
        except IdentityError as exc:
            raise BadRequest("ClientCertURI not a valid Connect identifier") from exc
        if not isinstance(ident, SpiffeIDService):
            raise BadRequest("ClientCertURI not a valid Service identifier")
        authz.require("service", target, "write")
        if ident.partition != "default":
            raise BadRequest(f'Mismatched partitions: "{ident.partition}" != "default"')
        return self.intention_decision(ident.service, target, authz)

    def intention_decision(
        self, source: str, destination: str, authz: Authorizer
    ) -> tuple[bool, str]:
        """The first matching intention in precedence order decides; else the default."""
        for ixn in self.matching_intentions(destination):
            if ixn.source not in (source, "*"):
                continue
            if ixn.permissions:
                return False, f"Matched L7 intention: {ixn.describe()}"
            return ixn.action == "allow", f"Matched L4 intention: {ixn.describe()}"
        if self.default_intention_policy is not None:
            return self.default_intention_policy == "allow", "Default intention policy"
        return authz.intention_default_allow, "Default behavior configured by ACLs"

    # -- ACL tokens and policies --------------------------------------------------------

    def create_policy(self, body: Mapping[str, Any], authz: Authorizer) -> dict[str, Any]:
        authz.require("acl", "", "write")
        if not body.get("Name"):
            raise BadRequest("Invalid Policy: no Name is set")
        policy = self.acl.add_policy(
            body["Name"], body.get("Rules") or "", body.get("Description") or "", self.index + 1
        )
        self._bump(("acl",))
        return policy.to_api()

    def create_token(self, body: Mapping[str, Any], authz: Authorizer) -> dict[str, Any]:
        authz.require("acl", "", "write")
        policies = [self.acl.policy_by_link(link).id for link in body.get("Policies") or []]
        token = Token(
            accessor_id=body.get("AccessorID") or str(uuid.uuid4()),
            secret_id=body.get("SecretID") or str(uuid.uuid4()),
            description=body.get("Description") or "",
            policy_ids=policies,
            service_identities=[s["ServiceName"] for s in body.get("ServiceIdentities") or []],
            node_identities=[n["NodeName"] for n in body.get("NodeIdentities") or []],
            create_index=self.index + 1,
            modify_index=self.index + 1,
        )
        self.acl.add_token(token)
        self._bump(("acl",))
        return token.to_api(self.acl.policies)

    # -- prepared queries ----------------------------------------------------------------

    def put_query(
        self, body: Mapping[str, Any], authz: Authorizer, query_id: str | None = None
    ) -> str:
        service = (body.get("Service") or {}).get("Service") or ""
        if not service:
            raise BadRequest("Must provide a Service name to query")
        name = body.get("Name") or ""
        authz.require("query", name, "write")
        for qid, q in self.queries.items():
            if name and q["Name"] == name and qid != query_id:
                raise BadRequest(f'A prepared query with name "{name}" already exists')
        if query_id is not None and query_id not in self.queries:
            raise NotFound(f"Cannot modify non-existent prepared query: '{query_id}'")
        qid = query_id or str(uuid.uuid4())
        index = self.index + 1
        old = self.queries.get(qid)
        svc_q = dict(body.get("Service") or {})
        svc_q.setdefault("Failover", {"NearestN": 0, "Datacenters": None})
        svc_q.setdefault("OnlyPassing", False)
        svc_q.setdefault("IgnoreCheckIDs", None)
        svc_q.setdefault("Near", "")
        svc_q.setdefault("Tags", None)
        svc_q.setdefault("NodeMeta", None)
        svc_q.setdefault("ServiceMeta", None)
        svc_q.setdefault("Connect", {"Enabled": False})
        self.queries[qid] = {
            "ID": qid,
            "Name": name,
            "Session": body.get("Session") or "",
            "Token": body.get("Token") or "",
            "Template": body.get("Template")
            or {"Type": "", "Regexp": "", "RemoveEmptyTags": False},
            "Service": svc_q,
            "DNS": {"TTL": (body.get("DNS") or {}).get("TTL") or ""},
            "CreateIndex": old["CreateIndex"] if old else index,
            "ModifyIndex": index,
        }
        self._bump(("queries",))
        return qid

    def find_query(self, id_or_name: str) -> dict[str, Any]:
        if id_or_name in self.queries:
            return self.queries[id_or_name]
        for q in self.queries.values():
            if q["Name"] and q["Name"] == id_or_name:
                return q
        raise NotFound("Query not found")

    def delete_query(self, query_id: str, authz: Authorizer) -> None:
        q = self.queries.get(query_id)
        if q is None:
            raise NotFound(f"Cannot delete non-existent prepared query: '{query_id}'")
        authz.require("query", q["Name"], "write")
        del self.queries[query_id]
        self._bump(("queries",))

    def execute_query(self, id_or_name: str, authz: Authorizer, *, connect: bool) -> dict[str, Any]:
        q = self.find_query(id_or_name)
        sq = q["Service"]
        name = sq["Service"]
        connect = connect or bool((sq.get("Connect") or {}).get("Enabled"))
        entries = []
        if authz.allowed("service", name, "read"):
            ignore = set(sq.get("IgnoreCheckIDs") or [])
            for svc in self.services_named(name, connect=connect):
                tags = sq.get("Tags") or []
                if not all(
                    (t[1:] not in svc["Tags"]) if t.startswith("!") else (t in svc["Tags"])
                    for t in tags
                ):
                    continue
                entry = self.service_entry(svc)
                statuses = [c["Status"] for c in entry["Checks"] if c["CheckID"] not in ignore]
                bad = {CRITICAL, MAINTENANCE} | ({WARNING} if sq.get("OnlyPassing") else set())
                if any(s in bad for s in statuses):
                    continue
                entries.append(entry)
        random.shuffle(entries)
        return {
            "Service": name,
            "Nodes": entries,
            "DNS": q["DNS"],
            "Datacenter": self.datacenter,
            "Failovers": 0,
        }

    # -- CA and leaves -------------------------------------------------------------------

    def roots_index(self) -> int:
        return self.index_of("roots")

    def roots(self) -> dict[str, Any]:
        return {
            "ActiveRootID": self.ca.active_root.id,
            "TrustDomain": self.ca.trust_domain,
            "Roots": [r.to_api(self.ca.cluster_id) for r in self.ca.roots],
        }

    def leaf(self, service: str, authz: Authorizer) -> LeafEntry:
        """The current leaf for `service`, issued on first request (the agent's leaf cache).

        Raises:
            PermissionDenied: the token lacks service:write on `service`.
        """
        authz.require("service", service, "write")
        entry = self.leaves.get(service)
        if entry is None or entry.leaf.root_id != self.ca.active_root.id:
            entry = self.issue_leaf(service)
        return entry

    def issue_leaf(self, service: str) -> LeafEntry:
        leaf = self.ca.sign_leaf(service, datacenter=self.datacenter)
        old = self.leaves.get(service)
        index = self._bump((f"leaf:{service}",))
        entry = LeafEntry(leaf, old.create_index if old else index, index)
        self.leaves[service] = entry
        for listener in self.leaf_listeners:
            listener(service, entry)
        return entry

    def rotate_ca(self, **kwargs: Any) -> None:
        """Rotate to a new root (cross-signed by the old one) and re-issue every cached leaf."""
        index = self.index + 1
        self.ca.rotate(index, **kwargs)
        self.ca_modify_index = index
        self._bump(("roots",))
        for service in list(self.leaves):
            self.issue_leaf(service)

    def ca_configuration(self) -> dict[str, Any]:
        rendered = self.ca.active_root.to_api(self.ca.cluster_id)
        key_type, bits = rendered["PrivateKeyType"], rendered["PrivateKeyBits"]
        return {
            "Provider": "consul",
            "Config": {
                "LeafCertTTL": f"{self.ca.leaf_ttl / 3600:g}h"
                if self.ca.leaf_ttl >= 3600
                else f"{self.ca.leaf_ttl:g}s",
                "PrivateKeyType": key_type,
                "PrivateKeyBits": bits,
                "IntermediateCertTTL": f"{self.ca.intermediate_ttl / 3600:g}h",
                "RootCertTTL": f"{self.ca.root_ttl / 3600:g}h",
                "RotationPeriod": "2160h",
            },
            "State": None,
            "ForceWithoutCrossSigning": False,
            "CreateIndex": 1,
            "ModifyIndex": self.ca_modify_index,
        }

    # -- legacy managed-proxy config -----------------------------------------------------

    def managed_proxy_config(
        self, proxy_id: str, authz: Authorizer, bind_address: str
    ) -> dict[str, Any]:
        """`GET /v1/agent/connect/proxy/:id` of Consul 1.2-1.5 (consul-spec.md section 1.10)."""
        svc = self.services.get(proxy_id)
        if svc is None or svc.get("Kind") != CONNECT_PROXY:
            raise NotFound(f"unknown proxy service ID: {proxy_id}")
        proxy = svc["Proxy"]
        target_id = proxy.get("DestinationServiceID") or ""
        target = self.services.get(target_id)
        if target is None:
            raise NotFound(f"unknown target service ID: {target_id}")
        authz.require("service", target["Service"], "write")
        config: dict[str, Any] = dict(proxy.get("Config") or {})
        upstreams = [
            {
                "DestinationType": u.get("DestinationType") or "service",
                "DestinationNamespace": u.get("DestinationNamespace") or "",
                "DestinationName": u["DestinationName"],
                "Datacenter": u.get("Datacenter") or "",
                "LocalBindAddress": u.get("LocalBindAddress") or "",
                "LocalBindPort": u.get("LocalBindPort") or 0,
                "Config": u.get("Config"),
            }
            for u in proxy.get("Upstreams") or []
        ]
        hashed = {"config": config, "upstreams": upstreams, "target": target_id}
        out_hash = content_hash(hashed)
        # Defaults are filled after hashing, as Consul did: they are not part of the hash.
        config.setdefault("bind_port", svc["Port"])
        config.setdefault("bind_address", svc["Address"] or bind_address)
        local_addr = proxy.get("LocalServiceAddress") or "127.0.0.1"
        local_port = proxy.get("LocalServicePort") or target["Port"]
        host = f"[{local_addr}]" if ":" in local_addr else local_addr
        config.setdefault("local_service_address", f"{host}:{local_port}")
        return {
            "ProxyServiceID": proxy_id,
            "TargetServiceID": target_id,
            "TargetServiceName": target["Service"],
            "ContentHash": out_hash,
            "ExecMode": "daemon",
            "Command": None,
            "Config": config,
            "Upstreams": upstreams,
        }

    def managed_proxy_hash(self, proxy_id: str, bind_address: str) -> str:
        unrestricted = Authorizer(enabled=False, default_allow=True)
        try:
            return str(
                self.managed_proxy_config(proxy_id, unrestricted, bind_address)["ContentHash"]
            )
        except StateError:
            return ""


__all__ = [
    "BadRequest",
    "NotFound",
    "PermissionDenied",
    "State",
    "StateError",
]
