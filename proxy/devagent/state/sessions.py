"""The sessions table: Consul's sessions, their checks, TTLs and invalidation.

A session is Consul's `structs.Session` (`ID`, `Name`, `Node`, `LockDelay` in ns,
`Behavior`, `TTL`, `NodeChecks`, `ServiceChecks`, the deprecated `Checks`, indexes). Create
follows Consul's HTTP defaults (the agent's node, `serfHealth`, a 15 s lock delay,
`release`) and its server's validation, in its order and with its texts. A session is
invalidated when destroyed, when one of its checks is removed or goes critical (checked on
every change of the checks table), or when its TTL passes twice without a renew.
Invalidation releases or deletes the keys it holds (the KV table's `drop_session`).

Rule 1: no timers here. The agent subscribes to `listeners`, called `(session_id, ttl)`
with the TTL in seconds to (re)arm its timer after a create or renew, or `None` to drop it
after an invalidation; when a timer fires the agent calls `invalidate`.
Rule 2: ACLs: create, renew and destroy need session:write on the session's node; reads
are filtered by session:read on the node.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Index, Watch
from proxy.devagent.state.checks import Checks
from proxy.devagent.state.kv import KV
from proxy.devagent.state.records import CRITICAL, BadRequest, Node, StateError
from proxy.goflags import format_duration, parse_duration

SERF_CHECK = "serfHealth"
RELEASE, DELETE = "release", "delete"
DEFAULT_LOCK_DELAY_NS = 15 * 10**9
# Consul's `structs.SessionTTLMax` and `SessionTTLMultiplier`.
TTL_MAX = 24 * 3600.0
TTL_MULTIPLIER = 2
# A LockDelay below this many nanoseconds is taken as seconds (Consul's
# `lockDelayMinThreshold`: users send `15` meaning 15 s).
_LOCK_DELAY_THRESHOLD = 1000
TOPIC = "sessions"

SessionListener = Callable[[str, float | None], None]


@dataclass(slots=True)
class Session:
    """One session (Consul's `structs.Session`)."""

    id: str
    name: str
    node: str
    lock_delay_ns: int
    behavior: str
    ttl: str
    node_checks: list[str] | None
    service_checks: list[dict[str, str]] | None
    checks: list[str] | None
    create_index: int = 0
    modify_index: int = 0

    def check_ids(self) -> list[str]:
        """Every check the session depends on (Consul's `Session.CheckIDs`)."""
        ids = [*(self.checks or []), *(self.node_checks or [])]
        return ids + [c.get("ID", "") for c in self.service_checks or []]

    @property
    def lock_delay(self) -> float:
        return self.lock_delay_ns / 1e9

    def ttl_seconds(self) -> float:
        """The TTL in seconds; 0 when the session has none."""
        return parse_duration(self.ttl) if self.ttl else 0.0

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": self.lock_delay_ns,
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": self.node_checks,
            "ServiceChecks": self.service_checks,
        }
        if self.checks:
            out["Checks"] = self.checks
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out


def lock_delay_ns(value: object) -> int:
    """A LockDelay as Consul's `Session.UnmarshalJSON` reads it: a Go duration string or a
    number of nanoseconds, either taken as seconds when below 1000 ns.

    Raises:
        BadRequest: a string that is not a Go duration ("Request decode failed: ...").
    """
    if isinstance(value, str):
        try:
            ns = round(parse_duration(value) * 1e9)
        except ValueError as exc:
            raise BadRequest(f"Request decode failed: {exc}") from exc
    elif isinstance(value, int | float) and not isinstance(value, bool):
        ns = int(value)
    else:
        ns = 0  # Go's switch matches neither case: the duration stays zero
    return ns * 10**9 if ns < _LOCK_DELAY_THRESHOLD else ns


class Sessions:
    """Sessions by ID; see the module docstring."""

    def __init__(
        self,
        index: Index,
        node: Node,
        checks: Checks,
        kv: KV,
        records: dict[str, Session],
        *,
        ttl_min: float = 10.0,
    ) -> None:
        self._index = index
        self._node = node
        self._checks = checks
        self._kv = kv
        self.records = records
        self.ttl_min = ttl_min
        self.listeners: list[SessionListener] = []
        checks.health_listeners.append(self.checks_changed)

    # -- writes --------------------------------------------------------------------------

    def create(self, body: Mapping[str, Any] | None, authz: Authorizer) -> str:
        """`PUT /v1/session/create` with a decoded body (None when the request had none).

        Returns:
            The new session's ID.

        Raises:
            PermissionDenied: the token lacks session:write on the node.
            BadRequest: a LockDelay that is not a duration.
            StateError: Consul's server-side refusals (500): no node, a bad Behavior or TTL,
                a missing or critical check.
        """
        sess = Session(
            id="",
            name="",
            node=self._node.name,
            lock_delay_ns=DEFAULT_LOCK_DELAY_NS,
            behavior=RELEASE,
            ttl="",
            node_checks=[SERF_CHECK],
            service_checks=None,
            checks=[SERF_CHECK],
        )
        body = body or {}
        for field_name, attr in (("Name", "name"), ("Node", "node"), ("Behavior", "behavior")):
            if body.get(field_name) is not None:
                setattr(sess, attr, body[field_name])
        if body.get("TTL") is not None:
            sess.ttl = body["TTL"]
        if body.get("LockDelay") is not None:
            sess.lock_delay_ns = lock_delay_ns(body["LockDelay"])
        if "NodeChecks" in body:
            sess.node_checks = body["NodeChecks"]
        if "ServiceChecks" in body:
            given = body["ServiceChecks"]
            sess.service_checks = (
                None
                if given is None
                else [
                    {"ID": c.get("ID") or "", "Namespace": c.get("Namespace") or ""} for c in given
                ]
            )
        if "Checks" in body:
            sess.checks = body["Checks"]
        _fixup_checks(sess)
        if not sess.node:
            raise StateError("Must provide Node")
        authz.require("session", sess.node, "write")
        if sess.behavior not in (RELEASE, DELETE):
            if sess.behavior:
                raise StateError(f"Invalid Behavior setting '{sess.behavior}'")
            sess.behavior = RELEASE
        self._check_ttl(sess.ttl)
        if sess.node.lower() != self._node.name.lower():
            raise StateError("Missing node registration")
        for check_id in sess.check_ids():
            status = self._check_status(check_id)
            if status is None:
                raise StateError(f"Missing check '{check_id}' registration")
            if status == CRITICAL:
                raise StateError(f"Check '{check_id}' is in {status} state")
        sess.id = str(uuid.uuid4())
        while sess.id in self.records:  # bounded: a collision of random UUIDs
            sess.id = str(uuid.uuid4())
        sess.create_index = sess.modify_index = self._index.next
        self.records[sess.id] = sess
        self._index.bump((TOPIC,))
        self._notify(sess.id, sess.ttl_seconds() or None)
        return sess.id

    def _check_ttl(self, ttl: str) -> None:
        if not ttl:
            return
        try:
            seconds = parse_duration(ttl)
        except ValueError as exc:
            raise StateError(f"Session TTL '{ttl}' invalid: {exc}") from exc
        if seconds != 0 and (seconds < self.ttl_min or seconds > TTL_MAX):
            raise StateError(
                f"Invalid Session TTL '{round(seconds * 1e9)}', must be between "
                f"[{format_duration(round(self.ttl_min * 1e9))}="
                f"{format_duration(round(TTL_MAX * 1e9))}]"
            )

    def _check_status(self, check_id: str) -> str | None:
        if check_id == SERF_CHECK:
            return "passing"  # the agent is alive: its serf check always passes
        record = self._checks.records.get(check_id)
        return record["Status"] if record is not None else None

    def destroy(self, session_id: str, authz: Authorizer) -> None:
        """`PUT /v1/session/destroy/:id`; destroying an unknown session is not an error.

        Raises:
            PermissionDenied: the token lacks session:write on the session's node.
        """
        sess = self.records.get(session_id)
        if sess is None:
            return
        authz.require("session", sess.node, "write")
        self.invalidate(session_id)

    def renew(self, session_id: str, authz: Authorizer) -> list[dict[str, Any]] | None:
        """`PUT /v1/session/renew/:id`: restart the TTL; None for an unknown session.

        Raises:
            PermissionDenied: the token lacks session:write on the session's node.
        """
        sess = self.records.get(session_id)
        if sess is None:
            return None
        authz.require("session", sess.node, "write")
        self._notify(session_id, sess.ttl_seconds() or None)
        return [sess.to_api()]

    def invalidate(self, session_id: str) -> bool:
        """Remove a session, releasing or deleting its keys. Returns whether it existed."""
        sess = self.records.pop(session_id, None)
        if sess is None:
            return False
        index = self._index.next
        held = self._kv.drop_session(session_id, sess.behavior, sess.lock_delay, index)
        self._index.bump((TOPIC, "kv") if held else (TOPIC,))
        self._notify(session_id, None)
        return True

    def checks_changed(self) -> None:
        """Invalidate the sessions whose checks are gone or critical (Consul does so when
        a check is deregistered or its status becomes critical)."""
        for sess in list(self.records.values()):
            if any(self._check_status(c) in (None, CRITICAL) for c in sess.check_ids()):
                self.invalidate(sess.id)

    def _notify(self, session_id: str, ttl: float | None) -> None:
        for listener in list(self.listeners):
            listener(session_id, ttl)

    # -- reads ---------------------------------------------------------------------------

    def get(self, session_id: str) -> Session | None:
        return self.records.get(session_id)

    def info(self, session_id: str, authz: Authorizer) -> tuple[list[dict[str, Any]], bool]:
        """`GET /v1/session/info/:id`: `([session] or [], filtered by ACLs)`."""
        sess = self.records.get(session_id)
        return self._readable([sess] if sess is not None else [], authz)

    def all_sessions(self, authz: Authorizer) -> tuple[list[dict[str, Any]], bool]:
        """`GET /v1/session/list`: every session the token may read, by ID."""
        return self._readable(sorted(self.records.values(), key=lambda s: s.id), authz)

    def node_sessions(self, node: str, authz: Authorizer) -> tuple[list[dict[str, Any]], bool]:
        """`GET /v1/session/node/:node`."""
        mine = [s for s in self.records.values() if s.node.lower() == node.lower()]
        return self._readable(sorted(mine, key=lambda s: s.id), authz)

    @staticmethod
    def _readable(sessions: list[Session], authz: Authorizer) -> tuple[list[dict[str, Any]], bool]:
        readable = [s for s in sessions if authz.allowed("session", s.node, "read")]
        return [s.to_api() for s in readable], len(readable) != len(sessions)

    def index(self) -> int:
        return self._index.of(TOPIC)

    def watch(self) -> Watch[int]:
        return self._index.watch(TOPIC)


def _fixup_checks(sess: Session) -> None:
    # Consul's `fixupEmptySessionChecks`: before 1.7 an empty `Checks` meant "no checks",
    # and the default `serfHealth` now lives in `NodeChecks`.
    if not sess.checks:
        sess.node_checks = []
        return
    if sess.checks == [SERF_CHECK]:
        sess.checks = None
        return
    if not sess.node_checks:
        sess.checks = None
