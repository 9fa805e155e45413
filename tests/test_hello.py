"""`listeners/tls/hello.py`: whether a ClientHello lets its client resume, read from real
ClientHellos (Go's crypto/tls, both of our engines) and from damaged ones; and what the
`openssl` engine's server does with the answer."""

from __future__ import annotations

import random
import ssl
from pathlib import Path

import pytest
from OpenSSL import SSL

from listeners.tls.contexts import build_contexts, new_engine
from listeners.tls.hello import offers_resumption
from proxy.devagent.ca import CertificateAuthority

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GO_NO_CACHE = (FIXTURES / "go-clienthello-no-session-cache.bin").read_bytes()
GO_CACHE = (FIXTURES / "go-clienthello-session-cache.bin").read_bytes()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("11111111-2222-3333-4444-555555555555")


def _contexts(ca: CertificateAuthority, engine: str, service: str) -> tuple[object, object]:
    leaf = ca.sign_leaf(service, datacenter="dc1")
    roots = [r.cert_pem for r in ca.roots]
    return build_contexts(roots, leaf.cert_pem, leaf.private_key_pem, engine)


def _hello(ca: CertificateAuthority, engine: str) -> bytes:
    """The first flight of a client of `engine` (one TLS record: the ClientHello)."""
    client = _contexts(ca, engine, "web")[1]
    engine_ = new_engine(client, server_side=False)  # type: ignore[arg-type]
    assert engine_.do_handshake() is False
    return engine_.take()


def test_go_without_a_session_cache_cannot_resume() -> None:
    # Consul's proxy and bench/goload dial so.
    assert offers_resumption(GO_NO_CACHE) is False


def test_go_with_a_session_cache_can() -> None:
    assert offers_resumption(GO_CACHE) is True


@pytest.mark.parametrize("engine", ["openssl", "ssl"])
def test_our_clients_can(ca: CertificateAuthority, engine: str) -> None:
    assert offers_resumption(_hello(ca, engine)) is True


def test_a_hello_cut_short_anywhere_is_no_answer(ca: CertificateAuthority) -> None:
    for hello in (GO_NO_CACHE, GO_CACHE, _hello(ca, "openssl")):
        for size in range(len(hello)):
            assert offers_resumption(hello[:size]) is None, size
        # More bytes after the record (the next record, early data) change nothing.
        assert offers_resumption(hello + b"\x17\x03\x03\x00\x01x") is not None


def test_what_is_not_a_client_hello_is_no_answer() -> None:
    assert offers_resumption(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n") is None
    assert offers_resumption(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00") is None  # ServerHello
    assert offers_resumption(b"") is None


def test_lengths_that_disagree_are_no_answer() -> None:
    hello = bytearray(GO_NO_CACHE)
    # The extensions block is the last part of the hello: one byte more in its length.
    at = len(hello) - _extensions_size(hello) - 2
    hello[at : at + 2] = (_extensions_size(hello) + 1).to_bytes(2, "big")
    assert offers_resumption(bytes(hello)) is None


def _extensions_size(hello: bytearray) -> int:
    at = 9 + 2 + 32
    at += 1 + hello[at]
    at += 2 + int.from_bytes(hello[at : at + 2], "big")
    at += 1 + hello[at]
    return int.from_bytes(hello[at : at + 2], "big")


def test_damaged_hellos_never_raise(ca: CertificateAuthority) -> None:
    rng = random.Random(13)
    hellos = [GO_NO_CACHE, GO_CACHE, _hello(ca, "openssl")]
    for _ in range(3000):
        hello = bytearray(rng.choice(hellos))
        for _ in range(rng.randint(1, 4)):
            hello[rng.randrange(len(hello))] = rng.randrange(256)
        assert offers_resumption(bytes(hello)) in (True, False, None)
    for _ in range(1000):
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        assert offers_resumption(b"\x16\x03\x01" + noise) in (True, False, None)


def _no_ticket(engine: object) -> bool:
    connection = engine.native  # type: ignore[attr-defined]
    assert isinstance(connection, SSL.Connection)
    return bool(connection.set_options(0) & SSL.OP_NO_TICKET)  # 0: read, change nothing


@pytest.mark.parametrize(("hello", "no_ticket"), [(GO_NO_CACHE, True), (GO_CACHE, False)])
def test_the_openssl_server_makes_no_stateless_ticket_for_a_client_that_cannot_resume(
    ca: CertificateAuthority, hello: bytes, no_ticket: bool
) -> None:
    server = new_engine(_contexts(ca, "openssl", "db")[0], server_side=True)  # type: ignore[arg-type]
    server.feed(hello)
    assert server.do_handshake() is False  # its first flight, then it waits for the client
    assert server.take()[:1] == b"\x16"
    assert _no_ticket(server) is no_ticket


def test_a_client_that_cannot_resume_still_completes_its_handshake(
    ca: CertificateAuthority,
) -> None:
    # A real client whose hello offers no resumption: TLS 1.2 without tickets (a TLS 1.3
    # OpenSSL client always sends psk_key_exchange_modes). Its server takes the other path,
    # and its session is kept nowhere: offered again, it is not resumed.
    server_ctx = _contexts(ca, "openssl", "db")[0]
    client_ctx = _contexts(ca, "ssl", "web")[1]
    assert isinstance(client_ctx, ssl.SSLContext)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.options |= ssl.OP_NO_TICKET
    session = None
    for _ in range(2):
        server = new_engine(server_ctx, server_side=True)  # type: ignore[arg-type]
        client = new_engine(client_ctx, server_side=False, session=session)
        assert client.do_handshake() is False
        hello = client.take()
        assert offers_resumption(hello) is False
        server.feed(hello)
        done = [False, False]
        for _ in range(8):
            if not done[1]:
                done[1] = server.do_handshake()
            if data := server.take():
                client.feed(data)
            if not done[0]:
                done[0] = client.do_handshake()
            if data := client.take():
                server.feed(data)
            if all(done):
                break
        assert all(done)
        assert _no_ticket(server)
        client.write(b"ping")
        server.feed(client.take())
        assert server.read(16) == b"ping"
        assert client.version() == "TLSv1.2"
        assert client.session_reused is False
        session = client.session
        # Closed cleanly: OpenSSL drops from its cache the session of a connection freed
        # without a close_notify sent, so only a clean close shows what a cache would keep.
        server.shutdown()
        client.feed(server.take())
        client.shutdown()
        server.feed(client.take())
