"""The dev agent's built-in certificate authority, shaped like Consul's `consul` CA provider.

Owns the X.509 side of Connect: root generation, optional signing intermediate, cross-signing
on rotation, and leaf issuance with the profile of modern Consul
(`agent/connect/ca/provider_consul.go`).

Rule 1: this module is pure. It does no I/O, knows nothing of HTTP, indexes or blocking; the
agent's state stamps the records it gets back with Raft-like indexes.
Rule 2: the only private keys that leave this module are those of end-entity certificates:
a leaf's `PrivateKeyPEM` (what a real agent hands its local proxies too), and the key that
`issue()` returns with the peering port's certificate. Root and intermediate keys never
leave.
"""

from __future__ import annotations

import datetime as dt
import secrets
import string
import uuid
from dataclasses import dataclass, field, replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.devagent.cakeys import (
    CAError,
    KeyType,
    PrivateKey,
    cert_pem,
    generate_key,
    key_id,
    key_type_bits,
    load_private_key,
    private_pem,
)
from proxy.identity import SpiffeIDService, colon_hex, encode_serial

DEFAULT_LEAF_TTL = 72 * 3600.0
DEFAULT_ROOT_TTL = 87600 * 3600.0
DEFAULT_INTERMEDIATE_TTL = 8760 * 3600.0
CROSS_SIGN_TTL = 7 * 24 * 3600.0
# Consul backdates leaves and intermediates by one minute to absorb clock skew between
# the agent that signs and the peers that verify. The dev agent backdates its roots too:
# OpenSSL checks validity against time(), which on Linux reads a clock that lags the one
# datetime.now() reads by up to a tick, so a root dated "now" and used within the same
# millisecond could be "not yet valid" (a test saw it once).
BACKDATE = dt.timedelta(minutes=1)

_BASE36 = string.digits + string.ascii_lowercase


def _ca_common_name(cluster_id: str) -> str:
    # Consul 1.7+ names CA certificates pri-<uid>.consul.ca.<first 8 of cluster id>.consul.
    uid = "".join(secrets.choice(_BASE36) for _ in range(8))
    return f"pri-{uid}.consul.ca.{cluster_id[:8]}.consul"


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ca_extensions(
    builder: x509.CertificateBuilder,
    *,
    trust_domain: str,
    subject_key: bytes,
    authority_key: bytes,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            False,
        )
        .add_extension(x509.SubjectKeyIdentifier(subject_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=authority_key,
                authority_cert_issuer=None,
                authority_cert_serial_number=None,
            ),
            False,
        )
    )


@dataclass(frozen=True, slots=True)
class _Signer:
    """A certificate that signs leaves (the root itself, or an intermediate under it)."""

    cert: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True, slots=True)
class Root:
    """One entry of the roots list: a `CARoot` in Consul's API."""

    id: str
    name: str
    serial: int
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    signer: _Signer = field(repr=False)
    # PEMs a peer needs between a leaf of this root and the root itself, or an older root:
    # the signing intermediate (if any) and, after a rotation, the cross-signed root.
    intermediates: tuple[str, ...]
    active: bool
    create_index: int
    modify_index: int

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def signing_key_id(self) -> str:
        ski = self.signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return colon_hex(ski.value.digest)

    def to_api(self, cluster_id: str) -> dict[str, object]:
        """Render as Consul's `CARoot` JSON object."""
        key_type, bits = key_type_bits(self.key)
        return {
            "ID": self.id,
            "Name": self.name,
            "SerialNumber": self.serial,
            "SigningKeyID": self.signing_key_id,
            "ExternalTrustDomain": cluster_id,
            "NotBefore": _rfc3339(self.cert.not_valid_before_utc),
            "NotAfter": _rfc3339(self.cert.not_valid_after_utc),
            "RootCert": self.cert_pem,
            "IntermediateCerts": list(self.intermediates) or None,
            "Active": self.active,
            "PrivateKeyType": key_type,
            "PrivateKeyBits": bits,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(frozen=True, slots=True)
class Leaf:
    """An issued leaf: Consul's `IssuedCert` minus the indexes the agent adds."""

    service: str
    service_uri: str
    serial: int
    cert: x509.Certificate
    cert_pem: str  # leaf followed by every intermediate a peer may need
    private_key_pem: str = field(repr=False)
    root_id: str

    @property
    def valid_after(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    @property
    def valid_before(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def to_api(self, create_index: int, modify_index: int) -> dict[str, object]:
        return {
            "SerialNumber": encode_serial(self.serial),
            "CertPEM": self.cert_pem,
            "PrivateKeyPEM": self.private_key_pem,
            "Service": self.service,
            "ServiceURI": self.service_uri,
            "ValidAfter": _rfc3339(self.valid_after),
            "ValidBefore": _rfc3339(self.valid_before),
            "CreateIndex": create_index,
            "ModifyIndex": modify_index,
        }


class CertificateAuthority:
    """Consul's built-in CA provider, in memory.

    Serial numbers come from one counter shared by roots, intermediates, cross-signed
    certificates and leaves, as Consul's provider counter does (root 7, leaf 8, ...).
    """

    def __init__(
        self,
        cluster_id: str | None = None,
        *,
        key_type: KeyType = "ec",
        key_bits: int = 256,
        private_key_pem: str | None = None,
        leaf_ttl: float = DEFAULT_LEAF_TTL,
        root_ttl: float = DEFAULT_ROOT_TTL,
        intermediate_ttl: float = DEFAULT_INTERMEDIATE_TTL,
        use_intermediate: bool = False,
        index: int = 1,
    ) -> None:
        if leaf_ttl <= 0:
            raise CAError("LeafCertTTL must be positive")
        self.cluster_id = (cluster_id or str(uuid.uuid4())).lower()
        self.trust_domain = f"{self.cluster_id}.consul"
        self.leaf_ttl = leaf_ttl
        self.root_ttl = root_ttl
        self.intermediate_ttl = intermediate_ttl
        self.use_intermediate = use_intermediate
        self._serial = 0
        key = load_private_key(private_key_pem) if private_key_pem else None
        self._roots: list[Root] = [self._new_root(key or generate_key(key_type, key_bits), index)]

    # -- reading -------------------------------------------------------------------------

    @property
    def roots(self) -> tuple[Root, ...]:
        return tuple(self._roots)

    @property
    def active_root(self) -> Root:
        return next(r for r in self._roots if r.active)

    # -- issuing -------------------------------------------------------------------------

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _new_root(self, key: PrivateKey, index: int) -> Root:
        now = dt.datetime.now(dt.UTC)
        serial = self._next_serial()
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, _ca_common_name(self.cluster_id))]
        )
        kid = key_id(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(seconds=self.root_ttl))
        )
        builder = _ca_extensions(
            builder,
            trust_domain=self.trust_domain,
            subject_key=kid,
            authority_key=kid,
            path_length=None,
        )
        cert = builder.sign(key, hashes.SHA256())
        signer = _Signer(cert, key)
        intermediates: tuple[str, ...] = ()
        if self.use_intermediate:
            signer = self._new_intermediate(cert, key)
            intermediates = (cert_pem(signer.cert),)
        return Root(
            id=colon_hex(cert.fingerprint(hashes.SHA1())),
            name="Consul CA Root Cert",
            serial=serial,
            cert=cert,
            key=key,
            signer=signer,
            intermediates=intermediates,
            active=True,
            create_index=index,
            modify_index=index,
        )

    def _new_intermediate(self, root: x509.Certificate, root_key: PrivateKey) -> _Signer:
        now = dt.datetime.now(dt.UTC)
        key = generate_key(*key_type_bits(root_key))
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [x509.NameAttribute(NameOID.COMMON_NAME, _ca_common_name(self.cluster_id))]
                )
            )
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(self._next_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(seconds=self.intermediate_ttl))
        )
        builder = _ca_extensions(
            builder,
            trust_domain=self.trust_domain,
            subject_key=key_id(key.public_key()),
            authority_key=key_id(root_key.public_key()),
            path_length=0,
        )
        return _Signer(builder.sign(root_key, hashes.SHA256()), key)

    def _cross_sign(self, new: Root, old: Root) -> x509.Certificate:
        """The new root re-signed by the old root's key.

        As Consul's `agent/consul/leader_connect_ca.go` does on a rotation.
        """
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(new.cert.subject)
            .issuer_name(old.cert.subject)
            .public_key(new.key.public_key())
            .serial_number(self._next_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(seconds=CROSS_SIGN_TTL))
        )
        builder = _ca_extensions(
            builder,
            trust_domain=self.trust_domain,
            subject_key=key_id(new.key.public_key()),
            authority_key=key_id(old.key.public_key()),
            path_length=None,
        )
        return builder.sign(old.key, hashes.SHA256())

    def rotate(
        self,
        index: int,
        *,
        key_type: KeyType | None = None,
        key_bits: int | None = None,
        private_key_pem: str | None = None,
    ) -> Root:
        """Replace the active root, keeping the old one in the list.

        The new root is cross-signed by the old root's key; the cross-signed certificate is
        published in the new root's `IntermediateCerts` and appended to every new leaf, so a
        peer that trusts only the old root still verifies leaves of the new one.

        Returns:
            The new active root.
        """
        old = self.active_root
        old_type, old_bits = key_type_bits(old.key)
        if private_key_pem:
            key = load_private_key(private_key_pem)
        else:
            new_type = key_type or old_type
            key = generate_key(new_type, key_bits or (old_bits if new_type == old_type else 256))
        new = self._new_root(key, index)
        cross = cert_pem(self._cross_sign(new, old))
        new = replace(new, intermediates=(*new.intermediates, cross))
        retired = replace(old, active=False, modify_index=index)
        self._roots = [*(r for r in self._roots if r is not old), retired, new]
        return new

    def issue(
        self, subject: x509.Name, names: list[x509.GeneralName], *, key_usage: bool
    ) -> tuple[x509.Certificate, PrivateKey, Root]:
        """An end-entity certificate from the active root's signer, on a new P-256 key.

        Valid from `BACKDATE` ago for `leaf_ttl`; CA:FALSE; ExtKeyUsage serverAuth and
        clientAuth; SKI of the new key, AKI of the signer; the SAN extension made critical
        when `subject` is empty (RFC 5280). With `key_usage`, KeyUsage as Consul's leaves
        carry it (critical). Returns the certificate, its key and the root it chains to.
        """
        root = self.active_root
        signer = root.signer
        key = ec.generate_private_key(ec.SECP256R1())
        not_before = dt.datetime.now(dt.UTC) - BACKDATE
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(self._next_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_before + dt.timedelta(seconds=self.leaf_ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        )
        if key_usage:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=True,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
        cert = (
            builder.add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                False,
            )
            .add_extension(x509.SubjectAlternativeName(names), not list(subject))
            .add_extension(x509.SubjectKeyIdentifier(key_id(key.public_key())), False)
            .add_extension(
                x509.AuthorityKeyIdentifier(
                    key_identifier=key_id(signer.key.public_key()),
                    authority_cert_issuer=None,
                    authority_cert_serial_number=None,
                ),
                False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        return cert, key, root

    def sign_leaf(
        self,
        service: str,
        *,
        datacenter: str,
        namespace: str = "default",
        partition: str = "default",
    ) -> Leaf:
        """Generate a key pair and a leaf certificate for `service`.

        Profile (modern Consul, `issue()`): empty subject, one critical URI SAN, CA:FALSE,
        KeyUsage digitalSignature|keyEncipherment|dataEncipherment|keyAgreement (critical),
        ExtKeyUsage serverAuth+clientAuth, SKI of the leaf key, AKI of the signer, NotBefore
        now - 1 min.
        """
        if not service:
            raise CAError("service name must not be empty")
        uri = SpiffeIDService(
            host=self.trust_domain,
            namespace=namespace,
            datacenter=datacenter,
            service=service,
            partition=partition,
        ).uri()
        cert, key, root = self.issue(
            x509.Name([]), [x509.UniformResourceIdentifier(uri)], key_usage=True
        )
        return Leaf(
            service=service,
            service_uri=uri,
            serial=cert.serial_number,
            cert=cert,
            cert_pem=cert_pem(cert) + "".join(root.intermediates),
            private_key_pem=private_pem(key),
            root_id=root.id,
        )
