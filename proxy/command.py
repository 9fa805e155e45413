"""The `connect-proxy` command (Consul's `connect proxy`): argv in, exit code out.

Owns its flags and environment variables (`ProxyOptions`), which configuration source each
mode uses, the start-up banner, signal handling (drain on the first signal, exit on the
second), the `-workers` processes and exit codes. Logging and the event loop are set up
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
from dataclasses import dataclass, field, fields

from proxy import console
from proxy.addr import split_host_port
from proxy.admin import AdminServer
from proxy.agent import AgentClient
from proxy.config import (
    DEFAULT_TLS_ENGINE,
    ProxyConfig,
    UpstreamConfig,
    flags_config,
    load_tls_engine,
    parse_upstream_flag,
)
from proxy.errors import ConfigError, ProxyError
from proxy.goflags import FlagError, FlagSet, HelpRequested, parse_duration
from proxy.httpflags import HTTPOptions, add_http_flags, load_http_options
from proxy.observe import ProxyMetrics
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

ADMIN_BIND_VAR = "CONNECT_PROXY_ADMIN_BIND"
METRICS_VAR = "CONNECT_PROXY_METRICS"

PROXY_HELP = """\
Usage: connect-proxy [options]

  Starts a Consul Connect proxy and runs until an interrupt is received.
  It is a drop-in replacement for `consul connect proxy`: same flags, same
  environment variables, same configuration modes.

  The proxy requires service:write permissions for the service it represents.
  The token may be passed with -token, -token-file or CONSUL_HTTP_TOKEN.

  A sidecar for a service registered with `connect { sidecar_service {} }`:

      $ connect-proxy -sidecar-for web

  A local proxy for outbound connections to "db" as the "frontend" service; any
  TCP connection to 127.0.0.1:8181 is carried over mutual TLS to "db":

      $ connect-proxy -service frontend -upstream db:8181

  Accept inbound connections on port 8443, authorize them, proxy them to 8080:

      $ connect-proxy -service frontend -service-addr 127.0.0.1:8080 -listen ':8443'

Other commands:

      connect-proxy dev-agent [options]   run the embedded Consul-compatible dev agent
      connect-proxy demo [-once]           a walk-through on the dev agent
      connect-proxy envoy [options]        Consul's `connect envoy`, this proxy as fallback
      connect-proxy version

Options:
"""


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """What the command line and the environment ask for, resolved."""

    mode: str  # "agent", "sidecar", "flags"
    proxy_id: str
    sidecar_for: str
    legacy: bool
    http: HTTPOptions
    static: ProxyConfig | None
    register: bool
    register_id: str
    listen: str
    service_addr: str  # -service-addr as given, for the banner
    log_level: str
    log_json: bool
    drain_timeout: float
    upstream_hosts: Mapping[str, str] = field(default_factory=dict)
    workers: int = 1
    max_inbound_connections: int | None = None  # -max-inbound-connections (not in Consul)
    reauthorize: bool = False  # -reauthorize (not in Consul)
    worker_child: bool = False  # one of the -workers processes started by the first
    tls_engine: str = DEFAULT_TLS_ENGINE  # CONNECT_PROXY_TLS_ENGINE (not in Consul)
    admin_bind: str = ""  # -admin-bind / CONNECT_PROXY_ADMIN_BIND (not in Consul)
    access_log: bool = True  # -access-log (not in Consul)
    metrics: bool = True  # CONNECT_PROXY_METRICS=off: no metrics, no access log (bench baseline)

    def settings(self) -> dict[str, object]:
        """What the admin endpoint's /config shows of the command line: no secret."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _UNSHOWN}
        http = {f.name: getattr(self.http, f.name) for f in fields(self.http)}
        http["token"] = "<redacted>" if self.http.token else ""
        http["basic_auth"] = "<redacted>" if self.http.basic_auth else ""
        return {**shown, "http": http, "access_log": self.access_log and self.metrics}


# The options /config leaves out: the agent's options are shown on their own (secrets
# redacted), and the flags-mode config is shown as the proxy's current config.
_UNSHOWN = frozenset({"http", "static", "upstream_hosts"})


def _flag_set(
    upstreams: dict[str, UpstreamConfig], given_hosts: dict[str, str] | None = None
) -> FlagSet:
    fs = FlagSet()

    def add_upstream(value: str) -> None:
        up = parse_upstream_flag(value)
        upstreams[up.destination_name] = up  # a repeated name overrides, as in Consul
        if given_hosts is not None:
            # The banner shows the host as given (empty when only a port was), as Consul.
            rest = value.partition(":")[2]
            given_hosts[up.destination_name] = rest.partition(":")[0] if ":" in rest else ""

    fs.string("proxy-id", "", "The proxy's ID on the local agent.")
    fs.string(
        "sidecar-for",
        "",
        "The ID of a service instance on the local agent that this proxy should become a "
        "sidecar for. Exactly one connect-proxy must be registered with "
        "Proxy.DestinationServiceID set to this value.",
    )
    fs.string("log-level", "INFO", "Specifies the log level.")
    fs.boolean("log-json", False, "Output logs in JSON format.")
    fs.string("pprof-addr", "", "Accepted for compatibility; Go's pprof has no Python equivalent.")
    fs.string("service", "", "Name of the service this proxy is representing.")
    fs.repeated(
        "upstream",
        "Upstream service to support connecting to. The format should be 'name:addr', such "
        "as 'db:8181'. This will make 'db' available on port 8181. This can be repeated.",
        add_upstream,
    )
    fs.string(
        "service-addr",
        "",
        "Address of the local service to proxy. Only useful with -listen and -service.",
    )
    fs.string(
        "listen",
        "",
        "Address to listen for inbound connections to the proxied service. "
        "Must be specified with -service and -service-addr.",
    )
    fs.boolean(
        "register", False, "Self-register with the local Consul agent. Only useful with -listen."
    )
    fs.string(
        "register-id", "", "ID suffix for the service. Use this to disambiguate with other proxies."
    )
    fs.string(
        "drain-timeout",
        "10s",
        "How long active connections may finish after SIGINT/SIGTERM (not in Consul).",
    )
    fs.string(
        "max-inbound-connections",
        "",
        "Most inbound connections open at once; beyond it new ones are closed at accept. "
        "Proxy.Config's max_inbound_connections wins when set. Default: a quarter of the "
        "descriptor limit less 64 (not a Consul flag).",
    )
    fs.boolean(
        "reauthorize",
        False,
        "Re-check open inbound connections when intentions or CA roots change, and close "
        "those no longer allowed. Proxy.Config's reauthorize wins when set (not in Consul).",
    )
    fs.string("workers", "1", "Processes sharing each listener with SO_REUSEPORT (not in Consul).")
    fs.string(
        "admin-bind",
        "",
        "host:port of the admin endpoint: /ready, /certs, /config, /connections, /metrics and "
        "a status page (not in Consul; off when empty; env CONNECT_PROXY_ADMIN_BIND).",
    )
    fs.boolean("access-log", True, "Log one line per connection at info level (not in Consul).")
    add_http_flags(fs)
    return fs


def parse_proxy_args(args: Sequence[str], env: Mapping[str, str]) -> ProxyOptions:
    """argv and environment -> ProxyOptions, with Consul's precedence and messages.

    Raises:
        FlagError, HelpRequested: from the flag parser.
        ConfigError: a combination Consul refuses, with its message; an unknown
            CONNECT_PROXY_TLS_ENGINE.
    """
    upstreams: dict[str, UpstreamConfig] = {}
    given_hosts: dict[str, str] = {}
    values, rest = _flag_set(upstreams, given_hosts).parse(args)
    if rest:
        raise ConfigError("Should have no non-flag arguments.")

    def text(name: str) -> str:
        value = values.get(name, "")
        return value if isinstance(value, str) else ""

    proxy_id = text("proxy-id")
    legacy = False
    if not proxy_id:
        proxy_id = env.get("CONNECT_PROXY_ID") or env.get("CONSUL_PROXY_ID") or ""
        # Consul 1.2-1.5 started managed proxies with the proxy ID and a proxy token in the
        # environment; such a proxy reads the managed-proxy endpoint.
        legacy = bool(proxy_id and env.get("CONNECT_PROXY_TOKEN"))
    sidecar_for = text("sidecar-for") or env.get("CONNECT_SIDECAR_FOR", "")
    service = text("service")
    listen = text("listen")
    register = values.get("register") is True
    http = load_http_options(values, env)
    try:
        drain = parse_duration(text("drain-timeout") or "10s")
    except ValueError as exc:
        raise ConfigError(f"-drain-timeout: {exc}") from None
    try:
        workers = int(text("workers") or "1")
    except ValueError:
        raise ConfigError(f"-workers must be a whole number, got {text('workers')!r}") from None
    if not 1 <= workers <= 64:
        raise ConfigError(f"-workers must be between 1 and 64, got {workers}")
    max_inbound: int | None = None
    if text("max-inbound-connections"):
        try:
            max_inbound = int(text("max-inbound-connections"))
        except ValueError:
            max_inbound = 0
        if max_inbound < 1:
            raise ConfigError(
                "-max-inbound-connections must be a positive whole number, "
                f"got {text('max-inbound-connections')!r}"
            )
    admin_bind = text("admin-bind") or env.get(ADMIN_BIND_VAR, "")
    if admin_bind:
        split_host_port(admin_bind, "-admin-bind")
    metrics = env.get(METRICS_VAR, "").lower() not in ("off", "0", "false")
    static = None
    if proxy_id:
        mode = "agent"
    elif sidecar_for:
        mode = "sidecar"
    elif service:
        mode = "flags"
        static = flags_config(service, listen, text("service-addr"), upstreams)
    else:
        raise ConfigError(
            "-service or -proxy-id must be specified so that proxy can configure itself."
        )
    if register and (not service or not listen):
        raise ConfigError("-register may only be specified with -service and -listen")
    return ProxyOptions(
        mode=mode,
        proxy_id=proxy_id,
        sidecar_for=sidecar_for,
        legacy=legacy,
        http=http,
        static=static,
        register=register,
        register_id=text("register-id"),
        listen=listen,
        service_addr=text("service-addr"),
        log_level=text("log-level") or "INFO",
        log_json=values.get("log-json") is True,
        drain_timeout=drain,
        upstream_hosts=given_hosts,
        workers=workers,
        max_inbound_connections=max_inbound,
        reauthorize=values.get("reauthorize") is True,
        worker_child=env.get("CONNECT_PROXY_WORKER") == "1",
        tls_engine=load_tls_engine(env),
        admin_bind=admin_bind,
        access_log=values.get("access-log") is not False,
        metrics=metrics,
    )


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
) -> int:
    """Run the proxy described by `options` until `stop` is set. Returns the exit code."""
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
        print(PROXY_HELP + _flag_set({}).usage())
        return 0
    except FlagError as exc:
        print(str(exc), file=sys.stderr)
        print(PROXY_HELP + _flag_set({}).usage(), file=sys.stderr)
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
        code = await serve(options, stop, metrics=metrics)
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
