"""`run`: serve the configs of a config source with a `Proxy`, from the first to `stop`.

Owns the life of a proxy process around its `Proxy`: the first config must start cleanly,
later ones are applied live, a change of the proxied service restarts the proxy; telemetry
comes from the first config (as in Consul); `RunState` tells readers (the admin endpoint)
the phase and the proxy serving now; `stop` drains and closes.

Rule 1: whatever ends `run` (stop, an error), the proxy is drained and closed, the register
monitor deregisters and the telemetry is flushed and closed, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from listeners.tls.contexts import describe_engine
from proxy.agent import AgentClient
from proxy.errors import ConfigError
from proxy.memtrim import MemoryTrimmer
from proxy.observe import ProxyMetrics
from proxy.register import RegisterMonitor
from proxy.sources import ConfigSource
from proxy.supervisor import Proxy, ProxySettings
from proxy.telemetry import Telemetry, TelemetryConfig, load_telemetry, unknown_keys

log = logging.getLogger("proxy")

T = TypeVar("T")


class _Stopped(Exception):
    """`stop` was set before the awaited thing happened."""


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """The result of `awaitable`, unless `stop` is set first (then it is cancelled).

    Raises:
        _Stopped: `stop` came first.
    """
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    raise _Stopped


@dataclass(slots=True)
class RunState:
    """Where `run()` is, for the admin endpoint: its phase and the proxy serving now."""

    phase: str = "starting"  # starting, ready, draining, stopped
    proxy: Proxy | None = None

    def not_ready(self) -> str:
        """Why the proxy is not ready to serve ("" when it is)."""
        if self.phase != "ready":
            return self.phase
        proxy = self.proxy
        if proxy is None or not proxy.tls.ready.is_set():
            return "no certificates yet"
        unbound = proxy.unbound()
        return "not bound: " + ", ".join(unbound) if unbound else ""


async def run(
    agent: AgentClient,
    source: ConfigSource,
    stop: asyncio.Event,
    settings: ProxySettings | None = None,
    *,
    on_ready: Callable[[Proxy], Awaitable[None] | None] | None = None,
    register: Callable[[int], RegisterMonitor] | None = None,
    metrics: ProxyMetrics | None = None,
    state: RunState | None = None,
) -> None:
    """Serve configs from `source` until `stop` is set, then drain and close.

    The first config must start cleanly: every listener bound. Later configs are applied
    live; a listener that cannot be bound then is logged and the rest keeps serving.

    Args:
        register: with `-register`, makes the monitor for the bound public port; it runs
            while the proxy serves, and deregisters at the end.
        metrics: where connections are counted and logged (kept across proxied-service
            changes); a quiet one of its own when not given.
        state: kept current for readers (the admin endpoint).

    Raises:
        ConfigError: the first config is unusable.
        OSError: a listener of the first config cannot be bound.
    """
    settings = settings or ProxySettings()
    metrics = metrics or ProxyMetrics(access_log=False)
    state = state or RunState()
    log.info("TLS engine: %s", describe_engine(settings.tls_engine))
    configs = source.configs()
    proxy: Proxy | None = None
    monitor: RegisterMonitor | None = None
    loop = asyncio.get_running_loop()
    flusher = loop.create_task(metrics.run(), name="metrics flush")
    keeper = loop.create_task(keep_memory(state, MemoryTrimmer()), name="memory trim")
    telemetry: Telemetry | None = None
    try:
        first = await _unless_stopped(anext(configs), stop)
        if metrics.telemetry is None:
            # As Consul: telemetry comes from the first config, and stays for the process.
            telemetry = await start_telemetry(first.telemetry)
            metrics.use_telemetry(telemetry)
        proxy = Proxy(agent, first, settings, metrics)
        state.proxy = proxy
        await proxy.start(strict=True)
        await _unless_stopped(proxy.wait_ready(), stop)
        log.info("Proxy loaded config and ready to serve")
        state.phase = "ready"
        metrics.ready.set(1)
        if register is not None and proxy.public is not None:
            monitor = register(proxy.public.port)
            proxy.spawn(monitor.run(), "register")
        if on_ready is not None:
            result = on_ready(proxy)
            if result is not None:
                await result
        while True:
            config = await _unless_stopped(anext(configs), stop)
            if config.service == proxy.config.service:
                await proxy.apply(config)
                continue
            log.info(
                "proxied service changed from %s to %s: restarting",
                proxy.config.service,
                config.service,
            )
            state.phase = "starting"
            metrics.ready.set(0)
            await proxy.close()
            proxy = Proxy(agent, config, settings, metrics)
            state.proxy = proxy
            await proxy.start()
            state.phase = "ready"
            metrics.ready.set(1)
    except _Stopped:
        return
    finally:
        state.phase = "draining"
        metrics.ready.set(0)
        with contextlib.suppress(Exception):
            await configs.aclose()  # type: ignore[attr-defined]
        if proxy is not None:
            await proxy.close(settings.drain_timeout)
        if monitor is not None:
            await monitor.deregister()
        flusher.cancel()
        keeper.cancel()
        await asyncio.gather(flusher, keeper, return_exceptions=True)
        metrics.flush()
        if telemetry is not None:
            await telemetry.aclose()
        state.phase = "stopped"


def open_connections(proxy: Proxy) -> int:
    """Connections being handled by every listener of `proxy` now."""
    listeners = [*proxy.upstreams.values(), *([proxy.public] if proxy.public else [])]
    return sum(len(listener.connections) for listener in listeners)


async def keep_memory(state: RunState, trimmer: MemoryTrimmer, interval: float = 5.0) -> None:
    """Every `interval` seconds, let `trimmer` see how many connections are open (it gives
    memory back after a spike has passed)."""
    while True:
        await asyncio.sleep(interval)
        if state.proxy is not None:
            trimmer.sample(open_connections(state.proxy))


async def start_telemetry(raw: Mapping[str, Any]) -> Telemetry:
    """Consul's telemetry of a `telemetry` map; a map that cannot be used is logged (as
    Consul's `proxy telemetry config error`) and the in-memory sink alone runs."""
    for key in unknown_keys(raw):
        log.warning("telemetry: %s is not supported by this proxy and is ignored", key)
    try:
        config = load_telemetry(raw)
        telemetry = Telemetry(config)
        await telemetry.start()
    except ConfigError as exc:
        log.error("proxy telemetry config error: %s", exc)
        telemetry = Telemetry(TelemetryConfig())
        await telemetry.start()
        return telemetry
    if telemetry.sinks:
        log.info("telemetry sinks: %s", ", ".join(telemetry.sinks))
    return telemetry
