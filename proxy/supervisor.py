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
from typing import Any

from listeners.public import PublicListener
from listeners.upstream import UpstreamListener
from proxy.agent import AgentClient, explain
from proxy.authorize import Authorizer
from proxy.config import (
    DEFAULT_TLS_ENGINE,
    ProxyConfig,
    UpstreamConfig,
    load_agent_service,
    load_managed_proxy,
    plan_upstreams,
    split_host_port,
)
from proxy.errors import AgentError, AgentResponseError, ConfigError
from proxy.resolve import AgentResolver, WatchingResolver
from proxy.tlsstore import TLSStore, describe_engine
from proxy.watch import BACKOFF_BASE, backoff, watch

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


# -- configuration sources ----------------------------------------------------------------


async def lookup_proxy_id_for_sidecar(agent: AgentClient, sidecar_for: str) -> str:
    """The ID of the one connect-proxy whose DestinationServiceID is `sidecar_for`.

    Raises:
        ConfigError: none, several, or the lookup failed (Consul's messages).
    """
    try:
        services = (await agent.services()).body or {}
    except AgentError as exc:
        raise ConfigError(
            f"Failed looking up sidecar proxy info for {sidecar_for}: {explain(exc)}"
        ) from exc
    ids = sorted(
        svc.get("ID", "")
        for svc in services.values()
        if svc.get("Kind") == "connect-proxy"
        and (svc.get("Proxy") or {}).get("DestinationServiceID", "").lower() == sidecar_for.lower()
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
    """Configs of one proxy service from the agent, by hash-blocking queries.

    `/v1/agent/service/:id` (Consul 1.3+) first; if the agent answers 404 there, or
    `legacy` is set (a managed proxy of Consul 1.2-1.5), `/v1/agent/connect/proxy/:id`.
    Errors are retried with the watch backoff; an answer that does not make a valid
    config is logged and the last good one is kept.
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
        self.first_error: ConfigError | None = None

    async def _fetch(self, content_hash: str) -> tuple[Any, str]:
        if not self.legacy:
            try:
                answer = await self.agent.agent_service(self.proxy_id, content_hash)
                return load_agent_service(answer.body or {}), answer.content_hash
            except AgentResponseError as exc:
                if exc.status != 404:
                    raise
                log.warning(
                    "the agent has no service %r at /v1/agent/service/ (%s); trying the "
                    "managed-proxy endpoint of Consul 1.2-1.5",
                    self.proxy_id,
                    exc,
                )
                self.legacy = True
                content_hash = ""
        answer = await self.agent.managed_proxy(self.proxy_id, content_hash)
        return load_managed_proxy(answer.body or {}), answer.content_hash

    async def configs(self) -> AsyncIterator[ProxyConfig]:
        """Each distinct valid config, forever (until the consumer stops)."""
        content_hash = ""
        failures = 0
        last: ProxyConfig | None = None
        while True:
            try:
                config, new_hash = await self._fetch(content_hash)
            except ConfigError as exc:
                if last is None:
                    # Nothing to keep: the proxy cannot start from this (for example the
                    # service is not a connect-proxy). Consul's proxy waits forever here.
                    raise
                log.error(
                    "ignoring unusable configuration from the agent, keeping the last good one: %s",
                    exc,
                )
                failures += 1
                await asyncio.sleep(backoff(failures, self.backoff_base))
                continue
            except AgentError as exc:
                failures += 1
                delay = backoff(failures, self.backoff_base)
                log.warning(
                    "Watch errored type=agent_service error=%s retry=%.1fs",
                    explain(exc, last.service if last else ""),
                    delay,
                )
                content_hash = ""
                await asyncio.sleep(delay)
                continue
            failures = 0
            content_hash = new_hash
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


# -- -register ----------------------------------------------------------------------------


class RegisterMonitor:
    """`-register`: keep `<svc>-proxy[-<id>]` registered with a TTL check (consul-spec 1.9)."""

    def __init__(
        self,
        agent: AgentClient,
        service: str,
        address: str,
        port: int,
        id_suffix: str = "",
        *,
        reconcile_period: float = 30.0,
        ttl_period: float = 30.0,
        deregister_delay: float = 0.5,
    ) -> None:
        self.agent = agent
        self.service = service
        self.address = address
        self.port = port
        self.service_id = f"{service}-proxy" + (f"-{id_suffix}" if id_suffix else "")
        self.service_name = f"{service}-proxy"
        self.check_id = f"{self.service_id}-ttl"
        self.reconcile_period = reconcile_period
        self.ttl_period = ttl_period
        self.deregister_delay = deregister_delay

    async def register(self) -> None:
        try:
            entries = (await self.agent.catalog_service(self.service_name)).body or []
        except AgentError:
            entries = []
        for entry in entries:
            if (
                entry.get("ServiceID") == self.service_id
                and entry.get("ServiceAddress") == self.address
                and entry.get("ServicePort") == self.port
            ):
                log.debug("service already registered, not re-registering")
                return
        try:
            await self.agent.register(
                {
                    "Kind": "connect-proxy",
                    "ID": self.service_id,
                    "Name": self.service_name,
                    "Address": self.address,
                    "Port": self.port,
                    "Proxy": {"DestinationServiceName": self.service},
                    "Check": {
                        "CheckID": self.check_id,
                        "Name": "proxy heartbeat",
                        "TTL": f"{self.ttl_period:g}s",
                        "Notes": "Built-in proxy will heartbeat this check.",
                        "Status": "passing",
                    },
                    "Checks": None,
                }
            )
        except AgentError as exc:
            log.warning("Failed to register Consul service error=%s", explain(exc, self.service))
            return
        log.info("registered Consul service service=%s", self.service_id)

    async def heartbeat(self) -> None:
        try:
            await self.agent.pass_ttl(self.check_id)
        except AgentError as exc:
            if "does not have associated" not in str(exc):
                log.warning("heartbeat failed error=%s", explain(exc, self.service))

    async def run(self) -> None:
        """Register now, then heartbeat every TTL/3 and reconcile every period, until cancelled."""
        await self.register()
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time() + self.reconcile_period
        next_beat = loop.time() + self.ttl_period / 3
        while True:
            # Timers are re-armed after each run, so events never pile up.
            await asyncio.sleep(max(0.0, min(next_reconcile, next_beat) - loop.time()))
            now = loop.time()
            if now >= next_beat:
                await self.heartbeat()
                next_beat = loop.time() + self.ttl_period / 3
            if now >= next_reconcile:
                await self.register()
                next_reconcile = loop.time() + self.reconcile_period

    async def deregister(self) -> None:
        """Deregister, with up to 3 attempts."""
        for attempt in range(3):
            try:
                await self.agent.deregister(self.service_id)
                log.info("deregistered Consul service service=%s", self.service_id)
                return
            except AgentError as exc:
                log.warning("service deregister failed error=%s", explain(exc, self.service))
                if attempt < 2:
                    await asyncio.sleep(self.deregister_delay)


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
    source: AgentConfigSource | StaticConfigSource,
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
