"""RSS of a real proxy process before, during and after a spike of idle connections.

Issue 12, item 4: after 10,000 idle authorized connections closed, RSS stayed at ~515 MiB
(from ~125 MiB). The proxy now gives memory back after a spike (`proxy/memtrim.py`); this
measures it: `python -m proxy` in flags mode (`-service db -listen ... -service-addr ...`)
against the dev agent, an echo app, N mTLS connections with web's leaf opened (64 at a time),
each echoing one byte and then held idle, then all closed. The target: RSS after the spike
within 1.5x of the baseline.

    python bench/memory_spike.py            # 3,000 connections, about 30 s
    python bench/memory_spike.py -n 10000   # needs `ulimit -n` above 2 x N

The proxy is started with `-max-inbound-connections N` (its default cap is a quarter of its
descriptor limit, 4,984 with `ulimit -n` 20,000: every connection past it would be refused).

Rule 1: nothing here is collected by pytest; the proxy and this script each need N
descriptors (the script raises its soft limit to the hard one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_util import (  # noqa: E402
    client_context,
    echo_handler,
    exchange,
    leaf_material,
)

from proxy.devagent import DevAgent  # noqa: E402

READY = b"Proxy loaded config and ready to serve"
TRIMMED = b"memory returned after"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / (1 << 20)


async def _line(proc: subprocess.Popen[bytes], text: bytes, timeout: float) -> None:
    """Wait for an output line of `proc` containing `text`."""
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            line = await loop.run_in_executor(None, proc.stdout.readline)
            if not line:
                raise RuntimeError("the proxy exited")
            if text in line:
                return


async def measure(n: int, settle: float) -> dict[str, float]:
    agent = DevAgent()
    await agent.start("127.0.0.1", 0)
    app = await asyncio.start_server(echo_handler, "127.0.0.1", 0, backlog=1024)
    app_port = app.sockets[0].getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "proxy", "-service", "db", "-listen", f"127.0.0.1:{port}"]
    argv += ["-service-addr", f"127.0.0.1:{app_port}", "-http-addr", agent.http_addr]
    argv += ["-access-log=false", "-max-inbound-connections", str(n + 100)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # noqa: ASYNC220 (read from a thread below)
    try:
        await _line(proc, READY, 30)
        ctx = client_context(leaf_material(agent.state.ca, "web"))
        gate = asyncio.Semaphore(64)

        async def connect() -> asyncio.StreamWriter:
            async with gate:
                return await exchange(port, b"x", ctx)

        for w in await asyncio.gather(*(connect() for _ in range(20))):
            w.close()
        baseline = rss_mib(proc.pid)
        writers = await asyncio.gather(*(connect() for _ in range(n)))
        peak = rss_mib(proc.pid)
        for w in writers:
            w.close()
        closed_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await _line(proc, TRIMMED, settle)  # the trimmer samples every 5 s
        waited = time.monotonic() - closed_at
        after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        app.close()
        await agent.close()
    return {"baseline": baseline, "peak": peak, "after": after, "waited": waited}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=3000, help="idle connections (default 3000)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds to wait after")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * args.n + 100:
        print(f"ulimit -n is {hard}: too low for {args.n} connections", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    got = asyncio.run(measure(args.n, args.settle))
    print(f"RSS of the proxy, {args.n} idle mTLS connections:")
    print(f"  baseline            {got['baseline']:7.1f} MiB")
    print(f"  with them open      {got['peak']:7.1f} MiB")
    print(f"  after they closed   {got['after']:7.1f} MiB ({got['waited']:.1f} s later)")
    ratio = got["after"] / got["baseline"]
    print(f"  after / baseline    {ratio:7.2f}x (goal <= 1.50x: {'met' if ratio <= 1.5 else 'no'})")
    per = (got["peak"] - got["baseline"]) * 1024 / args.n
    print(f"  per connection      {per:7.1f} KiB (goal <= 40 KiB; peak <= 400 MiB at 10,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
