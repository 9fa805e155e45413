"""Consul's telemetry from a sidecar's `Proxy.Config.telemetry`, after real traffic.

Two sidecars in agent mode on the dev agent (db with statsd, web with dogstatsd and the
Prometheus sink), one 11-byte echo through web's upstream to db: the datagrams a statsd and
a dogstatsd server receive on real UDP sockets, and the Consul-named series of a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx

from proxy.demo import ReservedPorts
from proxy.devagent import DevAgent
from proxy.observe import ProxyMetrics
from proxy.runner import run
from proxy.sources import AgentConfigSource
from proxy.supervisor import Proxy, ProxySettings
from tests.proxyfix import agent_client, echo_app


class UDPServer(asyncio.DatagramProtocol):
    """A statsd/dogstatsd server: every line of every datagram received, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.lines.extend(line for line in data.decode().split("\n") if line)
        self.changed.set()

    async def wait_for(self, *wanted: str) -> None:
        """Until every line of `wanted` has arrived (within 10 s)."""
        async with asyncio.timeout(10):
            while not all(line in self.lines for line in wanted):
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def udp_server() -> AsyncIterator[tuple[UDPServer, str]]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(UDPServer, local_addr=("127.0.0.1", 0))
    try:
        yield server, f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    finally:
        transport.close()


@contextlib.asynccontextmanager
async def sidecar(agent: DevAgent, proxy_id: str, metrics: ProxyMetrics) -> AsyncIterator[Proxy]:
    """`connect-proxy -proxy-id <proxy_id>` in this process, until the block ends."""
    ready: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    client = agent_client(agent)
    task = asyncio.create_task(
        run(
            client,
            AgentConfigSource(client, proxy_id, backoff_base=0.05),
            stop,
            ProxySettings(watch_backoff=0.05, drain_timeout=1.0),
            on_ready=ready.set_result,
            metrics=metrics,
        )
    )
    try:
        async with asyncio.timeout(10):
            yield await ready
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
        await client.aclose()


async def _db_passing(agent: DevAgent) -> None:
    """Until db's sidecar passes its TCP check (web finds only passing instances)."""
    async with httpx.AsyncClient(base_url=agent.url) as c, asyncio.timeout(10):
        index = "0"
        while not (r := await c.get(f"/v1/health/connect/db?passing&index={index}&wait=5s")).json():
            index = r.headers["X-Consul-Index"]


async def test_statsd_dogstatsd_and_prometheus_after_one_11_byte_echo(
    agent: DevAgent, ports: ReservedPorts
) -> None:
    host = socket.gethostname()
    db_port, web_port, up_port = ports.take(), ports.take(), ports.take()
    async with (
        echo_app() as app,
        udp_server() as (statsd, statsd_addr),
        udp_server() as (dogstatsd, dogstatsd_addr),
    ):
        db_telemetry = {"statsd_address": statsd_addr, "metrics_prefix": "consul"}
        web_telemetry = {
            "dogstatsd_addr": dogstatsd_addr,
            "dogstatsd_tags": ["env:test"],
            "metrics_prefix": "consul",
            "prometheus_retention_time": "60s",
            "disable_hostname": True,
        }
        services = [
            ("db", app.port, db_port, db_telemetry, []),
            (
                "web",
                8080,
                web_port,
                web_telemetry,
                [{"DestinationName": "db", "LocalBindPort": up_port}],
            ),
        ]
        async with httpx.AsyncClient(base_url=agent.url) as c:
            for name, port, proxy_port, telemetry, upstreams in services:
                r = await c.put(
                    "/v1/agent/service/register",
                    json={
                        "Name": name,
                        "Port": port,
                        "Connect": {
                            "SidecarService": {
                                "Port": proxy_port,
                                "Proxy": {
                                    "Config": {"telemetry": telemetry},
                                    "Upstreams": upstreams,
                                },
                            }
                        },
                    },
                )
                assert r.status_code == 200, r.text
        db_metrics, web_metrics = ProxyMetrics(), ProxyMetrics()
        async with (
            sidecar(agent, "db-sidecar-proxy", db_metrics),
            sidecar(agent, "web-sidecar-proxy", web_metrics),
        ):
            ports.release()  # the sidecars have bound them
            await _db_passing(agent)
            reader, writer = await asyncio.open_connection("127.0.0.1", up_port)
            try:
                writer.write(b"hello world")
                assert await reader.readexactly(11) == b"hello world"
                await statsd.wait_for(f"consul.{host}.inbound.conns.db:1.000000|g")
                await dogstatsd.wait_for(
                    "consul.upstream.conns:1|g|#env:test,src:web,dst_type:service,dst:db"
                )
            finally:
                writer.close()
            await statsd.wait_for(
                f"consul.{host}.inbound.conns.db:0.000000|g",
                "consul.inbound.tx_bytes.db:11.000000|c",
                "consul.inbound.rx_bytes.db:11.000000|c",
            )
            tags = "#env:test,src:web,dst_type:service,dst:db"
            await dogstatsd.wait_for(
                f"consul.upstream.conns:0|g|{tags}",
                f"consul.upstream.tx_bytes:11|c|{tags}",
                f"consul.upstream.rx_bytes:11|c|{tags}",
            )
            scrape = web_metrics.exposition().decode()
            series = 'dst="db",dst_type="service",src="web"'
            assert f"consul_upstream_conns{{{series}}} 0.0" in scrape
            assert f"consul_upstream_tx_bytes{{{series}}} 11.0" in scrape
            assert f"consul_upstream_rx_bytes{{{series}}} 11.0" in scrape
            # db has no Prometheus sink: no Consul-named series in its scrape.
            assert "consul_inbound" not in db_metrics.exposition().decode()
    # Each byte was counted once: no delta reported twice by the periodic flush and the close.
    assert statsd.lines.count("consul.inbound.tx_bytes.db:11.000000|c") == 1
    assert not [line for line in statsd.lines if "tx_bytes" in line and "11.0" not in line]
