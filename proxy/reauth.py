"""Live re-authorization: close open inbound connections that are no longer allowed.

Owns two follow-ups of the public listener's forwarded connections (`PublicListener.forwarding()`):
- intentions: one blocking watch (`watch.changes`) on the intentions that match the proxied
  service as destination; on each change (and on the first answer, which may be newer than
  a connection's handshake) every open connection is authorized again through the same
  authorizer as at accept, with the same client URI and serial;
- roots: after each rotation of the TLS store, a connection whose leaf was issued by a root
  that is gone, and by no current root, is closed.

Rule 1: only an explicit denial closes. A failed authorize call (agent down, 5xx, bad body)
keeps the connection: it was allowed at its handshake, and cutting every established
connection during an agent outage would turn a control-plane fault into a data-plane one
(the watch retries, and the next change re-checks everything anyway).
Rule 2: bounded: at most `concurrency` authorize calls at once, whatever the number of
connections; one pass at a time.
Rule 3: a closed connection is refused for `Refusal.REVOKED` or `Refusal.ROOT_REMOVED`, so the
listener's observer counts it (`connect_proxy_refused_connections`) and logs its access line.
Rule 4: the roots check reads the leaf only: a leaf issued by an intermediate is not matched
to a root and is kept (a full chain is not kept per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from listeners.events import Connection, Refusal
from listeners.public import InboundAuthorizer, PublicListener
from proxy.agent import AgentClient
from proxy.answers import IntentionRule
from proxy.tlsstore import TLSStore
from proxy.watch import BACKOFF_BASE, INDEX, changes

log = logging.getLogger("proxy.reauth")

DEFAULT_CONCURRENCY = 8


def _issued_by_any(leaf: x509.Certificate, roots: Sequence[x509.Certificate]) -> bool:
    for root in roots:
        try:
            leaf.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _load_roots(pems: Sequence[str]) -> list[x509.Certificate]:
    roots = []
    for pem in pems:
        with contextlib.suppress(ValueError):
            roots.append(x509.load_pem_x509_certificate(pem.encode()))
    return roots


def chained_to_removed_root(
    leaf_der: bytes, removed: Sequence[x509.Certificate], current: Sequence[x509.Certificate]
) -> bool:
    """Whether the leaf was issued by a `removed` root and by none of the `current` ones."""
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return False
    return _issued_by_any(leaf, removed) and not _issued_by_any(leaf, current)


class Reauthorizer:
    """Re-checks one public listener's open connections; `run()` until cancelled.

    Args:
        agent: the agent client (the intentions watch).
        service: the proxied service (the intentions' destination).
        listener: the public listener whose connections it checks.
        authorizer: the listener's authorizer (`proxy.authorize.AgentAuthorizer`).
        tls: the proxy's TLS store (its `rotations` and roots).
        concurrency: authorize calls in flight at most during a pass.
    """

    def __init__(
        self,
        agent: AgentClient,
        service: str,
        listener: PublicListener,
        authorizer: InboundAuthorizer,
        tls: TLSStore,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.agent = agent
        self.service = service
        self.listener = listener
        self.authorizer = authorizer
        self.tls = tls
        self.concurrency = concurrency
        self.backoff_base = backoff_base
        self.passes = 0  # intention passes completed
        self.revoked = 0  # connections closed by a denial
        self.root_removed = 0  # connections closed by a roots rotation
        self.kept_on_error = 0  # re-checks whose authorize call failed (connection kept)
        self._pass = asyncio.Lock()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_intentions())
            group.create_task(self._follow_roots())

    async def _follow_intentions(self) -> None:
        async def fetch(index: int) -> tuple[tuple[IntentionRule, ...], int]:
            match = await self.agent.intentions_match(self.service, index)
            return match.rules, match.index

        values = changes(
            "connect_intentions",
            fetch,
            INDEX,
            log=log,
            backoff_base=self.backoff_base,
            service=self.service,
        )
        async with contextlib.aclosing(values):
            async for _ in values:
                await self.reauthorize()

    async def reauthorize(self) -> int:
        """Authorize every open connection again; close the denied ones. Returns how many."""
        async with self._pass:
            gate = asyncio.Semaphore(self.concurrency)
            closed = 0

            async def check(conn: Connection, der: bytes) -> None:
                nonlocal closed
                async with gate:
                    decision = await self.authorizer.authorize(der)
                if decision.allowed:
                    return
                if decision.refusal != Refusal.DENIED:
                    self.kept_on_error += 1
                    return
                if self.listener.revoke(conn, Refusal.REVOKED, decision.reason):
                    closed += 1

            snapshot = [(conn, conn.peer_der) for conn in self.listener.forwarding()]
            async with asyncio.TaskGroup() as group:
                for conn, der in snapshot:
                    group.create_task(check(conn, der))
            self.passes += 1
            self.revoked += closed
            if closed:
                log.info(
                    "Intentions changed: closed %d of %d open connections", closed, len(snapshot)
                )
            return closed

    async def _follow_roots(self) -> None:
        seen = self.tls.rotations.value
        material = self.tls.material
        previous = material.roots if material is not None else ()
        while True:
            await self.tls.rotations.reached(seen + 1)
            seen = self.tls.rotations.value
            material = self.tls.material
            if material is None:
                continue
            current = material.roots
            if current != previous:
                self.check_roots(previous, current)
            previous = current

    def check_roots(self, previous: Sequence[str], current: Sequence[str]) -> int:
        """Close connections whose leaf chained to a root in `previous` but not `current`."""
        gone = [pem for pem in previous if pem not in current]
        if not gone:
            return 0
        removed, now = _load_roots(gone), _load_roots(current)
        closed = 0
        for conn in self.listener.forwarding():
            if chained_to_removed_root(conn.peer_der, removed, now) and self.listener.revoke(
                conn, Refusal.ROOT_REMOVED, "its CA root is no longer trusted"
            ):
                closed += 1
        self.root_removed += closed
        if closed:
            log.info("CA roots changed: closed %d open connections", closed)
        return closed
