"""Fixtures for peered proxies: two dev agents (dc1 dials, dc2 accepts and exports), the db
sidecar in dc2 and a web proxy in dc1 whose upstream `db` is imported from dc2."""

from __future__ import annotations

import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.config import ProxyConfig, UpstreamConfig
from proxy.devagent import AgentConfig, DevAgent
from tests.certs import load_chain
from tests.conftest import wait_until


@dataclass
class Cluster:
    agent: DevAgent
    http: httpx.AsyncClient

    @property
    def trust_domain(self) -> str:
        return self.agent.state.ca.trust_domain

    async def token(self, name: str, **body: Any) -> str:
        r = await self.http.post("/v1/peering/token", json={"PeerName": name, **body})
        assert r.status_code == 200, r.text
        token: str = r.json()["PeeringToken"]
        return token

    async def establish(self, name: str, token: str) -> httpx.Response:
        return await self.http.post(
            "/v1/peering/establish", json={"PeerName": name, "PeeringToken": token}
        )

    async def state(self, name: str) -> str:
        r = await self.http.get(f"/v1/peering/{name}")
        return str(r.json()["State"]) if r.status_code == 200 else str(r.status_code)

    async def export(self, service: str, peer: str) -> None:
        entry = {
            "Kind": "exported-services",
            "Name": "default",
            "Services": [{"Name": service, "Consumers": [{"Peer": peer}]}],
        }
        r = await self.http.put("/v1/config", json=entry)
        assert r.status_code == 200, r.text

    async def imports(self, service: str, peer: str) -> list[dict[str, Any]]:
        r = await self.http.get(f"/v1/health/connect/{service}?peer={peer}&passing=1")
        assert r.status_code == 200, r.text
        entries: list[dict[str, Any]] = r.json()
        return entries

    async def intention(self, source: str, destination: str, action: str, peer: str) -> None:
        entry = {
            "Kind": "service-intentions",
            "Name": destination,
            "Sources": [{"Name": source, "Peer": peer, "Action": action}],
        }
        r = await self.http.put("/v1/config", json=entry)
        assert r.status_code == 200, r.text


def cluster_config(dc: str, **kw: Any) -> AgentConfig:
    return AgentConfig(
        node_name=f"node-{dc}",
        datacenter=dc,
        cluster_id=str(uuid.uuid4()),
        grpc_tls_port=0,
        peering_heartbeat=0.5,
        sidecar_check_interval=0.3,
        **kw,
    )


@contextlib.asynccontextmanager
async def cluster(dc: str | AgentConfig) -> AsyncIterator[Cluster]:
    """A started dev agent (`dc`: a datacenter name for `cluster_config`, or a config)."""
    agent = DevAgent(cluster_config(dc) if isinstance(dc, str) else dc)
    await agent.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=agent.url, timeout=10.0) as http:
            yield Cluster(agent, http)
    finally:
        await agent.close()


async def peer(dc1: Cluster, dc2: Cluster) -> None:
    """dc2 generates the token (calls dc1 "dc1"), dc1 establishes (calls dc2 "dc2")."""
    r = await dc1.establish("dc2", await dc2.token("dc1"))
    assert (r.status_code, r.json()) == (200, {}), r.text

    async def active() -> bool:
        return await dc1.state("dc2") == "ACTIVE" and await dc2.state("dc1") == "ACTIVE"

    await wait_until(active)


@contextlib.asynccontextmanager
async def two_clusters() -> AsyncIterator[tuple[Cluster, Cluster]]:
    async with cluster("dc1") as dc1, cluster("dc2") as dc2:
        await peer(dc1, dc2)
        yield dc1, dc2


async def wait_imported(dc1: Cluster, dc2: Cluster, service: str = "db", count: int = 1) -> None:
    """dc1 sees `count` passing instances of `service` from dc2, and dc2's trust bundle."""

    async def seen() -> bool:
        if len(await dc1.imports(service, "dc2")) != count:
            return False
        r = await dc1.http.get("/v1/internal/connect-proxy/peering/trust-bundle/dc2")
        return r.status_code == 200

    await wait_until(seen, timeout=10.0)


def peered_upstream(name: str = "db", peer: str = "dc2", **kwargs: object) -> UpstreamConfig:
    return UpstreamConfig(
        destination_name=name,
        local_bind_port=0,
        destination_peer=peer,
        **kwargs,  # type: ignore[arg-type]
    )


def web_config(*upstreams: UpstreamConfig) -> ProxyConfig:
    return ProxyConfig(service="web", upstreams=upstreams or (peered_upstream(),))


def peer_client_ctx(client: DevAgent, server: DevAgent, service: str) -> ssl.SSLContext:
    """An mTLS client of `server`'s services with a leaf of `client`'s CA (another cluster)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(r.cert_pem for r in server.state.ca.roots))
    leaf = client.state.ca.sign_leaf(service, datacenter=client.config.datacenter)
    load_chain(ctx, leaf.cert_pem, leaf.private_key_pem)
    return ctx
