"""Upstream discovery: which instances serve an upstream, and which identity each must show.

Owns consul-spec.md section 6: service upstreams come from
`/v1/health/connect/<name>?passing&stale`, prepared queries from
`/v1/query/<name>/execute?connect=true&stale`; an instance's address is `Service.Address`,
else `Node.Address`; the expected identity is the proxy's destination service (or the
service itself for Connect-native instances) in the instance's datacenter.

Rule 1: `endpoints_from_entries` is pure; the resolvers only add the agent call.
Rule 2: an entry that is not a valid Connect endpoint is skipped, not fatal.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from proxy.agent import AgentClient
from proxy.identity import SpiffeIDService

Endpoint = tuple[str, int, SpiffeIDService]


def endpoints_from_entries(entries: Iterable[Mapping[str, Any]]) -> list[Endpoint]:
    """(host, port, expected identity) for each Connect-capable ServiceEntry."""
    out: list[Endpoint] = []
    for entry in entries:
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        proxy = svc.get("Proxy") or {}
        if svc.get("Kind") == "connect-proxy" and proxy.get("DestinationServiceName"):
            service = proxy["DestinationServiceName"]
        elif (svc.get("Connect") or {}).get("Native"):
            service = svc.get("Service") or ""
        else:
            continue
        host = svc.get("Address") or node.get("Address") or ""
        port = svc.get("Port")
        if not service or not host or not isinstance(port, int) or port <= 0:
            continue
        out.append(
            (
                host,
                port,
                SpiffeIDService(
                    host="",
                    namespace=svc.get("Namespace") or "default",
                    datacenter=node.get("Datacenter") or "",
                    service=service,
                    partition=svc.get("Partition") or "default",
                ),
            )
        )
    return out


class AgentResolver:
    """Asks the agent, per connection, for the healthy instances of one upstream."""

    def __init__(
        self,
        agent: AgentClient,
        name: str,
        *,
        destination_type: str = "service",
        datacenter: str = "",
    ) -> None:
        self.agent = agent
        self.name = name
        self.prepared_query = destination_type == "prepared_query"
        self.datacenter = datacenter

    async def resolve(self) -> Sequence[Endpoint]:
        """Instances in random order (the caller tries them in turn).

        Raises:
            AgentError: the agent could not be asked.
        """
        if self.prepared_query:
            answer = await self.agent.query_execute(self.name, datacenter=self.datacenter)
            entries = (answer.body or {}).get("Nodes") or []
        else:
            answer = await self.agent.health_connect(self.name, datacenter=self.datacenter)
            entries = answer.body or []
        endpoints = endpoints_from_entries(entries)
        random.shuffle(endpoints)
        return endpoints


class StaticResolver:
    """Fixed endpoints (tests, and upstreams given with an address)."""

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = list(endpoints)

    async def resolve(self) -> Sequence[Endpoint]:
        endpoints = list(self.endpoints)
        random.shuffle(endpoints)
        return endpoints
