"""Proxy: owns the certificate watches, the listeners, and their lifecycles (`run` in
`proxy.runner` serves the configs of a config source with it).

Wires the parts: two blocking watches (roots, and the leaf of the proxied service) feed the
TLSStore; upstream listeners bind at once (their connections wait for certificates); the
public listener binds once the certificates are ready. `apply()` moves a running proxy to a
new ProxyConfig by diffing it against the current one.

Rule 1: every task has an owner: the proxy's TaskGroup (watches, the public listener's bind,
listeners draining after a change, the -register monitor), or a listener (its connections).
No task of the group ever raises: each logs its own failure.
Rule 2: shutdown order: stop accepting, let connections finish up to the drain timeout, cancel
the rest, stop the watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from listeners.events import INBOUND, UPSTREAM
from listeners.public import PublicListener
from listeners.upstream import UpstreamListener
from proxy.agent import AgentClient
from proxy.authorize import AgentAuthorizer
from proxy.authzcache import CacheCounts, DecisionCache
from proxy.config import (
    DEFAULT_TLS_ENGINE,
    ProxyConfig,
    UpstreamConfig,
    plan_upstreams,
    upstream_key,
)
from proxy.intentwatch import IntentionsFollower
from proxy.observe import ListenerObserver, ProxyMetrics
from proxy.peertrust import PeerTrust
from proxy.reauth import Reauthorizer
from proxy.resolve import AgentResolver, WatchingResolver
from proxy.tlsstore import TLSStore
from proxy.watch import BACKOFF_BASE, watch

log = logging.getLogger("proxy")


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """How a proxy runs, whatever its config: the same for every config of one process."""

    drain_timeout: float = 10.0  # connections' grace after a stop or a listener change
    watch_backoff: float = BACKOFF_BASE  # base of the blocking watches' retry backoff
    reuse_port: bool = False  # -workers: several processes bind each listener
    tls_engine: str = DEFAULT_TLS_ENGINE
    observe: bool = True  # count and log connections (off: the bench's baseline)
    # -max-inbound-connections: the public listener's cap when its Config sets none
    # (None: derived from the descriptor limit, `listeners.limits.default_max_connections`).
    max_inbound_connections: int | None = None
    # -reauthorize: re-check open inbound connections (`proxy.reauth`) when the Config does
    # not say (its `reauthorize` wins when set, as for max_inbound_connections).
    reauthorize: bool = False
    # -authorize-cache: reuse the agent's decision per client identity while the intentions
    # watch is current (`proxy.authzcache`); implies re-checks on changes. Config wins.
    authorize_cache: bool = False


@dataclass(slots=True)
class _Upstream:
    """One running upstream: its config, its listener, and how it finds instances."""

    config: UpstreamConfig
    listener: UpstreamListener
    resolver: AgentResolver | WatchingResolver
    peer_trust: PeerTrust | None = None  # set for a peered upstream: released at the end

    async def close_resolver(self) -> None:
        if isinstance(self.resolver, WatchingResolver):
            await self.resolver.aclose()
        if self.peer_trust is not None:
            self.peer_trust.release(self.config.destination_peer)
            self.peer_trust = None


class Proxy:
    """One running proxy for one proxied service.

    `start()` and `close()` bracket its life (`close()` is idempotent); both must be awaited
    by the same task, which owns the proxy's TaskGroup.
    """

    def __init__(
        self,
        agent: AgentClient,
        config: ProxyConfig,
        settings: ProxySettings | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.agent = agent
        self.config = config
        self.settings = settings or ProxySettings()
        self.metrics = metrics or ProxyMetrics(access_log=False)
        self.tls = TLSStore(self.settings.tls_engine)
        # Peers' trust bundles: peered upstreams, and clients from peers at the public listener.
        self.peer_trust = PeerTrust(
            agent, self.tls, self._spawn_watch, backoff_base=self.settings.watch_backoff
        )
        self.metrics.follow_leaf(self._leaf_not_after)
        self.public: PublicListener | None = None
        self._upstreams: dict[tuple[str, int], _Upstream] = {}
        self._tasks = asyncio.TaskGroup()
        self._watches: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()  # cancelled at close
        self._draining: set[asyncio.Task[None]] = set()  # awaited at close
        self._public_task: asyncio.Task[None] | None = None
        self._public_error: BaseException | None = None
        self.reauthorizer: Reauthorizer | None = None
        self.follower: IntentionsFollower | None = None
        self.authorize_cache: DecisionCache | None = None
        self.cache_counts = CacheCounts()  # across the public listener's restarts
        self.metrics.follow_authorize_cache(self._cache_counts)
        self._reauth_tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, *, strict: bool = False) -> None:
        """Start the certificate watches and every listener of the current config.

        Raises:
            OSError: with `strict`, an upstream listener cannot be bound.
        """
        await self._tasks.__aenter__()
        self._started = True
        self._start_watches()
        await self.apply(self.config, force=True, strict=strict)

    async def wait_ready(self) -> None:
        """Certificates loaded and the public listener (if any) bound.

        Raises:
            OSError: the public listener could not be bound.
        """
        await self.tls.wait_ready()
        if self._public_task is not None:
            await asyncio.shield(self._public_task)
        if self._public_error is not None:
            raise self._public_error

    @property
    def upstreams(self) -> dict[tuple[str, int], UpstreamListener]:
        """The running upstream listeners, by (bind address, port)."""
        return {key: u.listener for key, u in self._upstreams.items()}

    def upstream_records(self) -> list[tuple[UpstreamConfig, UpstreamListener, Any]]:
        """(config, listener, resolver) of each running upstream, for the admin endpoint."""
        return [(u.config, u.listener, u.resolver) for u in self._upstreams.values()]

    def unbound(self) -> list[str]:
        """The listeners of the current config that are not bound (empty when all are)."""
        missing = [u.label for u in self.config.upstreams if upstream_key(u) not in self._upstreams]
        public = self.config.public_listener
        if public is not None and (self.public is None or not self.public.ready.is_set()):
            missing.append(f"public listener {public.bind_address}:{public.bind_port}")
        return missing

    def _cache_counts(self) -> dict[str, int] | None:
        return self.cache_counts.as_dict() if self.authorize_cache is not None else None

    def authorize_status(self) -> dict[str, object]:
        """The authorize cache and live re-authorization, for the admin endpoint."""
        follower = self.follower
        return {
            "cache": self.authorize_cache is not None,
            "reauthorize": self.reauthorizer is not None,
            "intentions_watch": None
            if follower is None
            else {"current": follower.generation() is not None, "failures": follower.failures},
            "cache_counts": self.cache_counts.as_dict(),
        }

    def _leaf_not_after(self) -> float | None:
        material = self.tls.material
        return material.not_after if material is not None else None

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run `coro` in the proxy's TaskGroup until it ends or the proxy closes."""
        task = self._tasks.create_task(_logged(coro, name), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _spawn_watch(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = self._tasks.create_task(_logged(coro, name), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, drain connections (bounded), stop the watches. Idempotent."""
        if self._closed or not self._started:
            return
        self._closed = True
        timeout = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        closers = [u.listener.close(timeout) for u in self._upstreams.values()]
        await self._stop_public_bind()
        if self.public is not None:
            closers.append(self.public.close(timeout))
        await asyncio.gather(*closers, *self._draining)
        for upstream in self._upstreams.values():
            await upstream.close_resolver()
        listeners = [u.listener for u in self._upstreams.values()]
        for listener in [*listeners, *([self.public] if self.public is not None else [])]:
            if isinstance(listener.observer, ListenerObserver):
                self.metrics.forget(listener.observer)
        for task in (*self._watches, *self._background):
            task.cancel()
        await self._tasks.__aexit__(None, None, None)

    # -- certificates --------------------------------------------------------------------

    def _start_watches(self) -> None:
        service = self.config.service

        async def fetch_roots(index: int) -> tuple[tuple[str, ...], int]:
            roots = await self.agent.roots(index)
            return roots.pems, roots.index

        async def fetch_leaf(index: int) -> tuple[tuple[str, str], int]:
            leaf = await self.agent.leaf(service, index)
            return (leaf.cert_pem, leaf.key_pem), leaf.index

        nudging: list[asyncio.Task[None]] = []

        async def fetch_leaf_now() -> None:
            try:
                leaf = await self.agent.leaf(service, 0)
            except Exception as exc:  # the leaf watch retries on its own
                log.debug("leaf fetch after new roots failed: %s", exc)
                return
            self.tls.set_leaf(leaf.cert_pem, leaf.key_pem)

        def on_roots(pems: tuple[str, ...]) -> None:
            # New roots that our leaf does not chain to (a new CA, or a restarted agent
            # whose indexes started over): the agent has a new leaf for them, which the
            # leaf watch may only ask for after its backoff. Ask once, now.
            if self.tls.set_roots(pems) or self.tls.material is None:
                return
            if not nudging or nudging[-1].done():
                nudging[:] = [self._tasks.create_task(fetch_leaf_now(), name="leaf now")]

        self._watches = [
            self._tasks.create_task(
                watch(
                    "connect_roots",
                    fetch_roots,
                    on_roots,
                    log=log,
                    backoff_base=self.settings.watch_backoff,
                ),
                name="watch roots",
            ),
            self._tasks.create_task(
                watch(
                    "connect_leaf",
                    fetch_leaf,
                    lambda leaf: self.tls.set_leaf(*leaf),
                    log=log,
                    backoff_base=self.settings.watch_backoff,
                    service=service,
                ),
                name=f"watch leaf {service}",
            ),
        ]

    # -- listeners -----------------------------------------------------------------------

    async def apply(
        self, config: ProxyConfig, *, force: bool = False, strict: bool = False
    ) -> None:
        """Move to `config`: start, stop or rebind only the listeners that changed.

        A listener that cannot be bound is logged as an error and the rest keeps serving;
        with `strict` (the first config) an upstream's bind error is raised instead, and the
        public listener's is raised by `wait_ready()`.
        """
        old = self.config
        if config.service != old.service:
            raise ValueError("the proxied service of a running proxy cannot change")
        self.config = config
        running = {key: u.config for key, u in self._upstreams.items()}
        stop, start = plan_upstreams(running, config.upstreams)
        for key in stop:
            upstream = self._upstreams.pop(key)
            log.info("stopping upstream listener %s", upstream.config.label)
            # Stop accepting now, so a changed upstream can bind again at once; its open
            # connections drain in the background (awaited by close()).
            upstream.listener.stop_accepting()
            await upstream.close_resolver()
            self._forget_when_closed(upstream.listener)
            self._drain(upstream.listener.close(self.settings.drain_timeout), "drain upstream")
        for upstream_config in start:
            await self._start_upstream(upstream_config, strict=strict)
        if force or config.public_listener != old.public_listener:
            await self._restart_public(strict=strict)

    def _forget_when_closed(self, listener: PublicListener | UpstreamListener) -> None:
        observer = listener.observer
        if isinstance(observer, ListenerObserver):
            self._drain(self._forget(listener, observer), f"forget {listener.name}")

    async def _forget(
        self, listener: PublicListener | UpstreamListener, observer: ListenerObserver
    ) -> None:
        await listener.until_idle()
        self.metrics.forget(observer)

    def _drain(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self._tasks.create_task(_logged(coro, name), name=name)
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _resolver(self, upstream: UpstreamConfig) -> AgentResolver | WatchingResolver:
        if upstream.destination_type == "prepared_query":
            # A prepared query cannot be watched: it is executed per connection, as in Consul.
            return AgentResolver(
                self.agent,
                upstream.destination_name,
                destination_type="prepared_query",
                datacenter=upstream.datacenter,
            )
        return WatchingResolver(
            self.agent,
            upstream.destination_name,
            datacenter=upstream.datacenter,
            peer=upstream.destination_peer,
            backoff_base=self.settings.watch_backoff,
        )

    async def _start_upstream(self, config: UpstreamConfig, *, strict: bool = False) -> None:
        resolver = self._resolver(config)
        peer = config.destination_peer
        listener = UpstreamListener(
            name=config.destination_name,
            bind_host=config.local_bind_address,
            bind_port=config.local_bind_port,
            contexts=self.peer_trust.contexts_for(peer) if peer else self.tls,
            resolver=resolver,
            connect_timeout=config.connect_timeout,
            reuse_port=self.settings.reuse_port,
            observer=self.metrics.observer(
                UPSTREAM,
                config.destination_name,
                service=self.config.service,
                destination_type=config.destination_type,
            )
            if self.settings.observe
            else None,
        )
        try:
            await listener.start()
        except OSError as exc:
            log.error("failed to start upstream listener %s: %s", config.label, exc)
            if isinstance(listener.observer, ListenerObserver):
                self.metrics.forget(listener.observer)
            if peer:
                self.peer_trust.release(peer)
            if strict:
                raise
            return
        self._upstreams[upstream_key(config)] = _Upstream(
            config, listener, resolver, self.peer_trust if peer else None
        )

    async def _stop_public_bind(self) -> None:
        if self._public_task is not None:
            self._public_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._public_task
            self._public_task = None

    async def _restart_public(self, *, strict: bool = False) -> None:
        await self._stop_public_bind()
        for task in self._reauth_tasks:
            task.cancel()
        self._reauth_tasks = []
        self.reauthorizer = self.follower = self.authorize_cache = None
        self._public_error = None
        if self.public is not None:
            old_public, self.public = self.public, None
            old_public.stop_accepting()
            self._drain(old_public.close(self.settings.drain_timeout), "drain public listener")
            self._forget_when_closed(old_public)
        cfg = self.config.public_listener
        if cfg is None:
            self.peer_trust.stop_exports()
            return
        # Clients from the peers the service is exported to verify against their roots.
        self.peer_trust.follow_exports(self.config.service)
        cache = cfg.authorize_cache
        if cache is None:
            cache = self.settings.authorize_cache
        reauth = cfg.reauthorize if cfg.reauthorize is not None else self.settings.reauthorize
        if cache or reauth:
            self.follower = IntentionsFollower(
                self.agent, self.config.service, self.tls, backoff_base=self.settings.watch_backoff
            )
            self._spawn_reauth(self.follower.run(), "intentions watch")
        if cache and self.follower is not None:
            self.authorize_cache = DecisionCache(self.follower, counts=self.cache_counts)
        authorizer = AgentAuthorizer(self.agent, self.config.service, self.authorize_cache)
        self.public = PublicListener(
            bind_host=cfg.bind_address,
            bind_port=cfg.bind_port,
            app_host=cfg.local_service_host,
            app_port=cfg.local_service_port,
            contexts=self.peer_trust,
            authorizer=authorizer,
            handshake_timeout=cfg.handshake_timeout,
            app_connect_timeout=cfg.local_connect_timeout,
            reuse_port=self.settings.reuse_port,
            # Proxy.Config wins over the flag: it is the per-service value an operator
            # manages centrally; the flag is this process's default (and all flags mode has).
            max_connections=cfg.max_inbound_connections
            if cfg.max_inbound_connections is not None
            else self.settings.max_inbound_connections,
            observer=self.metrics.observer(INBOUND, "public_listener", service=self.config.service)
            if self.settings.observe
            else None,
        )
        self._public_task = self._tasks.create_task(
            self._bind_public(self.public, report=not strict), name="public listener"
        )
        # The cache implies live re-authorization: the change that empties it re-checks the
        # open connections too (a decision never outlives a change, cached or in use).
        if self.follower is not None:
            self.reauthorizer = Reauthorizer(self.follower, self.public, authorizer, self.tls)
            self._spawn_reauth(self.reauthorizer.run(), "reauthorize")

    def _spawn_reauth(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self._tasks.create_task(_logged(coro, name), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self._reauth_tasks.append(task)

    async def _bind_public(self, listener: PublicListener, *, report: bool) -> None:
        """Bind once the certificates are ready; a failure is kept for `wait_ready()`."""
        try:
            await listener.start()
        except Exception as exc:  # CancelledError is a BaseException and passes
            self._public_error = exc
            if report:
                log.error("failed to start public listener %s: %s", listener.address, exc)


async def _logged(coro: Awaitable[None], name: str) -> None:
    """Run a task of the proxy's group: a failure is logged, never raised into the group."""
    try:
        await coro
    except Exception:
        log.exception("%s failed", name)
