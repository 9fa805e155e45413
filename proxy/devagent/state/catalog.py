"""The catalog table: services (sidecars included), and the views that read them.

Registration stores a service together with its checks at one index; the health, catalog,
agent and legacy managed-proxy views read the services (and checks) back.

Rule 1: ACL filtering of what a token may read happens here, not in the HTTP layer.
Rule 2: a service and its checks are stored together at one index, and the checks table's
listeners hear of every check added or removed with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state import render
from proxy.devagent.state.blocking import Index, Watch
from proxy.devagent.state.checks import Checks
from proxy.devagent.state.records import (
    CONNECT_PROXY,
    PASSING,
    BadRequest,
    Node,
    NotFound,
    StateError,
    service_topics,
)
from proxy.devagent.state.registration import prepare_checks, prepare_service, prepare_sidecar


class Catalog:
    """Service records by service ID; see the module docstring."""

    def __init__(
        self,
        index: Index,
        node: Node,
        services: dict[str, dict[str, Any]],
        checks: Checks,
        *,
        sidecar_port_range: tuple[int, int],
        sidecar_check_interval: float,
    ) -> None:
        self._index = index
        self._node = node
        self._checks = checks
        self._sidecar_port_range = sidecar_port_range
        self._sidecar_check_interval = sidecar_check_interval
        self.services = services

    # -- registration --------------------------------------------------------------------

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
        svc, checks, sidecar = prepare_service(definition)
        authz.require("service", svc["Service"], "write")
        if svc.get("Kind") == CONNECT_PROXY:
            authz.require("service", svc["Proxy"]["DestinationServiceName"], "write")
        sidecar_prepared = None
        if sidecar is not None:
            sidecar_prepared = prepare_sidecar(
                svc,
                sidecar,
                free_port=self._sidecar_port,
                check_interval=self._sidecar_check_interval,
            )
            authz.require("service", sidecar_prepared[0]["Service"], "write")
        self._store(svc, checks, replace_existing_checks)
        if sidecar_prepared is not None:
            self._store(*sidecar_prepared, replace_existing_checks)

    def _sidecar_port(self, sidecar_id: str) -> int:
        existing = self.services.get(sidecar_id)
        if existing and existing.get("Port"):
            return int(existing["Port"])
        used = {int(s.get("Port") or 0) for s in self.services.values()}
        low, high = self._sidecar_port_range
        for port in range(low, high + 1):
            if port not in used:
                return port
        raise BadRequest(
            "Invalid SidecarService: no port provided for sidecar and none left in the "
            "configured range"
        )

    def _store(
        self, svc: dict[str, Any], checks: list[dict[str, Any]], replace_existing_checks: bool
    ) -> None:
        prepared = prepare_checks(svc, checks, self._node.name)
        old = self.services.get(svc["ID"])
        index = self._index.next
        svc["CreateIndex"] = old["CreateIndex"] if old else index
        svc["ModifyIndex"] = index
        topics = set(service_topics(svc)) | {"checks"}
        if old is not None:
            topics |= set(service_topics(old))
        added, removed = self._checks.put_service_checks(
            svc,
            prepared,
            replace=replace_existing_checks or old is None or bool(checks),
            index=index,
        )
        self.services[svc["ID"]] = svc
        self._index.bump(topics)
        self._checks.refresh_aliases()
        self._checks.runners_changed(added, removed)

    def deregister_service(self, service_id: str, authz: Authorizer) -> None:
        """`PUT /v1/agent/service/deregister/:id`, with the sidecar registered beside it."""
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
            removed = self._checks.drop_service_checks(sid)
            self._index.bump([*service_topics(gone), "checks"])
            self._checks.runners_changed(set(), removed)
        self._checks.refresh_aliases()

    # -- the agent's view ----------------------------------------------------------------

    def agent_service(self, service_id: str) -> dict[str, Any]:
        """The `AgentService` object of `/v1/agent/service/:id`, ContentHash included."""
        svc = self.services.get(service_id)
        if svc is None:
            raise NotFound(f"unknown service ID: {service_id}")
        return render.agent_service(svc, self._node.datacenter, with_hash=True)

    def agent_service_watch(self, service_id: str) -> Watch[str]:
        """What a hash-blocking `/v1/agent/service/:id` waits on (empty hash once gone)."""

        def current() -> str:
            try:
                return str(self.agent_service(service_id)["ContentHash"])
            except NotFound:
                return ""

        return Watch(("services",), current)

    def agent_services(self, authz: Authorizer) -> tuple[dict[str, dict[str, Any]], bool]:
        """`/v1/agent/services`: the services the token may read, and whether any were hidden."""
        out = {
            sid: render.agent_service(svc, self._node.datacenter, with_hash=False)
            for sid, svc in self.services.items()
            if authz.allowed("service", svc["Service"], "read")
        }
        return out, len(out) < len(self.services)

    # -- the catalog's and health's views ------------------------------------------------

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

    def services_watch(self) -> Watch[int]:
        """What a blocking `/v1/catalog/services` waits on: a change to any service."""
        return self._index.watch("services")

    def service_watch(self, name: str, *, connect: bool) -> Watch[int]:
        """What a health or catalog query of one service name blocks on."""
        # Per service name, so a watch on one service is not woken by changes to others. A
        # name never registered has index 1; its first registration moves it past that.
        return self._index.watch(f"connect:{name}" if connect else f"svc:{name}")

    def service_entry(self, svc: Mapping[str, Any]) -> dict[str, Any]:
        return render.service_entry(self._node, svc, self._checks.records.values())

    def health_entries(
        self,
        name: str,
        authz: Authorizer,
        *,
        connect: bool,
        passing: bool,
        tags: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        """`/v1/health/service/:name` and `/v1/health/connect/:name`."""
        if not authz.allowed("service", name, "read") or not authz.allowed(
            "node", self._node.name, "read"
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

    def catalog_entries(
        self, name: str, authz: Authorizer, *, connect: bool, tags: Iterable[str] = ()
    ) -> list[dict[str, Any]]:
        """`/v1/catalog/service/:name` and `/v1/catalog/connect/:name`."""
        if not authz.allowed("service", name, "read"):
            return []
        wanted = list(tags)
        return [
            render.catalog_entry(self._node, s)
            for s in self.services_named(name, connect=connect)
            if all(t in s["Tags"] for t in wanted)
        ]

    def service_tags(self, authz: Authorizer) -> dict[str, list[str]]:
        """`/v1/catalog/services`: every readable service name with its tags."""
        out: dict[str, list[str]] = {"consul": []}
        for svc in self.services.values():
            if authz.allowed("service", svc["Service"], "read"):
                tags = out.setdefault(svc["Service"], [])
                tags.extend(t for t in svc["Tags"] if t not in tags)
        return out

    # -- the legacy managed-proxy view ---------------------------------------------------

    def managed_proxy_config(
        self, proxy_id: str, authz: Authorizer, bind_address: str
    ) -> dict[str, Any]:
        """`GET /v1/agent/connect/proxy/:id` of Consul 1.2-1.5 (its `agent/agent_endpoint.go`).

        Raises:
            NotFound: no such connect-proxy, or its target service is gone.
            PermissionDenied: the token lacks service:write on the target service.
        """
        svc = self.services.get(proxy_id)
        if svc is None or svc.get("Kind") != CONNECT_PROXY:
            raise NotFound(f"unknown proxy service ID: {proxy_id}")
        target_id = svc["Proxy"].get("DestinationServiceID") or ""
        target = self.services.get(target_id)
        if target is None:
            raise NotFound(f"unknown target service ID: {target_id}")
        authz.require("service", target["Service"], "write")
        return render.managed_proxy(svc, target, bind_address)

    def managed_proxy_watch(self, proxy_id: str, bind_address: str) -> Watch[str]:
        """What a hash-blocking managed-proxy query waits on (empty hash once gone)."""
        unrestricted = Authorizer(enabled=False, default_allow=True)

        def current() -> str:
            try:
                config = self.managed_proxy_config(proxy_id, unrestricted, bind_address)
            except StateError:
                return ""
            return str(config["ContentHash"])

        return Watch(("services",), current)
