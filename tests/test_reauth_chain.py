"""The roots check of live re-authorization through intermediates: the path walk on its own,
then real mTLS clients whose leaves were signed by an intermediate, through a real db sidecar
on a dev agent that signs through intermediates, while its roots rotate."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from listeners.events import Refusal
from proxy.devagent import AgentConfig, DevAgent
from proxy.devagent.ca import CertificateAuthority, Root
from proxy.devagent.cakeys import key_id
from proxy.observe import ProxyMetrics
from proxy.reauth import MAX_CHAIN, chained_to_removed_root
from tests.certs import load_chain
from tests.conftest import wait_until
from tests.proxyfix import db_sidecar, echo_app
from tests.test_reauth import LABELS, REFUSED, _closed, _echo, _forwarding, open_client


@pytest.fixture
def agent_config() -> AgentConfig:
    """The dev agent of these tests signs leaves through an intermediate of each root."""
    return AgentConfig(node_name="test-node", sidecar_check_interval=0.3, use_intermediate=True)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _bundle(pem: str) -> list[bytes]:
    """A leaf's CertPEM (leaf, then what a peer needs with it) as the DER chain a client sends."""
    return [_der(c) for c in x509.load_pem_x509_certificates(pem.encode())]


def _cross_sign(cert: x509.Certificate, issuer: Root) -> x509.Certificate:
    """`cert`'s subject, key and extensions, issued by the root `issuer` (a cross-signature)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.AuthorityKeyIdentifier):
            value = x509.AuthorityKeyIdentifier(key_id(issuer.key.public_key()), None, None)
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(issuer.key, hashes.SHA256())


def _rotated() -> tuple[CertificateAuthority, Root, Root]:
    """A CA with intermediates, rotated once: (the CA, root A retired, root B active)."""
    ca = CertificateAuthority(use_intermediate=True)
    ca.rotate(2)
    old, new = ca.roots
    return ca, old, new


# -- the path walk ------------------------------------------------------------------------


def test_a_leaf_under_an_intermediate_of_a_removed_root_is_closed() -> None:
    ca = CertificateAuthority(use_intermediate=True)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    ca.rotate(2)
    a, b = (r.cert for r in ca.roots)
    chain = _bundle(leaf.cert_pem)
    assert len(chain) == 2  # the leaf, then the intermediate of root A
    assert chained_to_removed_root(chain, [a], [b])
    # Whatever the order the client sent its intermediates in.
    assert chained_to_removed_root([chain[0], _der(b), chain[1]], [a], [b])
    # Root A is still trusted, or it was not the one removed: kept.
    assert not chained_to_removed_root(chain, [a], [a, b])
    assert not chained_to_removed_root(chain, [b], [a])
    # The leaf alone leads to no root: it cannot tell, so it keeps (a resumed session).
    assert not chained_to_removed_root(chain[:1], [a], [b])


def test_a_path_to_a_current_root_keeps_the_connection() -> None:
    ca = CertificateAuthority(use_intermediate=True)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    (inter_pem,) = ca.active_root.intermediates
    ca.rotate(2)
    old, new = ca.roots
    cross = _der(_cross_sign(_cert(inter_pem), new))  # the intermediate, signed by root B
    chain = _bundle(leaf.cert_pem)
    assert not chained_to_removed_root([*chain, cross], [old.cert], [new.cert])
    assert not chained_to_removed_root([chain[0], cross, chain[1]], [old.cert], [new.cert])
    # The control: without the cross-signed one, the only path ends in root A.
    assert chained_to_removed_root(chain, [old.cert], [new.cert])


def test_a_leaf_of_the_new_root_keeps_through_either_root() -> None:
    """After a rotation a leaf comes with its intermediate and the new root cross-signed by the
    old one: it reaches both roots, so removing either keeps it."""
    ca, old, new = _rotated()
    chain = _bundle(ca.sign_leaf("web", datacenter="dc1").cert_pem)
    assert len(chain) == 3
    assert not chained_to_removed_root(chain, [old.cert], [new.cert])
    assert not chained_to_removed_root(chain, [new.cert], [old.cert])
    # Both gone: every path ends in a removed root.
    other = CertificateAuthority().active_root.cert
    assert chained_to_removed_root(chain, [old.cert, new.cert], [other])


def test_a_leaf_issued_directly_by_a_root() -> None:
    ca = CertificateAuthority()
    chain = _bundle(ca.sign_leaf("web", datacenter="dc1").cert_pem)
    assert len(chain) == 1
    ca.rotate(2)
    old, new = ca.roots
    assert chained_to_removed_root(chain, [old.cert], [new.cert])
    assert not chained_to_removed_root(chain, [new.cert], [old.cert])


def test_the_root_itself_in_the_chain_and_repeated_certificates() -> None:
    ca = CertificateAuthority(use_intermediate=True)
    root = ca.active_root
    leaf = ca.sign_leaf("web", datacenter="dc1")
    chain = _bundle(leaf.cert_pem)
    other = CertificateAuthority().active_root.cert
    # A client may send its root too (self-signed), and the same certificate twice.
    assert chained_to_removed_root([*chain, _der(root.cert)], [root.cert], [other])
    assert chained_to_removed_root([*chain, chain[1], chain[0]], [root.cert], [other])
    assert not chained_to_removed_root([*chain, _der(root.cert)], [other], [root.cert])


def test_hostile_or_unparseable_chains_keep_or_skip() -> None:
    ca = CertificateAuthority(use_intermediate=True)
    chain = _bundle(ca.sign_leaf("web", datacenter="dc1").cert_pem)
    root = ca.active_root.cert
    other = CertificateAuthority().active_root.cert
    assert not chained_to_removed_root([], [root], [other])
    assert not chained_to_removed_root([b"\x30\x03junk"], [root], [other])
    assert not chained_to_removed_root([b"", chain[1]], [root], [other])
    # A certificate that does not parse leads nowhere; the others still do.
    assert chained_to_removed_root([chain[0], b"\xff" * 40, chain[1]], [root], [other])
    # Bounded: certificates past MAX_CHAIN are not looked at, so the intermediate is missed.
    unrelated = [_der(ca.sign_leaf(f"s{i}", datacenter="dc1").cert) for i in range(MAX_CHAIN)]
    assert chained_to_removed_root([chain[0], *unrelated[: MAX_CHAIN - 2], chain[1]], [root], [])
    assert not chained_to_removed_root([chain[0], *unrelated, chain[1]], [root], [other])


# -- live: a dev agent that signs through intermediates ------------------------------------


def _client_ctx(agent: DevAgent, cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """An mTLS client context that sends `cert_pem` (leaf and what follows it) as its chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(r.cert_pem for r in agent.state.ca.roots))
    load_chain(ctx, cert_pem, key_pem)
    return ctx


@pytest.mark.tls_engines()
async def test_removed_root_closes_a_leaf_signed_by_its_intermediate(
    agent: DevAgent, tls_engine: str
) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, reauthorize=True) as db:
        assert db.public is not None and db.reauthorizer is not None
        public, reauth = db.public, db.reauthorizer
        leaf = agent.state.ca.sign_leaf("web", datacenter="dc1")  # under root A's intermediate
        ctx = _client_ctx(agent, leaf.cert_pem, leaf.private_key_pem)
        async with open_client(public.port, ctx) as (reader, writer):
            assert await _echo(reader, writer, b"x") == b"x"
            await _forwarding(db, 1)
            (conn,) = public.forwarding()
            assert conn.peer_chain is not None
            assert conn.peer_chain() == _bundle(leaf.cert_pem)  # leaf, intermediate
            # Rotation: the proxy trusts A and B, then takes its own leaf of B. Nothing is
            # removed, so the connection stays.
            rotations = db.tls.rotations.value
            agent.state.connect_ca.rotate()
            async with asyncio.timeout(5):
                await db.tls.rotations.reached(rotations + 2)
            await wait_until(lambda: reauth.root_passes >= 1)
            assert await _echo(reader, writer, b"y") == b"y"
            # Root A is pruned: the path leaf -> intermediate -> A ends in a removed root.
            active = [r.cert_pem for r in agent.state.ca.roots if r.active]
            removed_at = asyncio.get_running_loop().time()
            assert db.tls.set_roots(active)
            async with asyncio.timeout(5):
                assert await _closed(reader)
            took = asyncio.get_running_loop().time() - removed_at
        assert took < 1.0, f"closed {took:.3f}s after the root was removed"
        assert reauth.root_removed == 1
        assert public.forwarding() == []
        await wait_until(
            lambda: (
                metrics.registry.get_sample_value(
                    REFUSED, {"reason": Refusal.ROOT_REMOVED.value, **LABELS}
                )
                == 1
            )
        )
        # The record lets the TLS connection go once the connection has ended.
        assert conn.peer_chain is None and conn.refusal == Refusal.ROOT_REMOVED


@pytest.mark.tls_engines()
async def test_an_intermediate_cross_signed_by_the_new_root_keeps_its_connection(
    agent: DevAgent, tls_engine: str
) -> None:
    async with echo_app() as app, db_sidecar(agent, app, reauthorize=True) as db:
        assert db.public is not None and db.reauthorizer is not None
        public, reauth = db.public, db.reauthorizer
        old = agent.state.ca.active_root
        leaf = agent.state.ca.sign_leaf("web", datacenter="dc1")  # under root A's intermediate
        rotations = db.tls.rotations.value
        agent.state.connect_ca.rotate()
        async with asyncio.timeout(5):
            await db.tls.rotations.reached(rotations + 2)
        new = agent.state.ca.active_root
        (inter_pem,) = old.intermediates
        cross = _cross_sign(_cert(inter_pem), new).public_bytes(Encoding.PEM).decode()
        plain = _client_ctx(agent, leaf.cert_pem, leaf.private_key_pem)
        crossed = _client_ctx(agent, leaf.cert_pem + cross, leaf.private_key_pem)
        async with (
            open_client(public.port, plain) as (r1, w1),
            open_client(public.port, crossed) as (r2, w2),
        ):
            assert await _echo(r1, w1, b"a") == b"a"
            assert await _echo(r2, w2, b"b") == b"b"
            await _forwarding(db, 2)
            passes = reauth.root_passes
            assert db.tls.set_roots([new.cert_pem])
            # The same leaf without the cross-signed intermediate only reaches root A...
            async with asyncio.timeout(5):
                assert await _closed(r1)
            await wait_until(lambda: reauth.root_passes > passes)
            # ...with it, it reaches root B too: kept, and still carrying bytes.
            assert await _echo(r2, w2, b"kept") == b"kept"
            assert len(public.forwarding()) == 1
        assert reauth.root_removed == 1
