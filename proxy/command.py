"""The `connect-proxy` command (Consul's `connect proxy`): argv in, exit code out.

Owns which configuration source each mode uses, the start-up banner, the admin endpoint's
start, signal handling (drain on the first signal, exit on the second; SIGUSR1 prints the
metrics), the `-workers` processes and exit codes; its flags and variables are
`proxy.proxyargs`. Logging and the event loop are set up
through `proxy.console`; the proxy itself is `proxy.runner.run`.

Rule 1: only this module (and the other commands) turns errors into exit codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from proxy import console
from proxy.addr import split_host_port
from proxy.admin import AdminServer
from proxy.agent import AgentClient
from proxy.config import (
    ProxyConfig,
)
from proxy.errors import ConfigError, ProxyError
from proxy.goflags import FlagError, HelpRequested
from proxy.memtrim import freeze_startup_objects
from proxy.observe import ProxyMetrics
from proxy.proxyargs import PROXY_HELP, ProxyOptions, flag_set, parse_proxy_args
from proxy.register import RegisterMonitor
from proxy.runner import RunState, run
from proxy.sources import (
    AgentConfigSource,
    ConfigSource,
    StaticConfigSource,
    lookup_proxy_id_for_sidecar,
)
from proxy.supervisor import ProxySettings
from proxy.watch import BACKOFF_BASE


def _flags_banner(options: ProxyOptions, cfg: ProxyConfig) -> None:
    console.info("Configuration mode: Flags")
    console.info(f"           Service: {cfg.service}")
    for up in cfg.upstreams:
        console.info(
            f"          Upstream: {up.destination_name} => "
            f"{options.upstream_hosts.get(up.destination_name, up.local_bind_address)}:"
            f"{up.local_bind_port}"
        )
    if cfg.public_listener is not None and options.listen:
        host, port = split_host_port(options.listen, "-listen")
        console.info(f"   Public listener: {host}:{port} => {options.service_addr}")
    else:
        console.info("   Public listener: Disabled")


def _agent_banner(options: ProxyOptions, proxy_id: str) -> None:
    console.info("Configuration mode: Agent API")
    if options.mode == "sidecar":
        console.info(f"    Sidecar for ID: {options.sidecar_for}")
    console.info(f"          Proxy ID: {proxy_id}")
    if options.legacy:
        console.info("      Config from: managed-proxy endpoint (Consul 1.2-1.5)")


def _register(
    options: ProxyOptions, agent: AgentClient, periods: tuple[float, float] | None
) -> Callable[[int], RegisterMonitor] | None:
    """With -register (and not in a -workers child), how to make the monitor for a port."""
    if not options.register or options.static is None or options.worker_child:
        return None
    host, _ = split_host_port(options.listen, "-listen")
    service = options.static.service
    reconcile, ttl = periods or (30.0, 30.0)

    def monitor(port: int) -> RegisterMonitor:
        return RegisterMonitor(
            agent,
            service,
            host,
            port,
            options.register_id,
            reconcile_period=reconcile,
            ttl_period=ttl,
        )

    return monitor


async def serve(
    options: ProxyOptions,
    stop: asyncio.Event,
    *,
    watch_backoff: float | None = None,
    register_periods: tuple[float, float] | None = None,
    metrics: ProxyMetrics | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run the proxy described by `options` until `stop` is set. Returns the exit code.

    `on_ready` is called once, when the first config is served."""
    backoff_base = BACKOFF_BASE if watch_backoff is None else watch_backoff
    if metrics is None:
        metrics = ProxyMetrics(access_log=options.access_log)
    try:
        agent = AgentClient(options.http)
    except ConfigError as exc:
        console.error(f"Error connecting to Consul agent: {exc}")
        return 1
    state = RunState()
    admin: AdminServer | None = None
    announced = False
    try:
        if options.admin_bind and not options.worker_child:
            # Before the banner: a taken port is a start-up error, like a bad flag.
            host, port = split_host_port(options.admin_bind, "-admin-bind")
            admin = AdminServer(
                host or "0.0.0.0",
                port,
                state=state,
                metrics=metrics,
                settings=options.settings(),
                agent=agent,
            )
            try:
                await admin.start()
            except OSError as exc:
                console.error(f"Failed to start admin endpoint on {options.admin_bind}: {exc}")
                return 1
        console.output("Consul Connect proxy starting...")
        announced = True
        source: ConfigSource
        if options.static is None:
            proxy_id = options.proxy_id
            if options.mode == "sidecar":
                try:
                    proxy_id = await lookup_proxy_id_for_sidecar(agent, options.sidecar_for)
                except ConfigError as exc:
                    console.error(f"Error preparing configuration: {exc}")
                    return 1
            _agent_banner(options, proxy_id)
            source = AgentConfigSource(
                agent, proxy_id, legacy=options.legacy, backoff_base=backoff_base
            )
        else:
            _flags_banner(options, options.static)
            source = StaticConfigSource(options.static)
        if admin is not None:
            console.info(f"    Admin endpoint: http://{admin.address}/")
        console.info("")
        console.output("Log data will now stream in as it occurs:\n")
        settings = ProxySettings(
            drain_timeout=options.drain_timeout,
            watch_backoff=backoff_base,
            reuse_port=options.workers > 1 or options.worker_child,
            tls_engine=options.tls_engine,
            observe=options.metrics,
            max_inbound_connections=options.max_inbound_connections,
            reauthorize=options.reauthorize,
            authorize_cache=options.authorize_cache,
        )
        try:
            await run(
                agent,
                source,
                stop,
                settings,
                register=_register(options, agent, register_periods),
                metrics=metrics,
                state=state,
                on_ready=None if on_ready is None else (lambda _proxy: on_ready()),
            )
        except (ProxyError, OSError) as exc:
            console.error(f"Failed running proxy: {exc}")
            return 1
        return 0
    finally:
        if admin is not None:
            await admin.aclose()
        await agent.aclose()
        if announced:
            console.output("Consul Connect proxy shutdown")


def proxy_main(args: Sequence[str], env: Mapping[str, str]) -> int:
    """`connect-proxy [flags]`: the `consul connect proxy` command."""
    try:
        options = parse_proxy_args(args, env)
    except HelpRequested:
        print(PROXY_HELP + flag_set({}).usage())
        return 0
    except FlagError as exc:
        print(str(exc), file=sys.stderr)
        print(PROXY_HELP + flag_set({}).usage(), file=sys.stderr)
        return 1
    except ConfigError as exc:
        console.error(str(exc))
        return 1
    return run_with_signals(options, args)


def _start_workers(options: ProxyOptions, args: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """The other -workers processes: the same command, marked as workers (they skip
    -register), binding the same addresses with SO_REUSEPORT."""
    if options.workers <= 1 or options.worker_child:
        return []
    env = {**os.environ, "CONNECT_PROXY_WORKER": "1"}
    return [
        subprocess.Popen([sys.executable, "-m", "proxy", *args], env=env)
        for _ in range(options.workers - 1)
    ]


def run_with_signals(options: ProxyOptions, args: Sequence[str] = ()) -> int:
    """Serve `options` on uvloop with Consul's signal behaviour; returns the exit code."""
    console.setup_logging(options.log_level, options.log_json)
    console.raise_descriptor_limit()
    workers = _start_workers(options, args)

    metrics = ProxyMetrics(access_log=options.access_log)

    async def main_async() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = {"count": 0}

        def on_signal(signum: int) -> None:
            signals["count"] += 1
            for worker in workers:  # the other workers drain (or exit) as this one does
                with contextlib.suppress(OSError):
                    worker.send_signal(signum)
            if signals["count"] == 1:
                stop.set()  # first: nothing below may prevent the shutdown
                console.output(
                    f"Caught signal: {signal.Signals(signum).name}, draining connections"
                )
            else:
                # A second signal: the user does not want to wait for the drain.
                console.output("Caught second signal, exiting now")
                os._exit(1)

        def on_usr1() -> None:
            # As Consul's proxy (go-metrics' DefaultInmemSignal): the metrics to stderr.
            console.dump(metrics.dump())

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, on_usr1)
        # This process is the proxy's own: what start-up made stays, so the collector's
        # full passes need not walk it again and again.
        code = await serve(options, stop, metrics=metrics, on_ready=freeze_startup_objects)
        if signals["count"] == 0:
            # This process stopped on its own (it could not serve): stop the others too. After
            # a signal they already have theirs; a second one would cut their drain short.
            for worker in workers:
                with contextlib.suppress(OSError):
                    worker.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(w.wait) for w in workers]
        return max([code, *codes])

    console.install_uvloop()
    try:
        return asyncio.run(main_async())
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
