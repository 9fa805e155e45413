"""What one authorize call costs the proxy: httpx against the keep-alive pool.

    python bench/authz_call.py [--calls N] [--concurrency C]

The dev agent runs as its own process on the second CPU (an intention web -> db allow is
created); this process, pinned to the first CPU, makes the same authorize calls the proxy
makes, first through an `httpx.AsyncClient` (the proxy's client before the pool), then
through `AgentClient` (its `KeepAlivePool`), then through the `-authorize-cache` look-up
(`DecisionCache` on a live intentions watch: every call after the first is a hit),
sequentially and C at a time. Reported: the
caller's CPU µs per call (`time.process_time`), the wall time per call, and the agent's
CPU per call. Nothing is asserted; compare figures of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import uvloop  # noqa: E402
from bench_util import dev_agent_process  # noqa: E402

from proxy.agent import AgentClient  # noqa: E402
from proxy.authzcache import DecisionCache  # noqa: E402
from proxy.httpflags import HTTPOptions  # noqa: E402
from proxy.intentwatch import IntentionsFollower  # noqa: E402
from proxy.tlsstore import TLSStore  # noqa: E402

URI = "spiffe://{td}/ns/default/dc/dc1/svc/web"


def _agent_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(
    name: str, call: Callable[[], Awaitable[None]], calls: int, concurrency: int, agent_pid: int
) -> dict[str, float | str | int]:
    for _ in range(200):  # warm up: connections, caches
        await call()

    async def worker(n: int) -> None:
        for _ in range(n):
            await call()

    cpu0, wall0, agent0 = time.process_time(), time.perf_counter(), _agent_cpu(agent_pid)
    share = calls // concurrency
    await asyncio.gather(*(worker(share) for _ in range(concurrency)))
    done = share * concurrency
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    agent = _agent_cpu(agent_pid) - agent0
    return {
        "client": name,
        "concurrency": concurrency,
        "calls": done,
        "caller_cpu_us_per_call": round(cpu / done * 1e6, 1),
        "wall_us_per_call": round(wall / done * 1e6, 1),
        "agent_cpu_us_per_call": round(agent / done * 1e6, 1),
        "calls_per_s": round(done / wall),
    }


async def run(calls: int, concurrency: int, addr: str, agent_pid: int) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=f"http://{addr}") as api:
        r = await api.put(
            "/v1/connect/intentions/exact",
            params={"source": "web", "destination": "db"},
            json={"Action": "allow"},
        )
        r.raise_for_status()
        td = (await api.get("/v1/agent/connect/ca/roots")).json()["TrustDomain"]
    body = {"Target": "db", "ClientCertURI": URI.format(td=td), "ClientCertSerial": "01"}
    raw = (json.dumps(body) + "\n").encode()
    results: list[dict[str, object]] = []
    async with httpx.AsyncClient(base_url=f"http://{addr}", trust_env=False) as old:

        async def via_httpx() -> None:
            r = await old.post(
                "/v1/agent/connect/authorize",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 200 and r.json()["Authorized"] is True

        agent = AgentClient(HTTPOptions(address=addr))

        async def via_pool() -> None:
            answer = await agent.authorize("db", body["ClientCertURI"], "01")
            assert answer.allowed is True

        follower = IntentionsFollower(agent, "db", TLSStore())
        watching = asyncio.create_task(follower.run())
        cache = DecisionCache(follower)

        async def via_cache() -> None:
            answer = await cache.decide(
                body["ClientCertURI"], lambda: agent.authorize("db", body["ClientCertURI"], "01")
            )
            assert answer.allowed is True

        try:
            async with asyncio.timeout(10):
                await follower.changes.reached(1)
            for c in (1, concurrency):
                results.append(await _measure("httpx", via_httpx, calls, c, agent_pid))
                results.append(await _measure("pool", via_pool, calls, c, agent_pid))
                results.append(await _measure("cache", via_cache, calls, c, agent_pid))
            assert cache.counts.misses == 1, cache.counts
        finally:
            watching.cancel()
            await agent.aclose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})
    with dev_agent_process(cpus[-1] if len(cpus) > 1 else None) as (addr, agent_pid):
        results = uvloop.run(run(args.calls, args.concurrency, addr, agent_pid))
    cols = list(results[0])
    print("  ".join(f"{c:>22}" for c in cols))
    for row in results:
        print("  ".join(f"{row[c]!s:>22}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
