"""Keys of the dev agent's CA: generation and loading with Consul's provider's rules, the key
identifier Consul puts in SKI and AKI, and PEM output as Consul emits it.

Rule 1: pure; no I/O. Private keys become PEM here only for an issued leaf (see `ca`).
"""

from __future__ import annotations

import hashlib
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


_EC_CURVES: dict[int, ec.EllipticCurve] = {
    256: ec.SECP256R1(),
    384: ec.SECP384R1(),
    521: ec.SECP521R1(),
}


class CAError(ValueError):
    """A CA configuration or key the built-in provider cannot use."""


def key_id(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    """Consul's key identifier: SHA-256 of the DER SubjectPublicKeyInfo (32 bytes)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def generate_key(key_type: KeyType = "ec", bits: int = 256) -> PrivateKey:
    """Generate a CA key of a type and size Consul's provider accepts."""
    if key_type == "ec":
        curve = _EC_CURVES.get(bits)
        if curve is None:
            raise CAError(f"private key bits must be one of 256, 384, 521 for ec keys, got {bits}")
        return ec.generate_private_key(curve)
    if key_type == "rsa":
        if bits not in (2048, 4096):
            raise CAError(f"private key bits must be 2048 or 4096 for rsa keys, got {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise CAError(f'private key type must be "ec" or "rsa", got "{key_type}"')


def load_private_key(pem: str) -> PrivateKey:
    """Load a CA key given in PEM (SEC1, PKCS#1 or PKCS#8, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"error parsing private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError("private key must be an EC or RSA key")
    return key


def key_type_bits(key: PrivateKey) -> tuple[KeyType, int]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ec", key.curve.key_size
    return "rsa", key.key_size


def private_pem(key: PrivateKey) -> str:
    # SEC1 for EC ("EC PRIVATE KEY") and PKCS#1 for RSA, as Consul emits them.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()
