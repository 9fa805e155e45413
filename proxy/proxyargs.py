"""The `connect-proxy` command line: Consul's `connect proxy` flags and variables, resolved.

Owns `ProxyOptions` (what argv and the environment ask for), the flag set with its help
texts, and `parse_proxy_args` with Consul's precedence and messages. `proxy.command` runs
what these options describe.

Rule 1: pure: argv and a mapping of variables in, `ProxyOptions` or an error out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from proxy.addr import split_host_port
from proxy.config import (
    DEFAULT_TLS_ENGINE,
    ProxyConfig,
    UpstreamConfig,
    flags_config,
    load_tls_engine,
    parse_upstream_flag,
)
from proxy.errors import ConfigError
from proxy.goflags import FlagSet, parse_duration
from proxy.httpflags import HTTPOptions, add_http_flags, load_http_options

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
    authorize_cache: bool = False  # -authorize-cache (not in Consul)
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


def flag_set(
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
    fs.boolean(
        "authorize-cache",
        False,
        "Reuse the agent's authorize decision per client identity until intentions or CA "
        "roots change; open connections are re-checked on each change as with -reauthorize. "
        "Proxy.Config's authorize_cache wins when set (not in Consul).",
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
    values, rest = flag_set(upstreams, given_hosts).parse(args)
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
        authorize_cache=values.get("authorize-cache") is True,
        worker_child=env.get("CONNECT_PROXY_WORKER") == "1",
        tls_engine=load_tls_engine(env),
        admin_bind=admin_bind,
        access_log=values.get("access-log") is not False,
        metrics=metrics,
    )
