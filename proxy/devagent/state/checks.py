"""The checks table: node and service health checks, their results, and alias checks.

A check record is Consul's `HealthCheck` shape; beside it the table keeps the `CheckSpec`
that says how the agent runs it. Results arrive through `update_check`, from the agent's
runners or a TTL update, and every change of a status takes an index.

Rule 1: nothing here runs a check or a timer. The agent's runners subscribe to `listeners`
(which checks were added or removed) and report back through `update_check`.
Rule 2: the services are the catalog's; this table only reads them (a check names its
service by ID, an alias check names the service it mirrors).
Rule 3: tables that depend on the health of checks (sessions) subscribe to
`health_listeners`, called after any check is added, removed or changes status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Index
from proxy.devagent.state.records import (
    CRITICAL,
    PASSING,
    STATUS_RANK,
    BadRequest,
    Node,
    NotFound,
    StateError,
    service_topics,
    worst_status,
)
from proxy.devagent.state.registration import CheckSpec, prepare_check
from proxy.devagent.state.render import without_indexes


def _unknown_check(check_id: str) -> NotFound:
    return NotFound(
        f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
    )


class Checks:
    """Check records by CheckID, with their specs; see the module docstring."""

    def __init__(self, index: Index, node: Node, services: Mapping[str, Mapping[str, Any]]) -> None:
        self._index = index
        self._node = node
        self._services = services
        self.records: dict[str, dict[str, Any]] = {}
        self.specs: dict[str, CheckSpec] = {}
        # The agent subscribes here to start and stop check runners: (added, removed) IDs.
        self.listeners: list[Callable[[set[str], set[str]], None]] = []
        # Called with no arguments after checks were added, removed or changed status.
        self.health_listeners: list[Callable[[], None]] = []

    # -- writes that the catalog makes with a service ----------------------------------

    def put_service_checks(
        self,
        svc: Mapping[str, Any],
        prepared: list[tuple[dict[str, Any], CheckSpec]],
        *,
        replace: bool,
        index: int,
    ) -> tuple[set[str], set[str]]:
        """Store `svc`'s prepared checks at `index`; the catalog takes the index for both.

        A check whose definition is unchanged keeps its status, output and CreateIndex.

        Args:
            replace: also remove `svc`'s checks that are not in `prepared`.

        Returns:
            The IDs of the checks added (or redefined) and removed, for `runners_changed`.
        """
        removed: set[str] = set()
        if replace:
            new_ids = {record["CheckID"] for record, _ in prepared}
            removed = {
                cid
                for cid, c in self.records.items()
                if c["ServiceID"] == svc["ID"] and cid not in new_ids
            }
        for cid in removed:
            del self.records[cid]
            self.specs.pop(cid, None)
        added: set[str] = set()
        for record, spec in prepared:
            existing = self.records.get(record["CheckID"])
            if existing is not None and existing["Definition"] == record["Definition"]:
                record["Status"], record["Output"] = existing["Status"], existing["Output"]
                record["CreateIndex"] = existing["CreateIndex"]
            else:
                record["CreateIndex"] = index
                added.add(record["CheckID"])
            record["ModifyIndex"] = index
            self.records[record["CheckID"]] = record
            self.specs[record["CheckID"]] = spec
        return added, removed

    def drop_service_checks(self, service_id: str) -> set[str]:
        """Remove every check of `service_id` (it is being deregistered). Returns their IDs."""
        removed = {cid for cid, c in self.records.items() if c["ServiceID"] == service_id}
        for cid in removed:
            del self.records[cid]
            self.specs.pop(cid, None)
        return removed

    def runners_changed(self, added: set[str], removed: set[str]) -> None:
        """Tell the agent's runners which checks to start (or restart) and stop."""
        for listener in self.listeners:
            listener(added, removed)
        self._health_changed()

    def _health_changed(self) -> None:
        for listener in list(self.health_listeners):
            listener()

    # -- the check endpoints -----------------------------------------------------------

    def register_check(self, check: Mapping[str, Any], authz: Authorizer) -> None:
        """`PUT /v1/agent/check/register`: a node check, or a check on a local service."""
        name = check.get("Name") or ""
        if not name:
            raise BadRequest("Missing check name")
        service_id = check.get("ServiceID") or ""
        check_id = check.get("CheckID") or name
        record, spec = prepare_check(check, check_id, name, self._node.name)
        topics = ["checks"]
        if service_id:
            svc = self._services.get(service_id)
            if svc is None:
                raise NotFound(f'ServiceID "{service_id}" does not exist')
            authz.require("service", svc["Service"], "write")
            record.update(
                ServiceID=svc["ID"], ServiceName=svc["Service"], ServiceTags=list(svc["Tags"])
            )
            topics += service_topics(svc)
        else:
            authz.require("node", self._node.name, "write")
            topics.append("nodes")
        index = self._index.next
        old = self.records.get(check_id)
        if old is not None and not check.get("Status"):
            # Consul keeps a re-registered check's last result unless a status is given.
            record["Status"], record["Output"] = old["Status"], old["Output"]
        record["CreateIndex"] = old["CreateIndex"] if old else index
        record["ModifyIndex"] = index
        self.records[check_id] = record
        self.specs[check_id] = spec
        self._index.bump(topics)
        self.refresh_aliases()
        self.runners_changed({check_id}, set())

    def deregister_check(self, check_id: str, authz: Authorizer) -> None:
        check = self.records.get(check_id)
        if check is None:
            raise _unknown_check(check_id)
        self._require_write(check, authz)
        del self.records[check_id]
        self.specs.pop(check_id, None)
        self._index.bump(self._topics(check))
        self.refresh_aliases()
        self.runners_changed(set(), {check_id})

    def ttl_update(self, check_id: str, status: str, output: str, authz: Authorizer) -> None:
        """`PUT /v1/agent/check/pass|warn|fail/:id` and `/v1/agent/check/update/:id`."""
        check = self.records.get(check_id)
        if check is None:
            raise _unknown_check(check_id)
        self._require_write(check, authz)
        if self.specs[check_id].kind != "ttl":
            raise StateError(f'CheckID "{check_id}" does not have associated TTL')
        self.update_check(check_id, status, output)
        self.runners_changed({check_id}, set())  # re-arms the TTL timer

    def update_check(self, check_id: str, status: str, output: str) -> bool:
        """Record a check result. Returns whether anything changed (and indexes moved)."""
        check = self.records.get(check_id)
        if check is None:
            return False
        if status not in STATUS_RANK:
            raise BadRequest(f'Invalid check status "{status}"')
        if check["Status"] == status and check["Output"] == output:
            return False
        check["Status"], check["Output"] = status, output
        check["ModifyIndex"] = self._index.bump(self._topics(check))
        self.refresh_aliases()
        self._health_changed()
        return True

    def agent_checks(self, authz: Authorizer) -> dict[str, dict[str, Any]]:
        """`GET /v1/agent/checks`: the checks the token may read, by CheckID."""
        out = {}
        for cid, check in self.records.items():
            name = check["ServiceName"]
            if (name and authz.allowed("service", name, "read")) or (
                not name and authz.allowed("node", self._node.name, "read")
            ):
                out[cid] = without_indexes(check)
        return out

    def _require_write(self, check: Mapping[str, Any], authz: Authorizer) -> None:
        if check["ServiceName"]:
            authz.require("service", check["ServiceName"], "write")
        else:
            authz.require("node", self._node.name, "write")

    def _topics(self, check: Mapping[str, Any]) -> list[str]:
        topics = ["checks"]
        svc = self._services.get(check["ServiceID"]) if check["ServiceID"] else None
        if svc is not None:
            topics += service_topics(svc)
        else:
            topics.append("nodes")
        return topics

    # -- alias checks ------------------------------------------------------------------

    def refresh_aliases(self) -> None:
        """Bring every alias check up to date after a change of any check or service."""
        # Alias checks mirror the worst status of the aliased service's checks and of the
        # node's own checks, as Consul's CheckAlias does. Two passes settle an alias of an
        # alias; longer chains converge on later changes.
        for _ in range(2):
            changed = False
            for cid, spec in self.specs.items():
                if spec.kind != "alias" or not spec.alias_service:
                    continue
                status, output = self._alias_result(cid, spec.alias_service)
                check = self.records[cid]
                if check["Status"] != status or check["Output"] != output:
                    check["Status"], check["Output"] = status, output
                    check["ModifyIndex"] = self._index.bump(self._topics(check))
                    changed = True
            if not changed:
                return
            self._health_changed()

    def _alias_result(self, check_id: str, service_id: str) -> tuple[str, str]:
        if service_id not in self._services:
            return CRITICAL, f'Service "{service_id}" could not be found'
        aliased = [
            c
            for c in self.records.values()
            if c["CheckID"] != check_id and c["ServiceID"] in (service_id, "")
        ]
        status = worst_status(c["Status"] for c in aliased)
        failing = next((c for c in aliased if c["Status"] == status), None)
        if not aliased:
            return status, "No checks found."
        if status == PASSING or failing is None:
            return status, "All checks passing."
        return status, f'Aliased check "{failing["Name"]}" failing: {failing["Output"]}'
