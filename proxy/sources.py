"""Where a proxy's configuration comes from: the agent (agent and sidecar modes), or flags.

`lookup_proxy_id_for_sidecar` finds the proxy ID of `-sidecar-for`; `AgentConfigSource`
follows the proxy's registration with a hash-blocking watch (`proxy.watch.changes`);
`StaticConfigSource` is the one config of flags mode. Each satisfies `ConfigSource`: an
async iterator of distinct valid configs.

Rule 1: a source yields only configs that loaded cleanly; a bad update is logged and the
last good config is kept. Only a first config that does not load is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from proxy.agent import AgentClient, explain
from proxy.answers import AgentService
from proxy.config import ProxyConfig, load_agent_service, load_managed_proxy
from proxy.errors import AgentError, AgentResponseError, ConfigError
from proxy.watch import BACKOFF_BASE, CONTENT_HASH, changes

log = logging.getLogger("proxy")


class ConfigSource(Protocol):
    """A stream of configs for one proxy; the first is the one to start with."""

    def configs(self) -> AsyncIterator[ProxyConfig]: ...


def _destination_id(service: dict[str, Any]) -> str:
    proxy = service.get("Proxy")
    destination = proxy.get("DestinationServiceID") if isinstance(proxy, dict) else None
    return destination if isinstance(destination, str) else ""


async def lookup_proxy_id_for_sidecar(agent: AgentClient, sidecar_for: str) -> str:
    """The ID of the one connect-proxy whose DestinationServiceID is `sidecar_for`.

    Raises:
        ConfigError: none, several, or the lookup failed (Consul's messages).
    """
    try:
        services = await agent.services()
    except AgentError as exc:
        raise ConfigError(
            f"Failed looking up sidecar proxy info for {sidecar_for}: {explain(exc)}"
        ) from exc
    ids = sorted(
        str(svc.get("ID", ""))
        for svc in services.values()
        if svc.get("Kind") == "connect-proxy"
        and _destination_id(svc).lower() == sidecar_for.lower()
    )
    if not ids:
        raise ConfigError(f"No sidecar proxy registered for {sidecar_for}")
    if len(ids) > 1:
        raise ConfigError(
            f"More than one sidecar proxy registered for {sidecar_for}.\n"
            f"    Start proxy with -proxy-id and one of the following IDs: {', '.join(ids)}"
        )
    return str(ids[0])


class AgentConfigSource:
    """Configs of one proxy service from the agent, by a hash-blocking watch.

    `/v1/agent/service/:id` (Consul 1.3+) first; if the agent answers 404 there, or
    `legacy` is set (a managed proxy of Consul 1.2-1.5), `/v1/agent/connect/proxy/:id`.
    Errors are retried with the watch backoff; an answer that does not make a valid
    config is logged and the last good one is kept. Only a 404 before any answer means an
    old agent: after one, it means the registration is gone for now (say, an agent restarted
    without it yet), an error retried until the service is back.
    """

    def __init__(
        self,
        agent: AgentClient,
        proxy_id: str,
        *,
        legacy: bool = False,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.agent = agent
        self.proxy_id = proxy_id
        self.legacy = legacy
        self.backoff_base = backoff_base
        self._answered = False  # /v1/agent/service/:id answered once: not an old agent

    async def _service(self, content_hash: str) -> AgentService:
        if not self.legacy:
            try:
                service = await self.agent.agent_service(self.proxy_id, content_hash)
            except AgentResponseError as exc:
                if exc.status != 404 or self._answered:
                    raise
                log.warning(
                    "the agent has no service %r at /v1/agent/service/ (%s); trying the "
                    "managed-proxy endpoint of Consul 1.2-1.5",
                    self.proxy_id,
                    exc,
                )
                self.legacy = True
                content_hash = ""  # a hash of the other endpoint means nothing here
            else:
                self._answered = True
                return service
        return await self.agent.managed_proxy(self.proxy_id, content_hash)

    async def _fetch(self, content_hash: str) -> tuple[ProxyConfig | ConfigError, str]:
        """One read of the watch: the config, or why the answer does not make one."""
        service = await self._service(content_hash)
        load = load_managed_proxy if self.legacy else load_agent_service
        try:
            return load(service.body), service.content_hash
        except ConfigError as exc:
            return exc, service.content_hash

    async def configs(self) -> AsyncIterator[ProxyConfig]:
        """Each distinct valid config, forever (until the consumer stops).

        Raises:
            ConfigError: the first answer does not make a config (for example the service
                is not a connect-proxy): the proxy cannot start from it.
        """
        last: ProxyConfig | None = None
        loaded = changes(
            "agent_service",
            self._fetch,
            CONTENT_HASH,
            log=log,
            backoff_base=self.backoff_base,
            service=lambda: last.service if last else "",
        )
        async with contextlib.aclosing(loaded):
            async for config in loaded:
                if isinstance(config, ConfigError):
                    if last is None:
                        # Nothing to keep. Consul's proxy waits forever here; we stop.
                        raise config
                    log.error(
                        "ignoring unusable configuration from the agent, keeping the last "
                        "good one: %s",
                        config,
                    )
                    continue
                if config != last:
                    log.debug("got new config")
                    last = config
                    yield config


class StaticConfigSource:
    """Flags mode: one config, then nothing."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    async def configs(self) -> AsyncIterator[ProxyConfig]:
        yield self.config
        await asyncio.Event().wait()  # no more changes, ever
