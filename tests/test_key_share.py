"""What the upstream listener keeps per server (`openssl` engine): the group the server
picked, so that later dials offer a key share for it and for no other; and its session,
kept as soon as its tickets are in, and forgotten once the server is gone.

Each server here is a real TLS server of the project's own engine (leaves of the project's
CA) behind a TCP relay on 127.0.0.1 that parses the ClientHello of every dial, so the
tests read which key shares went on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from listeners.tls.contexts import build_contexts
from listeners.tls.transport import TLSTransport
from listeners.upstream import UpstreamListener
from proxy.devagent.ca import CertificateAuthority
from proxy.identity import SpiffeIDService
from proxy.tlsstore import TLSStore
from tests.proxyfix import plain_exchange

# IANA TLS group code points (RFC 8446 4.2.7; draft-ietf-tls-ecdhe-mlkem for the hybrid).
X25519 = 0x001D
SECP256R1 = 0x0017
X25519MLKEM768 = 0x11EC

ENGINE = "openssl"  # the `ssl` engine cannot choose a client's key shares


def _hybrid_known() -> bool:
    """Whether the OpenSSL bundled by cryptography knows X25519MLKEM768 (3.5 and later)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    return bool(Binding.lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519MLKEM768"))


HYBRID = _hybrid_known()


def key_share_groups(record: bytes) -> list[int]:
    """The groups of the key_share extension of the ClientHello in a TLS record."""
    assert record[0] == 22 and record[5] == 1, "not a ClientHello record"
    body = record[9:]
    at = 2 + 32  # legacy_version, random
    at += 1 + body[at]  # legacy_session_id
    at += 2 + int.from_bytes(body[at : at + 2], "big")  # cipher_suites
    at += 1 + body[at]  # legacy_compression_methods
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    at += 2
    while at < end:
        kind, size = struct.unpack_from("!HH", body, at)
        at += 4
        if kind == 51:  # key_share: client_shares<0..2^16-1>
            groups, share, stop = [], at + 2, at + size
            while share < stop:
                group, length = struct.unpack_from("!HH", body, share)
                groups.append(group)
                share += 4 + length
            return groups
        at += size
    raise AssertionError("the ClientHello has no key_share extension")


@dataclass
class Relay:
    """A TCP relay to a backend that records the key shares of each ClientHello it passes."""

    backend: int
    port: int = 0
    offered: list[list[int]] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend)
        self.writers |= {writer, up_writer}
        try:
            head = await reader.readexactly(5)
            record = head + await reader.readexactly(int.from_bytes(head[3:5], "big"))
            self.offered.append(key_share_groups(record))
            up_writer.write(record)
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                self.writers.discard(w)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.resume_reading()  # type: ignore[attr-defined]  (attach() leaves it paused)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.transport.close()
        return False


@contextlib.asynccontextmanager
async def tls_server(ca: CertificateAuthority, groups: bytes | None) -> AsyncIterator[Relay]:
    """A `db` server offering only `groups` (None: OpenSSL's own list), behind a relay."""
    leaf = ca.sign_leaf("db", datacenter="dc1")
    roots = [r.cert_pem for r in ca.roots]
    context = build_contexts(roots, leaf.cert_pem, leaf.private_key_pem, ENGINE)[0]
    assert isinstance(context, SSL.Context)
    if groups is not None:
        assert Binding.lib.SSL_CTX_set1_curves_list(context._context, groups) == 1
    tasks: set[asyncio.Task[None]] = set()

    def factory() -> TLSTransport:
        tls = TLSTransport(context, server_side=True)

        async def serve() -> None:
            with contextlib.suppress(ConnectionError):
                await tls.handshake(5)
                tls.attach(_Echo())

        task = asyncio.ensure_future(serve())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return tls

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    relay = Relay(server.sockets[0].getsockname()[1])
    front = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    relay.port = front.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        front.close()
        server.close()
        for writer in relay.writers:
            writer.close()  # ends what is still being relayed
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Fixed:
    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self) -> list[tuple[str, int, SpiffeIDService]]:
        return [("127.0.0.1", self.port, SpiffeIDService("", "default", "dc1", "db"))]


@contextlib.asynccontextmanager
async def web_upstream(ca: CertificateAuthority, port: int) -> AsyncIterator[UpstreamListener]:
    tls = TLSStore(ENGINE)
    leaf = ca.sign_leaf("web", datacenter="dc1")
    tls.set_roots([r.cert_pem for r in ca.roots])
    tls.set_leaf(leaf.cert_pem, leaf.private_key_pem)
    listener = UpstreamListener(
        name="db",
        bind_host="127.0.0.1",
        bind_port=0,
        contexts=tls,
        resolver=_Fixed(port),
        connect_timeout=5,
    )
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close(1)


async def _dials(listener: UpstreamListener, count: int) -> None:
    for n in range(count):
        payload = f"dial {n}".encode()
        assert await plain_exchange(listener.port, payload) == payload
        async with asyncio.timeout(5):
            await listener.until_idle()


def _ca() -> CertificateAuthority:
    return CertificateAuthority("11111111-2222-3333-4444-555555555555")


async def test_a_server_that_picked_x25519_gets_that_key_share_alone() -> None:
    ca = _ca()
    async with tls_server(ca, b"X25519") as relay, web_upstream(ca, relay.port) as listener:
        await _dials(listener, 3)
        # The first dial offers OpenSSL's pair (the hybrid and X25519); the server takes
        # X25519, and the next dials, resumed, offer it alone: no ML-KEM key made for nothing.
        first = [X25519MLKEM768, X25519] if HYBRID else [X25519]
        assert relay.offered == [first, [X25519], [X25519]]
        assert listener.resumed == 2
        assert listener._key_shares == {("127.0.0.1", relay.port): "x25519"}


async def test_a_server_that_picked_the_hybrid_keeps_it_with_one_key_share() -> None:
    ca = _ca()
    async with tls_server(ca, None) as relay, web_upstream(ca, relay.port) as listener:
        await _dials(listener, 3)
        if HYBRID:
            # Post-quantum stays: later dials offer the hybrid share alone, not X25519 too.
            hybrid_alone = [X25519MLKEM768]
            assert relay.offered == [[X25519MLKEM768, X25519], hybrid_alone, hybrid_alone]
            assert set(listener._key_shares.values()) == {"X25519MLKEM768"}
        else:
            assert relay.offered == [[X25519]] * 3
        assert listener.resumed == 2


async def test_a_server_that_wants_another_group_now_asks_and_gets_it() -> None:
    ca = _ca()
    async with tls_server(ca, b"P-256") as relay, web_upstream(ca, relay.port) as listener:
        # Learnt from an earlier server at this address: X25519, which this one does not
        # take. It asks for P-256 (HelloRetryRequest), the dial goes through, and the next
        # one offers P-256 from the start.
        listener._key_shares[("127.0.0.1", relay.port)] = "x25519"
        await _dials(listener, 2)
        assert relay.offered[0] == [X25519]
        assert relay.offered[-1] == [SECP256R1]
        assert listener._key_shares == {("127.0.0.1", relay.port): "secp256r1"}
        assert listener.failed == 0


async def test_what_is_kept_for_servers_no_longer_resolved_is_forgotten() -> None:
    ca = _ca()
    async with tls_server(ca, b"X25519") as relay, web_upstream(ca, relay.port) as listener:
        await _dials(listener, 1)
        endpoint = ("127.0.0.1", relay.port)
        (kept,) = listener._sessions.values()
        # Instances that left since (deployments): far more than the resolver now returns.
        for port in range(1, 61):
            listener._sessions[("10.0.0.9", port)] = kept
            listener._key_shares[("10.0.0.9", port)] = "x25519"
        await _dials(listener, 1)
        assert list(listener._sessions) == [endpoint]
        assert listener._key_shares == {endpoint: "x25519"}
        assert listener.resumed == 1  # what the current server needs was kept


async def test_a_group_list_openssl_refuses_leaves_its_own() -> None:
    ca = _ca()
    async with tls_server(ca, b"X25519") as relay, web_upstream(ca, relay.port) as listener:
        # A name this OpenSSL does not know (as an OpenSSL before 3.5 would not know the
        # "?" syntax): the list is refused, the dial offers OpenSSL's own pair, goes
        # through, and learns the group the server picks.
        listener._key_shares[("127.0.0.1", relay.port)] = "no-such-group"
        await _dials(listener, 2)
        first = [X25519MLKEM768, X25519] if HYBRID else [X25519]
        assert relay.offered == [first, [X25519]]
        assert listener._key_shares == {("127.0.0.1", relay.port): "x25519"}
        assert listener.failed == 0


async def test_a_session_is_kept_while_its_first_connection_is_still_open() -> None:
    # Sessions were kept only when a connection ended: every dial while the first ones were
    # open (a burst, long-lived connections) made a full handshake.
    ca = _ca()
    async with tls_server(ca, b"X25519") as relay, web_upstream(ca, relay.port) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(b"first")
            async with asyncio.timeout(5):
                assert await reader.readexactly(5) == b"first"
            assert await plain_exchange(listener.port, b"second") == b"second"
            assert listener.resumed == 1
        finally:
            writer.close()
