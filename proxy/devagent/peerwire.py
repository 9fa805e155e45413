"""The peering channel's pieces that need no agent: messages, TLS material, texts.

A message is one JSON object on one line (at most `MAX_LINE` bytes). The agent's peering
certificate (`sign_server`) names `server.<dc>.peering.<trust domain>` as its DNS SAN, as
Consul's servers' gRPC TLS certificate does, and is signed by the Connect CA.

Rule 1: pure apart from `load_chain`, which keeps the private key off every disk.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from proxy import keyload
from proxy.devagent.ca import CertificateAuthority
from proxy.devagent.cakeys import cert_pem

MAX_LINE = 8 << 20


def sign_server(ca: CertificateAuthority, dns_name: str, *, datacenter: str) -> tuple[str, str]:
    """A certificate for the agent's peering port, signed by `ca`'s active root's signer.

    Also the dialer's client certificate on its stream (serverAuth and clientAuth). Subject
    and a DNS SAN `dns_name`, the URI SAN of the agent's server identity, no KeyUsage.

    Returns:
        (certificate PEM followed by the active root's intermediates, private key PEM)
    """
    uri = f"spiffe://{ca.trust_domain}/agent/server/dc/{datacenter}"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    names: list[x509.GeneralName] = [x509.DNSName(dns_name), x509.UniformResourceIdentifier(uri)]
    cert, key, root = ca.issue(subject, names, key_usage=False)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert_pem(cert) + "".join(root.intermediates), key_pem


def load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # The key never touches a disk (`proxy.keyload`).
    keyload.load_cert_chain(ctx, cert_pem, key_pem, name="devagent-peering")


def denied(message: str) -> bytes:
    """The refusal of an exchange or a stream (Consul's gRPC PermissionDenied)."""
    return line({"Error": {"Code": "PermissionDenied", "Message": message}})


def line(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


async def read_message(reader: asyncio.StreamReader, timeout: float | None) -> dict[str, Any]:
    """One JSON object line; EOF, an oversized line or anything else ends the stream."""
    async with asyncio.timeout(timeout):
        raw = await reader.readline()
    if not raw:
        raise ConnectionError("the peer closed the stream")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("a peering message must be a JSON object")
    return data


def uri_trust_domain(peercert: Mapping[str, Any] | None) -> str:
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith("spiffe://"):
            return str(value)[len("spiffe://") :].split("/", 1)[0].lower()
    return ""


def parses(pem: str) -> bool:
    try:
        x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return False
    return True


def reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == 111:
        return "connect: connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: {exc.verify_message}"
    return str(exc) or type(exc).__name__
