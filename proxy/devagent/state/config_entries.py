"""The config entries table, with the validation of `service-intentions` entries.

Entries are stored by (Kind, Name) as given; only `service-intentions` is understood (its
sources are validated and given a precedence), because intentions are stored as sources of
those entries, as in Consul 1.9+. Other kinds are kept and served back unchanged.

Rule 1: writing a `service-intentions` entry needs intention:write on its name; any other
kind needs operator:write.
Rule 2: fields starting with `_` are the table's own bookkeeping and are never rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Index
from proxy.devagent.state.records import BadRequest, NotFound, now_rfc3339

INTENTIONS_KIND = "service-intentions"
EXPORTED_KIND = "exported-services"


def precedence(source: str, destination: str) -> int:
    """Intention precedence with namespaces fixed to `default` (exact names beat `*`)."""
    top = 9 if destination != "*" else 6
    return top - (0 if source != "*" else 1)


def validate_name(field_name: str, value: str) -> None:
    if value != "*" and "*" in value:
        raise BadRequest(f"{field_name}: wildcard character '*' cannot be used with partial values")


def check_source(src: dict[str, Any], destination: str) -> None:
    """Validate one source of a `service-intentions` entry; fill its Type and Precedence."""
    validate_name("SourceName", src.get("Name") or "")
    if not src.get("Name"):
        raise BadRequest("Sources[].Name is required")
    perms = src.get("Permissions") or []
    action = src.get("Action") or ""
    if perms and action:
        raise BadRequest(
            f'Sources[].Action must be omitted if Permissions are specified for "{src["Name"]}"'
        )
    if not perms and action not in ("allow", "deny"):
        raise BadRequest(f"Sources[].Action must be set to 'allow' or 'deny' for \"{src['Name']}\"")
    if (src.get("Type") or "consul") != "consul":
        raise BadRequest(f"Sources[].Type must be set to 'consul' for \"{src['Name']}\"")
    peer = src.get("Peer") or ""
    if not isinstance(peer, str):
        raise BadRequest(f'Sources[].Peer must be a string for "{src["Name"]}"')
    if peer and (src.get("Partition") or "") not in ("", "default"):
        raise BadRequest("Sources[].Peer cannot be set with Sources[].Partition")
    src["Type"] = "consul"
    src["Precedence"] = precedence(src["Name"], destination)


def check_exported(entry: dict[str, Any]) -> None:
    """Validate an `exported-services` entry as Consul's `ExportedServicesConfigEntry`.

    Consumers name a `Peer` (Consul also reads `PeerName`, stored here as `Peer`); the dev
    agent has one partition, so a `Partition` consumer or a `SamenessGroup` is refused.
    """
    if entry.get("Name") != "default":
        raise BadRequest('exported-services Name must be "default"')
    services = entry.get("Services") or []
    if not isinstance(services, list):
        raise BadRequest("Services must be a list")
    out = []
    for i, svc in enumerate(services):
        if not isinstance(svc, dict):
            raise BadRequest(f"Services[{i}] must be an object")
        svc = dict(svc)
        name = svc.get("Name") or ""
        if not name:
            raise BadRequest(f"Services[{i}]: service name cannot be empty")
        if name != "*" and "*" in name:
            raise BadRequest(
                f"Services[{i}]: wildcard character '*' cannot be used with partial values"
            )
        if (svc.get("Namespace") or "default") not in ("default", "*"):
            raise BadRequest(f"Services[{i}]: namespaces are a Consul Enterprise feature")
        consumers = svc.get("Consumers") or []
        if not isinstance(consumers, list) or not consumers:
            raise BadRequest(f"Services[{i}]: must have at least one consumer")
        fixed = []
        for j, consumer in enumerate(consumers):
            where = f"Services[{i}].Consumers[{j}]"
            if not isinstance(consumer, dict):
                raise BadRequest(f"{where} must be an object")
            peer = consumer.get("Peer") or consumer.get("PeerName") or ""
            partition = consumer.get("Partition") or ""
            group = consumer.get("SamenessGroup") or ""
            if sum(1 for v in (peer, partition, group) if v) > 1:
                raise BadRequest(
                    f"{where}: must define at most one of Peer, Partition, or SamenessGroup"
                )
            if not (peer or partition or group):
                raise BadRequest(
                    f"{where}: must define at least one of Peer, Partition, or SamenessGroup"
                )
            if peer == "*":
                raise BadRequest(f"{where}: exporting to all peers (wildcard) is not supported")
            if not peer:
                raise BadRequest(
                    f"{where}: the dev agent exports to peers only (one partition, no "
                    "sameness groups)"
                )
            fixed.append({"Peer": peer})
        svc["Namespace"] = svc.get("Namespace") or "default"
        svc["Consumers"] = fixed
        out.append(svc)
    entry["Services"] = out


def public(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry as it is rendered and written back: without the table's `_` fields."""
    return {k: v for k, v in entry.items() if not k.startswith("_")}


class ConfigEntries:
    """Config entries by (Kind, Name); see the module docstring."""

    def __init__(self, index: Index) -> None:
        self._index = index
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}

    def put(self, entry: Mapping[str, Any], authz: Authorizer, *, cas: int | None = None) -> bool:
        """`PUT /v1/config` and `config_entries.bootstrap`. service-intentions are validated.

        With `cas` (`?cas=`), a check-and-set as Consul's `EnsureConfigEntryCAS`: 0 writes
        only a new entry, N only over an entry whose ModifyIndex is N. Returns whether the
        entry was written (False changes nothing).
        """
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
        if kind == INTENTIONS_KIND:
            validate_name("Name", name)
            authz.require("intention", name, "write")
            sources = [dict(s) for s in stored.get("Sources") or []]
            seen = set()
            for src in sources:
                check_source(src, name)
                key = (src["Name"], src.get("Peer") or "")
                if key in seen:
                    raise BadRequest(f'Sources[].Name "{src["Name"]}" is duplicated')
                seen.add(key)
            stored["Sources"] = sources
        else:
            if kind == EXPORTED_KIND:
                check_exported(stored)
            authz.require("operator", "", "write")
        old = self.entries.get((kind, name))
        if cas is not None and cas != (old["ModifyIndex"] if old else 0):
            return False
        index = self._index.next
        now = now_rfc3339()
        stored["CreateIndex"] = old["CreateIndex"] if old else index
        stored["ModifyIndex"] = index
        stored["_created"] = old["_created"] if old else now
        stored["_updated"] = now
        self.entries[(kind, name)] = stored
        self._index.bump(("config", f"config:{kind}", "intentions"))
        return True

    def delete(self, kind: str, name: str, authz: Authorizer, *, cas: int | None = None) -> bool:
        """`DELETE /v1/config/:kind/:name`; deleting what is not there is not an error.

        With `cas`, only an entry whose ModifyIndex is `cas` is deleted (Consul's
        `DeleteConfigEntryCAS`). Returns whether an entry was deleted.
        """
        if kind == INTENTIONS_KIND:
            authz.require("intention", name, "write")
        else:
            authz.require("operator", "", "write")
        old = self.entries.get((kind, name))
        if old is None or (cas is not None and old["ModifyIndex"] != cas):
            return False
        del self.entries[(kind, name)]
        self._index.bump(("config", f"config:{kind}", "intentions"))
        return True

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """`GET /v1/config/:kind/:name`."""
        entry = self.entries.get((kind, name))
        if entry is None:
            raise NotFound(f"Config entry not found for {kind!r} / {name!r}")
        return public(entry)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """`GET /v1/config/:kind`: the entries of one kind, sorted by name."""
        return [public(self.entries[key]) for key in sorted(self.entries) if key[0] == kind]

    def kind_index(self, kind: str) -> int:
        return self._index.of(f"config:{kind}", fallback="services")
