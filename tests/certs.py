"""TLS helpers for tests: SSL contexts from PEM held in memory, and a one-shot handshake."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable

from proxy.tlsstore import load_cert_chain


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
