"""Half-close in every order against the app's EOF, through both real sidecars (issue 16).

The path is client -> web's upstream listener (plain TCP: the pump's side A) -> mTLS -> db's
public listener -> app (plain TCP: the pump's side B), so `write_eof()` is called on plain
transports from inside `eof_received` in every order `tests/halfclose.py` describes, and
both pumps close both their sides when the second EOF arrives. Like every async test it runs
on plain asyncio and on uvloop; `bench/half_close_orders.py` runs thousands through proxy
processes on uvloop.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from proxy.config import ProxyConfig
from proxy.devagent import DevAgent
from tests.halfclose import ORDERS, app_handler, run_client
from tests.proxyfix import EchoApp, db_sidecar, local_port, running_proxy, upstream

PER_ORDER = 40
CONCURRENCY = 24


async def test_every_half_close_order_ends_cleanly_through_both_sidecars(agent: DevAgent) -> None:
    server = await asyncio.start_server(app_handler, "127.0.0.1", 0, backlog=1024)
    app = EchoApp(server=server, port=server.sockets[0].getsockname()[1])
    try:
        async with (
            db_sidecar(agent, app) as db,
            running_proxy(agent, ProxyConfig(service="web", upstreams=(upstream("db"),))) as web,
        ):
            port = local_port(web)
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(order: str, n: int) -> tuple[str, bool]:
                async with gate:
                    return order, await run_client(port, order, n)

            # Orders interleaved, so every order meets every other on the loop at once.
            jobs = [one(order, n) for n in range(PER_ORDER) for order in ORDERS]
            async with asyncio.timeout(60):
                results = await asyncio.gather(*jobs)
            failed = Counter(order for order, ok in results if not ok)
            assert not failed, f"connections that did not end as their order expects: {failed}"
            # Every connection is over on both proxies: no side was left half-open.
            (outbound,) = web.upstreams.values()
            assert db.public is not None
            async with asyncio.timeout(10):
                await outbound.until_idle()
                await db.public.until_idle()
            assert outbound.active == 0 and db.public.active == 0
            # And both still serve.
            assert await run_client(port, "client-first", PER_ORDER)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("order", ORDERS)
async def test_each_order_alone(agent: DevAgent, order: str) -> None:
    """One order at a time, so a failure names its order."""
    server = await asyncio.start_server(app_handler, "127.0.0.1", 0)
    app = EchoApp(server=server, port=server.sockets[0].getsockname()[1])
    try:
        async with (
            db_sidecar(agent, app),
            running_proxy(agent, ProxyConfig(service="web", upstreams=(upstream("db"),))) as web,
        ):
            async with asyncio.timeout(30):
                results = await asyncio.gather(
                    *(run_client(local_port(web), order, n) for n in range(8))
                )
            assert all(results)
    finally:
        server.close()
        await server.wait_closed()
