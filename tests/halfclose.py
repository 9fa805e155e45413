"""Half-close orders: a client's EOF in every order against the app's, for a path to an app.

Issue 16: uvloop was reported to abort a process whose protocol calls `write_eof()` from
`eof_received`. The proxy's pump turns an EOF from one side into `write_eof()` on the other
side's transport inside `eof_received`, and closes both when the second EOF arrives there.
These orders drive every way the two EOFs can meet through a real path (client -> proxies ->
app); `tests/test_halfclose_orders.py` runs a bounded number, `bench/half_close_orders.py`
thousands through proxy processes on uvloop.

The app reads the first byte to learn the order (none: the client half-closed at once).

| order | client | app |
|---|---|---|
| `client-first` | sends, half-closes at once, reads to EOF | reads to EOF, answers 64 KiB, closes |
| `app-first` | sends, reads the answer to EOF, then half-closes | reads the request, answers, closes |
| `together` | sends and half-closes at once, reads to EOF | reads the request, answers 64 KiB, closes |
| `at-once` | half-closes before sending anything | sees EOF first, closes |
| `app-closes` | sends, half-closes, reads to EOF or reset | reads one byte, closes with the rest unread |
| `client-resets` | sends, half-closes, resets (SO_LINGER 0) | reads to EOF, answers, closes |

Rule 1: plain asyncio streams and sockets only; no knowledge of the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct

ORDERS = ("client-first", "app-first", "together", "at-once", "app-closes", "client-resets")
_LETTER = {
    "client-first": b"C",
    "app-first": b"A",
    "together": b"T",
    "app-closes": b"X",
    "client-resets": b"R",
}
REQUEST_SIZE = 32
ANSWER_SIZE = 64 * 1024
DEADLINE = 20.0  # one connection, from connect to its end


def request_for(order: str, n: int) -> bytes:
    """The request of connection `n` in `order` (empty for `at-once`)."""
    if order == "at-once":
        return b""
    body = f"{order}:{n}:".encode().ljust(REQUEST_SIZE - 1, b".")
    return _LETTER[order] + body[: REQUEST_SIZE - 1]


def answer_for(request: bytes, size: int = ANSWER_SIZE) -> bytes:
    block = hashlib.sha256(request).hexdigest().encode()
    return (block * (size // len(block) + 1))[:size]


async def app_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The app side of every order (serve it with `asyncio.start_server`)."""
    try:
        first = await reader.read(1)
        if not first:
            return  # at-once: EOF before any byte; closing is the answer
        if first == b"X":
            return  # app-closes: the rest stays unread
        if first in (b"C", b"R"):
            request = first + await reader.read()  # up to the client's EOF
        else:
            request = first + await reader.readexactly(REQUEST_SIZE - 1)
        size = ANSWER_SIZE if first in (b"C", b"T") else REQUEST_SIZE
        writer.write(answer_for(request, size))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_to_end(sock: socket.socket) -> bytes | None:
    """Everything until EOF; None if the connection was reset."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    try:
        while chunk := await loop.sock_recv(sock, 1 << 16):
            got += chunk
    except ConnectionResetError:
        return None
    return bytes(got)


async def run_client(port: int, order: str, n: int) -> bool:
    """One connection of `order` to 127.0.0.1:`port`: whether it ended as the order expects.

    Raises:
        TimeoutError: the connection did not end within `DEADLINE` (a stuck half-close).
    """
    loop = asyncio.get_running_loop()
    request = request_for(order, n)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(DEADLINE):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            if order == "at-once":
                sock.shutdown(socket.SHUT_WR)
                return await _read_to_end(sock) == b""
            await loop.sock_sendall(sock, request)
            if order == "app-first":
                got = await _read_to_end(sock)
                sock.shutdown(socket.SHUT_WR)
                return got == answer_for(request, REQUEST_SIZE)
            sock.shutdown(socket.SHUT_WR)
            if order == "client-resets":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return True
            got = await _read_to_end(sock)
            if order == "app-closes":
                return got in (b"", None)  # EOF, or the reset of an unread request
            return got == answer_for(request)
    finally:
        sock.close()
