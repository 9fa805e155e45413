"""Peer chains verified once (`listeners.tls.verified`): the `openssl` engine accepts and
refuses exactly the chains that CPython's `ssl` engine, with the roots in its trust store,
does, with OpenSSL's same words, on the first handshake and on the ones after; what it
remembers never stands in for a check of the handshake itself (dates, purpose, CA flags),
nor outlives the root it ended at; failures are never remembered, and what is remembered
is bounded. Real handshakes between real contexts, in memory."""

from __future__ import annotations

import gc
import logging
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto

from listeners.tls import verified as verified_module
from listeners.tls.contexts import build_contexts, handshake_in_memory
from listeners.tls.engine import TLSContext, TLSError
from listeners.tls.verified import VerifiedChains
from proxy.devagent.ca import CertificateAuthority
from proxy.devagent.cakeys import private_pem
from tests.certs import CLUSTER, issue_leaf
from tests.faultkit import self_signed_root

WEB = f"spiffe://{CLUSTER}.consul/ns/default/dc/dc1/svc/web"


@dataclass(frozen=True)
class Case:
    roots: list[str]  # the server's roots
    chain: str  # the client's chain (PEM, leaf first)
    key: str


def _ca(use_intermediate: bool = False) -> CertificateAuthority:
    return CertificateAuthority(CLUSTER, use_intermediate=use_intermediate)


def _leaf(ca: CertificateAuthority, **options: Any) -> tuple[str, str]:
    """A leaf for web under `ca`'s active root (`options`: `issue_leaf`'s cn, days, usages)."""
    root = ca.active_root
    return issue_leaf(root.cert, root.key, uri=WEB, **options)


def _cases() -> dict[str, Case]:
    ca = _ca()
    roots = [r.cert_pem for r in ca.roots]
    root = ca.roots[0]
    good, good_key = _leaf(ca)
    with_intermediate = _ca(use_intermediate=True)
    leaf = with_intermediate.sign_leaf("web", datacenter="dc1")  # leaf, then intermediate
    lookalike_pem, lookalike_key = self_signed_root(root.cert.subject.rfc4514_string())
    lookalike = x509.load_pem_x509_certificate(lookalike_pem.encode())
    under_lookalike, under_lookalike_key = issue_leaf(lookalike, lookalike_key, uri=WEB)
    foreign_pem, foreign_key = self_signed_root("Foreign CA")
    foreign = x509.load_pem_x509_certificate(foreign_pem.encode())
    # A leaf signed with the key of a valid leaf (one with a subject to name as issuer),
    # sent with it as if it were a CA.
    named, named_key = _leaf(ca, cn="web")
    named_cert = x509.load_pem_x509_certificate(named.encode())
    forged, forged_key = issue_leaf(
        named_cert, load_pem_private_key(named_key.encode(), None), uri=WEB
    )
    server_only = (ExtendedKeyUsageOID.SERVER_AUTH,)
    return {
        "valid leaf": Case(roots, good, good_key),
        "leaf and intermediate": Case(
            [r.cert_pem for r in with_intermediate.roots], leaf.cert_pem, leaf.private_key_pem
        ),
        "leaf and its root": Case(roots, good + root.cert_pem, good_key),
        "the root itself": Case(roots, root.cert_pem, private_pem(root.key)),
        "foreign CA": Case(roots, *issue_leaf(foreign, foreign_key, uri=WEB)),
        "lookalike of the root": Case(roots, *issue_leaf(lookalike, lookalike_key, uri=WEB)),
        "lookalike sent along": Case(roots, under_lookalike + lookalike_pem, under_lookalike_key),
        "expired": Case(roots, *_leaf(ca, days=(-3, -1))),
        "not yet valid": Case(roots, *_leaf(ca, days=(1, 3))),
        "server purpose only": Case(roots, *_leaf(ca, usages=server_only)),
        "forged under a valid leaf": Case(roots, forged + named, forged_key),
    }


CASES = _cases()


# The servers' own leaf, and the roots the clients check it against: never what is tested.
SERVER_CA = _ca()
SERVER_LEAF = SERVER_CA.sign_leaf("db", datacenter="dc1")
SERVER_ROOTS = [r.cert_pem for r in SERVER_CA.roots]


def _server(roots: list[str], *, native: bool = False) -> TLSContext:
    """Our `openssl` server context; `native`: the same with the roots in its trust store
    and no verify callback, as before `listeners.tls.verified` (the reference)."""
    server = build_contexts(roots, SERVER_LEAF.cert_pem, SERVER_LEAF.private_key_pem)[0]
    assert isinstance(server, SSL.Context)
    if native:
        server.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)  # no callback
        store = server.get_cert_store()
        assert store is not None
        for pem in roots:
            for cert in x509.load_pem_x509_certificates(pem.encode()):
                store.add_cert(crypto.X509.from_cryptography(cert))
    return server


def _client(chain: str, key: str) -> TLSContext:
    return build_contexts(SERVER_ROOTS, chain, key, "openssl")[1]


def _verified(context: TLSContext) -> VerifiedChains:
    verified = getattr(context, "verified", None)
    assert isinstance(verified, VerifiedChains)
    return verified


def _verdict(server: TLSContext, client: TLSContext) -> str:
    """ "accepted", or OpenSSL's reason for the refusal (each engine's decoration gone)."""
    try:
        handshake_in_memory(server, client)
    except TLSError as exc:
        found = re.search(r"certificate verify failed: (.+?)(?: \(_ssl\.c:\d+\))?$", str(exc))
        return found.group(1) if found else str(exc)
    return "accepted"


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_chains_pass_as_with_the_roots_in_the_store(name: str) -> None:
    case = CASES[name]
    expected = _verdict(_server(case.roots, native=True), _client(case.chain, case.key))
    server = _server(case.roots)
    verdicts = [_verdict(server, _client(case.chain, case.key)) for _ in range(3)]
    assert verdicts == [expected] * 3
    verified = _verified(server)
    if expected == "accepted" or name in REFUSED_BY_THE_HANDSHAKE:
        assert (len(verified), verified.misses) == (1, 1)  # checked in full once
        assert verified.hits >= 2
    else:
        assert len(verified) == 0  # a chain that fails against the roots is never kept


# Chains that lead to a root (and are remembered so) but that the handshake's own check
# refuses each time: a client leaf whose purpose is serverAuth only.
REFUSED_BY_THE_HANDSHAKE = {"server purpose only"}


def test_the_reference_verdicts() -> None:
    # What the table above compares against, spelled out (the `openssl` engine's OpenSSL).
    words = {
        name: _verdict(_server(case.roots, native=True), _client(case.chain, case.key))
        for name, case in CASES.items()
    }
    assert words == {
        "valid leaf": "accepted",
        "leaf and intermediate": "accepted",
        "leaf and its root": "accepted",
        "the root itself": "accepted",
        "foreign CA": "unable to get local issuer certificate",
        "lookalike of the root": "unable to get local issuer certificate",
        "lookalike sent along": "self-signed certificate in certificate chain",
        "expired": "certificate has expired",
        "not yet valid": "certificate is not yet valid or the system clock is incorrect",
        "server purpose only": "unsuitable certificate purpose",
        "forged under a valid leaf": "invalid CA certificate",
    }


def test_a_remembered_leaf_is_refused_once_it_expires() -> None:
    ca = _ca()
    roots = [r.cert_pem for r in ca.roots]
    chain, key = _leaf(ca, days=(-1 / 1440, 2 / 86400))  # valid for 2 s more
    end = x509.load_pem_x509_certificate(chain.encode()).not_valid_after_utc.timestamp()
    server = _server(roots)
    assert _verdict(server, _client(chain, key)) == "accepted"
    assert len(_verified(server)) == 1
    deadline = time.monotonic() + 10
    while time.time() <= end + 1:  # OpenSSL compares whole seconds
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _verdict(server, _client(chain, key)) == "certificate has expired"


def test_nothing_is_trusted_past_the_end_of_its_root() -> None:
    ca = _ca()
    roots = [r.cert_pem for r in ca.roots]
    chain, key = _leaf(ca)
    server = _server(roots)
    verified = _verified(server)
    root_end = ca.roots[0].cert.not_valid_after_utc.timestamp()
    verified.clock = lambda: root_end + 1
    checks = [verified.misses]
    for _ in range(2):
        assert _verdict(server, _client(chain, key)) == "accepted"  # OpenSSL's own clock
        checks.append(verified.misses)
    assert len(verified) == 0
    assert checks[0] < checks[1] < checks[2]  # checked in full, each time
    verified.clock = time.time
    assert _verdict(server, _client(chain, key)) == "accepted"
    assert len(verified) == 1


def test_what_is_remembered_is_bounded_the_oldest_going_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verified_module, "MAX_CHAINS", 2)
    ca = _ca()
    roots = [r.cert_pem for r in ca.roots]
    leaves = [_leaf(ca) for _ in range(3)]
    server = _server(roots)
    verified = _verified(server)
    for chain, key in leaves:
        assert _verdict(server, _client(chain, key)) == "accepted"
    assert (len(verified), verified.misses) == (2, 3)
    assert _verdict(server, _client(*leaves[2])) == "accepted"
    assert verified.misses == 3  # the newest is still known
    assert _verdict(server, _client(*leaves[0])) == "accepted"
    assert verified.misses == 4  # the oldest had gone


def test_contexts_with_other_roots_trust_nothing_remembered_before() -> None:
    old, new = _ca(), _ca()
    chain, key = _leaf(old)
    before = _server([r.cert_pem for r in old.roots])
    assert _verdict(before, _client(chain, key)) == "accepted"
    after = _server([r.cert_pem for r in new.roots])
    assert _verdict(after, _client(chain, key)) == "unable to get local issuer certificate"


def test_a_failure_inside_the_callback_refuses_the_chain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> tuple[int, float]:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(VerifiedChains, "_verify", broken)
    ca = _ca()
    server = _server([r.cert_pem for r in ca.roots])
    with caplog.at_level(logging.ERROR, logger="listeners.tls.verified"):
        verdict = _verdict(server, _client(*_leaf(ca)))
    assert verdict != "accepted"
    assert "verify callback failed, the chain is refused: broken on purpose" in caplog.text
    assert len(_verified(server)) == 0


def test_contexts_and_their_chains_are_freed_without_the_collector() -> None:
    ca = _ca()
    server = _server([r.cert_pem for r in ca.roots])
    assert _verdict(server, _client(*_leaf(ca))) == "accepted"
    gone = weakref.ref(_verified(server))
    gc.disable()
    try:
        del server
        assert gone() is None
    finally:
        gc.enable()
