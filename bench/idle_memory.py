"""Where the memory of an idle forwarded connection goes, in one proxy process (issue 13).

A measured child process runs one proxy in-process (`proxy.supervisor.Proxy`, as a sidecar
would run it, metrics and access log on) with tracemalloc on; this process holds the dev
agent, the far ends and the clients. The child is told to take a reading (full garbage
collection, RSS, tracemalloc's total and snapshot, live objects by type) before and after
N idle connections are opened through it (each verified end to end by a 1-byte echo,
then left open). Per connection:

- RSS: what the process grew by (Python and OpenSSL and the event loop's C side);
- Python: what tracemalloc saw allocated through Python's allocators (objects, buffers);
- the rest (RSS - Python): OpenSSL's structures (SSL, its session and peer certificate),
  libuv's handles, malloc's overhead;
- the objects: the growth in live objects by type (gc-tracked ones: a `bytes` is not), and
  the source lines that allocated the most (tracemalloc, 1 frame).

Layouts: `inbound` (mTLS client -> public listener of `db` -> plain echo app) and
`outbound` (plain client -> upstream listener of `web` -> mTLS echo `db`, registered as a
Connect-native service). The TLS engine is the proxy's (`--engine ssl|openssl`).

    python bench/idle_memory.py                        # both layouts, both engines, 2,000 each
    python bench/idle_memory.py --layout inbound --engine openssl -n 5000 --top 30

Rule 1: nothing here is collected by pytest. RSS is read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_util import (  # noqa: E402
    client_context,
    echo_handler,
    exchange,
    leaf_material,
    server_context,
)

from listeners.serve import Listener  # noqa: E402
from proxy.devagent import DevAgent  # noqa: E402

CONCURRENCY = 32


def _rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _types() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


async def _child(layout: str, agent_addr: str, target_port: int) -> None:
    """The measured process: one proxy; readings on request (stdin), answers on stdout."""
    from proxy import console
    from proxy.agent import AgentClient
    from proxy.config import ProxyConfig, PublicListenerConfig, UpstreamConfig, load_tls_engine
    from proxy.httpflags import HTTPOptions
    from proxy.observe import ProxyMetrics
    from proxy.supervisor import Proxy, ProxySettings

    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230 (once, at start)
        console.setup_logging("INFO", False, devnull)
        client = AgentClient(HTTPOptions(address=agent_addr))
        settings = ProxySettings(tls_engine=load_tls_engine(os.environ))
        if layout == "inbound":
            public = PublicListenerConfig(bind_address="127.0.0.1", local_service_port=target_port)
            config = ProxyConfig(service="db", public_listener=public)
        else:
            upstream = UpstreamConfig(destination_name="db", local_bind_port=0)
            config = ProxyConfig(service="web", upstreams=(upstream,))
        proxy = Proxy(client, config, settings, ProxyMetrics())
        await proxy.start()
        async with asyncio.timeout(30):
            await proxy.wait_ready()
        if layout == "inbound":
            assert proxy.public is not None
            listener: Listener = proxy.public
        else:
            (listener,) = proxy.upstreams.values()
        port = listener.port
        print(json.dumps({"port": port}), flush=True)
        loop = asyncio.get_running_loop()
        before: tuple[int, int, Counter[str], tracemalloc.Snapshot] | None = None
        tracing = tracemalloc.is_tracing()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            gc.collect()
            reading = (_rss(), tracemalloc.get_traced_memory()[0], _types())
            # Without tracemalloc (the RSS run) an empty snapshot stands in.
            snap = tracemalloc.take_snapshot() if tracing else tracemalloc.Snapshot([], 1)
            if line.strip() == "before":
                # The warm-up's connections must be gone from the proxy first.
                async with asyncio.timeout(30):
                    await listener.until_idle()
                gc.collect()
                reading = (_rss(), tracemalloc.get_traced_memory()[0], _types())
                snap = tracemalloc.take_snapshot() if tracing else tracemalloc.Snapshot([], 1)
                before = (*reading, snap)
                print(json.dumps({}), flush=True)
                continue
            assert before is not None
            stats = snap.compare_to(before[3], "lineno")
            lines = [
                (str(s.traceback[0]), s.size_diff, s.count_diff) for s in stats if s.size_diff > 0
            ]
            growth = reading[2] - before[2]
            print(
                json.dumps(
                    {
                        "rss": reading[0] - before[0],
                        "traced": reading[1] - before[1],
                        "lines": lines[:60],
                        "types": growth.most_common(40),
                    }
                ),
                flush=True,
            )
        await proxy.close(drain_timeout=1.0)
        await proxy.agent.aclose()


async def _ask(proc: asyncio.subprocess.Process, word: str) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(word.encode() + b"\n")
    await proc.stdin.drain()
    async with asyncio.timeout(120):
        answer: dict[str, Any] = json.loads(await proc.stdout.readline())
    return answer


async def measure(layout: str, engine: str, n: int, trace: bool) -> dict[str, Any]:
    """One child, its two readings; `trace`: with tracemalloc (whose own records add to RSS,
    so the RSS figure comes from a run without it)."""
    agent = DevAgent()
    await agent.start("127.0.0.1", 0)
    if layout == "inbound":
        app = await asyncio.start_server(echo_handler, "127.0.0.1", 0, backlog=1024)
    else:
        app = await asyncio.start_server(
            echo_handler,
            "127.0.0.1",
            0,
            backlog=1024,
            ssl=server_context(leaf_material(agent.state.ca, "db")),
        )
    target_port = app.sockets[0].getsockname()[1]
    if layout == "outbound":
        from proxy.agent import AgentClient
        from proxy.httpflags import HTTPOptions

        client = AgentClient(HTTPOptions(address=agent.http_addr))
        await client.register(
            {"Name": "db", "Port": target_port, "Address": "127.0.0.1", "Connect": {"Native": True}}
        )
        await client.aclose()
    env = {**os.environ, "CONNECT_PROXY_TLS_ENGINE": engine}
    env.pop("PYTHONTRACEMALLOC", None)
    if trace:
        env["PYTHONTRACEMALLOC"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        layout,
        agent.http_addr,
        str(target_port),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    writers: list[asyncio.StreamWriter] = []
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            port = json.loads(await proc.stdout.readline())["port"]
        ctx = client_context(leaf_material(agent.state.ca, "web")) if layout == "inbound" else None
        gate = asyncio.Semaphore(CONCURRENCY)

        async def connect() -> asyncio.StreamWriter:
            async with gate, asyncio.timeout(60):
                return await exchange(port, b"x", ctx)

        # Warm up (the authorize pool, sessions, caches), then the readings around n.
        for w in await asyncio.gather(*(connect() for _ in range(50))):
            w.close()
        await _ask(proc, "before")
        writers = list(await asyncio.gather(*(connect() for _ in range(n))))
        return await _ask(proc, "after")
    finally:
        for w in writers:
            w.close()
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        app.close()
        await agent.close()


def report(layout: str, engine: str, n: int, got: dict[str, Any], top: int) -> None:
    rss, traced = got["rss"] / n / 1024, got["traced"] / n / 1024
    print(f"\n== {layout} / {engine}: {n} idle connections, per connection")
    print(
        f"  RSS {rss:6.1f} KiB   Python (tracemalloc) {traced:5.1f} KiB   "
        f"rest (OpenSSL, libuv, malloc) {rss - traced:5.1f} KiB"
    )
    print("  live objects per connection (gc-tracked), by type:")
    for name, count in got["types"][:top]:
        if count / n >= 0.5:
            print(f"    {count / n:5.2f}  {name}")
    print("  bytes per connection by allocating line (tracemalloc):")
    for where, size, count in got["lines"][:top]:
        if size / n >= 16:
            print(f"    {size / n:7.0f} B  {count / n:5.2f} blocks  {where}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=2000, help="idle connections (default 2000)")
    parser.add_argument(
        "--layout", default="inbound,outbound", help="inbound, outbound or inbound,outbound"
    )
    parser.add_argument("--engine", default="openssl,ssl", help="ssl, openssl or openssl,ssl")
    parser.add_argument("--top", type=int, default=20, help="rows of each table")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from proxy import console

        console.install_uvloop()  # as `python -m proxy`
        asyncio.run(_child(args.child[0], args.child[1], int(args.child[2])))
        return 0
    # A name the loops below do not know would measure a proxy with nothing behind it.
    for option, value, known in (
        ("--layout", args.layout, {"inbound", "outbound"}),
        ("--engine", args.engine, {"ssl", "openssl"}),
    ):
        if not set(value.split(",")) <= known:
            parser.error(f"{option} {value}: a comma-separated list of {', '.join(sorted(known))}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 3 * args.n + 200:
        print(f"ulimit -n is {hard}: too low for {args.n} connections", file=sys.stderr)
        return 2
    for layout in args.layout.split(","):
        for engine in args.engine.split(","):
            got = asyncio.run(measure(layout, engine, args.n, trace=True))
            got["rss"] = asyncio.run(measure(layout, engine, args.n, trace=False))["rss"]
            report(layout, engine, args.n, got, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
