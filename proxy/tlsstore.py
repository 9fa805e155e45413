"""TLSStore: the roots and leaf as the agent last sent them, and the TLS material in use.

Owns: the latest roots and the latest leaf (they arrive on two watches, so either may come
first during a rotation), and the current `TLSMaterial`: server and client contexts built by
`listeners.tls.contexts` from one pair of them, checked there with an in-memory handshake
(the leaf must chain to the roots), and swapped in with one assignment. The listeners read
the current contexts per accept and per dial.

Rule 1: a rotation that fails (bad PEM, leaf not chaining to the roots) logs once and keeps
the previous material; new connections never see a half-built state.
Rule 2: one reconcile step for both halves: the half that just arrived is tried with the
other half as last received, then with the other half of the material in use.
Rule 3: the private key exists only in memory (`listeners.tls.contexts` loads it so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from listeners.tls.contexts import build_contexts, check_contexts

# Re-exported for the supervisor's startup log (`X as X`: explicit for mypy --strict).
from listeners.tls.engine import DEFAULT_TLS_ENGINE, TLS_ENGINES, TLSContext
from proxy.counter import Counter
from proxy.errors import TLSMaterialError
from proxy.identity import PeerIdentity, colon_hex, peer_identity

log = logging.getLogger("proxy.tls")

Roots = tuple[str, ...]  # PEM each
Leaf = tuple[str, str]  # CertPEM (may carry intermediates), PrivateKeyPEM


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """One consistent set of roots, leaf and the contexts built from them."""

    roots: Roots
    cert_pem: str
    key_pem: str = field(repr=False)
    server: TLSContext
    client: TLSContext
    leaf: PeerIdentity
    not_before: float = 0.0  # the leaf's validity, POSIX seconds
    not_after: float = 0.0
    root_ids: tuple[str, ...] = ()  # Consul's root IDs: colon-hex SHA-1 of each root


def _leaf(cert_pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(cert_pem.encode())[0]
    except (ValueError, IndexError) as exc:
        raise TLSMaterialError(f"the leaf certificate does not parse: {exc}") from exc


def root_ids(roots: Roots) -> tuple[str, ...]:
    """Each root's ID as the agent gives it (colon-hex SHA-1 of the DER); "" if unreadable."""
    ids = []
    for pem in roots:
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            ids.append("")
            continue
        ids.append(colon_hex(cert.fingerprint(hashes.SHA1())))
    return tuple(ids)


def _build(roots: Roots, leaf: Leaf, engine: str) -> TLSMaterial:
    """Material for one pair, checked.

    Raises:
        TLSMaterialError: the pair does not load, or the leaf does not chain to the roots.
    """
    cert_pem, key_pem = leaf
    cert = _leaf(cert_pem)
    identity = peer_identity(cert.public_bytes(Encoding.DER))
    server, client = build_contexts(roots, cert_pem, key_pem, engine)
    check_contexts(server, client, roots, identity.subject_cn)
    return TLSMaterial(
        roots,
        cert_pem,
        key_pem,
        server,
        client,
        identity,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        root_ids=root_ids(roots),
    )


class TLSStore:
    """Holds the current `TLSMaterial`; `ready` is set once roots and a leaf that chains exist.

    `rotations` counts the sets of material swapped in (the first one included).

    Args:
        engine: the TLS engine whose contexts it builds, one of `TLS_ENGINES`.
    """

    def __init__(self, engine: str = DEFAULT_TLS_ENGINE) -> None:
        if engine not in TLS_ENGINES:
            raise ValueError(f"unknown TLS engine {engine!r}, expected one of {TLS_ENGINES}")
        self.engine = engine
        # As received, each replaced by its own watch; not necessarily usable.
        self._roots: Roots = ()
        self._leaf: Leaf | None = None
        self.material: TLSMaterial | None = None
        self.ready = asyncio.Event()
        self.rotations = Counter()
        # Called with each new material right after it is swapped in (`proxy.peertrust`
        # rebuilds the peers' contexts that present our leaf); an exception is logged.
        self.on_swap: list[Callable[[TLSMaterial], None]] = []

    def server_context(self) -> TLSContext | None:
        m = self.material
        return m.server if m is not None else None

    def client_context(self) -> TLSContext | None:
        m = self.material
        return m.client if m is not None else None

    async def wait_ready(self) -> None:
        await self.ready.wait()

    def set_roots(self, roots: Sequence[str]) -> bool:
        """Adopt new roots (PEM each). Returns whether new material was swapped in."""
        self._roots = tuple(r for r in roots if r.strip())
        return self._reconcile("roots")

    def set_leaf(self, cert_pem: str, key_pem: str) -> bool:
        """Adopt a new leaf (CertPEM may carry intermediates). Returns whether it was swapped."""
        self._leaf = (cert_pem, key_pem)
        return self._reconcile("leaf")

    def _reconcile(self, arrived: Literal["roots", "leaf"]) -> bool:
        """Swap in material for the newest pair of roots and leaf that builds and chains.

        The half that `arrived` goes with the other half as last received; if that pair is
        refused (say, a bad leaf is still pending when new roots come, or new roots have not
        come yet for a leaf of a new CA), with the other half of the material in use. Only
        the last refusal is logged: one log line per update.
        """
        pairs: list[tuple[Roots, Leaf | None]] = [(self._roots, self._leaf)]
        if (m := self.material) is not None:
            good_leaf = (m.cert_pem, m.key_pem)
            pairs.append((self._roots, good_leaf) if arrived == "roots" else (m.roots, self._leaf))
        tries = [(r, leaf) for r, leaf in dict.fromkeys(pairs) if r and leaf is not None]
        for n, (roots, leaf) in enumerate(tries, 1):
            try:
                material = _build(roots, leaf, self.engine)
            except TLSMaterialError as exc:
                if n == len(tries):
                    log.error("failed to rotate TLS material, keeping the previous one: %s", exc)
                continue
            self._swap(material)
            return True
        return False

    def _swap(self, material: TLSMaterial) -> None:
        # One assignment: a connection accepted from now on sees the whole new set.
        self.material = material
        self.rotations.add()
        for follower in self.on_swap:
            try:
                follower(material)
            except Exception:
                log.exception("a follower of the TLS material failed")
        identity = material.leaf
        if not self.ready.is_set():
            log.info("Parsed TLS identity uri=%s", identity.uri)
            self.ready.set()
        else:
            log.info("TLS material updated uri=%s serial=%x", identity.uri, identity.serial)
