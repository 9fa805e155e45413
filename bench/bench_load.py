"""The load generator: blocking single-connection probes, and a multi-process conn/s worker.

Every loop here is bounded by a count or a deadline, and every socket has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from bench_util import TLSMaterial, client_context

IO_TIMEOUT = 15.0
CONN_TIMEOUT = 10.0

_contexts: dict[TLSMaterial, ssl.SSLContext] = {}


@dataclass(frozen=True, slots=True)
class Target:
    """Where a client connects: plain TCP when `tls` is None, else mTLS with that leaf."""

    host: str
    port: int
    tls: TLSMaterial | None = None


def _ctx(target: Target) -> ssl.SSLContext | None:
    if target.tls is None:
        return None
    ctx = _contexts.get(target.tls)
    if ctx is None:
        ctx = _contexts[target.tls] = client_context(target.tls)
    return ctx


def thread_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def connect(target: Target) -> socket.socket:
    """Dial (and hand-shake, for mTLS) with TCP_NODELAY, as the proxy's peers do."""
    sock = socket.create_connection((target.host, target.port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    ctx = _ctx(target)
    if ctx is None:
        return sock
    try:
        return ctx.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def latency(target: Target, count: int, warmup: int = 10) -> tuple[list[float], float]:
    """`count` sequential connections: dial, handshake, 1-byte echo, close.

    Returns:
        (seconds per connection, load-generator CPU seconds used).
    """
    samples: list[float] = []
    cpu0 = thread_cpu()
    for i in range(count + warmup):
        t0 = time.perf_counter()
        sock = connect(target)
        try:
            sock.sendall(b"x")
            if _recv_exactly(sock, 1) != b"x":
                raise ConnectionError("bad echo")
        finally:
            sock.close()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return samples, thread_cpu() - cpu0


def tls_info(target: Target) -> dict[str, Any] | None:
    """The TLS version and cipher the client negotiated on its hop (None for plain TCP)."""
    if target.tls is None:
        return None
    sock = connect(target)
    try:
        sock.sendall(b"t")
        _recv_exactly(sock, 1)
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        return {"version": sock.version(), "cipher": cipher[0] if cipher else None}
    finally:
        sock.close()


def rtt(target: Target, count: int, size: int = 64, warmup: int = 50) -> list[float]:
    """`count` round trips of `size` bytes on one connection (seconds each)."""
    payload = b"r" * size
    samples: list[float] = []
    sock = connect(target)
    try:
        for i in range(count + warmup):
            t0 = time.perf_counter()
            sock.sendall(payload)
            _recv_exactly(sock, size)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    finally:
        sock.close()
    return samples


def throughput(
    target: Target, nbytes: int, on_start: Any = None, chunk: int = 1 << 20
) -> tuple[int, float, float]:
    """Send `nbytes` on one connection to a sink that counts them and answers the count.

    `on_start()` is called after the connection is established, just before the first byte.

    Returns:
        (bytes counted at the far end, seconds from first byte to the count's arrival,
         load-generator CPU seconds in that time).
    """
    block = memoryview(bytes(range(256)) * (chunk // 256))
    sock = connect(target)
    try:
        if on_start is not None:
            on_start()
        cpu0 = thread_cpu()
        t0 = time.perf_counter()
        sock.sendall(b"S" + struct.pack("!Q", nbytes))
        left = nbytes
        while left > 0:
            n = min(left, chunk)
            sock.sendall(block[:n])
            left -= n
        (counted,) = struct.unpack("!Q", _recv_exactly(sock, 8))
        elapsed = time.perf_counter() - t0
        return int(counted), elapsed, thread_cpu() - cpu0
    finally:
        sock.close()


def open_idle(target: Target, count: int, deadline: float) -> list[socket.socket]:
    """Open up to `count` connections (each verified end to end by a 1-byte echo), keep them.

    Stops early at `deadline` (time.monotonic()); the caller closes what is returned.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            sock = connect(target)
            socks.append(sock)
            sock.sendall(b"i")
            _recv_exactly(sock, 1)
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()
    socks.clear()


# -- conn/s worker (runs in a pool process pinned with the load generator) ---------------


class _Once(asyncio.Protocol):
    """Writes one byte when connected, resolves `done` when it is echoed back."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"x")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before the echo: {exc!r}"))


async def _conn_rate(
    target: Target, concurrency: int, start_at: float, duration: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    ctx = _ctx(target)
    host, port = target.host, target.port
    state = {"count": 0, "errors": 0}
    first_error: list[str] = []
    end_at = start_at + duration

    async def one() -> None:
        done: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: _Once(done), host, port, ssl=ctx, server_hostname=None
        )
        try:
            await done
        finally:
            transport.close()  # FIN (plain) or close_notify then FIN (TLS, in the background)

    async def client() -> None:
        while time.monotonic() < end_at:
            try:
                await asyncio.wait_for(one(), CONN_TIMEOUT)
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                state["errors"] += 1
                if not first_error:
                    first_error.append(repr(exc))
                await asyncio.sleep(0.001)
                continue
            if time.monotonic() <= end_at:
                state["count"] += 1

    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    cpu0 = process_cpu()
    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.monotonic() - t0
    cpu = process_cpu() - cpu0
    await asyncio.sleep(0.05)  # let background TLS shutdowns finish
    return {
        "count": state["count"],
        "errors": state["errors"],
        "first_error": first_error[0] if first_error else "",
        "cpu_s": cpu,
        "wall_s": wall,
    }


def conn_rate_worker(
    target: Target, concurrency: int, start_at: float, duration: float
) -> dict[str, Any]:
    """Entry point in a pool process: `concurrency` loops of connect/echo/close."""
    import uvloop

    result: dict[str, Any] = uvloop.run(_conn_rate(target, concurrency, start_at, duration))
    return result


def warm_worker(target: Target) -> bool:
    """Import everything and build the TLS context ahead of the measured window."""
    import uvloop  # noqa: F401

    _ctx(target)
    return True
