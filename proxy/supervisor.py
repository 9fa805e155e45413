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
from collections.abc import AsyncIterator, Awaitable, Callable

from listeners.public import PublicListener
from listeners.upstream import UpstreamListener
from proxy.addr import split_host_port
from proxy.agent import AgentClient
from proxy.authorize import Authorizer
from proxy.config import (
    DEFAULT_TLS_ENGINE,
    ProxyConfig,
    UpstreamConfig,
    plan_upstreams,
)
from proxy.resolve import AgentResolver, WatchingResolver
from proxy.sources import ConfigSource
from proxy.tlsstore import TLSStore, describe_engine
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
        reuse_port: bool = False,
        tls_engine: str = DEFAULT_TLS_ENGINE,
    ) -> None:
        self.agent = agent
        self.config = config
        self.reuse_port = reuse_port
        self.drain_timeout = drain_timeout
        self.watch_backoff = watch_backoff
        self.tls = TLSStore(tls_engine)
        self.public: PublicListener | None = None
        self.upstreams: dict[tuple[str, int], UpstreamListener] = {}
        self._resolvers: dict[tuple[str, int], WatchingResolver] = {}
        self._upstream_configs: dict[tuple[str, int], UpstreamConfig] = {}
        self._watches: list[asyncio.Task[None]] = []
        self._draining: set[asyncio.Task[None]] = set()
        self._public_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, strict: bool = False) -> None:
        """Start the certificate watches and every listener of the current config.

        Raises:
            OSError: with `strict`, an upstream listener cannot be bound.
        """
        self._start_watches()
        await self.apply(self.config, force=True, strict=strict)

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
        await asyncio.gather(*closers, *self._draining)
        for resolver in self._resolvers.values():
            await resolver.aclose()
        self._resolvers.clear()
        for task in self._watches:
            task.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)

    # -- certificates --------------------------------------------------------------------

    def _start_watches(self) -> None:
        service = self.config.service

        async def fetch_roots(index: int) -> tuple[tuple[str, ...], int]:
            roots = await self.agent.roots(index)
            return roots.pems, roots.index

        async def fetch_leaf(index: int) -> tuple[tuple[str, str], int]:
            leaf = await self.agent.leaf(service, index)
            return (leaf.cert_pem, leaf.key_pem), leaf.index

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
                    service=service,
                ),
                name=f"watch leaf {service}",
            ),
        ]

    # -- listeners -----------------------------------------------------------------------

    async def apply(
        self, config: ProxyConfig, *, force: bool = False, strict: bool = False
    ) -> None:
        """Move to `config`: start, stop or rebind only the listeners that changed."""
        old = self.config
        if config.service != old.service:
            raise ValueError("the proxied service of a running proxy cannot change")
        self.config = config
        stop, start = plan_upstreams(self._upstream_configs, config.upstreams)
        for key in stop:
            listener = self.upstreams.pop(key)
            log.info("stopping upstream listener %s", self._upstream_configs.pop(key).identity)
            # Stop accepting now, so a changed upstream can bind again at once; its open
            # connections drain in the background (awaited by close()).
            listener.stop_accepting()
            resolver = self._resolvers.pop(key, None)
            if resolver is not None:
                await resolver.aclose()
            task = asyncio.get_running_loop().create_task(listener.close(self.drain_timeout))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        for upstream in start:
            await self._start_upstream(upstream, strict=strict)
        if force or config.public_listener != old.public_listener:
            await self._restart_public()

    async def _start_upstream(self, upstream: UpstreamConfig, *, strict: bool = False) -> None:
        key = (upstream.local_bind_address, upstream.local_bind_port)
        resolver: AgentResolver | WatchingResolver
        if upstream.destination_type == "prepared_query":
            # A prepared query cannot be watched: it is executed per connection, as in Consul.
            resolver = AgentResolver(
                self.agent,
                upstream.destination_name,
                destination_type="prepared_query",
                datacenter=upstream.datacenter,
            )
        else:
            resolver = WatchingResolver(
                self.agent,
                upstream.destination_name,
                datacenter=upstream.datacenter,
                backoff_base=self.watch_backoff,
            )
            self._resolvers[key] = resolver
        listener = UpstreamListener(
            name=upstream.destination_name,
            bind_host=upstream.local_bind_address,
            bind_port=upstream.local_bind_port,
            contexts=self.tls,
            resolver=resolver,
            connect_timeout=upstream.connect_timeout,
            reuse_port=self.reuse_port,
        )
        try:
            await listener.start()
        except OSError as exc:
            log.error("failed to start upstream listener %s: %s", upstream.identity, exc)
            if isinstance(resolver, WatchingResolver):
                self._resolvers.pop(key, None)
            if strict:
                raise
            return
        self.upstreams[key] = listener
        self._upstream_configs[key] = upstream

    async def _restart_public(self) -> None:
        if self._public_task is not None:
            self._public_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._public_task
            self._public_task = None
        if self.public is not None:
            old_public, self.public = self.public, None
            old_public.stop_accepting()
            task = asyncio.get_running_loop().create_task(old_public.close(self.drain_timeout))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
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
            reuse_port=self.reuse_port,
        )
        self._public_task = asyncio.get_running_loop().create_task(
            self.public.start(), name="public listener"
        )


# -- running ------------------------------------------------------------------------------


async def _next_or_stop(
    configs: AsyncIterator[ProxyConfig], stop: asyncio.Event
) -> ProxyConfig | None:
    """The next config, or None once `stop` is set first."""
    nxt = asyncio.ensure_future(anext(configs))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if nxt.done():
        return nxt.result()
    nxt.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await nxt
    return None


async def run(
    agent: AgentClient,
    source: ConfigSource,
    stop: asyncio.Event,
    *,
    drain_timeout: float = 10.0,
    watch_backoff: float = BACKOFF_BASE,
    on_ready: Callable[[Proxy], Awaitable[None] | None] | None = None,
    reuse_port: bool = False,
    tls_engine: str = DEFAULT_TLS_ENGINE,
) -> None:
    """Serve configs from `source` until `stop` is set, then drain and close.

    The first config must start cleanly: every listener bound. Later configs are applied
    live; a listener that cannot be bound then is logged and the rest keeps serving.

    Raises:
        ConfigError: the first config is unusable.
        OSError: a listener of the first config cannot be bound.
    """
    log.info("TLS engine: %s", describe_engine(tls_engine))
    configs = source.configs()
    proxy: Proxy | None = None
    try:
        first = await _next_or_stop(configs, stop)
        if first is None:
            return
        proxy = Proxy(
            agent,
            first,
            drain_timeout=drain_timeout,
            watch_backoff=watch_backoff,
            reuse_port=reuse_port,
            tls_engine=tls_engine,
        )
        await proxy.start(strict=True)
        ready = asyncio.ensure_future(proxy.wait_ready())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({ready, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not ready.done():
            ready.cancel()
            return
        ready.result()  # raises the public listener's bind error
        log.info("Proxy loaded config and ready to serve")
        if on_ready is not None:
            result = on_ready(proxy)
            if result is not None:
                await result
        while True:
            config = await _next_or_stop(configs, stop)
            if config is None:
                return
            if config.service != proxy.config.service:
                log.info(
                    "proxied service changed from %s to %s: restarting",
                    proxy.config.service,
                    config.service,
                )
                await proxy.close()
                proxy = Proxy(
                    agent,
                    config,
                    drain_timeout=drain_timeout,
                    watch_backoff=watch_backoff,
                    reuse_port=reuse_port,
                    tls_engine=tls_engine,
                )
                await proxy.start()
            else:
                await proxy.apply(config)
    finally:
        with contextlib.suppress(Exception):
            await configs.aclose()  # type: ignore[attr-defined]
        if proxy is not None:
            await proxy.close(drain_timeout)
