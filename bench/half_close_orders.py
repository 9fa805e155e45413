"""Half-close in every order through two proxy processes on uvloop, thousands of times (issue 16).

The long run of `tests/test_halfclose_orders.py`: the dev agent and an app in this process,
two real proxies started as `python -m proxy` (which run on uvloop): `db` with a public
listener in front of the app (`-register`), and `web` with an upstream to `db`. N clients
per order of `tests/halfclose.py` go client -> web (plain TCP) -> mTLS -> db -> app (plain
TCP), orders interleaved, `--concurrency` at a time. The report gives, per order, the
connections run and how many ended as expected, and for each proxy process whether it is
still alive, how it exited on SIGTERM, and whether its output says "double free" or
"corruption".

    python bench/half_close_orders.py              # 5,000 per order: 30,000 connections
    python bench/half_close_orders.py -n 500       # a quick look

Rule 1: nothing here is collected by pytest; loopback only; the proxies are ended by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.devagent import DevAgent  # noqa: E402
from tests.halfclose import ORDERS, app_handler, run_client  # noqa: E402

READY = b"Proxy loaded config and ready to serve"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def on_uvloop(pid: int) -> bool:
    """Whether process `pid` has uvloop's extension module mapped."""
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text(encoding="utf-8")


async def wait_line(log: IO[bytes], proc: subprocess.Popen[bytes], text: bytes) -> None:
    """Wait (bounded) until the process's log file holds `text`."""
    async with asyncio.timeout(30):
        while True:
            log.seek(0)
            if text in log.read():
                return
            if proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {proc.returncode} before it was ready")
            await asyncio.sleep(0.05)  # polling a file: there is no event to wait on


async def run(n: int, concurrency: int) -> int:
    agent = DevAgent()
    await agent.start("127.0.0.1", 0)
    app = await asyncio.start_server(app_handler, "127.0.0.1", 0, backlog=4096)
    app_port = app.sockets[0].getsockname()[1]
    public, local = free_port(), free_port()
    common = ["-http-addr", agent.http_addr, "-access-log=false"]
    argvs = {
        "db": [
            *("-service", "db", "-listen", f"127.0.0.1:{public}"),
            *("-service-addr", f"127.0.0.1:{app_port}", "-register", *common),
        ],
        "web": ["-service", "web", "-upstream", f"db:{local}", *common],
    }
    procs: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
    code = 0
    try:
        for name, argv in argvs.items():
            log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
            proc = subprocess.Popen(  # noqa: ASYNC220 (its output goes to a file)
                [sys.executable, "-m", "proxy", *argv], cwd=ROOT, stdout=log, stderr=log
            )
            procs[name] = (proc, log)
            await wait_line(log, proc, READY)
            if not on_uvloop(proc.pid):
                raise RuntimeError(f"proxy {name} is not running on uvloop")
        # web finds db's instance through its health watch: wait for the first success
        # (another process: there is no event to wait on, so a bounded poll).
        for _ in range(300):
            if await run_client(local, "client-first", -1):
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("web never reached db")

        gate = asyncio.Semaphore(concurrency)
        results: Counter[tuple[str, str]] = Counter()

        async def one(order: str, i: int) -> None:
            async with gate:
                try:
                    ok = await run_client(local, order, i)
                    results[(order, "ok" if ok else "unexpected")] += 1
                except TimeoutError:
                    results[(order, "stuck")] += 1
                except OSError as exc:
                    results[(order, type(exc).__name__)] += 1

        start = time.perf_counter()
        batch = 600  # ORDERS interleaved, a bounded number of tasks at a time
        for base in range(0, n, batch // len(ORDERS)):
            count = min(batch // len(ORDERS), n - base)
            await asyncio.gather(*(one(order, base + i) for i in range(count) for order in ORDERS))
            dead = [name for name, (proc, _) in procs.items() if proc.poll() is not None]
            if dead:
                print(f"proxy process(es) gone after {base + count} per order: {dead}")
                break
        elapsed = time.perf_counter() - start

        print(f"{sum(results.values())} connections in {elapsed:.1f} s, {concurrency} at a time")
        for order in ORDERS:
            row = {k: v for (o, k), v in results.items() if o == order}
            print(f"  {order:14} {sum(row.values()):6}  {row}")
            if set(row) != {"ok"}:
                code = 1
    finally:
        for name, (proc, log) in procs.items():
            alive = proc.poll() is None
            if alive:
                proc.send_signal(signal.SIGTERM)
            try:
                # Waited for off the loop: the agent in this process must keep answering
                # (db deregisters itself on SIGTERM).
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            log.seek(0)
            out = log.read()
            log.close()
            corrupt = b"double free" in out or b"corruption" in out
            print(
                f"proxy {name}: {'alive' if alive else 'DEAD'} at the end, exit "
                f"{proc.returncode} on SIGTERM, "
                f"{'DOUBLE FREE / CORRUPTION in its output' if corrupt else 'no heap error'}"
            )
            if not alive or corrupt or proc.returncode != 0:
                code = 1
        app.close()
        await agent.close()
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=5000, help="connections per order (default 5000)")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    import uvloop

    print(f"uvloop {uvloop.__version__}; this process and both proxies on uvloop (checked)")
    return uvloop.run(run(args.n, args.concurrency))


if __name__ == "__main__":
    sys.exit(main())
