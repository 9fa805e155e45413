"""Intentions: the legacy `/v1/connect/intentions` API and the authorize decision.

As in Consul 1.9+, an intention is one source of a `service-intentions` config entry; this
table owns no records of its own. It reads and writes them through the config entries
table, and sees them as `IntentionView`s sorted by precedence.

Rule 1: every write goes through `ConfigEntries.put`/`delete`, so an intention change takes
an index and wakes the `intentions` and `config` watchers exactly as an entry change does.
Rule 2: the first matching intention in precedence order decides; with none, the agent's
`default_intention_policy`, else the ACL default.
Rule 3: authorize refuses an identity whose trust domain is not one of `trust_domains()`
(ours, and later our peers') before it looks at any intention, as Consul 1.2-1.3 did.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Index, Watch
from proxy.devagent.state.config_entries import (
    INTENTIONS_KIND,
    ConfigEntries,
    check_source,
    public,
    validate_name,
)
from proxy.devagent.state.records import BadRequest, NotFound, StateError, now_rfc3339
from proxy.errors import IdentityError
from proxy.identity import SpiffeIDService, parse_spiffe_id


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
    # The peer a source names (`Sources[].Peer`): it matches only clients from that peer's
    # trust domain; an empty peer matches only our own clients.
    peer: str = ""

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
        if self.peer:
            out["SourcePeer"] = self.peer
        return out


def _writable(entry: Mapping[str, Any]) -> dict[str, Any]:
    # An entry written back through ConfigEntries.put, which stamps the indexes afresh.
    return {k: v for k, v in public(entry).items() if k not in ("CreateIndex", "ModifyIndex")}


class Intentions:
    """The intentions held in `service-intentions` entries; see the module docstring."""

    def __init__(
        self,
        index: Index,
        entries: ConfigEntries,
        default_policy: str | None = None,
        *,
        trust_domains: Callable[[], Collection[str]],
        peer_for: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        """
        Args:
            trust_domains: the lower-case trust domains authorize accepts, read at each
                call (`ConnectCA.trust_domains`: our roots' and our peers').
            peer_for: the local peer name of a peer's trust domain (None: not a peer's).
        """
        if default_policy not in (None, "allow", "deny"):
            raise ValueError('default_intention_policy must be "allow" or "deny"')
        self._index = index
        self._entries = entries
        self._trust_domains = trust_domains
        self._peer_for = peer_for
        self.default_policy = default_policy

    # -- reading -------------------------------------------------------------------------

    def all(self) -> list[IntentionView]:
        """Every intention, highest precedence first."""
        out = []
        for (kind, name), entry in self._entries.entries.items():
            if kind != INTENTIONS_KIND:
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
                        peer=src.get("Peer") or "",
                    )
                )
        out.sort(key=lambda i: (-i.precedence, "default", i.source, "default", i.destination))
        return out

    def watch(self) -> Watch[int]:
        """What a blocking `GET /v1/connect/intentions` waits on."""
        return self._index.watch("intentions", fallback="services")

    def index(self) -> int:
        """The index of a single intention's rendering (exact match, by ID)."""
        return self._index.of("intentions")

    def readable(
        self, authz: Authorizer, intentions: Iterable[IntentionView] | None = None
    ) -> list[dict[str, Any]]:
        """The rendered `intentions` (default: all) whose destination the token may read."""
        chosen = self.all() if intentions is None else intentions
        return [i.to_api() for i in chosen if authz.allowed("intention", i.destination, "read")]

    def match(self, by: str, names: Iterable[str], authz: Authorizer) -> dict[str, Any]:
        """`GET /v1/connect/intentions/match`: per name, the readable intentions matching it.

        Args:
            by: "source" or "destination".
        """
        out = {}
        for name in names:
            if by == "destination":
                matches = self.matching(name)
            else:
                matches = [i for i in self.all() if i.source in (name, "*")]
            out[name] = self.readable(authz, matches)
        return out

    def matching(self, destination: str) -> list[IntentionView]:
        return [i for i in self.all() if i.destination in (destination, "*")]

    def find(self, intention_id: str) -> IntentionView:
        for ixn in self.all():
            if ixn.id and ixn.id == intention_id:
                return ixn
        raise NotFound("Intention not found")

    def exact(self, source: str, destination: str, authz: Authorizer) -> IntentionView:
        """`GET /v1/connect/intentions/exact`: the intention from `source` to `destination`."""
        authz.require("intention", destination, "read")
        for ixn in self.all():
            if ixn.source == source and ixn.destination == destination:
                return ixn
        raise NotFound("Intention not found")

    # -- writing -------------------------------------------------------------------------

    def create(
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
        validate_name("SourceName", src_name)
        validate_name("DestinationName", dst_name)
        authz.require("intention", dst_name, "write")
        entry = self._entries.entries.get((INTENTIONS_KIND, dst_name))
        sources = [dict(s) for s in (entry or {}).get("Sources") or []]
        existing = next((s for s in sources if s["Name"] == src_name), None)
        if existing is not None and not exact:
            found = next(i for i in self.all() if (i.source, i.destination) == (src_name, dst_name))
            raise StateError(f"duplicate intention found: {found.describe()}")
        new_id = "" if exact else str(uuid.uuid4())
        src = self._source(body, src_name, new_id, existing)
        if existing is not None:
            sources.remove(existing)
        check_source(src, dst_name)
        sources.append(src)
        new_entry = dict(entry or {"Kind": INTENTIONS_KIND, "Name": dst_name})
        new_entry["Sources"] = sources
        self._entries.put(_writable(new_entry), authz)
        return new_id

    @staticmethod
    def _source(
        body: Mapping[str, Any], name: str, new_id: str, existing: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        # The entry source for a legacy intention body; an update keeps the legacy ID,
        # metadata and creation time of the source it replaces.
        now = now_rfc3339()
        src: dict[str, Any] = {
            "Name": name,
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
            for key in ("LegacyID", "LegacyMeta", "LegacyCreateTime"):
                if key in existing:
                    src[key] = existing[key]
            if "LegacyID" in existing:
                src["LegacyUpdateTime"] = now
        return src

    def update(self, intention_id: str, body: Mapping[str, Any], authz: Authorizer) -> None:
        ixn = self.find(intention_id)
        self.delete(ixn.source, ixn.destination, authz)
        try:
            self.create(body, authz)
        finally:
            # Keep the ID stable across the update, as Consul does.
            entry = self._entries.entries.get(
                (INTENTIONS_KIND, body.get("DestinationName") or ixn.destination)
            )
            for src in (entry or {}).get("Sources") or []:
                if src["Name"] == (body.get("SourceName") or ixn.source) and src.get("LegacyID"):
                    src["LegacyID"] = intention_id

    def delete(self, source: str, destination: str, authz: Authorizer) -> None:
        authz.require("intention", destination, "write")
        entry = self._entries.entries.get((INTENTIONS_KIND, destination))
        if entry is None:
            raise NotFound("Intention not found")
        sources = [s for s in entry.get("Sources") or [] if s["Name"] != source]
        if len(sources) == len(entry.get("Sources") or []):
            raise NotFound("Intention not found")
        if sources:
            new_entry = _writable(entry)
            new_entry["Sources"] = sources
            self._entries.put(new_entry, authz)
        else:
            self._entries.delete(INTENTIONS_KIND, destination, authz)

    # -- deciding ------------------------------------------------------------------------

    def authorize(self, target: str, client_uri: str, authz: Authorizer) -> tuple[bool, str]:
        """`POST /v1/agent/connect/authorize` (Consul's `agent/connect_auth.go`).

        Consul's order: target, URI, service identity, ACL, trust domain, partition, then
        the intentions. An identity from a trust domain not in `trust_domains()` is a 200
        with `Authorized: false`, not an error.

        Raises:
            BadRequest: missing target or an unusable ClientCertURI.
            PermissionDenied: the token lacks service:write on the target.
            StateError: no trust domain at all (500, the CA is not bootstrapped).
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
        trusted = self._trust_domains()
        if not trusted:
            raise StateError("Connect CA not bootstrapped yet")
        if ident.host.lower() not in trusted:
            # The reason quotes the host as the client wrote it (Go's URL parser keeps case).
            return False, f"Identity from an external trust domain: {urlsplit(client_uri).netloc}"
        peer = self._peer_for(ident.host.lower()) or ""
        if ident.partition != "default":
            raise BadRequest(f'Mismatched partitions: "{ident.partition}" != "default"')
        return self.decision(ident.service, target, authz, peer=peer)

    def check(self, source: str, destination: str, authz: Authorizer) -> bool:
        """`GET /v1/connect/intentions/check`: would `source` be allowed to `destination`?"""
        authz.require("intention", destination, "read")
        allowed, _ = self.decision(source, destination, authz)
        return allowed

    def decision(
        self, source: str, destination: str, authz: Authorizer, *, peer: str = ""
    ) -> tuple[bool, str]:
        """The first matching intention in precedence order decides; else the default.

        A client from a peer (`peer`) matches only sources naming that peer.
        """
        for ixn in self.matching(destination):
            if ixn.source not in (source, "*") or ixn.peer != peer:
                continue
            if ixn.permissions:
                return False, f"Matched L7 intention: {ixn.describe()}"
            return ixn.action == "allow", f"Matched L4 intention: {ixn.describe()}"
        if self.default_policy is not None:
            return self.default_policy == "allow", "Default intention policy"
        return authz.intention_default_allow, "Default behavior configured by ACLs"
