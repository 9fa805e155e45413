"""The prepared queries table: static queries by ID or name, executed against the catalog.

Supported: `Service`, `OnlyPassing`, `Tags` (with `!` negation), `IgnoreCheckIDs` and
`Connect` (a bool, as Consul's `structs.ServiceQuery`). No templates, failover or `Near`
sorting: a `Template` is stored and rendered with Consul's fields, not applied.

Rule 1: writing a query needs query:write on its name; reading it, query:read; executing it
returns only the instances of a service the token may read.
Rule 2: queries only read the catalog and checks; executing one changes nothing.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Index
from proxy.devagent.state.catalog import Catalog
from proxy.devagent.state.records import CRITICAL, MAINTENANCE, WARNING, BadRequest, NotFound

_SERVICE_DEFAULTS: dict[str, Any] = {
    "Failover": {"NearestN": 0, "Datacenters": None},
    "OnlyPassing": False,
    "IgnoreCheckIDs": None,
    "Near": "",
    "Tags": None,
    "NodeMeta": None,
    "ServiceMeta": None,
    "Connect": False,
}


def _template(template: Mapping[str, Any] | None) -> dict[str, Any]:
    """Consul's `QueryTemplateOptions`: all three fields, whatever was sent."""
    t = template or {}
    return {
        "Type": t.get("Type") or "",
        "Regexp": t.get("Regexp") or "",
        "RemoveEmptyTags": bool(t.get("RemoveEmptyTags")),
    }


def _tags_match(wanted: list[str], tags: list[str]) -> bool:
    return all((t[1:] not in tags) if t.startswith("!") else (t in tags) for t in wanted)


class Queries:
    """Prepared queries by ID; see the module docstring."""

    def __init__(self, index: Index, catalog: Catalog, datacenter: str) -> None:
        self._index = index
        self._catalog = catalog
        self._datacenter = datacenter
        self.queries: dict[str, dict[str, Any]] = {}

    def put(self, body: Mapping[str, Any], authz: Authorizer, query_id: str | None = None) -> str:
        """`POST /v1/query` (a new ID) or `PUT /v1/query/:id`. Returns the query's ID."""
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
        index = self._index.next
        old = self.queries.get(qid)
        svc_q = dict(body.get("Service") or {})
        for key, default in _SERVICE_DEFAULTS.items():
            if svc_q.get(key) is None:
                svc_q[key] = dict(default) if isinstance(default, dict) else default
        self.queries[qid] = {
            "ID": qid,
            "Name": name,
            "Session": body.get("Session") or "",
            "Token": body.get("Token") or "",
            "Template": _template(body.get("Template")),
            "Service": svc_q,
            "DNS": {"TTL": (body.get("DNS") or {}).get("TTL") or ""},
            "CreateIndex": old["CreateIndex"] if old else index,
            "ModifyIndex": index,
        }
        self._index.bump(("queries",))
        return qid

    def find(self, id_or_name: str) -> dict[str, Any]:
        if id_or_name in self.queries:
            return self.queries[id_or_name]
        for q in self.queries.values():
            if q["Name"] and q["Name"] == id_or_name:
                return q
        raise NotFound("Query not found")

    def get(self, id_or_name: str, authz: Authorizer) -> dict[str, Any]:
        """`GET /v1/query/:id`."""
        q = self.find(id_or_name)
        authz.require("query", q["Name"], "read")
        return q

    def readable(self, authz: Authorizer) -> list[dict[str, Any]]:
        """`GET /v1/query`: the queries the token may read."""
        return [q for q in self.queries.values() if authz.allowed("query", q["Name"], "read")]

    def index(self) -> int:
        return self._index.of("queries")

    def execute_index(self) -> int:
        """The index of an execution's answer: it reads services, checks and queries."""
        return self._index.of("services", "checks", "queries")

    def delete(self, query_id: str, authz: Authorizer) -> None:
        q = self.queries.get(query_id)
        if q is None:
            raise NotFound(f"Cannot delete non-existent prepared query: '{query_id}'")
        authz.require("query", q["Name"], "write")
        del self.queries[query_id]
        self._index.bump(("queries",))

    def execute(self, id_or_name: str, authz: Authorizer, *, connect: bool) -> dict[str, Any]:
        """`GET /v1/query/:id/execute`: the healthy instances, shuffled as Consul does."""
        q = self.find(id_or_name)
        sq = q["Service"]
        name = sq["Service"]
        connect = connect or bool(sq.get("Connect"))
        entries = []
        if authz.allowed("service", name, "read"):
            ignore = set(sq.get("IgnoreCheckIDs") or [])
            bad = {CRITICAL, MAINTENANCE} | ({WARNING} if sq.get("OnlyPassing") else set())
            for svc in self._catalog.services_named(name, connect=connect):
                if not _tags_match(sq.get("Tags") or [], svc["Tags"]):
                    continue
                entry = self._catalog.service_entry(svc)
                statuses = [c["Status"] for c in entry["Checks"] if c["CheckID"] not in ignore]
                if any(s in bad for s in statuses):
                    continue
                entries.append(entry)
        random.shuffle(entries)
        return {
            "Service": name,
            "Nodes": entries,
            "DNS": q["DNS"],
            "Datacenter": self._datacenter,
            "Failovers": 0,
        }
