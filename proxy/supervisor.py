"""Proxy: owns the certificate watches, the listeners, and their lifecycles.

Wires the parts: two blocking watches (roots, and the leaf of the proxied service) feed the
TLSStore; upstream listeners bind at once (their connections wait for certificates); the
public listener binds once the certificates are ready. `apply()` moves a running proxy to a
new ProxyConfig by diffing it against the current one.

Rule 1: every task has an owner (this object) and is cancelled by `close()`.
Rule 2: shutdown order: stop accepting, let connections finish up to the drain timeout, cancel
the rest, stop the watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from listeners.public import PublicListener
from listeners.upstream import UpstreamListener
from proxy.agent import AgentClient
from proxy.authorize import Authorizer
from proxy.config import ProxyConfig, UpstreamConfig, plan_upstreams, split_host_port
from proxy.resolve import AgentResolver
from proxy.tlsstore import TLSStore
from proxy.watch import BACKOFF_BASE, watch

log = logging.getLogger("proxy")


class Proxy:
    """One running proxy for one proxied service."""

    def __init__(
        self,
        agent: AgentClient,
        config: ProxyConfig,
        *,
        drain_timeout: float = 10.0,
        watch_backoff: float = BACKOFF_BASE,
    ) -> None:
        self.agent = agent
        self.config = config
        self.drain_timeout = drain_timeout
        self.watch_backoff = watch_backoff
        self.tls = TLSStore()
        self.public: PublicListener | None = None
        self.upstreams: dict[tuple[str, int], UpstreamListener] = {}
        self._upstream_configs: dict[tuple[str, int], UpstreamConfig] = {}
        self._watches: list[asyncio.Task[None]] = []
        self._public_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the certificate watches and every listener of the current config."""
        self._start_watches()
        await self.apply(self.config, force=True)

    async def wait_ready(self) -> None:
        """Certificates loaded and the public listener (if any) bound."""
        await self.tls.wait_ready()
        if self._public_task is not None:
            await asyncio.shield(self._public_task)

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, drain connections (bounded), stop the watches. Idempotent."""
        if self._closed:
            return
        self._closed = True
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        closers = [u.close(timeout) for u in self.upstreams.values()]
        if self._public_task is not None:
            self._public_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._public_task
        if self.public is not None:
            closers.append(self.public.close(timeout))
        await asyncio.gather(*closers)
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)

    # -- certificates --------------------------------------------------------------------

    def _start_watches(self) -> None:
        service = self.config.service

        async def fetch_roots(index: int) -> tuple[Any, int]:
            answer = await self.agent.roots(index)
            roots = tuple(r.get("RootCert", "") for r in (answer.body or {}).get("Roots") or [])
            return roots, answer.index

        async def fetch_leaf(index: int) -> tuple[Any, int]:
            answer = await self.agent.leaf(service, index)
            body = answer.body or {}
            return (body.get("CertPEM", ""), body.get("PrivateKeyPEM", "")), answer.index

        loop = asyncio.get_running_loop()
        self._watches = [
            loop.create_task(
                watch(
                    "connect_roots",
                    fetch_roots,
                    self.tls.set_roots,
                    log=log,
                    backoff_base=self.watch_backoff,
                ),
                name="watch roots",
            ),
            loop.create_task(
                watch(
                    "connect_leaf",
                    fetch_leaf,
                    lambda leaf: self.tls.set_leaf(*leaf),
                    log=log,
                    backoff_base=self.watch_backoff,
                ),
                name=f"watch leaf {service}",
            ),
        ]

    # -- listeners -----------------------------------------------------------------------

    async def apply(self, config: ProxyConfig, *, force: bool = False) -> None:
        """Move to `config`: start, stop or rebind only the listeners that changed."""
        old = self.config
        self.config = config
        if config.service != old.service:
            raise ValueError("the proxied service of a running proxy cannot change")
        stop, start = plan_upstreams(self._upstream_configs, config.upstreams)
        for key in stop:
            listener = self.upstreams.pop(key)
            self._upstream_configs.pop(key)
            await listener.close(self.drain_timeout)
        for upstream in start:
            await self._start_upstream(upstream)
        if force or config.public_listener != old.public_listener:
            await self._restart_public()

    async def _start_upstream(self, upstream: UpstreamConfig) -> None:
        listener = UpstreamListener(
            name=upstream.destination_name,
            bind_host=upstream.local_bind_address,
            bind_port=upstream.local_bind_port,
            contexts=self.tls,
            resolver=AgentResolver(
                self.agent,
                upstream.destination_name,
                destination_type=upstream.destination_type,
                datacenter=upstream.datacenter,
            ),
            connect_timeout=upstream.connect_timeout,
        )
        try:
            await listener.start()
        except OSError as exc:
            log.error("failed to start upstream listener %s: %s", upstream.identity, exc)
            return
        key = (upstream.local_bind_address, upstream.local_bind_port)
        self.upstreams[key] = listener
        self._upstream_configs[key] = upstream

    async def _restart_public(self) -> None:
        if self._public_task is not None:
            self._public_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._public_task
            self._public_task = None
        if self.public is not None:
            await self.public.close(self.drain_timeout)
            self.public = None
        cfg = self.config.public_listener
        if cfg is None:
            return
        app_host, app_port = split_host_port(cfg.local_service_address, "local_service_address")
        self.public = PublicListener(
            bind_host=cfg.bind_address,
            bind_port=cfg.bind_port,
            app_host=app_host,
            app_port=app_port,
            contexts=self.tls,
            authorizer=Authorizer(self.agent, self.config.service),
            handshake_timeout=cfg.handshake_timeout,
            app_connect_timeout=cfg.local_connect_timeout,
        )
        self._public_task = asyncio.get_running_loop().create_task(
            self.public.start(), name="public listener"
        )
