"""Peering tokens and the peering rules that need no state: names, meta, token bytes.

A peering token is the standard base64 (with padding) of compact JSON whose keys come in
the order of Consul's `structs.PeeringToken` (`agent/structs/peering.go`): `CA`,
`ManualServerAddresses`, `ServerAddresses`, `ServerName`, `PeerID`, `EstablishmentSecret`,
`Remote` {`Partition`, `Datacenter`, `Locality`}. No key is omitted; empty lists are `null`.

Rule 1: pure; no I/O, no indexes. Every refusal is a `PeeringInputError` whose text is
Consul's (`agent/rpc/peering/validate.go`, `service.go`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_B64 = re.compile(r"[A-Za-z0-9+/=]")
META_MAX_PAIRS, META_KEY_MAX, META_VALUE_MAX = 64, 128, 512


class PeeringInputError(ValueError):
    """A peering name, meta or token Consul refuses (an InvalidArgument: HTTP 400)."""


def validate_name(name: str) -> None:
    if not _NAME.match(name):
        raise PeeringInputError(
            f"{name} is not a valid peer name: a valid peering name must consist of lower case "
            "alphanumeric characters or '-', and must start and end with an alphanumeric "
            "character"
        )


def validate_meta(meta: Mapping[str, Any] | None) -> None:
    """Service-meta rules (`structs.ValidateServiceMetadata`)."""
    if not meta:
        return
    if len(meta) > META_MAX_PAIRS:
        raise PeeringInputError(
            f"Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
        )
    for key, value in meta.items():
        if not isinstance(value, str):
            raise PeeringInputError(f"Meta value of key {key!r} must be a string")
        if key == "":
            raise PeeringInputError("Key cannot be blank")
        if not _META_KEY.match(key):
            raise PeeringInputError(f"Key contains invalid characters: {key}")
        if len(key) > META_KEY_MAX:
            raise PeeringInputError(f"Key is too long (limit: {META_KEY_MAX} characters)")
        if key.startswith("consul-"):
            raise PeeringInputError(f"Key prefix 'consul-' is reserved for internal use: {key}")
        if len(value) > META_VALUE_MAX:
            raise PeeringInputError(
                f"Value is too long (limit: {META_VALUE_MAX} characters): {key}"
            )


def server_name(datacenter: str, trust_domain: str) -> str:
    """The TLS name of a cluster's peering servers: `server.<dc>.peering.<trust domain>`."""
    return f"server.{datacenter}.peering.{trust_domain}"


@dataclass(frozen=True, slots=True)
class PeeringToken:
    ca: tuple[str, ...]
    manual_server_addresses: tuple[str, ...]
    server_addresses: tuple[str, ...]
    server_name: str
    peer_id: str
    establishment_secret: str
    remote_partition: str
    remote_datacenter: str

    def to_json(self) -> dict[str, Any]:
        """The token's JSON object, keys in Consul's order."""
        return {
            "CA": list(self.ca) or None,
            "ManualServerAddresses": list(self.manual_server_addresses) or None,
            "ServerAddresses": list(self.server_addresses) or None,
            "ServerName": self.server_name,
            "PeerID": self.peer_id,
            "EstablishmentSecret": self.establishment_secret,
            "Remote": {
                "Partition": self.remote_partition,
                "Datacenter": self.remote_datacenter,
                "Locality": None,
            },
        }

    def encode(self) -> str:
        raw = json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False)
        return base64.b64encode(raw.encode()).decode("ascii")

    def addresses(self) -> list[str]:
        """Where to dial: manual addresses first (they take precedence), then automatic."""
        return [*self.manual_server_addresses, *self.server_addresses]


def _base64_error(text: str) -> str:
    for n, ch in enumerate(text):
        if not _B64.match(ch):
            return f"illegal base64 data at input byte {n}"
    stripped = text.rstrip("=")
    if "=" in stripped or len(text) % 4:
        return f"illegal base64 data at input byte {len(stripped)}"
    return "illegal base64 data"


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PeeringInputError(
            f"failed to unmarshal peering token: json: cannot unmarshal {type(value).__name__} "
            f"into Go struct field PeeringToken.{field} of type []string"
        )
    return tuple(value)


def _string(data: Mapping[str, Any], field: str) -> str:
    value = data.get(field) or ""
    if not isinstance(value, str):
        raise PeeringInputError(
            f"failed to unmarshal peering token: json: cannot unmarshal {type(value).__name__} "
            f"into Go struct field PeeringToken.{field} of type string"
        )
    return value


def decode_token(text: str) -> PeeringToken:
    """Decode a token as Consul's `DecodeToken`, then validate it as `validatePeeringToken`.

    Raises:
        PeeringInputError: Consul's text for what is wrong.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise PeeringInputError(f"failed to decode peering token: {_base64_error(text)}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PeeringInputError(f"failed to unmarshal peering token: {exc}") from None
    if not isinstance(data, dict):
        raise PeeringInputError(
            "failed to unmarshal peering token: json: cannot unmarshal "
            f"{type(data).__name__} into Go value of type structs.PeeringToken"
        )
    remote = data.get("Remote") or {}
    if not isinstance(remote, dict):
        remote = {}
    token = PeeringToken(
        ca=_strings(data.get("CA"), "CA"),
        manual_server_addresses=_strings(
            data.get("ManualServerAddresses"), "ManualServerAddresses"
        ),
        server_addresses=_strings(data.get("ServerAddresses"), "ServerAddresses"),
        server_name=_string(data, "ServerName"),
        peer_id=_string(data, "PeerID"),
        establishment_secret=_string(data, "EstablishmentSecret"),
        remote_partition=_string(remote, "Partition"),
        remote_datacenter=_string(remote, "Datacenter"),
    )
    validate_token(token)
    return token


def validate_token(token: PeeringToken) -> None:
    for pem in token.ca:
        try:
            x509.load_pem_x509_certificate(pem.encode())
        except ValueError as exc:
            raise PeeringInputError(f"peering token invalid CA: {exc}") from None
    if not token.server_addresses and not token.manual_server_addresses:
        raise PeeringInputError("peering token server addresses value is empty")
    for addr in token.addresses():
        if not valid_address(addr):
            raise PeeringInputError(f"{addr} is not a valid peering server address")
    if token.ca and not token.server_name:
        raise PeeringInputError("peering token server name value is empty")
    if not token.peer_id:
        raise PeeringInputError("peering token peer ID value is empty")


def valid_address(addr: str) -> bool:
    """`host:port` with a port 1-65535 (Go's SplitHostPort and Atoi)."""
    if addr.startswith("["):
        end = addr.find("]:")
        if end < 0:
            return False
        host, port = addr[1:end], addr[end + 2 :]
    else:
        host, sep, port = addr.rpartition(":")
        if not sep or ":" in host:
            return False
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def ca_pems(pems: Sequence[str]) -> list[str]:
    """Each PEM with a trailing newline ensured, as Consul puts roots into a token."""
    return [p if p.endswith("\n") else p + "\n" for p in pems]
