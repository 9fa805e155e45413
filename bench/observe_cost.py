"""What metrics and the access log cost per connection, in instructions (valgrind callgrind).

The conn/s windows of `run.py --only observe` vary by ±20 % from one to the next on a small
shared machine, which hides a cost of a few per cent. Instruction counts do not vary with
the machine's load: this script runs one process per (variant, connection count) under
callgrind, each holding the dev agent, a `db` sidecar (public listener, authorize),
a `web` proxy (upstream to db), an echo app and a client, all in-process, and sends N
connections (11 bytes each way) through web -> db -> app. The cost of one connection is the
slope between two counts (the start-up cancels out):

    (Ir(on, large) - Ir(on, small)) / (large - small)   against the same for bare

`on` is the proxy as shipped (metrics, access log at info to /dev/null); `nolog` the same
without the access log (`-access-log=false`); `bare` is CONNECT_PROXY_METRICS=off (no
observer on any listener). Both proxies of the path are
observed, so the difference is two observed connections; the ratio is over everything in
the process (client, app, agent, both proxies), so the proxies' own share of it is larger.

    python bench/observe_cost.py              # about 5 minutes on 2 cores
    python bench/observe_cost.py --small 50 --large 250

Rule 1: nothing here is collected by pytest; valgrind must be on PATH (else a clear error).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_util import callgrind_slopes, connect_many, echo_handler  # noqa: E402

from proxy import console  # noqa: E402
from proxy.agent import AgentClient  # noqa: E402
from proxy.config import ProxyConfig, PublicListenerConfig, UpstreamConfig  # noqa: E402
from proxy.devagent import DevAgent  # noqa: E402
from proxy.httpflags import HTTPOptions  # noqa: E402
from proxy.observe import ProxyMetrics  # noqa: E402
from proxy.supervisor import Proxy, ProxySettings  # noqa: E402

CONCURRENCY = 8
_LOOP_VARIABLE = "OBSERVE_COST_LOOP"  # --loop, passed to the measured children
WARMUP = 20
_DEVNULL = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


async def _proxy(agent: DevAgent, config: ProxyConfig, variant: str) -> Proxy:
    client = AgentClient(HTTPOptions(address=agent.http_addr))
    settings = ProxySettings(observe=variant != "bare")
    proxy = Proxy(client, config, settings, ProxyMetrics(access_log=variant == "on"))
    await proxy.start()
    async with asyncio.timeout(30):
        await proxy.wait_ready()
    return proxy


async def child(variant: str, n: int) -> None:
    """The measured process: the path web -> db -> app, then n connections through it."""
    # The access log goes where a sidecar's stdout would, minus the reader.
    console.setup_logging("INFO", False, _DEVNULL)
    agent = DevAgent()
    await agent.start("127.0.0.1", 0)
    app = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    public = PublicListenerConfig(bind_address="127.0.0.1", local_service_port=app_port)
    db = await _proxy(agent, ProxyConfig(service="db", public_listener=public), variant)
    assert db.public is not None
    registration = {
        "Kind": "connect-proxy",
        "Name": "db-sidecar-proxy",
        "Port": db.public.port,
        "Address": "127.0.0.1",
        "Proxy": {"DestinationServiceName": "db", "LocalServicePort": app_port},
    }
    await db.agent.register(registration)
    upstream = UpstreamConfig(destination_name="db", local_bind_port=0)
    web = await _proxy(agent, ProxyConfig(service="web", upstreams=(upstream,)), variant)
    (listener,) = web.upstreams.values()
    await connect_many(listener.port, WARMUP, b"hello world", concurrency=CONCURRENCY)
    await connect_many(listener.port, n, b"hello world", concurrency=CONCURRENCY)
    for proxy in (web, db):
        await proxy.close(drain_timeout=1.0)
        await proxy.agent.aclose()
    app.close()
    await agent.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=50, help="connections, first count")
    parser.add_argument("--large", type=int, default=250, help="connections, second count")
    parser.add_argument(
        "--variants",
        default="on,bare",
        help="which variants to run, comma-separated, of on, nolog and bare (default on,bare; "
        "`on` alone gives the instructions per connection of the proxy as shipped, for other "
        "comparisons)",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of the measured process (default asyncio; the proxy's own is "
        "uvloop, whose socket wrappers and transports cost differently)",
    )
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = child(args.child[0], int(args.child[1]))
        if os.environ.get(_LOOP_VARIABLE) == "uvloop":
            import uvloop

            uvloop.run(run)
        else:
            asyncio.run(run)
        return 0
    os.environ[_LOOP_VARIABLE] = args.loop  # the children inherit it
    if not 0 < args.small < args.large:
        print("need 0 < --small < --large", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    if not variants or not set(variants) <= {"on", "nolog", "bare"}:
        print("--variants takes on, nolog, bare or several of them", file=sys.stderr)
        return 2
    try:
        per = callgrind_slopes(__file__, variants, args.small, args.large)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"instructions per connection ({args.small} -> {args.large} connections, whole process):")
    for variant in variants:
        print(f"  {variant:5s} {per[variant]:>14,.0f}")
    if "on" in per and "nolog" in per:
        log = per["on"] - per["nolog"]
        print(f"  on - nolog: {log:,.0f} per connection ({log / 2:,.0f} per observing proxy)")
    if "on" not in per or "bare" not in per:
        return 0
    extra = per["on"] - per["bare"]
    print(f"  on - bare: {extra:,.0f} per connection ({extra / 2:,.0f} per observing proxy)")
    print(f"  on / bare: {per['on'] / per['bare']:.3f}x (issue 11's goal: at most 5 % more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
