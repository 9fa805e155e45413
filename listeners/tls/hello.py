"""What a server can tell from a client's first bytes, before OpenSSL reads them.

One question only: can this client resume a session at all? A TLS 1.3 client that may
resume sends the psk_key_exchange_modes extension (RFC 8446 4.2.9: without it no PSK can
be used), a TLS 1.2 one that takes tickets sends session_ticket (RFC 5077). A client with
neither, such as Go's crypto/tls without a ClientSessionCache (Consul's built-in proxy and
`bench/goload`), throws every ticket away; OpenSSL makes and sends them all the same.

Rule 1: no I/O, no state, never raises: the bytes are a peer's, hostile or cut short; an
answer it cannot give is None, and the caller keeps its default.
"""

from __future__ import annotations

import struct

_HANDSHAKE = 22  # TLS record content type
_CLIENT_HELLO = 1  # handshake message type
_SESSION_TICKET = 35  # RFC 5077 (TLS 1.2 tickets)
_PSK_KEY_EXCHANGE_MODES = 45  # RFC 8446 4.2.9
_RESUMPTION = frozenset((_SESSION_TICKET, _PSK_KEY_EXCHANGE_MODES))

_U16 = struct.Struct("!H").unpack_from
_TYPE_AND_SIZE = struct.Struct("!HH").unpack_from


def offers_resumption(data: bytes | bytearray) -> bool | None:
    """Whether the ClientHello that starts `data` lets the client resume a session.

    Returns:
        True if it sends psk_key_exchange_modes or session_ticket, False if neither; None
        when `data` does not start with one whole ClientHello in its first record (cut
        short, split across records, or not TLS at all).
    """
    if len(data) < 9 or data[0] != _HANDSHAKE or data[5] != _CLIENT_HELLO:
        return None
    record_end = 5 + _U16(data, 3)[0]
    hello_end = 9 + (data[6] << 16 | _U16(data, 7)[0])
    if hello_end > record_end or record_end > len(data):
        return None
    at = 9 + 2 + 32  # legacy_version, random
    if at >= hello_end:
        return None
    at += 1 + data[at]  # legacy_session_id
    if at + 2 > hello_end:
        return None
    at += 2 + _U16(data, at)[0]  # cipher_suites
    if at >= hello_end:
        return None
    at += 1 + data[at]  # legacy_compression_methods
    if at == hello_end:
        return False  # no extensions at all (a TLS 1.2 client that wants nothing)
    if at + 2 > hello_end or at + 2 + _U16(data, at)[0] != hello_end:
        return None
    at += 2
    while at + 4 <= hello_end:  # each turn moves on by at least 4 bytes
        kind, size = _TYPE_AND_SIZE(data, at)
        if kind in _RESUMPTION:
            return True
        at += 4 + size
    return False if at == hello_end else None
