"""What the authorize cache saves the proxy per inbound connection (`-authorize-cache`).

    python bench/authz_cache.py [--connections N] [--rounds R] [--concurrency C]

The dev agent, an echo app and the client run on the last CPU; a `db` proxy in flags mode
(`python -m proxy -service db -listen ... -service-addr ...`, access log on as shipped,
output to /dev/null) runs pinned to the first, started afresh for each window, alternately
without and with `-authorize-cache`. Each window sends N connections from one client
identity (`web`), C at a time: a full TLS 1.3 handshake, 11 bytes each way, close. Reported
per variant, the median over the rounds of the proxy process's CPU µs per connection
(utime + stime from /proc) and of the agent's, then the difference. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_util import AgentHTTP, client_context, dev_agent_process  # noqa: E402

ROOT = HERE.parent
PAYLOAD = b"hello proxy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
Options = argparse.Namespace
Row = tuple[float, float]  # proxy, agent CPU µs per connection


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _one(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=None
        )
    except (OSError, ssl.SSLError):
        return False
    try:
        writer.write(PAYLOAD)
        await writer.drain()
        return await reader.readexactly(len(PAYLOAD)) == PAYLOAD
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def _connections(port: int, ctx: ssl.SSLContext, n: int, concurrency: int) -> int:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> bool:
        async with gate:
            return await _one(port, ctx)

    return sum(await asyncio.gather(*(one() for _ in range(n))))


async def _window(
    agent: tuple[str, int], app_port: int, ctx: ssl.SSLContext, *, cached: bool, args: Options
) -> tuple[float, float]:
    """(proxy CPU µs, agent CPU µs) per connection of one window through a fresh proxy."""
    agent_addr, agent_pid = agent
    listen = _free_port()
    argv = [sys.executable, "-m", "proxy", "-service", "db", "-listen", f"127.0.0.1:{listen}"]
    argv += ["-service-addr", f"127.0.0.1:{app_port}", "-http-addr", agent_addr]
    argv += ["-authorize-cache"] if cached else []
    proxy = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        os.sched_setaffinity(proxy.pid, {args.proxy_cpu})
        deadline = time.monotonic() + 30
        while not await _one(listen, ctx):
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not serve within 30 s")
            await asyncio.sleep(0.1)
        await _connections(listen, ctx, 200, args.concurrency)  # warm up
        p0, a0 = _cpu(proxy.pid), _cpu(agent_pid)
        ok = await _connections(listen, ctx, args.connections, args.concurrency)
        p1, a1 = _cpu(proxy.pid), _cpu(agent_pid)
        if ok != args.connections:
            raise RuntimeError(f"only {ok} of {args.connections} connections were served")
        return (p1 - p0) / ok * 1e6, (a1 - a0) / ok * 1e6
    finally:
        proxy.terminate()
        try:
            async with asyncio.timeout(5):
                await proxy.wait()
        except TimeoutError:
            proxy.kill()
            await proxy.wait()


async def run(agent_addr: str, agent_pid: int, args: Options) -> dict[bool, list[Row]]:
    api = AgentHTTP(agent_addr)
    api.put("/v1/connect/intentions/exact?source=web&destination=db", {"Action": "allow"})
    ctx = client_context(api.material("web"))
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=1024)
    app_port = server.sockets[0].getsockname()[1]
    results: dict[bool, list[Row]] = {False: [], True: []}
    try:
        for r in range(args.rounds):
            for cached in (False, True):
                proxy_us, agent_us = await _window(
                    (agent_addr, agent_pid), app_port, ctx, cached=cached, args=args
                )
                results[cached].append((proxy_us, agent_us))
                label = "on " if cached else "off"
                print(
                    f"round {r + 1} cache {label}: proxy {proxy_us:7.1f} µs/conn, "
                    f"agent {agent_us:6.1f} µs/conn",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        server.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    args.proxy_cpu = cpus[0]
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[-1]})
    with dev_agent_process(cpus[-1] if len(cpus) > 1 else None) as (addr, agent_pid):
        results = asyncio.run(run(addr, agent_pid, args))
    median = {
        cached: (
            statistics.median(p for p, _ in rows),
            statistics.median(a for _, a in rows),
        )
        for cached, rows in results.items()
    }
    (off_p, off_a), (on_p, on_a) = median[False], median[True]
    print(f"{'cache':>6} {'proxy µs/conn':>14} {'agent µs/conn':>14}")
    print(f"{'off':>6} {off_p:14.1f} {off_a:14.1f}")
    print(f"{'on':>6} {on_p:14.1f} {on_a:14.1f}")
    print(
        f"saved: proxy {off_p - on_p:.1f} µs/conn ({(off_p - on_p) / off_p:.1%}), "
        f"agent {off_a - on_a:.1f} µs/conn"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
