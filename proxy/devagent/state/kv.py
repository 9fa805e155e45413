"""The KV table: Consul's key/value store, its check-and-set writes and session locks.

An entry is Consul's `DirEntry` (`LockIndex`, `Key`, `Flags`, `Value`, `Session`,
`CreateIndex`, `ModifyIndex`). Writes follow `agent/consul/state/kvs.go`: a plain set keeps
the entry's lock holder; `cas` 0 means "only if absent"; `acquire` takes the lock for a
live session unless another holds it (the holder acquiring again changes nothing but the
value, a new holder increments `LockIndex`), and is refused while the key's lock delay
runs; `release` only by the holder. A delete leaves a tombstone so the index of a prefix
never goes back when its last key goes.

Rule 1: every KV change takes one index and wakes the `kv` topic; the index a query
answers with is computed here (the key's `ModifyIndex`, or the highest of a prefix's
entries and tombstones, else the table's), as Consul's state store does.
Rule 2: the sessions are the sessions table's; this table only reads them (a lock names a
session). Invalidating a session releases or deletes its keys through `drop_session`.
Rule 3: ACLs: reads need key:read (lists are filtered), writes key:write, a recursive
delete key:write on the whole prefix (Consul's `KeyWritePrefix`).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Index, Watch
from proxy.devagent.state.records import StateError

TOPIC = "kv"
# Consul's `limits.kv_max_value_size` default.
MAX_VALUE_SIZE = 512 * 1024
# Consul's `structs.MaxLockDelay`: a session's lock delay is capped at one minute.
MAX_LOCK_DELAY = 60.0
# Tombstones kept at most (Consul reaps them after `tombstone_ttl`); the oldest go first.
MAX_TOMBSTONES = 10_000


@dataclass(slots=True)
class Entry:
    """One stored key (Consul's `DirEntry`)."""

    key: str
    value: bytes | None
    flags: int = 0
    lock_index: int = 0
    session: str = ""
    create_index: int = 0
    modify_index: int = 0

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode() if self.value else None,
        }
        if self.session:
            out["Session"] = self.session
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out


class KV:
    """Entries by key, tombstones and lock delays; see the module docstring."""

    def __init__(self, index: Index, sessions: Mapping[str, Any]) -> None:
        self._index = index
        self._sessions = sessions
        self.entries: dict[str, Entry] = {}
        self._tombstones: dict[str, int] = {}
        # Key -> monotonic time before which no session may acquire it.
        self._lock_delays: dict[str, float] = {}
        self._table_index = 0

    # -- reads ---------------------------------------------------------------------------

    def get(self, key: str, authz: Authorizer) -> Entry | None:
        """The entry at `key`, or None.

        Raises:
            PermissionDenied: the token lacks key:read on `key`.
        """
        authz.require("key", key, "read")
        return self.entries.get(key)

    def list_prefix(self, prefix: str, authz: Authorizer) -> list[Entry]:
        """The entries under `prefix` the token may read, sorted by key."""
        return [
            e
            for k, e in sorted(self.entries.items())
            if k.startswith(prefix) and authz.allowed("key", k, "read")
        ]

    def keys(self, prefix: str, separator: str, authz: Authorizer) -> list[str]:
        """The keys under `prefix`; with `separator`, each cut after its first one past the
        prefix and listed once (Consul's `?keys&separator=`)."""
        out: list[str] = []
        seen: set[str] = set()
        for entry in self.list_prefix(prefix, authz):
            key = entry.key
            if separator:
                cut = key.find(separator, len(prefix))
                if cut >= 0:
                    key = key[: cut + len(separator)]
                    if key in seen:
                        continue
                    seen.add(key)
            out.append(key)
        return out

    def key_index(self, key: str) -> int:
        """The index a read of `key` answers with: its ModifyIndex, else the table's."""
        entry = self.entries.get(key)
        return entry.modify_index if entry is not None else max(self._table_index, 1)

    def prefix_index(self, prefix: str) -> int:
        """The index a list of `prefix` answers with (Consul's `kvsListTxn`)."""
        if not prefix:
            return max(self._table_index, 1)
        found = max(
            (e.modify_index for k, e in self.entries.items() if k.startswith(prefix)), default=0
        )
        found = max(
            found, max((i for k, i in self._tombstones.items() if k.startswith(prefix)), default=0)
        )
        return found or max(self._table_index, 1)

    def key_watch(self, key: str) -> Watch[int]:
        return Watch((TOPIC,), lambda: self.key_index(key))

    def prefix_watch(self, prefix: str) -> Watch[int]:
        return Watch((TOPIC,), lambda: self.prefix_index(prefix))

    # -- writes --------------------------------------------------------------------------

    def put(
        self,
        key: str,
        value: bytes | None,
        authz: Authorizer,
        *,
        flags: int = 0,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        """`PUT /v1/kv/:key`: a set, a check-and-set, a lock or an unlock.

        Returns:
            True when written; False when a `cas` index is stale, the lock is held by
            another session or in its lock delay, or a release is not by the holder.

        Raises:
            PermissionDenied: the token lacks key:write on `key`.
            StateError: "missing session" or "invalid session ..." for acquire/release (500,
                as Consul's RPC errors).
        """
        if not key:
            raise StateError("Must provide key")
        authz.require("key", key, "write")
        value = value or None
        existing = self.entries.get(key)
        if acquire is not None:
            return self._lock(key, value, flags, acquire, existing)
        if release is not None:
            return self._unlock(key, value, flags, release, existing)
        stale = cas is not None and (
            (cas == 0 and existing is not None)
            or (cas != 0 and (existing is None or existing.modify_index != cas))
        )
        if stale:
            return False
        session = existing.session if existing is not None else ""
        lock_index = existing.lock_index if existing is not None else 0
        self._set(
            key, value=value, flags=flags, session=session, lock_index=lock_index, existing=existing
        )
        return True

    def _lock(
        self, key: str, value: bytes | None, flags: int, session: str, existing: Entry | None
    ) -> bool:
        # The lock delay is checked first, as Consul's leader checks it before Raft.
        if self._lock_delays.get(key, 0.0) > time.monotonic():
            return False
        self._lock_delays.pop(key, None)
        if not session:
            raise StateError("missing session")
        if session not in self._sessions:
            raise StateError(f'invalid session "{session}"')
        if existing is None:
            lock_index = 1
        elif existing.session == session:
            lock_index = existing.lock_index
        elif existing.session:
            return False
        else:
            lock_index = existing.lock_index + 1
        self._set(
            key, value=value, flags=flags, session=session, lock_index=lock_index, existing=existing
        )
        return True

    def _unlock(
        self, key: str, value: bytes | None, flags: int, session: str, existing: Entry | None
    ) -> bool:
        if not session:
            raise StateError("missing session")
        if existing is None or existing.session != session:
            return False
        self._set(
            key,
            value=value,
            flags=flags,
            session="",
            lock_index=existing.lock_index,
            existing=existing,
        )
        return True

    def _set(
        self,
        key: str,
        *,
        value: bytes | None,
        flags: int,
        session: str,
        lock_index: int,
        existing: Entry | None,
    ) -> None:
        if existing is not None and (
            existing.value == value
            and existing.flags == flags
            and existing.session == session
            and existing.lock_index == lock_index
        ):
            return  # unchanged: Consul writes nothing and no index moves
        index = self._index.next
        self.entries[key] = Entry(
            key=key,
            value=value,
            flags=flags,
            lock_index=lock_index,
            session=session,
            create_index=existing.create_index if existing is not None else index,
            modify_index=index,
        )
        self._tombstones.pop(key, None)
        self._bump()

    def delete(
        self, key: str, authz: Authorizer, *, recurse: bool = False, cas: int | None = None
    ) -> bool:
        """`DELETE /v1/kv/:key`, `?recurse` (the whole prefix), `?cas` (only at that index).

        Returns:
            False only for a `cas` that does not match the key's ModifyIndex (a missing key
            matches, as in Consul).

        Raises:
            PermissionDenied: the token lacks key:write (on the whole prefix for `recurse`).
        """
        if recurse and cas is None:
            if not authz.allowed_prefix("key", key, "write"):
                raise StateError("Permission denied", status=403)
            doomed = [k for k in self.entries if k.startswith(key)]
            if doomed:
                index = self._index.next
                for k in doomed:
                    self._bury(k, index)
                self._bump()
            return True
        if not key:
            raise StateError("Must provide key")
        authz.require("key", key, "write")
        existing = self.entries.get(key)
        if cas is not None and existing is not None and existing.modify_index != cas:
            return False
        if existing is not None:
            self._bury(key, self._index.next)
            self._bump()
        return True

    # -- what the sessions table calls ---------------------------------------------------

    def held_by(self, session: str) -> list[str]:
        """The keys `session` holds."""
        return [k for k, e in self.entries.items() if e.session == session]

    def drop_session(self, session: str, behavior: str, lock_delay: float, index: int) -> bool:
        """Release (behavior `release`) or delete (`delete`) every key `session` holds, at
        `index`, and start each key's lock delay (capped at a minute).

        The sessions table takes `index` and bumps; this returns whether any key changed
        (then the `kv` topic is to be bumped too).
        """
        delay = min(lock_delay, MAX_LOCK_DELAY)
        until = time.monotonic() + delay
        held = self.held_by(session)
        for key in held:
            entry = self.entries[key]
            if behavior == "delete":
                self._bury(key, index)
            else:
                entry.session = ""
                entry.modify_index = index
            if delay > 0:
                self._lock_delays[key] = until
        if held:
            self._table_index = index
        return bool(held)

    def _bury(self, key: str, index: int) -> None:
        del self.entries[key]
        self._tombstones.pop(key, None)
        self._tombstones[key] = index
        if len(self._tombstones) > MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]

    def _bump(self) -> None:
        self._table_index = self._index.bump((TOPIC,))
        now = time.monotonic()
        if len(self._lock_delays) > 1024:  # expired delays go once there are many
            self._lock_delays = {k: t for k, t in self._lock_delays.items() if t > now}
