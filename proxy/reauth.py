"""Live re-authorization: close open inbound connections that are no longer allowed.

Owns two follow-ups of the public listener's forwarded connections (`PublicListener.forwarding()`):
- intentions: the proxy's one watch of the intentions that match the proxied service as
  destination (`proxy.intentwatch.IntentionsFollower`, shared with the authorize cache); on
  each change (and on the first answer, which may be newer than a connection's handshake)
  every open connection is authorized again through the same authorizer as at accept, with
  the same client URI and serial (with the cache on, one call per distinct client identity:
  the change has emptied the cache);
- roots: after each rotation of the TLS store, a connection whose client chain ends in a root
  that is gone, and in no current root, is closed. The chain is the one the client sent
  (leaf, then intermediates or cross-signed roots), read from the live TLS connection only
  then (`Connection.peer_chain`), and walked from the leaf with a signature check per step.

Rule 1: only an explicit denial closes. A failed authorize call (agent down, 5xx, bad body)
keeps the connection: it was allowed at its handshake, and cutting every established
connection during an agent outage would turn a control-plane fault into a data-plane one
(the watch retries, and the next change re-checks everything anyway).
Rule 2: bounded: at most `concurrency` authorize calls at once, whatever the number of
connections; one pass at a time.
Rule 3: a closed connection is refused for `Refusal.REVOKED` or `Refusal.ROOT_REMOVED`, so the
listener's observer counts it (`connect_proxy_refused_connections`) and logs its access line.
Rule 4: the roots check closes only what it can prove: a path of signatures from the leaf,
through certificates the client sent, to a removed root, and none to a current root. When it
cannot tell (a certificate that does not parse, no path to any root, a resumed session whose
chain only holds the leaf) the connection is kept. The walk is bounded by `MAX_CHAIN`
certificates; a pass walks each distinct chain once and checks each signature once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from listeners.events import Connection, Refusal
from listeners.public import InboundAuthorizer, PublicListener
from proxy.intentwatch import IntentionsFollower
from proxy.tlsstore import TLSStore

log = logging.getLogger("proxy.reauth")

DEFAULT_CONCURRENCY = 8
WALKS_PER_TURN = 8  # distinct chains walked between two turns of the event loop


# Certificates of a client's chain looked at, leaf included: Consul's chains hold a leaf, an
# intermediate and a cross-signed root at most; the rest of a longer chain is ignored.
MAX_CHAIN = 8


# A certificate as sent (DER, the key of the memo below) and parsed.
_Cert = tuple[bytes, x509.Certificate]
# Signature checks already made in one roots pass: (certificate, issuer) DER -> issued.
Checked = dict[tuple[bytes, bytes], bool]


def _issued_by(cert: _Cert, issuer: _Cert, checked: Checked) -> bool:
    """Whether `issuer`'s name and key signed `cert` (the name is compared first: cheap)."""
    key = (cert[0], issuer[0])
    known = checked.get(key)
    if known is not None:
        return known
    try:
        cert[1].verify_directly_issued_by(issuer[1])
    except (ValueError, TypeError, InvalidSignature):
        checked[key] = False
    else:
        checked[key] = True
    return checked[key]


def _load_roots(pems: Sequence[str]) -> list[x509.Certificate]:
    roots = []
    for pem in pems:
        with contextlib.suppress(ValueError):
            roots.append(x509.load_pem_x509_certificate(pem.encode()))
    return roots


def chained_to_removed_root(
    chain_der: Sequence[bytes],
    removed: Sequence[x509.Certificate],
    current: Sequence[x509.Certificate],
    checked: Checked | None = None,
) -> bool:
    """Whether a client's chain leads to a `removed` root and to none of the `current` ones.

    Args:
        chain_der: the chain as the client sent it, DER, leaf first (a bare leaf is a chain of
            one); only its first `MAX_CHAIN` certificates are looked at.
        removed: the roots gone in a rotation.
        current: the roots trusted now.
        checked: signature checks made so far in this pass, shared by the calls of a pass
            (clients of one CA send the same intermediates: each is checked once), and added to.

    From the leaf, every certificate of the chain that signed one already reached is reached
    in turn (each one once: at most `MAX_CHAIN` steps). True when some reached certificate
    was issued by a removed root and none by a current root; False when one was issued by a
    current root (a cross-signed intermediate, say), and when it cannot tell: the leaf does
    not parse, or no path reaches a root.
    """
    if not chain_der:
        return False
    if checked is None:
        checked = {}
    try:
        leaf = (chain_der[0], x509.load_der_x509_certificate(chain_der[0]))
    except ValueError:
        return False
    sent: list[_Cert] = []
    for der in chain_der[1:MAX_CHAIN]:
        with contextlib.suppress(ValueError):  # one that does not parse leads nowhere
            sent.append((der, x509.load_der_x509_certificate(der)))
    gone = [(root.public_bytes(Encoding.DER), root) for root in removed]
    now = [(root.public_bytes(Encoding.DER), root) for root in current]
    to_visit = [leaf]
    ends_in_removed = False
    while to_visit:
        cert = to_visit.pop()
        if any(_issued_by(cert, root, checked) for root in now):
            return False
        if any(_issued_by(cert, root, checked) for root in gone):
            ends_in_removed = True
        issuers = [other for other in sent if _issued_by(cert, other, checked)]
        sent = [other for other in sent if other not in issuers]
        to_visit += issuers
    return ends_in_removed


class Reauthorizer:
    """Re-checks one public listener's open connections; `run()` until cancelled.

    Args:
        follower: the intentions watch (run by its owner, the supervisor).
        listener: the public listener whose connections it checks.
        authorizer: the listener's authorizer (`proxy.authorize.AgentAuthorizer`).
        tls: the proxy's TLS store (its `rotations` and roots).
        concurrency: authorize calls in flight at most during a pass.
    """

    def __init__(
        self,
        follower: IntentionsFollower,
        listener: PublicListener,
        authorizer: InboundAuthorizer,
        tls: TLSStore,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.follower = follower
        self.listener = listener
        self.authorizer = authorizer
        self.tls = tls
        self.concurrency = concurrency
        self.passes = 0  # intention passes completed
        self.revoked = 0  # connections closed by a denial
        self.root_removed = 0  # connections closed by a roots rotation
        self.root_passes = 0  # roots changes checked
        self.kept_on_error = 0  # re-checks whose authorize call failed (connection kept)
        self._pass = asyncio.Lock()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_intentions())
            group.create_task(self._follow_roots())

    async def _follow_intentions(self) -> None:
        changed = self.follower.changes
        seen = 0
        while True:
            await changed.reached(seen + 1)
            seen = changed.value  # changes during a pass are all checked by the next one
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
                await self.check_roots(previous, current)
                self.root_passes += 1
            previous = current

    async def check_roots(self, previous: Sequence[str], current: Sequence[str]) -> int:
        """Close connections whose client chain led to a root in `previous` and to none in
        `current`. Returns how many.

        A walk checks signatures (about 0.2 ms each): the loop gets a turn after every
        `WALKS_PER_TURN` new walks, so a rotation with many distinct clients does not stall
        the other connections.
        """
        gone = [pem for pem in previous if pem not in current]
        if not gone:
            return 0
        removed, now = _load_roots(gone), _load_roots(current)
        # Connections of one client instance share a chain: each distinct one is walked once,
        # and each signature of an intermediate is checked once.
        verdicts: dict[tuple[bytes, ...], bool] = {}
        checked: Checked = {}
        closed = 0
        for conn in self.listener.forwarding():
            chain = tuple(conn.peer_chain() if conn.peer_chain is not None else ()) or (
                conn.peer_der,
            )
            verdict = verdicts.get(chain)
            if verdict is None:
                verdict = verdicts[chain] = chained_to_removed_root(chain, removed, now, checked)
                if len(verdicts) % WALKS_PER_TURN == 0:
                    await asyncio.sleep(0)
            if verdict and self.listener.revoke(
                conn, Refusal.ROOT_REMOVED, "its CA root is no longer trusted"
            ):
                closed += 1
        self.root_removed += closed
        if closed:
            log.info("CA roots changed: closed %d open connections", closed)
        return closed
