"""Does `transport.write_eof()` on EOF abort a server process? (issue 16)

Reported: uvloop 0.23.0 aborts a server with "double free or corruption" when a protocol
calls `transport.write_eof()` from `eof_received` (or via `call_soon` right after it), after a
few thousand short half-closing connections; plain asyncio survives.

This script starts an echo server in a child process, on uvloop or on plain asyncio, whose
protocol answers a peer's EOF in one of these ways (`--mode`):

    direct     write_eof() inside eof_received, which returns False (the loop closes the
               transport right after)
    call-soon  eof_received returns True and schedules write_eof() then close() with
               call_soon
    keep       write_eof() inside eof_received, which returns True; close() comes with
               call_soon

and runs N clients against it (`--concurrency` at a time), each connecting, sending 64
bytes and half-closing (shutdown SHUT_WR), then, by `--client`:

    read       reading the echo up to EOF and closing (the full exchange)
    close      closing at once, without reading (the echo may meet a closed socket)
    reset      closing at once with SO_LINGER 0 (an RST while the server answers)

The server is checked after every 1,000 connections; the report says per loop, mode and
client how many connections ran and whether the server died (exit status, and "double free"
in its stderr).

    python bench/uvloop_write_eof.py             # 30,000 per loop, mode and client: ~2 min
    python bench/uvloop_write_eof.py -n 5000 --loop uvloop --mode direct --client reset

Rule 1: nothing here is collected by pytest; it only opens loopback connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MODES = ("direct", "call-soon", "keep")
CLIENTS = ("read", "close", "reset")
LOOPS = ("uvloop", "asyncio")
PAYLOAD = b"x" * 64


# -- the server (child process) ------------------------------------------------------------


class EchoEOF(asyncio.Protocol):
    """Echoes, and answers the peer's EOF with write_eof() as `mode` says."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        t = self.transport
        assert t is not None
        if self.mode == "direct":
            t.write_eof()
            return False
        loop = asyncio.get_running_loop()
        if self.mode == "call-soon":

            def later() -> None:
                t.write_eof()
                t.close()

            loop.call_soon(later)
            return True
        t.write_eof()  # keep
        loop.call_soon(t.close)
        return True


async def _serve(mode: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoEOF(mode), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def serve(loop_name: str, mode: str) -> None:
    if loop_name == "uvloop":
        import uvloop

        uvloop.run(_serve(mode))
    else:
        asyncio.run(_serve(mode))


# -- the clients (this process) ------------------------------------------------------------


@dataclass
class Result:
    loop: str
    mode: str
    client: str
    attempted: int = 0
    echoed: int = 0  # the full echo, then EOF
    refused: int = 0  # connect failed or reset (the server is gone, or was going)
    crashed: bool = False
    exit_status: int | None = None
    double_free: bool = False
    errors: int = 0  # tracebacks the server's loop logged (callbacks that raised)
    seconds: float = 0.0


async def _one(port: int, client: str) -> bool:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        if client == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if client != "read":
            return True
        got = b""
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10.0)
            if not chunk:
                break
            got += chunk
        return got == PAYLOAD
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()


async def _clients(
    proc: subprocess.Popen[bytes], port: int, res: Result, n: int, conc: int
) -> None:
    batch = 1000
    sem = asyncio.Semaphore(conc)

    async def guarded() -> bool:
        async with sem:
            return await _one(port, res.client)

    while res.attempted < n:
        count = min(batch, n - res.attempted)

        results = await asyncio.gather(*(guarded() for _ in range(count)))
        res.attempted += count
        res.echoed += sum(results)
        res.refused += count - sum(results)
        if proc.poll() is not None:
            res.crashed = True
            return


def run_one(loop_name: str, mode: str, client: str, n: int, conc: int) -> Result:
    res = Result(loop_name, mode, client)
    cmd = [sys.executable, __file__, "--serve", loop_name, "--mode", mode]
    # The server's stderr goes to a file: a pipe nobody reads would fill with the loop's
    # error logs and block the server.
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile)
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        start = time.perf_counter()
        hung = False
        try:
            asyncio.run(_clients(proc, port, res, n, conc))
        finally:
            res.seconds = time.perf_counter() - start
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                hung = True
                proc.kill()
                proc.wait()
            proc.stdout.close()
        errfile.seek(0)
        stderr = errfile.read()
    res.exit_status = proc.returncode
    # SIGTERM ends a healthy server with 0 (its handler); a signal it died of is a crash.
    if proc.returncode != 0 and not hung:
        res.crashed = True
    res.double_free = b"double free" in stderr or b"corruption" in stderr
    res.errors = stderr.count(b"Traceback")
    if res.crashed and stderr:
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=30_000, help="connections per loop and mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=LOOPS, action="append", help="default: both")
    parser.add_argument("--mode", choices=MODES, action="append", help="default: all")
    parser.add_argument("--client", choices=CLIENTS, action="append", help="default: all")
    parser.add_argument("--serve", choices=LOOPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, (args.mode or ["direct"])[0])
        return 0
    with contextlib.suppress(ImportError):
        import uvloop

        print(f"uvloop {uvloop.__version__}, Python {sys.version.split()[0]}, pid {os.getpid()}")
    crashed = False
    for loop_name in args.loop or LOOPS:
        for mode in args.mode or MODES:
            for client in args.client or CLIENTS:
                r = run_one(loop_name, mode, client, args.n, args.concurrency)
                crashed |= r.crashed
                verdict = "ABORTED" if r.crashed else "survived"
                print(
                    f"{r.loop:8} {r.mode:10} {r.client:6} {r.attempted:6} connections, "
                    f"{r.echoed:6} ok, {r.refused:5} failed, {r.seconds:6.1f} s: "
                    f"server {verdict} (exit {r.exit_status}, {r.errors} logged errors"
                    f"{', double free' if r.double_free else ''})",
                    flush=True,
                )
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
