"""Consul's telemetry, fed as Consul's built-in proxy feeds go-metrics.

Owns the `telemetry` map of the proxy's `Config` (`load_telemetry`: the keys of Consul's
`lib.TelemetryConfig`) and `Telemetry`: go-metrics' key building (prefix; the hostname on
gauges, only when an external sink runs), its prefix filter, and the sinks of one config: the
in-memory sink (always; `dump()` is the SIGUSR1 text), statsd and dogstatsd (UDP) and
Prometheus (`collector()`). The wire formats live in `proxy.telemetry_sinks`.

Rule 1: `set_gauge`, `incr_counter` and `add_sample` do no I/O and take no lock: they append
one tuple to a deque. A flush 100 ms after the first call into an empty deque (the Go clients
flush every 100 ms), `dump()`, a scrape and `aclose()` drain it into the sinks, under a lock
of their own. Nothing is scheduled while nothing is pending: an idle proxy is not woken.
Rule 2: a send error never reaches a caller and never stops later flushes; it is logged at
debug, at most once per 5 s per sink. A drain that a bug cut short is tried again 100 ms later.
Rule 3: a value is rounded to float32 before any sink sees it, as go-metrics' API takes
float32.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from proxy.addr import split_host_port
from proxy.errors import ConfigError
from proxy.goflags import parse_duration
from proxy.telemetry_sinks import (
    COUNTER,
    DOGSTATSD_MAX,
    GAUGE,
    SAMPLE,
    STATSD_MAX,
    InmemSink,
    Packer,
    PromSeries,
    Series,
    UdpSink,
    describe,
    dogstatsd_line,
    f32,
    prometheus_families,
    statsd_line,
)

log = logging.getLogger("proxy.telemetry")

Labels = Sequence[tuple[str, str]]

_FLUSH_INTERVAL = 0.1  # go-metrics' statsd sink and datadog-go both flush every 100 ms
_BACKLOG = 4096  # calls beyond this are drained inline rather than piling up
_MAX_SERIES = 10_000  # cached descriptions; past this the cache starts again
_ERROR_EVERY = 5.0


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """The proxy's telemetry settings (Consul's `telemetry` map, decoded once).

    `metrics_prefix` is go-metrics' ServiceName: the proxy decodes the map with no default,
    so "" means no prefix. `prometheus_retention` is in seconds; 0 disables the Prometheus
    series. `allowed_prefixes`/`blocked_prefixes` include the `+`/`-` rules of
    `prefix_filter`. `statsite_address` is accepted but no statsite sink is run.
    """

    metrics_prefix: str = ""
    disable_hostname: bool = False
    statsd_address: str = ""
    statsite_address: str = ""
    dogstatsd_addr: str = ""
    dogstatsd_tags: tuple[str, ...] = ()
    prometheus_retention: float = 0.0
    filter_default: bool = True
    allowed_prefixes: tuple[str, ...] = ()
    blocked_prefixes: tuple[str, ...] = ()


_STRINGS = ("metrics_prefix", "statsd_address", "statsite_address", "dogstatsd_addr")
_BOOLS = ("disable_hostname", "filter_default")
_LISTS = ("dogstatsd_tags", "allowed_prefixes", "blocked_prefixes", "prefix_filter")
_KNOWN = frozenset((*_STRINGS, *_BOOLS, *_LISTS, "prometheus_retention_time", "prometheusopts"))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def _fold(raw: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    # mapstructure matches a key exactly first, then case-insensitively.
    found: dict[str, tuple[str, Any]] = {}
    for key, value in raw.items():
        lower = str(key).lower()
        if lower not in found or key == lower:
            found[lower] = (str(key), value)
    return found


def unknown_keys(raw: object) -> list[str]:
    """The keys of a `telemetry` map that this proxy ignores (circonus_*, ...), as written."""
    if not isinstance(raw, Mapping):
        return []
    return [str(key) for key in raw if str(key).lower() not in _KNOWN]


def load_telemetry(raw: object) -> TelemetryConfig:
    """Decode the `telemetry` map of a proxy's `Config`.

    Types are checked as Consul's (non-weak) decoding checks them: a string where a boolean
    belongs is an error, not a conversion. Unknown keys are ignored (see `unknown_keys`).
    `prometheus_retention_time` is a Go duration string or a number of seconds; the
    `PrometheusOpts.Expiration` (nanoseconds) that Consul 1.3-1.5 agents serve is read too.

    Raises:
        ConfigError: naming `telemetry.<key>` for a wrong type or an unusable value.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"telemetry: expected a map, got {_kind(raw)}")
    found = _fold(raw)
    values: dict[str, Any] = {}
    for name in _STRINGS:
        if name in found:
            key, value = found[name]
            if not isinstance(value, str):
                raise ConfigError(f"telemetry.{key}: expected a string, got {_kind(value)}")
            values[name] = value
    for name in _BOOLS:
        if name in found:
            key, value = found[name]
            if not isinstance(value, bool):
                raise ConfigError(f"telemetry.{key}: expected a boolean, got {_kind(value)}")
            values[name] = value
    lists: dict[str, tuple[str, ...]] = {}
    for name in _LISTS:
        if name in found:
            key, value = found[name]
            if not isinstance(value, list | tuple):
                raise ConfigError(
                    f"telemetry.{key}: expected a list of strings, got {_kind(value)}"
                )
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise ConfigError(f"telemetry.{key}[{i}]: expected a string, got {_kind(item)}")
            lists[name] = tuple(value)
    allowed = list(lists.get("allowed_prefixes", ()))
    blocked = list(lists.get("blocked_prefixes", ()))
    for i, rule in enumerate(lists.get("prefix_filter", ())):
        key = found["prefix_filter"][0]
        if rule[:1] == "+":
            allowed.append(rule[1:])
        elif rule[:1] == "-":
            blocked.append(rule[1:])
        else:
            raise ConfigError(
                f'telemetry.{key}[{i}]: a rule must begin with "+" or "-", got {rule!r}'
            )
    for name in ("statsd_address", "statsite_address", "dogstatsd_addr"):
        address = values.get(name, "")
        if address:
            key = found[name][0]
            if address.startswith("unix://"):
                raise ConfigError(
                    f"telemetry.{key}: unix sockets are not supported ({address!r}); use host:port"
                )
            if split_host_port(address, f"telemetry.{key}")[1] == 0:
                raise ConfigError(f"telemetry.{key}: port 0 in address {address!r}")
    return TelemetryConfig(
        metrics_prefix=values.get("metrics_prefix", ""),
        disable_hostname=values.get("disable_hostname", False),
        statsd_address=values.get("statsd_address", ""),
        statsite_address=values.get("statsite_address", ""),
        dogstatsd_addr=values.get("dogstatsd_addr", ""),
        dogstatsd_tags=lists.get("dogstatsd_tags", ()),
        prometheus_retention=_retention(found),
        filter_default=values.get("filter_default", True),
        allowed_prefixes=tuple(allowed),
        blocked_prefixes=tuple(blocked),
    )


def _retention(found: dict[str, tuple[str, Any]]) -> float:
    if "prometheus_retention_time" in found:
        key, value = found["prometheus_retention_time"]
        if isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"telemetry.{key}: {exc}") from None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            raise ConfigError(
                f'telemetry.{key}: expected a duration ("60s") or seconds, got {_kind(value)}'
            )
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(f"telemetry.{key}: must be a duration of 0 or more, got {value!r}")
        return seconds
    if "prometheusopts" in found:
        key, opts = found["prometheusopts"]
        if not isinstance(opts, Mapping):
            raise ConfigError(f"telemetry.{key}: expected a map, got {_kind(opts)}")
        sub = _fold(opts)
        if "expiration" in sub:
            name, ns = sub["expiration"]
            if not isinstance(ns, int | float) or isinstance(ns, bool) or not math.isfinite(ns):
                raise ConfigError(f"telemetry.{key}.{name}: expected nanoseconds, got {_kind(ns)}")
            # go-metrics: an expiration under 1 ns means no Prometheus sink.
            return int(ns) / 1e9 if int(ns) >= 1 else 0.0
    return 0.0


class _Collector:
    """The Prometheus side of a `Telemetry`, for a prometheus_client `CollectorRegistry`."""

    def __init__(self, owner: Telemetry) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        return self._owner._prometheus_families()

    def describe(self) -> Iterable[Metric]:
        # Nothing to declare up front: the registry must not collect at registration.
        return []


_Call = tuple[int, tuple[str, ...], float, tuple[tuple[str, str], ...], float]
_SeriesKey = tuple[int, tuple[str, ...], tuple[tuple[str, str], ...]]


class Telemetry:
    """go-metrics for the proxy: key building, the filter, and the sinks of one config.

    Args:
        config: the decoded `telemetry` map.
        hostname: go-metrics' HostName (default `socket.gethostname()`, Go's os.Hostname).
        clock: wall-clock seconds; every call is stamped with it (tests inject one).

    `sinks` names the external sinks that run ("statsd", "dogstatsd", "prometheus").
    """

    def __init__(
        self,
        config: TelemetryConfig,
        *,
        hostname: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self._hostname = socket.gethostname() if hostname is None else hostname
        self._statsd: UdpSink | None = None
        self._dogstatsd: UdpSink | None = None
        if config.statsd_address:
            packer = Packer(STATSD_MAX, joined=False)
            self._statsd = UdpSink("statsd", "statsd_address", config.statsd_address, packer)
        if config.dogstatsd_addr:
            packer = Packer(DOGSTATSD_MAX, joined=True)
            self._dogstatsd = UdpSink("dogstatsd", "dogstatsd_addr", config.dogstatsd_addr, packer)
        self._udp = [sink for sink in (self._statsd, self._dogstatsd) if sink is not None]
        self._retention = config.prometheus_retention
        prometheus = ("prometheus",) if self._retention > 0 else ()
        self.sinks: tuple[str, ...] = (*(sink.name for sink in self._udp), *prometheus)
        # Consul: EnableHostname = !disable_hostname, forced off when no external sink runs.
        enabled = bool(self.sinks) and not config.disable_hostname
        self._gauge_host = self._hostname if enabled else ""
        self._rules = dict.fromkeys(config.allowed_prefixes, True)
        self._rules.update(dict.fromkeys(config.blocked_prefixes, False))  # blocked wins a tie
        self._dog_tags = tuple(tag.replace("\n", "") for tag in config.dogstatsd_tags)
        self._pending: deque[_Call] = deque()
        self._series: dict[_SeriesKey, Series | None] = {}
        self._inmem = InmemSink()
        self._prom: dict[tuple[int, str], PromSeries] = {}
        self._bad_names: set[str] = set()
        self._lock = threading.Lock()  # between drainers only: the flush, dump, a scrape
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._next_report = -math.inf

    # The hot path (Rule 1).

    def set_gauge(self, key: Sequence[str], value: float, labels: Labels = ()) -> None:
        """go-metrics SetGaugeWithLabels."""
        pending = self._pending
        pending.append((GAUGE, tuple(key), value, tuple(labels), self._clock()))
        if len(pending) == 1:
            self._arm()
        elif len(pending) > _BACKLOG:
            self._drain()

    def incr_counter(self, key: Sequence[str], value: float, labels: Labels = ()) -> None:
        """go-metrics IncrCounterWithLabels."""
        pending = self._pending
        pending.append((COUNTER, tuple(key), value, tuple(labels), self._clock()))
        if len(pending) == 1:
            self._arm()
        elif len(pending) > _BACKLOG:
            self._drain()

    def add_sample(self, key: Sequence[str], value: float, labels: Labels = ()) -> None:
        """go-metrics AddSampleWithLabels (a timer's value is in milliseconds)."""
        pending = self._pending
        pending.append((SAMPLE, tuple(key), value, tuple(labels), self._clock()))
        if len(pending) == 1:
            self._arm()
        elif len(pending) > _BACKLOG:
            self._drain()

    # Lifecycle.

    async def start(self) -> None:
        """Open the UDP sockets; from now on a pending call is flushed within 100 ms.

        Raises:
            ConfigError: naming the key and the address of a sink that does not resolve or
                cannot be used.
        """
        if self.config.statsite_address:
            log.warning(
                "telemetry: statsite_address %s ignored: this proxy has no statsite sink",
                self.config.statsite_address,
            )
        try:
            for sink in self._udp:
                await sink.open()
        except BaseException:
            for sink in self._udp:
                sink.close()
            raise
        self._loop = asyncio.get_running_loop()
        if self._pending:  # calls made before the start
            self._arm()

    async def aclose(self) -> None:
        """Cancel the flush, send what is buffered and close the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()
        for sink in self._udp:
            sink.close()
        # Later calls still reach the in-memory and Prometheus sinks, never a closed socket.
        self._udp = []
        self._statsd = self._dogstatsd = None

    @property
    def flush_scheduled(self) -> bool:
        """Whether a flush waits on the loop's clock (only while calls are pending)."""
        return self._timer is not None

    def _arm(self) -> None:
        # Before start() there is no loop yet (start arms); after aclose() only the readers
        # drain, as no UDP sink is left.
        if self._timer is None and self._loop is not None and not self._closed:
            self._timer = self._loop.call_later(_FLUSH_INTERVAL, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        self._flush()
        if self._pending:  # a drain cut short by a bug (Rule 2): try again, never spin
            self._arm()

    def _flush(self) -> None:
        try:
            self._drain()
        except Exception:  # Rule 2: a bug here must not stop later flushes
            now = time.monotonic()
            if now >= self._next_report:
                self._next_report = now + _ERROR_EVERY
                log.exception("telemetry: metrics dropped")
        for sink in self._udp:
            sink.send()

    # Draining into the sinks.

    def _drain(self) -> None:
        with self._lock:
            pending = self._pending
            while pending:
                try:
                    kind, key, value, labels, t = pending.popleft()
                except IndexError:
                    break
                try:
                    series = self._series[kind, key, labels]
                except KeyError:
                    if len(self._series) >= _MAX_SERIES:
                        self._series.clear()
                    series = self._series[kind, key, labels] = self._describe(kind, key, labels)
                if series is not None:
                    self._record(series, f32(value), t)

    def _describe(
        self, kind: int, key: tuple[str, ...], labels: tuple[tuple[str, str], ...]
    ) -> Series | None:
        # go-metrics: the hostname goes in first (gauges only), then the prefix before it.
        parts = key
        if kind == GAUGE and self._gauge_host:
            parts = (self._gauge_host, *parts)
        if self.config.metrics_prefix:
            parts = (self.config.metrics_prefix, *parts)
        if not self._allowed(".".join(parts)):
            return None
        return describe(kind, parts, labels, hostname=self._hostname, dog_tags=self._dog_tags)

    def _allowed(self, joined: str) -> bool:
        # go-metrics: the longest matching prefix decides; if none matches, filter_default.
        best, verdict = -1, self.config.filter_default
        for prefix, allow in self._rules.items():
            if len(prefix) > best and joined.startswith(prefix):
                best, verdict = len(prefix), allow
        return verdict

    def _record(self, series: Series, value: float, t: float) -> None:
        self._inmem.record(series, value, t)
        if self._statsd is not None:
            self._statsd.packer.add(statsd_line(series, value))
        if self._dogstatsd is not None:
            self._dogstatsd.packer.add(dogstatsd_line(series, value))
        if self._retention > 0:
            prom = self._prom.get(series.prom_id)
            if prom is None:
                prom = PromSeries(series.kind, series.prom_name, series.prom_labels)
                self._prom[series.prom_id] = prom
            prom.record(value, t)

    # Readers.

    def dump(self) -> str:
        """The in-memory sink as go-metrics prints it on SIGUSR1 (`inmem_signal.go`).

        The completed 10 s intervals of the last minute; the interval still being aggregated
        is left out, as Go leaves it out. Within an interval the keys are sorted.
        """
        self._drain()
        with self._lock:
            return self._inmem.dump(self._clock())

    def collector(self) -> Collector:
        """The Consul-named series for a prometheus_client `CollectorRegistry`.

        Empty unless `prometheus_retention` > 0; a series not updated for longer than the
        retention disappears. Counters are exposed untyped: their names stay go-metrics'.
        """
        return _Collector(self)

    def _prometheus_families(self) -> list[Metric]:
        if self._retention <= 0:
            return []
        self._drain()
        with self._lock:
            now = self._clock()
            return prometheus_families(self._prom, self._retention, now, self._bad_names)
