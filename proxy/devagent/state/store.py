"""`State`: the dev agent's tables, built together over one index and one notifier.

Rule 1: `State` holds no records and makes no decisions; each belongs to one table, and
callers (the HTTP routes, the agent's runners) call the table that owns the data.
Rule 2: all tables take their indexes from the one `Index`, so the index of any change is
greater than that of every change before it, across tables, as with Consul's Raft index.
"""

from __future__ import annotations

import uuid
from typing import Any

from proxy.devagent.acl import ACLStore
from proxy.devagent.ca import CertificateAuthority
from proxy.devagent.state.acl_tokens import ACLTokens
from proxy.devagent.state.blocking import Index, Notifier, Watch
from proxy.devagent.state.catalog import Catalog
from proxy.devagent.state.checks import Checks
from proxy.devagent.state.config_entries import ConfigEntries
from proxy.devagent.state.connect_ca import ConnectCA, LeafEntry
from proxy.devagent.state.events import Events
from proxy.devagent.state.intentions import Intentions
from proxy.devagent.state.kv import KV
from proxy.devagent.state.peering import Peerings
from proxy.devagent.state.queries import Queries
from proxy.devagent.state.records import Node
from proxy.devagent.state.sessions import Session, Sessions


class State:
    """Everything the agent knows, one attribute per table (see the package docstring)."""

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
        session_ttl_min: float = 10.0,
    ) -> None:
        self.notifier = Notifier()
        self.index = Index(self.notifier)
        self.node = Node(
            id=node_id or str(uuid.uuid4()),
            name=node_name,
            address=node_address,
            datacenter=datacenter,
            create_index=self.index.value,
        )
        # The catalog owns the services; the checks table reads them (a check names its
        # service), and the catalog stores a service's checks through the checks table.
        services: dict[str, dict[str, Any]] = {}
        self.checks = Checks(self.index, self.node, services)
        self.catalog = Catalog(
            self.index,
            self.node,
            services,
            self.checks,
            sidecar_port_range=sidecar_port_range,
            sidecar_check_interval=sidecar_check_interval,
        )
        self.config_entries = ConfigEntries(self.index)
        # Built before the intentions: authorize reads the CA's trust domains.
        self.connect_ca = ConnectCA(self.index, ca, datacenter)
        # Peers' bundles add their trust domains to the CA's; authorize asks which peer.
        self.peerings = Peerings(self.index, self.connect_ca, datacenter)
        self.intentions = Intentions(
            self.index,
            self.config_entries,
            default_intention_policy,
            trust_domains=self.connect_ca.trust_domains,
            peer_for=self.peerings.peer_for_trust_domain,
        )
        self.queries = Queries(self.index, self.catalog, datacenter)
        self.acl = ACLTokens(self.index, acl)
        # The sessions table owns the sessions; the KV table reads them (a lock names its
        # session), and invalidating a session releases or deletes its keys through KV.
        sessions: dict[str, Session] = {}
        self.kv = KV(self.index, sessions)
        self.sessions = Sessions(
            self.index, self.node, self.checks, self.kv, sessions, ttl_min=session_ttl_min
        )
        self.events = Events(self.notifier, self.node, services)
        self.index.bump(("services", "checks", "roots", "nodes"))

    # -- blocking queries ------------------------------------------------------------------

    async def block_on_index(self, watch: Watch[int], min_index: int, timeout: float) -> None:
        """Return once the watched index exceeds `min_index`, at the deadline, or at shutdown.

        A `min_index` of 0 (no `?index=`) returns at once.
        """
        if min_index > 0:
            await self.notifier.wait_until(
                watch.topics, lambda: watch.current() > min_index, timeout
            )

    async def block_on_hash(self, watch: Watch[str], last_hash: str, timeout: float) -> None:
        """Return once the watched content hash differs from `last_hash` (or as above)."""
        if last_hash:
            await self.notifier.wait_until(
                watch.topics, lambda: watch.current() != last_hash, timeout
            )

    # -- read-only conveniences (the dev-agent command's banner, tests) --------------------

    @property
    def datacenter(self) -> str:
        return self.node.datacenter

    @property
    def node_name(self) -> str:
        return self.node.name

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        """The catalog's services by ID (read only: register through `catalog`)."""
        return self.catalog.services

    @property
    def ca(self) -> CertificateAuthority:
        return self.connect_ca.ca

    def issue_leaf(self, service: str) -> LeafEntry:
        """Re-issue `service`'s leaf now, as the agent's renewal timer does."""
        return self.connect_ca.issue_leaf(service)
