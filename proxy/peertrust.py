"""PeerTrust: peers' trust bundles, and the TLS contexts that trust them.

Owns two things, both followed on `watch.watch` (the one blocking-query loop):
- **Peered upstreams.** One watch per peer named by an upstream's `destination_peer`, on the
  dev agent's `/v1/internal/connect-proxy/peering/trust-bundle/<peer>`. Its client context
  verifies the server's chain against that peer's roots only (not ours) and presents our
  leaf; `PeerClientContexts` hands it to the upstream listener. The exporter rotating its CA
  moves the bundle, which is rebuilt off to the side and swapped in with one assignment.
- **The public listener of an exported service.** One watch on `.../trust-bundles?service=`
  (the peers the service is exported to, Consul's `TrustBundleListByService`): while the
  list is not empty, the server context trusts our roots and those peers' roots (and no
  other peer's), so a client from such a peer completes the handshake and is then
  authorized by the agent like any client. With no exports it is the TLS store's context.

Rule 1: as `TLSStore`: a bundle or a list that does not build (no roots, PEM that does not
parse) logs once and keeps the last good contexts. Contexts are rebuilt when our leaf or
roots rotate (the store's `on_swap`).
Rule 2: a peer whose bundle is gone (404: the peering was deleted or terminated) loses its
client context: new connections to it are refused. Open connections are not touched.
Rule 3: an agent without the bundle-list endpoint (a real Consul: bundles are gRPC-only)
answers 404 to the exports watch; it stops, once logged, and the public listener trusts only
our roots, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from listeners.tls.contexts import build_contexts
from listeners.tls.engine import TLSContext
from proxy.agent import AgentClient
from proxy.counter import Counter
from proxy.errors import AgentResponseError, TLSMaterialError
from proxy.peeranswers import TrustBundle
from proxy.tlsstore import TLSMaterial, TLSStore
from proxy.watch import BACKOFF_BASE, watch

log = logging.getLogger("proxy.peering")

Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


@dataclass(slots=True)
class _Peer:
    """What one peer's upstreams dial with."""

    name: str
    bundle: TrustBundle | None = None  # the last good one
    client: TLSContext | None = None
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    users: int = 0
    task: asyncio.Task[None] | None = None
    rotations: int = 0  # client contexts swapped in (tests wait on it)


class PeerClientContexts:
    """The `ClientContexts` of a peered upstream: the peer's roots, our leaf."""

    def __init__(self, trust: PeerTrust, peer: str) -> None:
        self.trust = trust
        self.peer = peer

    def client_context(self) -> TLSContext | None:
        record = self.trust.peers.get(self.peer)
        return record.client if record is not None else None

    async def wait_ready(self) -> None:
        """Our leaf is ready and the peer's bundle watch has answered (either way)."""
        await self.trust.store.wait_ready()
        record = self.trust.peers.get(self.peer)
        if record is not None:
            await record.answered.wait()


class PeerTrust:
    """The peers' bundles the proxy follows and the contexts built from them.

    Args:
        spawn: runs a watch in the proxy's TaskGroup and returns its task.
    """

    def __init__(
        self,
        agent: AgentClient,
        store: TLSStore,
        spawn: Spawn,
        *,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.agent = agent
        self.store = store
        self.spawn = spawn
        self.backoff_base = backoff_base
        self.peers: dict[str, _Peer] = {}
        # The public listener's side: the exported-to peers' bundles, the context built.
        self.exported: tuple[TrustBundle, ...] = ()
        self._server: tuple[TLSMaterial, TLSContext] | None = None
        self._exports_task: asyncio.Task[None] | None = None
        self.server_rotations = 0
        # Every change of what is trusted (a peer's context, the exported-to peers, either
        # way): readers wait on it for a condition instead of polling.
        self.changes = Counter()
        store.on_swap.append(self._rebuild_all)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, re-checked after each change (bound it)."""
        while not condition():
            await self.changes.reached(self.changes.value + 1)

    # -- peered upstreams ----------------------------------------------------------------

    def contexts_for(self, peer: str) -> PeerClientContexts:
        """The client contexts of `peer`, following its bundle while an upstream uses it."""
        record = self.peers.get(peer)
        if record is None:
            record = self.peers[peer] = _Peer(peer)
            record.task = self.spawn(self._follow(record), f"watch trust bundle {peer}")
        record.users += 1
        return PeerClientContexts(self, peer)

    def client_ready(self, peer: str) -> bool:
        """Whether upstreams of `peer` have a client context (its bundle arrived and built)."""
        record = self.peers.get(peer)
        return record is not None and record.client is not None

    def release(self, peer: str) -> None:
        """One upstream of `peer` stopped; the last one stops its bundle watch."""
        record = self.peers.get(peer)
        if record is None:
            return
        record.users -= 1
        if record.users <= 0:
            del self.peers[peer]
            if record.task is not None:
                record.task.cancel()

    async def _follow(self, record: _Peer) -> None:
        async def fetch(index: int) -> tuple[TrustBundle, int]:
            bundle = await self.agent.trust_bundle(record.name, index)
            return bundle, bundle.index

        def failed(exc: Exception) -> None:
            if isinstance(exc, AgentResponseError) and exc.status == 404 and record.client:
                log.warning(
                    "trust bundle of peer %s is gone (peering deleted?): new connections to "
                    "its services are refused",
                    record.name,
                )
                record.client = None
                record.bundle = None
                self.changes.add()
            record.answered.set()

        await watch(
            f"peer_trust_bundle peer={record.name}",
            fetch,
            lambda bundle: self._adopt(record, bundle),
            log=log,
            backoff_base=self.backoff_base,
            on_error=failed,
        )

    def _adopt(self, record: _Peer, bundle: TrustBundle) -> None:
        material = self.store.material
        if material is not None:
            try:
                client = _client_context(bundle, material, self.store.engine)
            except TLSMaterialError as exc:
                log.error(
                    "refused the trust bundle of peer %s, keeping the previous one: %s",
                    record.name,
                    exc,
                )
                record.answered.set()
                return
            record.client = client
            record.rotations += 1
            self.changes.add()
            log.info(
                "trust bundle of peer %s in use trust_domain=%s roots=%d",
                record.name,
                bundle.trust_domain,
                len(bundle.root_pems),
            )
        record.bundle = bundle
        record.answered.set()

    # -- the public listener of an exported service --------------------------------------

    def follow_exports(self, service: str) -> None:
        """Trust the roots of the peers `service` is exported to at the public listener."""
        if self._exports_task is None:
            self._exports_task = self.spawn(self._follow_exports(service), "watch exports")

    def stop_exports(self) -> None:
        if self._exports_task is not None:
            self._exports_task.cancel()
            self._exports_task = None
        self.exported, self._server = (), None

    async def _follow_exports(self, service: str) -> None:
        async def fetch(index: int) -> tuple[tuple[TrustBundle, ...], int]:
            return await self.agent.service_trust_bundles(service, index)

        def failed(exc: Exception) -> None:
            if isinstance(exc, AgentResponseError) and exc.status == 404:
                log.info(
                    "the agent lists no peers' trust bundles (%s): clients from peers are "
                    "not trusted at the public listener",
                    exc,
                )
                if self._exports_task is not None:
                    self._exports_task.cancel()

        await watch(
            f"peer_trust_bundles service={service}",
            fetch,
            self._adopt_exports,
            log=log,
            backoff_base=self.backoff_base,
            on_error=failed,
        )

    def _adopt_exports(self, bundles: tuple[TrustBundle, ...]) -> None:
        material = self.store.material
        if not bundles:
            self.exported, self._server = (), None
            self.server_rotations += 1
            self.changes.add()
            log.info("public listener trusts our roots only (no peer imports the service)")
            return
        if material is not None and not self._build_server(bundles, material):
            return
        self.exported = bundles
        self.changes.add()

    def _build_server(self, bundles: tuple[TrustBundle, ...], material: TLSMaterial) -> bool:
        roots = [*material.roots, *(pem for b in bundles for pem in b.root_pems)]
        try:
            for bundle in bundles:
                _check_bundle(bundle)
            server, _ = build_contexts(
                roots, material.cert_pem, material.key_pem, self.store.engine
            )
        except TLSMaterialError as exc:
            log.error("refused the peers' trust bundles, keeping the previous ones: %s", exc)
            return False
        self._server = (material, server)
        self.server_rotations += 1
        log.info(
            "public listener trusts peers %s",
            ", ".join(f"{b.peer} ({b.trust_domain})" for b in bundles),
        )
        return True

    def server_context(self) -> TLSContext | None:
        """The public listener's context: ours, or ours trusting the exported-to peers too."""
        server = self._server
        material = self.store.material
        if server is None or material is None or server[0] is not material:
            return self.store.server_context()
        return server[1]

    async def wait_ready(self) -> None:
        await self.store.wait_ready()

    # -- our own rotations ---------------------------------------------------------------

    def _rebuild_all(self, material: TLSMaterial) -> None:
        """Our leaf or roots changed: rebuild every context that presents or trusts them."""
        for record in self.peers.values():
            if record.bundle is not None:
                self._adopt(record, record.bundle)
        if self.exported:
            self._build_server(self.exported, material)


def _check_bundle(bundle: TrustBundle) -> None:
    if not bundle.root_pems:
        raise TLSMaterialError(f"the trust bundle of peer {bundle.peer} has no roots")


def _client_context(bundle: TrustBundle, material: TLSMaterial, engine: str) -> TLSContext:
    """A client context that trusts only the peer's roots and presents our leaf.

    Raises:
        TLSMaterialError: no roots, or roots that do not load.
    """
    _check_bundle(bundle)
    _, client = build_contexts(bundle.root_pems, material.cert_pem, material.key_pem, engine)
    return client
