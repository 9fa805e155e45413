"""TLS helpers for tests: SSL contexts from PEM held in memory, one-shot handshakes, and
TLSTransport pairs over loopback on either engine."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import socket
import ssl
from collections.abc import Iterable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from listeners.tls.contexts import load_cert_chain
from listeners.tls.engine import TLSContext, TLSSession
from listeners.tls.transport import TLSTransport
from proxy.devagent.cakeys import key_id

# The cluster ID of the shared `ca` fixture (tests/conftest.py): fixed, so that tests can spell
# out its trust domain.
CLUSTER = "11111111-2222-3333-4444-555555555555"


def issue_leaf(
    issuer: x509.Certificate,
    issuer_key: Any,
    *,
    uri: str | None,
    serial: int | None = None,
    cn: str | None = None,
    days: tuple[float, float] = (-1 / 1440, 1 / 24),
    usages: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    ),
) -> tuple[str, str]:
    """(cert PEM, key PEM) of a leaf signed by (`issuer`, `issuer_key`), valid from
    `days[0]` to `days[1]` days from now, with a URI SAN `uri` (critical without a CN) and
    the extended key `usages`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]) if cn else x509.Name([])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=days[0]))
        .not_valid_after(now + dt.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), False)
        .add_extension(
            x509.AuthorityKeyIdentifier(key_id(issuer_key.public_key()), None, None), False
        )
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=cn is None
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def load_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """Load a certificate chain and key from memory, as the proxy does (never via a file)."""
    load_cert_chain(ctx, cert_pem, key_pem)


def server_context(cert_pem: str, key_pem: str, roots: Iterable[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata="".join(roots))
    load_chain(ctx, cert_pem, key_pem)
    return ctx


def client_context(cert_pem: str, key_pem: str, roots: Iterable[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata="".join(roots))
    load_chain(ctx, cert_pem, key_pem)
    return ctx


async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[bool, bool]:
    """Run one mutual TLS handshake over loopback and echo a byte.

    Returns:
        (client_ok, server_ok): whether each side completed the handshake and the echo.
    """
    server_ok = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.readexactly(1)
            writer.write(data)
            await writer.drain()
            if not server_ok.done():
                server_ok.set_result(True)
        except (ssl.SSLError, OSError, asyncio.IncompleteReadError):
            if not server_ok.done():
                server_ok.set_result(False)
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ok = False
    try:
        async with asyncio.timeout(5):
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_ctx, server_hostname=None
                )
                writer.write(b"x")
                await writer.drain()
                client_ok = await reader.readexactly(1) == b"x"
            except (ssl.SSLError, OSError, asyncio.IncompleteReadError):
                client_ok = False
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(ssl.SSLError, OSError):
                        await writer.wait_closed()
            if not client_ok and not server_ok.done():
                # The server side may still be waiting for a byte that will never come.
                server_ok.set_result(False)
            ok = await server_ok
    finally:
        server.close()
        await server.wait_closed()
    return client_ok, ok


# -- either engine: the product's contexts and TLSTransport -------------------------------


def cap_at_tls12(ctx: TLSContext) -> None:
    """Make a (client) context offer TLS 1.2 at most."""
    if isinstance(ctx, ssl.SSLContext):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        from OpenSSL import SSL

        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)


class Sink(asyncio.Protocol):
    """An app protocol over a TLSTransport: hashes what arrives, records the chunk sizes,
    resolves `eof` on EOF (returning True: the transport stays open for writing) and `lost`
    on connection_lost. With `echo`, writes back what it receives."""

    def __init__(self, *, echo: bool = False, until: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.until = until  # resolve `got` once this many bytes have arrived
        self.transport: TLSTransport | None = None
        self.digest = hashlib.sha256()
        self.size = 0
        self.chunks: list[int] = []
        self.got: asyncio.Future[None] = loop.create_future()
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.chunks.append(len(data))
        if self.echo and self.transport is not None:
            self.transport.write(data)
        if self.until is not None and self.size >= self.until and not self.got.done():
            self.got.set_result(None)

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.got, self.eof):
            if not fut.done():
                fut.set_exception(ConnectionError(f"lost: {exc!r}"))
                fut.exception()  # retrieved: a test may only await `lost`
        if not self.lost.done():
            self.lost.set_result(exc)


def attach(tls: TLSTransport, app: Sink) -> Sink:
    """Attach `app` above `tls` and start reading (the listeners' order: attach, resume)."""
    tls.attach(app)
    tls.resume_reading()
    return app


async def connect_pair(
    server_ctx: TLSContext, client_ctx: TLSContext, *, session: TLSSession | None = None
) -> tuple[TLSTransport, TLSTransport]:
    """A client and a server TLSTransport on the two ends of a loopback TCP connection.

    The client has sent its ClientHello; await both `handshake()`s next.
    """
    loop = asyncio.get_running_loop()
    client = TLSTransport(client_ctx, server_side=False, session=session)
    server = TLSTransport(server_ctx, server_side=True)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)
        await loop.create_connection(lambda: client, *lsock.getsockname()[:2])
        sock, _ = await loop.sock_accept(lsock)
    await loop.connect_accepted_socket(lambda: server, sock)
    return client, server


async def transport_handshake(server_ctx: TLSContext, client_ctx: TLSContext) -> tuple[bool, bool]:
    """One mutual handshake between TLSTransports over loopback, then a byte echoed.

    Returns:
        (client_ok, server_ok): whether each side completed the handshake, and the client
        got its byte back.
    """
    client, server = await connect_pair(server_ctx, client_ctx)
    try:
        async with asyncio.timeout(5):
            c, s = await asyncio.gather(
                client.handshake(5), server.handshake(5), return_exceptions=True
            )
            server_ok = s is None
            if server_ok:
                attach(server, Sink(echo=True))
            if c is not None:
                return False, server_ok
            app = attach(client, Sink(until=1))
            client.write(b"x")
            await asyncio.wait([app.got, app.lost], return_when=asyncio.FIRST_COMPLETED)
            return app.got.done() and app.got.exception() is None, server_ok
    finally:
        client.close()
        server.close()
