"""listeners.tls.engine and listeners.tls.transport on both TLS engines, and between them.

Every test runs two TLSTransports over a real loopback connection, with the product's
contexts (listeners.tls.contexts.build_contexts) and leaves from the dev agent's CA. Pairs are named
client-server: `openssl-ssl` is a pyOpenSSL client talking to a stdlib server.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import socket
import ssl
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from listeners.tls import openssl as openssl_engine
from listeners.tls.contexts import (
    _with_issuing_root,
    build_contexts,
    handshake_in_memory,
    new_engine,
)
from listeners.tls.engine import (
    BIO_SLICE,
    RECORD_SIZE,
    RECORD_WIRE_SIZE,
    TLSContext,
    TLSEngine,
    TLSError,
    TLSSession,
)
from listeners.tls.transport import HandshakeError, TLSTransport
from proxy.devagent.ca import CertificateAuthority
from tests.certs import Sink, attach, cap_at_tls12, connect_pair

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from tls_state import malloc_in_use  # noqa: E402  # bench's measure of malloc'd bytes

PAIRS = [
    pytest.param("ssl", "ssl", id="ssl-ssl"),
    pytest.param("ssl", "openssl", id="ssl-openssl"),
    pytest.param("openssl", "ssl", id="openssl-ssl"),
    pytest.param("openssl", "openssl", id="openssl-openssl"),
]
ENGINES = ["ssl", "openssl"]
DER = Encoding.DER
VERSIONS = [pytest.param("TLSv1.2", id="tls12"), pytest.param("TLSv1.3", id="tls13")]


def _roots(ca: CertificateAuthority) -> list[str]:
    return [r.cert_pem for r in ca.roots]


def _server(ca: CertificateAuthority, engine: str, service: str = "db") -> TLSContext:
    leaf = ca.sign_leaf(service, datacenter="dc1")
    return build_contexts(_roots(ca), leaf.cert_pem, leaf.private_key_pem, engine)[0]


def _client(
    ca: CertificateAuthority, engine: str, version: str = "TLSv1.3", service: str = "web"
) -> TLSContext:
    leaf = ca.sign_leaf(service, datacenter="dc1")
    ctx = build_contexts(_roots(ca), leaf.cert_pem, leaf.private_key_pem, engine)[1]
    if version == "TLSv1.2":
        cap_at_tls12(ctx)
    return ctx


def _service(der: bytes | None) -> str:
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uri.rsplit("/", 1)[1]


async def _both(client: TLSTransport, server: TLSTransport) -> None:
    await asyncio.gather(client.handshake(5), server.handshake(5))


async def _close(*transports: TLSTransport) -> None:
    for tls in transports:
        tls.close()


# -- handshakes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_mutual_handshake_and_echo(
    ca: CertificateAuthority, client_engine: str, server_engine: str, version: str
) -> None:
    client, server = await connect_pair(
        _server(ca, server_engine), _client(ca, client_engine, version)
    )
    try:
        async with asyncio.timeout(5):
            await _both(client, server)
            assert client.version() == server.version() == version
            # Each side verified the other's leaf: the server sees web, the client sees db.
            assert _service(server.peer_certificate()) == "web"
            assert _service(client.peer_certificate()) == "db"
            assert not client.session_reused and not server.session_reused
            native = ssl.SSLObject if client_engine == "ssl" else SSL.Connection
            assert isinstance(client.get_extra_info("ssl_object"), native)
            echo = attach(server, Sink(echo=True))
            app = attach(client, Sink(until=4))
            client.write(b"ping")
            await app.got
            assert app.digest.digest() == hashlib.sha256(b"ping").digest()
            assert echo.size == 4
    finally:
        await _close(client, server)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bad_record_after_good_ones_delivers_them_then_fails(
    ca: CertificateAuthority, engine: str
) -> None:
    """A full record, then a corrupted one, arriving together: the first is delivered, the
    failure comes with the next read. Keeping that failure once pinned the read buffer (the
    traceback held a slice of it), so trimming it raised BufferError and the connection was
    lost with the good record."""
    srv, cli = handshake_in_memory(_server(ca, engine), _client(ca, engine))
    cli.write(b"a" * RECORD_SIZE)
    good = cli.take()
    cli.write(b"b" * 1000)
    bad = bytearray(cli.take())
    bad[-1] ^= 0xFF  # the last byte of the record's authentication tag
    assert len(good) + len(bad) > RECORD_WIRE_SIZE  # the path that gathers several records
    srv.feed(good + bytes(bad))
    assert srv.read(256 * 1024) == b"a" * RECORD_SIZE
    with pytest.raises(TLSError):
        srv.read(256 * 1024)


def _client_done(server_ctx: TLSContext, client_ctx: TLSContext) -> tuple[TLSEngine, TLSEngine]:
    """A server and a client engine, the client's handshake complete and its last flight
    (its Finished) not yet taken: the server still waits for it."""
    server = new_engine(server_ctx, server_side=True, session=None)
    client = new_engine(client_ctx, server_side=False, session=None)
    assert not client.do_handshake()
    server.feed(client.take())
    assert not server.do_handshake()
    client.feed(server.take())
    assert client.do_handshake()
    return server, client


def _read_all(engine: TLSEngine, size: int) -> bytes:
    got = bytearray()
    for _ in range(size // RECORD_SIZE + 4):  # bounded: a record per call at the least
        chunk = engine.read(256 * 1024)
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
def test_data_beyond_a_slice_arrives_whole_with_the_handshake_and_an_eof(
    ca: CertificateAuthority, client_engine: str, server_engine: str
) -> None:
    """A client's last handshake flight, application data several slices long and the end
    of its transport, fed as one: the server completes its handshake, reads every byte in
    order, and only then sees the EOF."""
    server, client = _client_done(_server(ca, server_engine), _client(ca, client_engine))
    payload = os.urandom(5 * BIO_SLICE + 77)
    client.write(payload)
    server.feed(client.take())  # the client's Finished, then the data: one feed
    server.feed_eof()
    assert server.do_handshake()
    assert _read_all(server, len(payload)) == payload
    assert server.read(1024) == b""  # the EOF, after the data


@pytest.mark.parametrize("engine", ENGINES)
def test_a_bulk_transfer_leaves_the_memory_bios_no_larger_than_a_slice(
    ca: CertificateAuthority, engine: str
) -> None:
    """A memory BIO keeps the capacity of the most it ever held. Pairs of connections held
    idle after two writes of 256 KiB each way (as a socket's reads come) hold about what
    pairs hold after two writes of one slice: before slices, about ten times as much."""
    server_ctx, client_ctx = _server(ca, engine), _client(ca, engine)

    def held_per_pair(size: int, count: int = 40) -> float:
        blob = os.urandom(size)
        gc.collect()
        before = malloc_in_use()
        pairs = []
        for _ in range(count):
            srv, cli = handshake_in_memory(server_ctx, client_ctx)
            for sender, receiver in ((srv, cli), (cli, srv)):
                for _ in range(2):
                    sender.write(blob)
                    receiver.feed(sender.take())
                    assert _read_all(receiver, len(blob)) == blob
            pairs.append((srv, cli))
        gc.collect()
        return (malloc_in_use() - before) / count

    sliced = held_per_pair(BIO_SLICE)
    bulk = held_per_pair(256 * 1024)
    assert bulk < 1.3 * sliced, f"{bulk / 1024:.0f} KiB per pair after bulk, {sliced / 1024:.0f}"


def test_the_openssl_engine_renews_its_bios_after_the_handshake_and_keeps_what_came(
    ca: CertificateAuthority,
) -> None:
    """Once the handshake's last flight is taken, the `openssl` engine's connection gets two
    empty memory BIOs: data the client sent right behind its Finished moves along, and a
    connection held idle keeps about 3 KiB less per side than with the BIOs of the
    handshake (measured against pairs whose engines keep theirs, in the same run)."""
    server_ctx, client_ctx = _server(ca, "openssl"), _client(ca, "openssl")

    def one_pair(renew: bool) -> tuple[TLSEngine, TLSEngine]:
        server = new_engine(server_ctx, server_side=True, session=None)
        client = new_engine(client_ctx, server_side=False, session=None)
        if not renew:
            for engine in (server, client):
                engine._renew = 2  # type: ignore[attr-defined]  # as if done already
        assert not client.do_handshake()
        server.feed(client.take())
        assert not server.do_handshake()
        first = server._out_bio  # type: ignore[attr-defined]
        client.feed(server.take())
        assert client.do_handshake()
        client.write(b"right behind the Finished")
        server.feed(client.take())  # the client's Finished and its first data, as one
        assert server.do_handshake()
        client.feed(server.take())  # the server's tickets: its BIOs are renewed after this
        assert (server._out_bio != first) is renew  # type: ignore[attr-defined]
        assert server.read(1024) == b"right behind the Finished"
        server.write(b"and back")
        client.feed(server.take())
        assert client.read(1024) == b"and back"
        return server, client

    def held_per_pair(renew: bool, count: int = 60) -> float:
        gc.collect()
        before = malloc_in_use()
        pairs = [one_pair(renew) for _ in range(count)]
        gc.collect()
        held = (malloc_in_use() - before) / count
        del pairs
        return held

    kept, renewed = held_per_pair(False), held_per_pair(True)
    assert renewed < kept - 2 * 2048, f"{renewed / 1024:.1f} KiB per pair, {kept / 1024:.1f}"


@pytest.mark.parametrize("path", ["memory BIO", "bio_read"])
def test_openssl_take_gives_every_record_in_order_by_either_path(
    ca: CertificateAuthority, path: str
) -> None:
    """The pyOpenSSL engine reads outgoing ciphertext from OpenSSL's memory BIO into a
    buffer of its own; `bio_read` is the way without pyOpenSSL's private attribute."""
    srv, cli = handshake_in_memory(_server(ca, "openssl"), _client(ca, "openssl"))
    for engine in (srv, cli):
        assert engine._out_bio is not None  # type: ignore[attr-defined]  # with this pyOpenSSL
        if path == "bio_read":
            engine._out_bio = None  # type: ignore[attr-defined]
    assert cli.take() == b"" and srv.take() == b""  # nothing to send: no error either
    payload = os.urandom(5 * RECORD_SIZE + 123)  # more than one buffer of ciphertext
    cli.write(payload)
    wire = cli.take()
    assert len(wire) > 5 * RECORD_SIZE and cli.take() == b""
    srv.feed(wire)
    got = b""
    for _ in range(10):
        chunk = srv.read(256 * 1024)
        if not chunk:
            break
        got += chunk
    assert got == payload
    srv.write(b"back")
    cli.feed(srv.take())
    assert cli.read(1024) == b"back"


_LARGE = bytes(range(256)) * (3 * RECORD_SIZE // 256 + 7)  # three records and a bit


def _outcomes(ca: CertificateAuthority, stranger: TLSContext, composed: bool) -> list[object]:
    """What the openssl engine gives, call by call, on paths that end each way OpenSSL can:
    data small and large, a closure with and without close_notify, a damaged record, a
    refused client. `composed`: ciphertext goes in with `feed_read` and out with `seal`
    instead of `feed` then `read`, and `write` then `take`."""

    def send(sender: TLSEngine, payload: bytes) -> bytes:
        if composed:
            return sender.seal(payload)
        sender.write(payload)
        return sender.take()

    def receive(receiver: TLSEngine, data: bytes, size: int = 1024) -> object:
        if composed:
            return receiver.feed_read(data, size)
        receiver.feed(data)
        return receiver.read(size)

    def receive_all(receiver: TLSEngine, data: bytes, size: int) -> bytes:
        first = receive(receiver, data, 256 * 1024)
        assert isinstance(first, bytes | bytearray)
        return bytes(first) + _read_all(receiver, size)

    seen: list[object] = []
    large = _LARGE
    server_ctx, client_ctx = _server(ca, "openssl"), _client(ca, "openssl")
    srv, cli = handshake_in_memory(server_ctx, client_ctx)
    seen.append((srv.read(1024), cli.read(1024)))  # nothing yet; the client takes its tickets
    for sender, receiver, payload in ((cli, srv, b"ping"), (srv, cli, large)):
        seen.append(receive_all(receiver, send(sender, payload), len(payload)) == payload)
    srv.shutdown()
    seen.append((receive(cli, srv.take()), cli.read(1024)))  # close_notify: EOF, and again
    srv, cli = handshake_in_memory(server_ctx, client_ctx)
    seen.append(receive(srv, send(cli, b"cut short")[:-3]))  # a record not yet whole
    srv.feed_eof()  # a "ragged" EOF: no close_notify
    seen.append(srv.read(1024))
    srv, cli = handshake_in_memory(server_ctx, client_ctx)
    damaged = bytearray(send(cli, b"x" * 100))
    damaged[-1] ^= 0xFF
    with pytest.raises(TLSError) as bad:
        receive(srv, bytes(damaged))
    seen.append(str(bad.value))
    # The same endings behind more than a record: the path that gathers records.
    srv, cli = handshake_in_memory(server_ctx, client_ctx)
    wire = send(cli, large)
    cli.shutdown()
    seen.append((receive_all(srv, wire + cli.take(), len(large)) == large, srv.read(1024)))
    srv, cli = handshake_in_memory(server_ctx, client_ctx)
    seen.append(len(receive_all(srv, send(cli, large)[:-3], len(large))))
    srv.feed_eof()
    seen.append(srv.read(1024))
    srv, cli = handshake_in_memory(server_ctx, client_ctx)
    good = send(cli, large)
    damaged = bytearray(send(cli, b"x" * 100))
    damaged[-1] ^= 0xFF
    seen.append(receive(srv, good + bytes(damaged), 256 * 1024) == large)  # what came whole
    with pytest.raises(TLSError) as late:  # the failure comes next
        srv.read(1024)
    seen.append(str(late.value))
    with pytest.raises(TLSError) as refused:
        handshake_in_memory(_server(ca, "openssl"), stranger)
    seen.append(str(refused.value))
    return seen


def test_the_openssl_engine_calls_openssl_straight_with_pyopenssls_outcomes(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handshakes, reads, writes and incoming ciphertext go straight to OpenSSL through
    pyOpenSSL's pointers (`listeners.tls.openssl.DIRECT`); every outcome is the one
    pyOpenSSL's public methods give, and the same by `feed_read` and `seal` as by the calls
    they stand for."""
    stranger = CertificateAuthority().sign_leaf("web", datacenter="dc1")
    stranger_ctx = build_contexts(
        _roots(ca), stranger.cert_pem, stranger.private_key_pem, "openssl"
    )[1]
    engine = new_engine(_server(ca, "openssl"), server_side=True)
    assert engine._ptr is not None  # type: ignore[attr-defined]  # with this pyOpenSSL
    straight = _outcomes(ca, stranger_ctx, composed=False)
    assert _outcomes(ca, stranger_ctx, composed=True) == straight
    monkeypatch.setattr(openssl_engine, "DIRECT", False)
    assert new_engine(_server(ca, "openssl"), server_side=True)._ptr is None  # type: ignore[attr-defined]
    assert _outcomes(ca, stranger_ctx, composed=False) == straight
    assert _outcomes(ca, stranger_ctx, composed=True) == straight
    records = len(_LARGE) // RECORD_SIZE * RECORD_SIZE  # the last, cut short, never comes
    assert straight == [
        (None, None),
        True,
        True,
        (b"", b""),
        None,
        b"",
        straight[6],
        (True, b""),
        records,
        b"",
        True,
        straight[6],
        straight[12],
    ]
    assert "decryption failed or bad record mac" in str(straight[6])
    assert "unable to get local issuer certificate" in str(straight[12])


@pytest.mark.parametrize("engine", ENGINES)
def test_feed_read_and_seal_carry_a_handshakes_last_flight_and_what_follows(
    ca: CertificateAuthority, engine: str
) -> None:
    """`seal` on a client whose last handshake flight has not been taken yet sends that
    flight first (and renews the `openssl` engine's BIOs, as `take` does); `feed_read` reads
    the data behind a server's session tickets, and the first slice of a write that was
    encrypted a slice at a time."""
    server, client = _client_done(_server(ca, engine), _client(ca, engine))
    wire = client.seal(b"right behind the Finished")  # the Finished, then the record
    if engine == "openssl":  # and its memory BIOs were renewed, as `take` does
        assert client._renew == 2  # type: ignore[attr-defined]
    server.feed(wire)
    assert server.do_handshake()
    assert server.read(1024) == b"right behind the Finished"
    tickets = server.take()
    assert client.feed_read(tickets + server.seal(b"and back"), 1024) == b"and back"
    assert client.read(1024) is None
    big = os.urandom(3 * BIO_SLICE + 5)  # written a slice at a time
    first = server.feed_read(client.seal(big), 256 * 1024)
    assert isinstance(first, bytes | bytearray)
    assert bytes(first) + _read_all(server, len(big)) == big


@pytest.mark.parametrize("client_engine", ENGINES)
async def test_openssl_server_picks_aes_128_first_as_go_does(
    ca: CertificateAuthority, client_engine: str
) -> None:
    # CPython's ssl client offers AES-256 first, as OpenSSL's default order does; the
    # server's own order decides.
    client, server = await connect_pair(_server(ca, "openssl"), _client(ca, client_engine))
    try:
        async with asyncio.timeout(5):
            await _both(client, server)
        native = server.get_extra_info("ssl_object")
        assert isinstance(native, SSL.Connection)
        assert native.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
    finally:
        await _close(client, server)


@pytest.mark.parametrize("server_engine", ENGINES)
@pytest.mark.parametrize("client_engine", ENGINES)
async def test_client_from_another_ca_is_refused(
    ca: CertificateAuthority, client_engine: str, server_engine: str
) -> None:
    # The stranger trusts our roots (it accepts the server) but has a leaf from its own CA.
    stranger = CertificateAuthority().sign_leaf("web", datacenter="dc1")
    client_ctx = build_contexts(
        _roots(ca), stranger.cert_pem, stranger.private_key_pem, client_engine
    )[1]
    client, server = await connect_pair(_server(ca, server_engine), client_ctx)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(TLSError) as refused:
                await server.handshake(5)
            # OpenSSL's verify result is part of the text on both engines.
            assert "certificate verify failed: unable to get local issuer certificate" in str(
                refused.value
            )
            # TLS 1.3: the client finishes its side first, then gets the server's alert; it
            # never gets to send a byte to an app.
            try:
                await client.handshake(5)
            except OSError:
                return
            app = attach(client, Sink())
            lost = await app.lost
            assert isinstance(lost, TLSError)
            assert app.size == 0
    finally:
        await _close(client, server)


@pytest.mark.parametrize("server_engine", ENGINES)
async def test_silent_client_is_cut_at_the_handshake_timeout(
    ca: CertificateAuthority, server_engine: str
) -> None:
    loop = asyncio.get_running_loop()
    server = TLSTransport(_server(ca, server_engine), server_side=True)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        reader, writer = await asyncio.open_connection(*lsock.getsockname()[:2])
        sock, _ = await loop.sock_accept(lsock)
    await loop.connect_accepted_socket(lambda: server, sock)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(HandshakeError, match=r"timed out after 0\.1s"):
                await server.handshake(0.1)
            assert await reader.read(100) == b""  # closed by the server side
    finally:
        writer.close()
        server.close()


# -- the peer's chain -----------------------------------------------------------------------


async def _chains(
    server_ctx: TLSContext, client_ctx: TLSContext, session: TLSSession | None = None
) -> tuple[list[bytes], list[bytes], bool, TLSSession | None]:
    """One connection as `_dial`; returns what each side read as its peer's chain (server
    side first), whether the server resumed, and the client's session at the end."""
    client, server = await connect_pair(server_ctx, client_ctx, session=session)
    try:
        await _both(client, server)
        at_server, at_client = server.peer_chain(), client.peer_chain()
        attach(server, Sink(echo=True))
        app = attach(client, Sink(until=5))
        client.write(b"hello")
        await app.got  # TLS 1.3 tickets come after the handshake: read past them
        client.write_eof()
        server.write_eof()
        await app.eof
        return at_server, at_client, server.session_reused, client.session
    finally:
        await _close(client, server)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_peer_chain_is_the_chain_as_sent_leaf_first(
    client_engine: str, server_engine: str, version: str
) -> None:
    """Each side reads the other's leaf, then the intermediate it sent (on a server, OpenSSL's
    SSL_get_peer_cert_chain() leaves the client's leaf out: both engines put it first)."""
    ca = CertificateAuthority(use_intermediate=True)
    (intermediate,) = ca.active_root.intermediates
    inter = x509.load_pem_x509_certificate(intermediate.encode()).public_bytes(DER)
    web, db = ca.sign_leaf("web", datacenter="dc1"), ca.sign_leaf("db", datacenter="dc1")
    web_der, db_der = web.cert.public_bytes(DER), db.cert.public_bytes(DER)
    server_ctx = build_contexts(_roots(ca), db.cert_pem, db.private_key_pem, server_engine)[0]
    client_ctx = build_contexts(_roots(ca), web.cert_pem, web.private_key_pem, client_engine)[1]
    if version == "TLSv1.2":
        cap_at_tls12(client_ctx)
    async with asyncio.timeout(10):
        at_server, at_client, resumed, session = await _chains(server_ctx, client_ctx)
        assert not resumed
        assert at_server == [web_der, inter]
        assert at_client == [db_der, inter]
        at_server, at_client, resumed, _ = await _chains(server_ctx, client_ctx, session)
        assert resumed
        # No Certificate message came: a server knows the client's leaf only. A client may
        # still hold the server's chain from the session it resumed (pyOpenSSL's does).
        assert at_server == [web_der]
        assert at_client in ([db_der], [db_der, inter])


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_a_leaf_under_the_root_goes_alone_from_the_openssl_engine(
    ca: CertificateAuthority, client_engine: str, server_engine: str
) -> None:
    """The `openssl` engine sends what the agent gave, as Consul's Go proxy does: a leaf the
    root signed goes alone. Without SSL_MODE_NO_AUTO_CHAIN OpenSSL would complete the chain
    from the trust store (checking our own leaf's signature on every handshake) and send the
    root too, which CPython's ssl, unable to set that mode, still does."""
    web, db = ca.sign_leaf("web", datacenter="dc1"), ca.sign_leaf("db", datacenter="dc1")
    web_der, db_der = web.cert.public_bytes(DER), db.cert.public_bytes(DER)
    root_der = x509.load_pem_x509_certificate(ca.active_root.cert_pem.encode()).public_bytes(DER)
    server_ctx = build_contexts(_roots(ca), db.cert_pem, db.private_key_pem, server_engine)[0]
    client_ctx = build_contexts(_roots(ca), web.cert_pem, web.private_key_pem, client_engine)[1]
    async with asyncio.timeout(10):
        at_server, at_client, resumed, _ = await _chains(server_ctx, client_ctx)
    assert not resumed
    assert at_server == ([web_der] if client_engine == "openssl" else [web_der, root_der])
    assert at_client == ([db_der] if server_engine == "openssl" else [db_der, root_der])


def test_the_ssl_engine_loads_a_lone_leaf_with_the_root_that_signed_it(
    ca: CertificateAuthority,
) -> None:
    """CPython's ssl cannot turn auto-chaining off; a chain of two certificates does, so it
    sends the same two without checking its own leaf on every handshake. Only the root whose
    key signed the leaf is added, not another CA's."""
    other = CertificateAuthority()
    leaf = ca.sign_leaf("web", datacenter="dc1").cert_pem
    roots = [other.active_root.cert_pem, ca.active_root.cert_pem]
    sent = x509.load_pem_x509_certificates(_with_issuing_root(leaf, roots).encode())
    expected = [leaf, ca.active_root.cert_pem]
    assert [c.public_bytes(DER) for c in sent] == [
        x509.load_pem_x509_certificate(pem.encode()).public_bytes(DER) for pem in expected
    ]
    assert _with_issuing_root(leaf, [other.active_root.cert_pem]) == leaf
    with_intermediate = CertificateAuthority(use_intermediate=True)
    chained = with_intermediate.sign_leaf("web", datacenter="dc1").cert_pem
    assert _with_issuing_root(chained, _roots(with_intermediate)) == chained
    assert _with_issuing_root("not a certificate", roots) == "not a certificate"


# -- half-close and bulk data -------------------------------------------------------------


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_half_close_in_both_directions(
    ca: CertificateAuthority, client_engine: str, server_engine: str
) -> None:
    client, server = await connect_pair(_server(ca, server_engine), _client(ca, client_engine))
    try:
        async with asyncio.timeout(5):
            await _both(client, server)
            at_server = attach(server, Sink())
            at_client = attach(client, Sink())
            # The client sends its request and shuts down its write side (close_notify)...
            client.write(b"request")
            client.write_eof()
            await at_server.eof
            assert at_server.size == 7
            # ...and still gets the answer, which the server sends after that EOF.
            assert not server.is_closing()
            server.write(b"answer")
            server.write_eof()
            await at_client.eof
            assert at_client.digest.digest() == hashlib.sha256(b"answer").digest()
            assert not at_client.lost.done() and not at_server.lost.done()
    finally:
        await _close(client, server)


@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_large_transfer_each_way_is_intact_and_read_in_large_chunks(
    ca: CertificateAuthority, client_engine: str, server_engine: str
) -> None:
    size = 8 << 20
    up, down = os.urandom(size), os.urandom(size)
    client, server = await connect_pair(_server(ca, server_engine), _client(ca, client_engine))
    try:
        async with asyncio.timeout(30):
            await _both(client, server)
            at_server = attach(server, Sink())
            at_client = attach(client, Sink())
            for tls, payload in ((client, up), (server, down)):
                view = memoryview(payload)
                for i in range(0, size, 1 << 20):
                    tls.write(view[i : i + (1 << 20)])
                tls.write_eof()
            await asyncio.gather(at_server.eof, at_client.eof)
        assert at_server.digest.digest() == hashlib.sha256(up).digest()
        assert at_client.digest.digest() == hashlib.sha256(down).digest()
        # Records (16 KiB each at most) are handed on several at a time.
        assert max(at_server.chunks) > 16 * 1024 and max(at_client.chunks) > 16 * 1024
    finally:
        await _close(client, server)


def _counting_tickets(ca: CertificateAuthority) -> tuple[ssl.SSLContext, list[int]]:
    """A CPython `ssl` client context, and the sizes of the NewSessionTicket messages its
    connections read, as they read them (OpenSSL's message callback)."""
    read: list[int] = []

    def message(
        _conn: object, direction: str, _v: object, kind: object, _m: object, data: bytes
    ) -> None:
        if direction == "read" and kind == ssl._TLSContentType.HANDSHAKE and data[:1] == b"\x04":
            read.append(len(data))

    client_ctx = _client(ca, "ssl")
    assert isinstance(client_ctx, ssl.SSLContext)
    client_ctx._msg_callback = message  # type: ignore[attr-defined]
    return client_ctx, read


async def _raw_client_of(server: TLSTransport) -> socket.socket:
    """A non-blocking client socket over loopback whose accepted end has `server` as its
    protocol."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, lsock.getsockname()[:2])
        accepted, _ = await loop.sock_accept(lsock)
    await loop.connect_accepted_socket(lambda: server, accepted)
    return sock


async def _last_flight(client: TLSEngine, sock: socket.socket) -> bytes:
    """Drive `client`'s handshake over `sock` until only its last flight is left to send
    (a TLS 1.3 client's Finished); return that flight, untaken until now."""
    loop = asyncio.get_running_loop()
    client.do_handshake()
    await loop.sock_sendall(sock, client.take())
    while not client.do_handshake():
        data = await loop.sock_recv(sock, 65536)
        assert data, "the server closed the connection during the handshake"
        client.feed(data)
    return client.take()


@pytest.mark.tls_engines()
async def test_nothing_is_decrypted_before_an_app_is_attached(
    ca: CertificateAuthority, tls_engine: str
) -> None:
    """A TLS 1.3 client sends its Finished and a (tampered) record in one segment. The server
    completes its handshake without touching the record; only attaching an app decrypts it,
    and only then is the tampering found."""
    loop = asyncio.get_running_loop()
    server = TLSTransport(_server(ca, tls_engine), server_side=True)
    client = new_engine(_client(ca, "ssl"), server_side=False)
    sock = await _raw_client_of(server)
    try:
        async with asyncio.timeout(5):
            finished = await _last_flight(client, sock)
            client.write(b"secret")
            record = bytearray(client.take())
            record[-1] ^= 0xFF  # breaks the record's authentication tag
            await loop.sock_sendall(sock, finished + bytes(record))

            await server.handshake(5)
            assert server.version() == "TLSv1.3"
            assert not server.is_closing()  # the bad record has not been looked at

            app = attach(server, Sink())
            lost = await app.lost
            assert isinstance(lost, TLSError)
            assert app.size == 0
    finally:
        sock.close()
        server.close()


@pytest.mark.parametrize(("server_engine", "tickets"), [("ssl", 1), ("openssl", 2)])
async def test_a_tls13_servers_tickets_go_out_with_its_first_write(
    ca: CertificateAuthority, server_engine: str, tickets: int
) -> None:
    """Nothing follows the handshake on the wire until the server writes: then its session
    tickets and its first record come in one segment, the tickets first, and resume."""
    loop = asyncio.get_running_loop()
    client_ctx, read = _counting_tickets(ca)
    server = TLSTransport(_server(ca, server_engine), server_side=True)
    client = new_engine(client_ctx, server_side=False)
    sock = await _raw_client_of(server)
    try:
        async with asyncio.timeout(5):
            await loop.sock_sendall(sock, await _last_flight(client, sock))
            await server.handshake(5)
            assert server.version() == "TLSv1.3"
            # A loopback write is in the peer's queue when it returns: the tickets are held.
            with pytest.raises(BlockingIOError):
                sock.recv(65536)
            assert server.get_write_buffer_size() > 0

            attach(server, Sink(echo=True))
            client.write(b"ping")
            await loop.sock_sendall(sock, client.take())
            client.feed(await loop.sock_recv(sock, 65536))  # one segment
            assert client.read(64) == b"ping"
            assert len(read) == tickets
            assert server.get_write_buffer_size() == 0
            session = client.session
    finally:
        sock.close()
        server.close()
    assert session is not None
    async with asyncio.timeout(5):
        assert (await _dial(server.context, client_ctx, session))[:2] == (True, True)


# -- session resumption -------------------------------------------------------------------


async def _dial(
    server_ctx: TLSContext, client_ctx: TLSContext, session: TLSSession | None = None
) -> tuple[bool, bool, TLSSession | None]:
    """One connection: handshake, one echoed message, clean close from both sides.

    Returns:
        (client resumed, server resumed, the client's session at the end).
    """
    client, server = await connect_pair(server_ctx, client_ctx, session=session)
    try:
        await _both(client, server)
        attach(server, Sink(echo=True))
        app = attach(client, Sink(until=5))
        client.write(b"hello")
        await app.got  # TLS 1.3 tickets come after the handshake: read past them
        client.write_eof()
        server.write_eof()
        await app.eof
        return client.session_reused, server.session_reused, client.session
    finally:
        await _close(client, server)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("client_engine", "server_engine"), PAIRS)
async def test_second_dial_resumes_and_a_new_server_context_does_not(
    ca: CertificateAuthority, client_engine: str, server_engine: str, version: str
) -> None:
    server_ctx = _server(ca, server_engine)
    client_ctx = _client(ca, client_engine, version)
    async with asyncio.timeout(10):
        first = await _dial(server_ctx, client_ctx)
        assert first[:2] == (False, False)
        assert first[2] is not None
        # Both ends agree, whichever engine says so: the stdlib's SSL_session_reused() and the
        # pyOpenSSL engine's reading of it (no verified chain) are checked against each other.
        second = await _dial(server_ctx, client_ctx, first[2])
        assert second[:2] == (True, True)
        # A rotated server has new ticket keys: the old session no longer resumes.
        rotated = _server(ca, server_engine)
        third = await _dial(rotated, client_ctx, second[2])
        assert third[:2] == (False, False)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_openssl_engine_reads_resumption_both_ways_alike(
    ca: CertificateAuthority, version: str
) -> None:
    # `session_reused` asks OpenSSL through pyOpenSSL's private `_ssl`; without it, it reads
    # the verified chain (none after a resumed handshake). Both readings, on both sides,
    # of a full and of a resumed handshake.
    server_ctx, client_ctx = _server(ca, "openssl"), _client(ca, "openssl", version)
    session = None
    for resumed in (False, True):
        server = new_engine(server_ctx, server_side=True)
        client = new_engine(client_ctx, server_side=False, session=session)
        done = [False, False]
        for _ in range(8):
            done[0] = done[0] or client.do_handshake()
            if data := client.take():
                server.feed(data)
            done[1] = done[1] or server.do_handshake()
            if data := server.take():
                client.feed(data)
            if all(done):
                break
        assert all(done)
        client.read(1)  # TLS 1.3 tickets come after the handshake
        for engine in (server, client):
            native = engine.native
            assert isinstance(native, SSL.Connection)
            assert engine.session_reused is resumed
            assert (native.get_verified_chain() is None) is resumed
        session = client.session
        server.shutdown()  # a clean close, so that OpenSSL keeps the session resumable
        client.feed(server.take())


@pytest.mark.tls_engines()
async def test_a_session_only_resumes_with_the_context_that_made_it(
    ca: CertificateAuthority, tls_engine: str
) -> None:
    server_ctx, client_ctx = _server(ca, tls_engine), _client(ca, tls_engine)
    async with asyncio.timeout(5):
        _, _, session = await _dial(server_ctx, client_ctx)
    # After a rotation the upstream listener drops sessions of the old context; the engines
    # refuse the mix outright rather than resume with the wrong certificates.
    assert session is not None
    with pytest.raises(ValueError):
        new_engine(_client(ca, tls_engine), server_side=False, session=session)


# -- OpenSSL settings ---------------------------------------------------------------------


@pytest.mark.parametrize(("server_engine", "tickets"), [("ssl", 1), ("openssl", 2)])
async def test_tickets_a_server_sends_as_a_real_client_sees_them(
    ca: CertificateAuthority, server_engine: str, tickets: int
) -> None:
    # A CPython ssl client over a real socket counts the NewSessionTicket messages it reads
    # (OpenSSL's message callback). The `ssl` engine's servers send one, as Go does; the
    # `openssl` engine keeps OpenSSL's two (no binding sets the count, bench/README.md).
    client_ctx, seen = _counting_tickets(ca)
    server_ctx = _server(ca, server_engine)
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[TLSTransport] = loop.create_future()

    def accept() -> TLSTransport:
        tls = TLSTransport(server_ctx, server_side=True)
        accepted.set_result(tls)
        return tls

    listener = await loop.create_server(accept, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=None
            )
            server = await accepted
            await server.handshake(5)
            attach(server, Sink(echo=True))
            writer.write(b"ping")
            # The tickets come after the handshake, before the echo: read past them.
            assert await reader.readexactly(4) == b"ping"
            assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            assert len(seen) == tickets
            writer.close()
            server.close()
    finally:
        listener.close()
