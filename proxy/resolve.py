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

import asyncio
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from proxy.agent import AgentClient
from proxy.errors import AgentError
from proxy.identity import Endpoint, SpiffeIDService
from proxy.watch import backoff, next_index

log = logging.getLogger("proxy.upstream")


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


class WatchingResolver:
    """Keeps the healthy instances of one service upstream current with a blocking query.

    Consul's Go proxy asks the agent once per connection; here one long-poll per upstream
    follows `/v1/health/connect/<name>?passing` and connections read the last answer, so a
    new connection costs no agent round trip. If the watch fails after a success, the last
    known instances keep being used (a dial that fails moves on to the next instance) while
    the watch retries with Consul's backoff; before any success, `resolve()` raises.
    """

    def __init__(
        self,
        agent: AgentClient,
        name: str,
        *,
        datacenter: str = "",
        backoff_base: float = 5.0,
    ) -> None:
        self.agent = agent
        self.name = name
        self.datacenter = datacenter
        self.backoff_base = backoff_base
        self._endpoints: list[Endpoint] | None = None
        self._error: Exception | None = None
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.updates = 0
        self._updated: asyncio.Event | None = None

    async def _run(self) -> None:
        index = 0
        failures = 0
        while True:
            try:
                answer = await self.agent.health_connect(
                    self.name, datacenter=self.datacenter, index=index
                )
            except AgentError as exc:
                failures += 1
                self._error = exc
                self._answered.set()
                delay = backoff(failures, self.backoff_base)
                log.warning(
                    "Watch errored type=health_connect service=%s error=%s retry=%.1fs",
                    self.name,
                    exc,
                    delay,
                )
                index = 0
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._endpoints = endpoints_from_entries(answer.body or [])
            self._answered.set()
            self.updates += 1
            if self._updated is not None:
                self._updated.set()
            index = next_index(index, answer.index)

    async def resolve(self) -> Sequence[Endpoint]:
        """The current healthy instances, in random order.

        Raises:
            AgentError: the agent has not answered successfully yet.
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"watch upstream {self.name}"
            )
        await self._answered.wait()
        if self._endpoints is None:
            assert self._error is not None
            raise self._error
        endpoints = list(self._endpoints)
        random.shuffle(endpoints)
        return endpoints

    async def until_updates(self, count: int) -> None:
        """Return once the watch has had `count` answers (bound it with a timeout)."""
        while self.updates < count:
            self._updated = asyncio.Event()
            try:
                await self._updated.wait()
            finally:
                self._updated = None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
