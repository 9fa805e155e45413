"""The Connect CA table: roots, the CA configuration, and the agent's cache of leaves.

The X.509 work is `CertificateAuthority`'s (pure, in `devagent/ca.py`); this table stamps
what it returns with indexes and wakes watchers. Two topics, as Consul's two tables
(`connect-ca-roots`, `connect-ca-config`): `roots` moves on a rotation, `ca-config` on a
configuration change that rotates nothing (a new leaf TTL). A roots query's index covers
both, as Consul's `CARootsAndConfig` does, so a roots watcher sees either change.

Rule 1: every change of the roots, the configuration or a leaf takes an index here;
nothing outside this table sets `ca.leaf_ttl` or rotates the CA.
Rule 2: no timers. The agent subscribes to `listeners` to renew each issued leaf, and
renews it through `issue_leaf`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.ca import CertificateAuthority, Leaf
from proxy.devagent.state import render
from proxy.devagent.state.blocking import Index, Watch
from proxy.devagent.state.records import BadRequest
from proxy.goflags import parse_duration

ROOTS, CA_CONFIG = "roots", "ca-config"


@dataclass(slots=True)
class LeafEntry:
    leaf: Leaf
    create_index: int
    modify_index: int

    def to_api(self) -> dict[str, object]:
        return self.leaf.to_api(self.create_index, self.modify_index)


class ConnectCA:
    """Roots, CA configuration and leaves by service name; see the module docstring."""

    def __init__(self, index: Index, ca: CertificateAuthority, datacenter: str) -> None:
        self._index = index
        self._datacenter = datacenter
        self.ca = ca
        self.leaves: dict[str, LeafEntry] = {}
        self.config_modify_index = 1
        # The agent subscribes here to schedule each issued leaf's renewal.
        self.listeners: list[Callable[[str, LeafEntry], None]] = []
        # Trust domains besides our own whose identities authorize may accept: the peering
        # table keeps here the trust domain of each peer's bundle (lower-cased).
        self.peer_trust_domains: set[str] = set()

    # -- roots -------------------------------------------------------------------------

    def roots(self) -> dict[str, Any]:
        return render.roots(self.ca)

    def trust_domains(self) -> frozenset[str]:
        """The trust domains authorize accepts: the roots' own, then any peers' (lower-case).

        Empty only while the CA has no trust domain (Consul: not bootstrapped yet).
        """
        own = {self.ca.trust_domain.lower()} if self.ca.trust_domain else set()
        return frozenset(own | self.peer_trust_domains)

    def roots_watch(self) -> Watch[int]:
        """What a blocking roots query waits on: a rotation or a configuration change."""
        return self._index.watch(ROOTS, CA_CONFIG)

    def rotate(self, **kwargs: Any) -> None:
        """Rotate to a new root (cross-signed by the old one) and re-issue every cached leaf."""
        index = self._index.next
        self.ca.rotate(index, **kwargs)
        self.config_modify_index = index
        self._index.bump((ROOTS,))
        for service in list(self.leaves):
            self.issue_leaf(service)

    # -- configuration -----------------------------------------------------------------

    def configuration(self) -> dict[str, Any]:
        return render.ca_configuration(self.ca, self.config_modify_index)

    def update_configuration(self, body: Mapping[str, Any]) -> None:
        """`PUT /v1/connect/ca/configuration`: a new leaf TTL, or a rotation.

        A new key, key type or size, or the dev-agent field `"Rotate": true` rotates the
        root. A leaf TTL alone rotates nothing but still takes an index, so roots watchers
        wake and the configuration's ModifyIndex moves (see
        test_leaf_ttl_update_wakes_a_blocked_roots_query).

        Raises:
            BadRequest: another provider, or an unusable LeafCertTTL.
            CAError: a key, key type or size the built-in provider cannot use.
        """
        provider = body.get("Provider") or "consul"
        if provider != "consul":
            raise BadRequest(
                f'the dev agent only runs the built-in "consul" CA provider, not "{provider}"'
            )
        cfg = {k.replace("_", "").lower(): v for k, v in (body.get("Config") or {}).items()}
        ttl_changed = False
        if "leafcertttl" in cfg:
            try:
                ttl = parse_duration(str(cfg["leafcertttl"]))
            except ValueError as exc:
                raise BadRequest(f"Invalid LeafCertTTL: {exc}") from exc
            if ttl <= 0:
                raise BadRequest("LeafCertTTL must be positive")
            ttl_changed = ttl != self.ca.leaf_ttl
            self.ca.leaf_ttl = ttl
        rotated = False
        try:
            current = self.configuration()["Config"]
            key_type = cfg.get("privatekeytype") or current["PrivateKeyType"]
            bits = int(cfg.get("privatekeybits") or current["PrivateKeyBits"])
            pem = cfg.get("privatekey") or None
            if (
                pem
                or key_type != current["PrivateKeyType"]
                or bits != current["PrivateKeyBits"]
                or cfg.get("rotate")
            ):
                self.rotate(key_type=key_type, key_bits=bits, private_key_pem=pem)
                rotated = True
        finally:
            # The new TTL holds even if a rotation asked for with it fails: its index moves.
            if ttl_changed and not rotated:
                self.config_modify_index = self._index.bump((CA_CONFIG,))

    # -- leaves ------------------------------------------------------------------------

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

    def leaf_watch(self, service: str) -> Watch[int]:
        """What a blocking leaf query waits on: a renewal, or a rotation that re-issues."""

        def current() -> int:
            entry = self.leaves.get(service)
            return entry.modify_index if entry is not None else 0

        return Watch((f"leaf:{service}", ROOTS), current)

    def issue_leaf(self, service: str) -> LeafEntry:
        """Sign a new leaf for `service` now (first request, renewal or rotation)."""
        leaf = self.ca.sign_leaf(service, datacenter=self._datacenter)
        old = self.leaves.get(service)
        index = self._index.bump((f"leaf:{service}",))
        entry = LeafEntry(leaf, old.create_index if old else index, index)
        self.leaves[service] = entry
        for listener in self.listeners:
            listener(service, entry)
        return entry
