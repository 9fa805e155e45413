"""Upstream discovery: which instances serve an upstream, and which identity each must show.

Owns when the agent is asked (Consul's `connect/resolver.go`): service upstreams come from
`/v1/health/connect/<name>?passing&stale` (`&peer=<name>` for a peered upstream), followed
by one blocking watch per upstream;
prepared queries from `/v1/query/<name>/execute?connect=true&stale`, once per connection.
Reading the agent's ServiceEntries into (host, port, expected identity) is
`proxy.answers.endpoints_from_entries`, beside the HTTP code.

Rule 1: no JSON here; the resolvers only choose the agent call and keep its result.
Rule 2: connections get the instances in random order, from a copy (the caller tries them
in turn).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

from proxy.agent import AgentClient
from proxy.counter import Counter
from proxy.identity import Endpoint
from proxy.watch import BACKOFF_BASE, watch

log = logging.getLogger("proxy.upstream")


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
            endpoints = await self.agent.query_execute(self.name, datacenter=self.datacenter)
        else:
            result = await self.agent.health_connect(self.name, datacenter=self.datacenter)
            endpoints = list(result.endpoints)
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
    the watch retries (`proxy.watch.backoff`: at most 1.5 s apart); before any success,
    `resolve()` raises.
    """

    def __init__(
        self,
        agent: AgentClient,
        name: str,
        *,
        datacenter: str = "",
        peer: str = "",
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.agent = agent
        self.name = name
        self.datacenter = datacenter
        self.peer = peer  # `destination_peer`: follow `?peer=<name>` (imports, PeerMeta)
        self.backoff_base = backoff_base
        self._endpoints: list[Endpoint] | None = None
        self._error: Exception | None = None
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.updates = Counter()  # changes of the instance list (tests wait on it)

    async def _fetch(self, index: int) -> tuple[tuple[Endpoint, ...], int]:
        result = await self.agent.health_connect(
            self.name, datacenter=self.datacenter, index=index, peer=self.peer
        )
        return result.endpoints, result.index

    def _changed(self, endpoints: tuple[Endpoint, ...]) -> None:
        self._endpoints = list(endpoints)
        self._answered.set()
        self.updates.add()

    def _failed(self, exc: Exception) -> None:
        # Kept for `resolve()` before any success; after one, the last instances stay in use.
        self._error = exc
        self._answered.set()

    async def _run(self) -> None:
        peer = f" peer={self.peer}" if self.peer else ""
        await watch(
            f"health_connect service={self.name}{peer}",
            self._fetch,
            self._changed,
            log=log,
            backoff_base=self.backoff_base,
            on_error=self._failed,
        )

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

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
