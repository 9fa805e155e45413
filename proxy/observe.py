"""What the proxy lets an operator see of its connections: metrics and the access log.

Owns `ProxyMetrics`: one Prometheus registry of our own `connect_proxy_*` series (the admin
endpoint's `/metrics`), the feed of Consul's telemetry (`proxy.telemetry`, the names and
labels of Consul's `connect/proxy/listener.go`), the access log (one line per connection)
and the last refusals (the status page). Each listener gets a `ListenerObserver`
(`listeners.events.Observer`) with its labels bound once, so the per-connection work is a
few increments.

Consul's byte counters: `tx_bytes` counts bytes written to the accepted side (the source)
and `rx_bytes` bytes written to the dialled side (the destination), for inbound and
upstream alike; Consul's own code comment says the opposite, its code does this, and we
match the code. Like Consul, open connections report their byte deltas every 5 s and once
at close.

Rule 1: observers never raise and never block: they run inside the listeners' handlers.
Rule 2: the access log never holds a secret: addresses, SPIFFE IDs, reasons, numbers.
Rule 3: identical refusals are logged once, then counted; a summary line per throttle
window says how many were not logged (the metrics count every one).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from listeners.events import INBOUND, UPSTREAM, Connection, Outcome, Refusal
from listeners.tls.verified import CHECKS
from proxy.console import log_fields
from proxy.telemetry import Telemetry
from proxy.throttle import Throttle

FLUSH_INTERVAL = 5.0  # seconds between byte-count reports of open connections, as Consul
RECENT_REFUSALS = 20

# Sub-millisecond to seconds: a handshake on loopback takes ~1 ms, across a WAN ~100 ms.
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DURATION_BUCKETS = (0.001, 0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 14400)

Labels = tuple[tuple[str, str], ...]


def _ms(seconds: float | None) -> float | None:
    """Milliseconds to the microsecond (a float whose shortest form has three decimals at
    most), four times per access-log line: integer arithmetic, under half the instructions
    of `round(x, 3)`."""
    return None if seconds is None else int(seconds * 1e6 + 0.5) / 1000


class _Histogram:
    """Bucket counts of one series, kept as plain numbers (read at scrape time).

    prometheus_client's own metrics take a lock per update; on the hot path plain list
    increments on the event loop's thread are a fraction of that.
    """

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le), the last one `+Inf`."""
        out, total = [], 0
        for bound, count in zip((*self.buckets, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if math.isinf(bound) else repr(float(bound)), float(total)))
        return out


class _Totals:
    """Everything counted for one (direction, listener), across the listeners' lives."""

    __slots__ = ("accept_pauses", "active", "bytes", "dial", "duration", "outcomes", "refusals")

    def __init__(self) -> None:
        self.accept_pauses = 0
        self.outcomes = dict.fromkeys(Outcome, 0)
        self.refusals: dict[str, int] = {}
        self.active = 0
        self.bytes = [0, 0]  # toward the destination, toward the source
        self.dial = _Histogram(_STEP_BUCKETS)
        self.duration = _Histogram(_DURATION_BUCKETS)


class ProxyMetrics:
    """The proxy's metrics and access log, for the life of the process.

    Counts live in plain numbers per (direction, listener), updated by the listeners'
    observers on the event loop, and are read into the registry's text exposition by a
    collector at scrape time.

    Args:
        access_log: write one log line per connection (info; refusals at warning).
        throttle_window: seconds during which identical refusals are counted, not logged.
    """

    def __init__(self, *, access_log: bool = True, throttle_window: float = 5.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.access_log = access_log
        self.telemetry: Telemetry | None = None
        self.throttle: Throttle[tuple[str, str, str, str]] = Throttle(throttle_window)
        self.recent_refusals: collections.deque[Connection] = collections.deque(
            maxlen=RECENT_REFUSALS
        )
        self.observers: list[ListenerObserver] = []
        self.totals: dict[tuple[str, str], _Totals] = {}
        self.handshake = {direction: _Histogram(_STEP_BUCKETS) for direction in (INBOUND, UPSTREAM)}
        # Completed TLS handshakes by direction: [full, resumed].
        self.sessions = {direction: [0, 0] for direction in (INBOUND, UPSTREAM)}
        self.authorize = _Histogram(_STEP_BUCKETS)
        self._leaf_not_after: Callable[[], float | None] = lambda: None
        self.cache_counts: Callable[[], dict[str, int] | None] = lambda: None
        r = self.registry
        r.register(_Collector(self))
        leaf = Gauge(
            "connect_proxy_leaf_expiry_seconds",
            "Seconds until the leaf certificate in use expires (NaN before one is loaded).",
            registry=r,
        )
        leaf.set_function(self._leaf_expiry)
        self.ready = Gauge(
            "connect_proxy_ready", "1 while the proxy is ready to serve, else 0.", registry=r
        )

    # -- wiring --------------------------------------------------------------------------

    def use_telemetry(self, telemetry: Telemetry) -> None:
        """Feed Consul's names to `telemetry` from now on (its Prometheus series too)."""
        self.telemetry = telemetry
        self.registry.register(telemetry.collector())

    def follow_leaf(self, not_after: Callable[[], float | None]) -> None:
        """Where the leaf's expiry time (POSIX seconds) is read at each scrape."""
        self._leaf_not_after = not_after

    def follow_authorize_cache(self, counts: Callable[[], dict[str, int] | None]) -> None:
        """Where the authorize cache's counts (`proxy.authzcache.CacheCounts`) are read at
        each scrape; None: no cache, no series."""
        self.cache_counts = counts

    def _leaf_expiry(self) -> float:
        expiry = self._leaf_not_after()
        return float("nan") if expiry is None else expiry - time.time()

    def observer(
        self,
        direction: str,
        listener: str,
        *,
        service: str,
        destination_type: str = "service",
    ) -> ListenerObserver:
        """The observer of one listener (inbound for `service`, or an upstream to `listener`)."""
        if direction == INBOUND:
            labels: Labels = (("dst", service),)
        else:
            labels = (("src", service), ("dst_type", destination_type), ("dst", listener))
        totals = self.totals.setdefault((direction, listener), _Totals())
        observer = ListenerObserver(self, direction, listener, labels, totals)
        self.observers.append(observer)
        return observer

    def forget(self, observer: ListenerObserver) -> None:
        """A listener is gone for good (its connections have finished; its counts stay)."""
        if observer in self.observers:
            self.observers.remove(observer)

    # -- periodic work -------------------------------------------------------------------

    def flush(self) -> None:
        """Report the bytes of open connections and the throttled refusals' summaries."""
        for observer in self.observers:
            observer.flush()
        for key, count, window in self.throttle.summaries():
            direction, listener, reason, detail = key
            logging.getLogger(f"proxy.{direction}").warning(
                "%d more connections refused like the last one in %.0fs",
                count,
                window,
                extra={
                    "fields": {
                        "listener": listener,
                        "reason": reason,
                        "error": detail,
                        "suppressed": count,
                    }
                },
            )

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Flush every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.flush()

    def dump(self) -> str:
        """The metrics as Consul's proxy prints them on SIGUSR1 (its in-memory sink), then
        ours in the Prometheus text format."""
        self.flush()
        consul = self.telemetry.dump() if self.telemetry is not None else ""
        return consul + generate_latest(self.registry).decode()

    def exposition(self) -> bytes:
        """The Prometheus text exposition, counts of open connections included."""
        self.flush()
        return generate_latest(self.registry)


class _Collector:
    """Our series, read from the totals at each scrape."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.metrics
        pair = ["direction", "listener"]
        connections = CounterMetricFamily(
            "connect_proxy_connections",
            "Connections handled, by how they ended (forwarded, refused, closed by the client "
            "before a decision).",
            labels=[*pair, "outcome"],
        )
        refused = CounterMetricFamily(
            "connect_proxy_refused_connections",
            "Connections closed without being forwarded, by reason.",
            labels=[*pair, "reason"],
        )
        active = GaugeMetricFamily(
            "connect_proxy_active_connections", "Connections forwarding right now.", labels=pair
        )
        forwarded = CounterMetricFamily(
            "connect_proxy_bytes",
            "Bytes forwarded, toward the destination (the app or the upstream instance) or "
            "back toward the source.",
            labels=[*pair, "toward"],
        )
        dial = HistogramMetricFamily(
            "connect_proxy_dial_seconds",
            "Dials of the destination: the local app (inbound), or resolve, connect, TLS and "
            "identity check of an upstream instance (upstream).",
            labels=pair,
        )
        duration = HistogramMetricFamily(
            "connect_proxy_connection_duration_seconds",
            "Lifetimes of forwarded connections.",
            labels=pair,
        )
        pauses = CounterMetricFamily(
            "connect_proxy_accept_pauses",
            "Times accepting paused for want of descriptors (EMFILE, ENFILE), each pause of a "
            "backoff counted.",
            labels=pair,
        )
        for (direction, listener), t in sorted(m.totals.items()):
            pauses.add_metric([direction, listener], t.accept_pauses)
            for outcome, count in t.outcomes.items():
                connections.add_metric([direction, listener, outcome.value], count)
            for reason, count in sorted(t.refusals.items()):
                refused.add_metric([direction, listener, reason], count)
            active.add_metric([direction, listener], t.active)
            forwarded.add_metric([direction, listener, "destination"], t.bytes[0])
            forwarded.add_metric([direction, listener, "source"], t.bytes[1])
            dial.add_metric([direction, listener], t.dial.cumulative(), t.dial.sum)
            duration.add_metric([direction, listener], t.duration.cumulative(), t.duration.sum)
        handshake = HistogramMetricFamily(
            "connect_proxy_tls_handshake_seconds",
            "TLS handshakes: inbound as server, upstream as client.",
            labels=["direction"],
        )
        for direction, h in m.handshake.items():
            handshake.add_metric([direction], h.cumulative(), h.sum)
        completed = CounterMetricFamily(
            "connect_proxy_tls_handshakes_completed",
            "TLS handshakes completed, by whether they resumed a session (inbound: a client "
            "of ours that dialled this proxy before; upstream: a session kept per instance).",
            labels=["direction", "resumed"],
        )
        for direction, (full, resumed) in m.sessions.items():
            completed.add_metric([direction, "false"], full)
            completed.add_metric([direction, "true"], resumed)
        authorize = HistogramMetricFamily(
            "connect_proxy_authorize_seconds",
            "Authorize calls to the agent for inbound connections.",
        )
        authorize.add_metric([], m.authorize.cumulative(), m.authorize.sum)
        chains = CounterMetricFamily(
            "connect_proxy_tls_chain_checks",
            "Answers of the openssl engine's verify callback about peer chains, one or two per "
            "full handshake: known (the same chain passed a full check against the roots "
            "before), verified (it passed one now), refused. This process, every listener.",
            labels=["result"],
        )
        for result in ("known", "verified", "refused"):
            chains.add_metric([result], getattr(CHECKS, result))
        found: list[Metric] = [connections, refused, active, forwarded, handshake, completed]
        found += [chains, authorize]
        found += [dial, duration, pauses, *_cache_series(m.cache_counts())]
        return found


def _cache_series(counts: dict[str, int] | None) -> list[Metric]:
    if counts is None:
        return []
    lookups = CounterMetricFamily(
        "connect_proxy_authorize_cache_lookups",
        "Inbound authorize decisions by how they were had: hit (the cache), shared (another "
        "connection's call in flight), miss (a call, its answer kept), bypass (a call: the "
        "intentions watch is not current).",
        labels=["result"],
    )
    for result, key in (("hit", "hits"), ("shared", "shared"), ("miss", "misses")):
        lookups.add_metric([result], counts[key])
    lookups.add_metric(["bypass"], counts["bypasses"])
    discarded = CounterMetricFamily(
        "connect_proxy_authorize_cache_discarded",
        "Answers used once and not kept: asked before an intentions or roots change and "
        "arrived after it (changed), or not what the watched intentions say (disagreed).",
        labels=["reason"],
    )
    discarded.add_metric(["changed"], counts["discarded"])
    discarded.add_metric(["disagreed"], counts["disagreed"])
    entries = GaugeMetricFamily(
        "connect_proxy_authorize_cache_entries", "Client identities whose decision is cached."
    )
    entries.add_metric([], counts["entries"])
    return [lookups, discarded, entries]


class ListenerObserver:
    """Counts one listener's connections in our series and Consul's, and logs them."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        direction: str,
        listener: str,
        labels: Labels,
        totals: _Totals,
    ) -> None:
        self.metrics = metrics
        self.direction = direction
        self.listener = listener
        self.log = logging.getLogger(f"proxy.{direction}")
        self.consul_labels = labels
        self.totals = totals
        self._handshake = metrics.handshake[direction]
        self._conns_key = (direction, "conns")
        self._tx_key = (direction, "tx_bytes")
        self._rx_key = (direction, "rx_bytes")
        # Open forwarding connections -> bytes (to destination, to source) already reported.
        self.live: dict[Connection, list[int]] = {}

    def forwarding(self, conn: Connection) -> None:
        self.live[conn] = [0, 0]
        self.totals.active += 1
        if (telemetry := self.metrics.telemetry) is not None:
            telemetry.set_gauge(self._conns_key, len(self.live), self.consul_labels)

    def accept_paused(self) -> None:
        self.totals.accept_pauses += 1

    def finished(self, conn: Connection) -> None:
        try:
            self._finished(conn)
        except Exception:  # an observer must never break a connection's handler
            self.log.exception("metrics failed for a connection")

    def _finished(self, conn: Connection) -> None:
        metrics = self.metrics
        totals = self.totals
        outcome = conn.outcome
        totals.outcomes[outcome] += 1
        if conn.handshake is not None:
            self._handshake.observe(conn.handshake)
        if conn.resumed is not None:
            metrics.sessions[self.direction][conn.resumed] += 1
        if conn.authorize is not None:
            metrics.authorize.observe(conn.authorize)
        if conn.dial is not None:
            totals.dial.observe(conn.dial)
        if conn in self.live:
            self._report(conn)
            del self.live[conn]
            totals.active -= 1
            if conn.duration is not None:
                totals.duration.observe(conn.duration)
            if (telemetry := metrics.telemetry) is not None:
                telemetry.set_gauge(self._conns_key, len(self.live), self.consul_labels)
        if conn.refusal is not None:
            reason = conn.refusal.value
            totals.refusals[reason] = totals.refusals.get(reason, 0) + 1
            metrics.recent_refusals.append(conn)
        if metrics.access_log:
            self._log(conn, outcome)

    def flush(self) -> None:
        for conn in self.live:
            self._report(conn)

    def _report(self, conn: Connection) -> None:
        """Count the bytes `conn` moved since its last report (only positive deltas)."""
        reported = self.live[conn]
        to_dst, to_src = conn.to_destination, conn.to_source
        d_dst, d_src = to_dst - reported[0], to_src - reported[1]
        if d_dst <= 0 and d_src <= 0:
            return
        reported[0], reported[1] = to_dst, to_src
        counted = self.totals.bytes
        telemetry = self.metrics.telemetry
        if d_dst > 0:
            counted[0] += d_dst
            if telemetry is not None:
                telemetry.incr_counter(self._rx_key, d_dst, self.consul_labels)
        if d_src > 0:
            counted[1] += d_src
            if telemetry is not None:
                telemetry.incr_counter(self._tx_key, d_src, self.consul_labels)

    # -- access log ----------------------------------------------------------------------

    def _log(self, conn: Connection, outcome: Outcome) -> None:
        if outcome is Outcome.CLOSED:
            level = logging.DEBUG  # a TCP health check, or a client that gave up
        elif outcome is Outcome.FORWARDED:
            level = logging.INFO
        else:
            level = logging.WARNING if conn.refusal in _WARNINGS else logging.INFO
        if not self.log.isEnabledFor(level):
            return
        if conn.refusal is not None:
            key = (self.direction, self.listener, conn.refusal.value, conn.detail)
            if not self.metrics.throttle.admit(key):
                return
        log_fields(self.log, level, "connection " + outcome.value, access_fields(conn))


# Refusals that point at a problem on this side (the app, the mesh's instances), not at a
# client that is not welcome.
_WARNINGS = frozenset(
    {
        Refusal.APP_DIAL_FAILED,
        Refusal.AUTHORIZE_FAILED,
        Refusal.NO_HEALTHY_INSTANCE,
        Refusal.OVER_CONNECTION_LIMIT,
        Refusal.OVER_HANDSHAKE_LIMIT,
        Refusal.UPSTREAM_DIAL_FAILED,
        Refusal.WRONG_SERVER_IDENTITY,
    }
)


def access_fields(conn: Connection) -> dict[str, Any]:
    """The access log's fields of one connection (also the admin endpoint's rows)."""
    fields: dict[str, Any] = {
        "direction": conn.direction,
        "listener": conn.listener,
        "src": conn.source,
        "peer": conn.peer_id,
        "dst": conn.destination,
        "decision": conn.outcome.value,
        "reason": conn.refusal.value if conn.refusal is not None else "",
        "detail": conn.detail,
        "bytes_to_dst": conn.to_destination,
        "bytes_to_src": conn.to_source,
        "handshake_ms": _ms(conn.handshake),
        "authorize_ms": _ms(conn.authorize),
        "dial_ms": _ms(conn.dial),
        "duration_ms": _ms(conn.age()),
    }
    return fields
