"""The two TLS engines side by side, through the proxy's own TLS code.

    python bench/engines.py [--seconds S] [--repeat R] [--mib M] [--tls12] [--cpu N] [--json FILE]

Engines (listeners/tls/engine.py): `ssl`, CPython's ssl module on the OpenSSL the interpreter
links; `openssl`, pyOpenSSL on the OpenSSL bundled by the cryptography wheel. Contexts come
from listeners.tls.contexts.build_contexts (Consul's settings, ECDSA P-256 leaves from the dev
agent's CA); TLS 1.3 unless --tls12 caps the clients. Per engine:

- memory: full mutual handshakes between two engines over memory BIOs, then resumed ones
  (the client offers the session of the first): the TLS cost alone, no socket, no loop;
- loopback: TLSTransport clients dialling a TLSTransport server on 127.0.0.1 on uvloop,
  8 at a time, each connection closed once both sides have completed the handshake: TCP,
  the event loop and TLS, as a listener sees them;
- round trips: one TLSTransport connection echoing 100-byte messages, one at a time: the
  cost per small message;
- bulk: one TLSTransport connection on 127.0.0.1 on uvloop carrying M MiB client -> server
  with flow control: MiB/s of application data;
- forward: the same, with the server's app writing what it gets into a plain TCP
  connection (as the public listener's pump does): MiB/s, and the writes it took.

Both ends of every connection run in this one process, on one CPU (pinned with --cpu): each
figure pays for the client and the server side. The best of R runs is reported, with the
spread. Nothing is asserted; compare the figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from listeners.tls.contexts import build_contexts, describe_engine, new_engine  # noqa: E402
from listeners.tls.engine import TLSContext, TLSEngine, TLSSession  # noqa: E402
from listeners.tls.transport import TLSTransport  # noqa: E402
from proxy.config import TLS_ENGINES  # noqa: E402
from proxy.devagent.ca import CertificateAuthority  # noqa: E402

MiB = 1 << 20


def contexts(ca: CertificateAuthority, engine: str, tls12: bool) -> tuple[TLSContext, TLSContext]:
    roots = [r.cert_pem for r in ca.roots]
    db = ca.sign_leaf("db", datacenter="dc1")
    web = ca.sign_leaf("web", datacenter="dc1")
    server = build_contexts(roots, db.cert_pem, db.private_key_pem, engine)[0]
    client = build_contexts(roots, web.cert_pem, web.private_key_pem, engine)[1]
    if tls12:
        if engine == "ssl":
            import ssl

            assert isinstance(client, ssl.SSLContext)
            client.maximum_version = ssl.TLSVersion.TLSv1_2
        else:
            from OpenSSL import SSL

            assert isinstance(client, SSL.Context)
            client.set_max_proto_version(SSL.TLS1_2_VERSION)
    return server, client


# -- memory --------------------------------------------------------------------------------


def _memory_handshake(
    server_ctx: TLSContext, client_ctx: TLSContext, session: TLSSession | None = None
) -> TLSEngine:
    srv = new_engine(server_ctx, server_side=True)
    cli = new_engine(client_ctx, server_side=False, session=session)
    client_done = server_done = False
    for _ in range(8):  # three flights for TLS 1.3, four for TLS 1.2
        if not client_done:
            client_done = cli.do_handshake()
        if data := cli.take():
            srv.feed(data)
        if not server_done:
            server_done = srv.do_handshake()
        if data := srv.take():
            cli.feed(data)
        if client_done and server_done:
            break
    else:
        raise RuntimeError("handshake did not complete")
    cli.read(1)  # TLS 1.3 session tickets come after the handshake
    cli.shutdown()  # a clean end: OpenSSL does not resume sessions of broken connections
    return cli


def rate(seconds: float, one: Callable[[], object]) -> float:
    """Calls of `one` per second, over about `seconds`."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        for _ in range(10):
            one()
        count += 10
    return count / (now - start)


def memory(server_ctx: TLSContext, client_ctx: TLSContext, seconds: float) -> dict[str, float]:
    session = _memory_handshake(server_ctx, client_ctx).session
    resumed = _memory_handshake(server_ctx, client_ctx, session)
    if not resumed.session_reused:
        raise RuntimeError("the session did not resume")
    return {
        "full": rate(seconds, lambda: _memory_handshake(server_ctx, client_ctx)),
        "resumed": rate(seconds, lambda: _memory_handshake(server_ctx, client_ctx, session)),
    }


# -- loopback ------------------------------------------------------------------------------


async def loopback(
    server_ctx: TLSContext, client_ctx: TLSContext, seconds: float, concurrency: int = 8
) -> float:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    served = 0

    async def serve_one(tls: TLSTransport) -> None:
        nonlocal served
        try:
            await tls.handshake(5)
            served += 1
        except OSError:
            pass
        finally:
            tls.close()

    class Accepted(TLSTransport):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            task = loop.create_task(serve_one(self))
            pending.add(task)
            task.add_done_callback(pending.discard)

    server = await loop.create_server(
        lambda: Accepted(server_ctx, server_side=True), "127.0.0.1", 0, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    dialled = 0

    async def dial_loop(deadline: float) -> None:
        nonlocal dialled
        while loop.time() < deadline:
            tls = TLSTransport(client_ctx, server_side=False)
            await loop.create_connection(functools.partial(lambda t: t, tls), "127.0.0.1", port)
            try:
                await tls.handshake(5)
                dialled += 1
            finally:
                tls.close()

    start = time.perf_counter()
    deadline = loop.time() + seconds
    try:
        await asyncio.gather(*(dial_loop(deadline) for _ in range(concurrency)))
        async with asyncio.timeout(10):
            while pending:
                await asyncio.gather(*pending)
        elapsed = time.perf_counter() - start
    finally:
        server.close()
        await server.wait_closed()
    return min(dialled, served) / elapsed


# -- bulk ----------------------------------------------------------------------------------


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.size = 0
        self.eof = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.size += len(data)

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return True


class _Forward(asyncio.Protocol):
    """The app over the TLS server: writes what it gets into a plain TCP transport."""

    def __init__(self, out: asyncio.Transport) -> None:
        self.out = out
        self.writes = 0
        self.tls: TLSTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.tls = transport

    def data_received(self, data: bytes) -> None:
        self.writes += 1
        self.out.write(data)
        if self.out.get_write_buffer_size() > 1 << 20 and self.tls is not None:
            self.tls.pause_reading()
            asyncio.get_running_loop().call_soon(self._drained)

    def _drained(self) -> None:
        if self.out.get_write_buffer_size() > 256 << 10:
            asyncio.get_running_loop().call_soon(self._drained)
        elif self.tls is not None:
            self.tls.resume_reading()

    def eof_received(self) -> bool:
        self.out.write_eof()
        return True


class _Source(asyncio.Protocol):
    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.tls = transport

    def data_received(self, data: bytes) -> None:
        self.tls.write(data)


class _Ping(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiting: asyncio.Future[None] | None = None
        self.got = 0

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= 100 and self.waiting is not None:
            self.got -= 100
            self.waiting.set_result(None)


async def _connected(
    server_ctx: TLSContext, client_ctx: TLSContext
) -> tuple[TLSTransport, TLSTransport, asyncio.Server]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[TLSTransport] = loop.create_future()

    def accept() -> TLSTransport:
        tls = TLSTransport(server_ctx, server_side=True)
        accepted.set_result(tls)
        return tls

    server = await loop.create_server(accept, "127.0.0.1", 0)
    client = TLSTransport(client_ctx, server_side=False)
    await loop.create_connection(
        functools.partial(lambda t: t, client), "127.0.0.1", server.sockets[0].getsockname()[1]
    )
    far = await accepted
    await asyncio.gather(client.handshake(5), far.handshake(5))
    return client, far, server


async def round_trips(server_ctx: TLSContext, client_ctx: TLSContext, count: int) -> float:
    loop = asyncio.get_running_loop()
    client, far, server = await _connected(server_ctx, client_ctx)
    try:
        far.attach(_Echo())
        far.resume_reading()
        ping = _Ping()
        client.attach(ping)
        client.resume_reading()
        message = b"x" * 100
        start = time.perf_counter()
        for _ in range(count):
            ping.waiting = loop.create_future()
            client.write(message)
            await ping.waiting
        return count / (time.perf_counter() - start)
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def bulk(
    server_ctx: TLSContext, client_ctx: TLSContext, mib: int, *, forward: bool = False
) -> tuple[float, int]:
    """MiB/s client -> server, and how many writes the server's app made (forward only)."""
    loop = asyncio.get_running_loop()
    sink = _Sink()
    plain = await loop.create_server(lambda: sink, "127.0.0.1", 0)
    out, _ = await loop.create_connection(
        asyncio.Protocol, "127.0.0.1", plain.sockets[0].getsockname()[1]
    )
    client, far, server = await _connected(server_ctx, client_ctx)
    try:
        app: asyncio.Protocol
        if forward:
            app = _Forward(cast(asyncio.Transport, out))
            done = sink
        else:
            app = done = _Sink()
        far.attach(app)
        far.resume_reading()
        source = _Source()
        client.attach(source)
        chunk = os.urandom(256 * 1024)
        total = mib * MiB
        start = time.perf_counter()
        for _ in range(total // len(chunk)):
            if not source.writable.is_set():
                await source.writable.wait()
            client.write(chunk)
        client.write_eof()
        async with asyncio.timeout(120):
            await done.eof
        elapsed = time.perf_counter() - start
        if done.size != total:
            raise RuntimeError(f"sent {total} bytes, received {done.size}")
        return total / MiB / elapsed, app.writes if isinstance(app, _Forward) else 0
    finally:
        client.close()
        out.close()
        server.close()
        plain.close()
        await server.wait_closed()


# -- report --------------------------------------------------------------------------------


def best(values: list[float]) -> dict[str, float]:
    return {
        "best": max(values),
        "median": statistics.median(values),
        "worst": min(values),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per handshake measure")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measure (best kept)")
    parser.add_argument("--mib", type=int, default=256, help="bulk transfer size")
    parser.add_argument("--tls12", action="store_true", help="cap clients at TLS 1.2")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to a CPU")
    parser.add_argument("--engines", default=",".join(TLS_ENGINES))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    ca = CertificateAuthority()
    results: dict[str, dict[str, object]] = {}
    for engine in args.engines.split(","):
        server_ctx, client_ctx = contexts(ca, engine, args.tls12)
        full, resumed, dials, trips, mibs, forwards, writes = [], [], [], [], [], [], []
        for _ in range(args.repeat):
            mem = memory(server_ctx, client_ctx, args.seconds)
            full.append(mem["full"])
            resumed.append(mem["resumed"])
            dials.append(uvloop.run(loopback(server_ctx, client_ctx, args.seconds)))
            trips.append(uvloop.run(round_trips(server_ctx, client_ctx, 20000)))
            mibs.append(uvloop.run(bulk(server_ctx, client_ctx, args.mib))[0])
            rate_, count = uvloop.run(bulk(server_ctx, client_ctx, args.mib, forward=True))
            forwards.append(rate_)
            writes.append(float(count))
        results[engine] = {
            "library": describe_engine(engine),
            "memory_handshakes_per_s": best(full),
            "memory_resumed_per_s": best(resumed),
            "loopback_handshakes_per_s": best(dials),
            "round_trips_per_s": best(trips),
            "bulk_mib_per_s": best(mibs),
            "forward_mib_per_s": best(forwards),
            "forward_writes": statistics.median(writes),
        }
    version = "TLS 1.2" if args.tls12 else "TLS 1.3"
    print(f"TLS engines, {version}, best of {args.repeat} (median), one process, one loop\n")
    rows = [
        ("memory: full handshakes/s", "memory_handshakes_per_s"),
        ("memory: resumed handshakes/s", "memory_resumed_per_s"),
        ("loopback uvloop: handshakes/s", "loopback_handshakes_per_s"),
        ("loopback uvloop: 100 B round trips/s", "round_trips_per_s"),
        (f"loopback uvloop: bulk MiB/s ({args.mib} MiB)", "bulk_mib_per_s"),
        ("loopback uvloop: forward TLS->TCP MiB/s", "forward_mib_per_s"),
        ("  writes into TCP per forward (median)", "forward_writes"),
    ]
    engines = list(results)
    print(f"{'':44}" + "".join(f"{e:>20}" for e in engines))
    for label, key in rows:
        cells = []
        for e in engines:
            figure = results[e][key]
            if isinstance(figure, dict):
                cells.append(f"{figure['best']:>10.0f} ({figure['median']:>6.0f})")
            else:
                assert isinstance(figure, float)
                cells.append(f"({figure:>6.0f})")
        print(f"{label:44}" + "".join(f"{c:>20}" for c in cells))
    print()
    for e in engines:
        print(f"{e}: {results[e]['library']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
