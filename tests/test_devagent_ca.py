"""The dev agent's CA: leaf and root profiles, real TLS verification, rotation, intermediates."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.devagent.ca import CertificateAuthority
from proxy.devagent.cakeys import CAError, key_id
from proxy.identity import colon_hex, encode_serial
from tests.certs import CLUSTER, client_context, handshake, server_context

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough


def _pem_certs(bundle: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle.encode())


def test_root_profile(ca: CertificateAuthority) -> None:
    root = ca.active_root
    cert = root.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length is None
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert (
        ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and ku.value.digital_signature
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{CLUSTER}.consul"]
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert (
        ski
        == key_id(cert.public_key())
        == hashlib.sha256(
            cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()
    )
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert (
        isinstance(cn, str)
        and cn.startswith("pri-")
        and cn.endswith(f".consul.ca.{CLUSTER[:8]}.consul")
    )
    api = root.to_api(ca.cluster_id)
    assert api["ID"] == colon_hex(
        cert.fingerprint(__import__("cryptography").hazmat.primitives.hashes.SHA1())
    )
    assert api["SigningKeyID"] == colon_hex(ski)
    assert api["Active"] is True and api["PrivateKeyType"] == "ec" and api["PrivateKeyBits"] == 256


def test_leaf_profile(ca: CertificateAuthority) -> None:
    before = dt.datetime.now(dt.UTC)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    cert = leaf.cert
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{CLUSTER}.consul/ns/default/dc/dc1/svc/web"
    ]
    assert san.value.get_values_for_type(x509.DNSName) == []
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert ku.value.data_encipherment and ku.value.key_agreement
    assert not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical
    assert set(eku.value) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == key_id(ca.active_root.cert.public_key())
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ski == key_id(cert.public_key()) != aki.key_identifier
    # NotBefore is backdated one minute; the default TTL is 72 h.
    assert dt.timedelta(seconds=50) < before - cert.not_valid_before_utc < dt.timedelta(seconds=70)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=72)
    key = serialization.load_pem_private_key(leaf.private_key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert leaf.private_key_pem.startswith("-----BEGIN EC PRIVATE KEY-----")
    api = leaf.to_api(5, 6)
    assert api["SerialNumber"] == encode_serial(cert.serial_number)


def test_serials_are_sequential_and_keys_fresh() -> None:
    ca = CertificateAuthority(CLUSTER)
    a, b = ca.sign_leaf("web", datacenter="dc1"), ca.sign_leaf("web", datacenter="dc1")
    assert ca.active_root.serial == 1
    assert (a.serial, b.serial) == (2, 3)
    assert a.private_key_pem != b.private_key_pem


def test_a_new_root_is_valid_at_once_by_openssls_clock() -> None:
    """The root is backdated a minute like the leaves: OpenSSL checks validity against
    time(), whose clock can lag datetime.now() by a tick, so a root dated "now" could be
    "not yet valid" in a handshake made the same millisecond."""
    made = dt.datetime.now(dt.UTC)
    root = CertificateAuthority(CLUSTER, root_ttl=3600).active_root.cert
    assert dt.timedelta(seconds=59) <= made - root.not_valid_before_utc < dt.timedelta(seconds=61)
    # The TTL still counts from the moment it was made.
    lifetime = root.not_valid_after_utc - made
    assert dt.timedelta(minutes=59) < lifetime < dt.timedelta(minutes=61)


def test_leaf_ttl_is_configurable() -> None:
    ca = CertificateAuthority(CLUSTER, leaf_ttl=3600)
    cert = ca.sign_leaf("web", datacenter="dc1").cert
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key_type": "ec", "key_bits": 224}, "256, 384, 521"),
        ({"key_type": "rsa", "key_bits": 1024}, "2048 or 4096"),
        ({"key_type": "dsa"}, 'must be "ec" or "rsa"'),
        ({"leaf_ttl": 0}, "LeafCertTTL must be positive"),
        ({"private_key_pem": "not a key"}, "error parsing private key"),
    ],
)
def test_bad_ca_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CAError, match=message):
        CertificateAuthority(CLUSTER, **kwargs)  # type: ignore[arg-type]


def _roots(ca: CertificateAuthority) -> list[str]:
    return [r.cert_pem for r in ca.roots]


async def test_issued_leaves_verify_as_client_and_server() -> None:
    ca = CertificateAuthority(CLUSTER)
    web, db = ca.sign_leaf("web", datacenter="dc1"), ca.sign_leaf("db", datacenter="dc1")
    server = server_context(db.cert_pem, db.private_key_pem, _roots(ca))
    client = client_context(web.cert_pem, web.private_key_pem, _roots(ca))
    # OpenSSL checks the client's chain for the SSL-client purpose and the server's for the
    # SSL-server purpose, so this proves both EKUs chain to the root.
    assert await handshake(server, client) == (True, True)


async def test_foreign_ca_leaf_is_rejected() -> None:
    ours, theirs = CertificateAuthority(CLUSTER), CertificateAuthority()
    db = ours.sign_leaf("db", datacenter="dc1")
    intruder = theirs.sign_leaf("web", datacenter="dc1")
    server = server_context(db.cert_pem, db.private_key_pem, _roots(ours))
    client = client_context(intruder.cert_pem, intruder.private_key_pem, _roots(ours))
    assert (await handshake(server, client))[1] is False


async def test_rsa_root_signs_ec_leaves() -> None:
    ca = CertificateAuthority(CLUSTER, key_type="rsa", key_bits=2048)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    assert isinstance(leaf.cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.active_root.to_api(ca.cluster_id)["PrivateKeyType"] == "rsa"
    ctx_s = server_context(leaf.cert_pem, leaf.private_key_pem, _roots(ca))
    ctx_c = client_context(leaf.cert_pem, leaf.private_key_pem, _roots(ca))
    assert await handshake(ctx_s, ctx_c) == (True, True)


async def test_intermediate_signing_bundles_the_intermediate() -> None:
    ca = CertificateAuthority(CLUSTER, use_intermediate=True)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    chain = _pem_certs(leaf.cert_pem)
    assert len(chain) == 2
    intermediate = chain[1]
    bc = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert leaf.cert.issuer == intermediate.subject
    assert intermediate.issuer == ca.active_root.cert.subject
    root_api = ca.active_root.to_api(ca.cluster_id)
    assert root_api["IntermediateCerts"] == [
        chain[1].public_bytes(serialization.Encoding.PEM).decode()
    ]
    ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert root_api["SigningKeyID"] == colon_hex(ski)
    db = ca.sign_leaf("db", datacenter="dc1")
    server = server_context(db.cert_pem, db.private_key_pem, _roots(ca))
    client = client_context(leaf.cert_pem, leaf.private_key_pem, _roots(ca))
    assert await handshake(server, client) == (True, True)


def test_rotation_keeps_old_root_and_cross_signs() -> None:
    ca = CertificateAuthority(CLUSTER)
    old = ca.active_root
    new = ca.rotate(index=7)
    assert [r.active for r in ca.roots] == [False, True]
    assert ca.roots[0].id == old.id and ca.roots[0].modify_index == 7
    assert new.id != old.id and new.serial > old.serial
    (cross_pem,) = new.intermediates
    (cross,) = _pem_certs(cross_pem)
    assert cross.subject == new.cert.subject
    assert cross.issuer == old.cert.subject
    assert cross.public_key() == new.cert.public_key()
    aki = cross.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == key_id(old.cert.public_key())
    assert cross.not_valid_after_utc - cross.not_valid_before_utc == dt.timedelta(days=7, minutes=1)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    assert _pem_certs(leaf.cert_pem)[1] == cross


@pytest.mark.parametrize("intermediate", [False, True])
async def test_rotation_old_root_client_and_new_root_server_verify_each_other(
    intermediate: bool,
) -> None:
    ca = CertificateAuthority(CLUSTER, use_intermediate=intermediate)
    old_roots = _roots(ca)
    web_old = ca.sign_leaf("web", datacenter="dc1")
    ca.rotate(index=9)
    db_new = ca.sign_leaf("db", datacenter="dc1")
    # The client has not seen the rotation: it trusts only the old root and presents its old
    # leaf. The server has the new leaf (bundled with the cross-signed root) and all roots.
    server = server_context(db_new.cert_pem, db_new.private_key_pem, _roots(ca))
    client = client_context(web_old.cert_pem, web_old.private_key_pem, old_roots)
    assert await handshake(server, client) == (True, True)
    # And the other way round: a new-leaf client towards a server that knows only the old root.
    web_new = ca.sign_leaf("web", datacenter="dc1")
    db_old_ctx = server_context(web_old.cert_pem, web_old.private_key_pem, old_roots)
    client_new = client_context(web_new.cert_pem, web_new.private_key_pem, _roots(ca))
    assert await handshake(db_old_ctx, client_new) == (True, True)


async def test_without_the_cross_signed_cert_old_root_clients_reject_new_leaves() -> None:
    ca = CertificateAuthority(CLUSTER)
    old_roots = _roots(ca)
    web_old = ca.sign_leaf("web", datacenter="dc1")
    ca.rotate(index=9)
    db_new = ca.sign_leaf("db", datacenter="dc1")
    bare_leaf = _pem_certs(db_new.cert_pem)[0].public_bytes(serialization.Encoding.PEM).decode()
    server = server_context(bare_leaf, db_new.private_key_pem, _roots(ca))
    client = client_context(web_old.cert_pem, web_old.private_key_pem, old_roots)
    assert (await handshake(server, client))[0] is False
