"""Connect identities: SPIFFE IDs, certificate serial encoding, identity comparison.

Owns the parsing rules of Consul's `agent/connect/uri*.go` and
the colon-hex encodings of section 2.6.

Rule 1: pure values and functions: no I/O, no sockets, no awaits.
Rule 2: parsing failures raise IdentityError with Consul's own texts; nothing here guesses.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from proxy.errors import IdentityError

_SERVICE = re.compile(r"^(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)$")
_AGENT = re.compile(r"^(?:/ap/([^/]+))?/agent/client/dc/([^/]+)/id/([^/]+)$")
_SERVER = re.compile(r"^/agent/server/dc/([^/]+)$")
_MESH_GATEWAY = re.compile(r"^(?:/ap/([^/]+))?/gateway/mesh/dc/([^/]+)$")


def colon_hex(data: bytes) -> str:
    """Consul's HexString: lowercase two-digit hex per byte, joined with colons."""
    return ":".join(f"{b:02x}" for b in data)


def encode_serial(serial: int) -> str:
    """Encode a certificate serial as Consul does: colon-hex of the minimal big-endian bytes.

    0x0e gives ``0e``, 256 gives ``01:00``, 0 gives the empty string.
    """
    if serial < 0:
        raise ValueError("serial numbers are non-negative")
    return colon_hex(serial.to_bytes((serial.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True, slots=True)
class SpiffeIDService:
    """`spiffe://<td>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>`."""

    host: str
    namespace: str
    datacenter: str
    service: str
    partition: str = "default"

    def uri(self) -> str:
        prefix = f"/ap/{self.partition}" if self.partition and self.partition != "default" else ""
        return (
            f"spiffe://{self.host}{prefix}/ns/{self.namespace}/dc/{self.datacenter}"
            f"/svc/{self.service}"
        )


@dataclass(frozen=True, slots=True)
class SpiffeIDAgent:
    host: str
    partition: str
    datacenter: str
    agent: str


@dataclass(frozen=True, slots=True)
class SpiffeIDServer:
    host: str
    datacenter: str


@dataclass(frozen=True, slots=True)
class SpiffeIDMeshGateway:
    host: str
    partition: str
    datacenter: str


@dataclass(frozen=True, slots=True)
class SpiffeIDSigning:
    """The CA's own identity: `spiffe://<cluster-id>.consul` with no path."""

    host: str


SpiffeID = SpiffeIDService | SpiffeIDAgent | SpiffeIDServer | SpiffeIDMeshGateway | SpiffeIDSigning


@dataclass(frozen=True, slots=True)
class PeerTarget:
    """What an instance imported from a peer must show, from its `Connect.PeerMeta`.

    `spiffe_ids` are full URIs in the exporter's trust domain and datacenter; the server's
    URI SAN must equal one of them (case-insensitive; trust domains are compared, unlike
    `matches_expected`). `sni` is sent as the TLS server name (`PeerMeta.SNI[0]`).
    """

    peer: str  # our local name of the exporting peer
    spiffe_ids: tuple[str, ...]
    sni: str

    def uri(self) -> str:
        """The identities accepted, for error texts."""
        return " or ".join(self.spiffe_ids)


# An upstream instance: (host, port, the identity its certificate must show).
Endpoint = tuple[str, int, SpiffeIDService | PeerTarget]


def parse_spiffe_id(uri: str) -> SpiffeID:
    """Parse a Connect SPIFFE URI.

    Raises:
        IdentityError: not a `spiffe` URI, or not one of Consul's identity shapes.
    """
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise IdentityError("SPIFFE ID is not in the expected format") from exc
    if parts.scheme.lower() != "spiffe":
        raise IdentityError("SPIFFE ID must have 'spiffe' scheme")
    host = parts.netloc.lower()
    # Segments are matched on the raw path and percent-decoded afterwards, so an encoded
    # slash inside a name cannot create a new path segment.
    path = parts.path

    def seg(value: str | None, default: str = "") -> str:
        return unquote(value) if value else default

    if m := _SERVICE.match(path):
        return SpiffeIDService(
            host=host,
            partition=seg(m.group(1), "default"),
            namespace=seg(m.group(2)),
            datacenter=seg(m.group(3)),
            service=seg(m.group(4)),
        )
    if m := _AGENT.match(path):
        return SpiffeIDAgent(
            host=host,
            partition=seg(m.group(1), "default"),
            datacenter=seg(m.group(2)),
            agent=seg(m.group(3)),
        )
    if m := _SERVER.match(path):
        return SpiffeIDServer(host=host, datacenter=seg(m.group(1)))
    if m := _MESH_GATEWAY.match(path):
        return SpiffeIDMeshGateway(
            host=host, partition=seg(m.group(1), "default"), datacenter=seg(m.group(2))
        )
    if path == "" and "." in host:
        return SpiffeIDSigning(host=host)
    raise IdentityError("SPIFFE ID is not in the expected format")


def matches_expected(peer_uri: str, expected: SpiffeIDService) -> bool:
    """Consul's server identity check (`verifyServerCertMatchesURI` in Consul's `connect/tls.go`).

    The expected URI takes the peer's trust-domain host (trust domains are deliberately not
    compared), then the two strings are compared case-insensitively.
    """
    try:
        host = urlsplit(peer_uri).netloc
    except ValueError:
        return False
    want = SpiffeIDService(
        host=host,
        namespace=expected.namespace,
        datacenter=expected.datacenter,
        service=expected.service,
        partition=expected.partition,
    ).uri()
    return peer_uri.lower() == want.lower()


@functools.lru_cache(maxsize=1024)  # asked per upstream connection, of a few pairs
def server_matches(peer_uri: str, expected: SpiffeIDService | PeerTarget) -> bool:
    """The server identity check of an upstream: `matches_expected` for a local service, an
    exact (case-insensitive) match with one of `PeerMeta.SpiffeID` for a peered one."""
    if isinstance(expected, PeerTarget):
        return any(peer_uri.lower() == want.lower() for want in expected.spiffe_ids)
    return matches_expected(peer_uri, expected)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of authorizing one inbound connection. A denial is a value, not an error."""

    allowed: bool
    reason: str
    # Why it was refused, as a metric label (`listeners.events.Refusal` values): empty when
    # allowed.
    refusal: str = ""
    peer_uri: str = ""  # the client's URI SAN, when it had one


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What a peer's leaf certificate says about it."""

    uri: str | None  # the first URI SAN, if any
    serial: int
    subject_cn: str | None


@functools.lru_cache(maxsize=1024)
def peer_identity(der: bytes) -> PeerIdentity:
    """Read the first URI SAN, the serial and the subject CN of a DER certificate.

    Cached: a peer presents the same leaf on every connection until its next rotation, so
    the parse is done once per leaf, not once per connection.

    Raises:
        IdentityError: the bytes are not a certificate.
    """
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"peer certificate does not parse: {exc}") from exc
    uri: str | None = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        uri = uris[0] if uris else None
    except x509.ExtensionNotFound:
        uri = None
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    return PeerIdentity(
        uri=uri, serial=cert.serial_number, subject_cn=cn if isinstance(cn, str) else None
    )
