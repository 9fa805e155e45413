"""What the admin endpoint shows of the running proxy: the status page's view, gathered.

Owns `gather_view` (the proxy, its listeners and certificates, the recent refusals and each
upstream's instances as the agent sees them, into one `proxy.admin_page.StatusView`) and
`open_connections`. Read only, as `proxy.admin`: nothing here changes the proxy.
"""

from __future__ import annotations

import asyncio
import time

from listeners.events import Connection
from listeners.serve import Listener
from proxy.addr import join_host_port
from proxy.admin_page import (
    InstanceRow,
    ListenerRow,
    RefusalRow,
    StatusView,
    UpstreamInstances,
)
from proxy.agent import AgentClient
from proxy.identity import encode_serial
from proxy.observe import ProxyMetrics
from proxy.runner import RunState
from proxy.supervisor import Proxy


async def gather_view(
    state: RunState,
    metrics: ProxyMetrics,
    *,
    agent: AgentClient | None = None,
    agent_timeout: float,
) -> StatusView:
    """The status page's view of the proxy `state` serves now (None: not serving yet)."""
    proxy = state.proxy
    refusals = tuple(_refusal_row(conn) for conn in metrics.recent_refusals)
    if proxy is None:
        return StatusView(now=time.time(), ready=state.not_ready(), refusals=refusals)
    material = proxy.tls.material
    return StatusView(
        now=time.time(),
        service=proxy.config.service,
        ready=state.not_ready(),
        spiffe_id=(material.leaf.uri or "") if material is not None else "",
        serial=encode_serial(material.leaf.serial) if material is not None else "",
        not_after=material.not_after if material is not None else None,
        root_ids=material.root_ids if material is not None else (),
        listeners=_listener_rows(proxy),
        upstreams=await _instances(proxy, agent or proxy.agent, agent_timeout),
        refusals=refusals,
    )


async def _instances(
    proxy: Proxy, agent: AgentClient, agent_timeout: float
) -> tuple[UpstreamInstances, ...]:
    """Each upstream's instances with their health, asked of the agent concurrently
    under one short deadline; an upstream the agent did not answer for says so."""
    records = proxy.upstream_records()

    async def one(name: str, kind: str, datacenter: str, peer: str) -> UpstreamInstances:
        if kind == "prepared_query":
            return UpstreamInstances(name, note="prepared query: resolved per connection")
        try:
            async with asyncio.timeout(agent_timeout):
                found = await agent.health_instances(
                    name, datacenter=datacenter, timeout=agent_timeout, peer=peer
                )
        except Exception as exc:  # any failure to ask: the page still renders
            return UpstreamInstances(name, error=f"agent unreachable: {exc}".rstrip(": "))
        rows = tuple(
            InstanceRow(i.node, i.service_id, i.address, i.status) for i in found.instances
        )
        return UpstreamInstances(name, rows)

    return tuple(
        await asyncio.gather(
            *(
                one(
                    cfg.destination_name, cfg.destination_type, cfg.datacenter, cfg.destination_peer
                )
                for cfg, _, _ in records
            )
        )
    )


def _listeners(proxy: Proxy | None) -> list[Listener]:
    if proxy is None:
        return []
    found: list[Listener] = [listener for _, listener, _ in proxy.upstream_records()]
    if proxy.public is not None:
        found.insert(0, proxy.public)
    return found


def open_connections(proxy: Proxy | None) -> list[Connection]:
    """The open connections of every listener of `proxy`, oldest first."""
    conns = [conn for listener in _listeners(proxy) for conn in list(listener.connections)]
    return sorted(conns, key=lambda c: c.started)


def _listener_rows(proxy: Proxy) -> tuple[ListenerRow, ...]:
    rows = []
    public = proxy.config.public_listener
    if public is not None:
        listener = proxy.public
        bound = listener is not None and listener.ready.is_set()
        address = (
            listener.address
            if bound and listener is not None
            else join_host_port(public.bind_address, public.bind_port)
        )
        rows.append(
            ListenerRow(
                kind="public",
                name="public_listener",
                address=address,
                bound=bound,
                open_connections=len(listener.connections) if listener is not None else 0,
                target=public.local_service_address,
            )
        )
    running = {cfg: listener for cfg, listener, _ in proxy.upstream_records()}
    for cfg in proxy.config.upstreams:
        up = running.get(cfg)
        rows.append(
            ListenerRow(
                kind="upstream",
                name=cfg.destination_name,
                address=(
                    up.address
                    if up is not None
                    else join_host_port(cfg.local_bind_address, cfg.local_bind_port)
                ),
                bound=up is not None and up.ready.is_set(),
                open_connections=len(up.connections) if up is not None else 0,
                target=cfg.label.partition("->")[2],  # type:partition/namespace/name
            )
        )
    return tuple(rows)


def _refusal_row(conn: Connection) -> RefusalRow:
    return RefusalRow(
        at=conn.started_at,
        direction=conn.direction,
        listener=conn.listener,
        source=conn.source,
        peer=conn.peer_id,
        reason=conn.refusal.value if conn.refusal is not None else "",
        detail=conn.detail,
    )
