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
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from listeners.events import INBOUND, Connection, Outcome, Refusal
from proxy.throttle import Throttle

FLUSH_INTERVAL = 5.0  # seconds between byte-count reports of open connections, as Consul
RECENT_REFUSALS = 20

# Sub-millisecond to seconds: a handshake on loopback takes ~1 ms, across a WAN ~100 ms.
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DURATION_BUCKETS = (0.001, 0.01, 0.1, 1, 10, 60, 300, 1800, 3600, 14400)

Labels = tuple[tuple[str, str], ...]


class Telemetry(Protocol):
    """Consul's telemetry sinks (`proxy.telemetry.Telemetry`), as go-metrics is called."""

    def set_gauge(
        self, key: Sequence[str], value: float, labels: Sequence[tuple[str, str]] = ()
    ) -> None: ...
    def incr_counter(
        self, key: Sequence[str], value: float, labels: Sequence[tuple[str, str]] = ()
    ) -> None: ...
    def collector(self) -> Collector: ...
    def dump(self) -> str: ...


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class ProxyMetrics:
    """The proxy's metrics and access log, for the life of the process.

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
        self._leaf_not_after: Callable[[], float | None] = lambda: None
        self._instances: dict[str, Callable[[], int | None]] = {}
        r = self.registry
        self.connections = Counter(
            "connect_proxy_connections",
            "Connections handled, by how they ended (forwarded, refused, closed by the client "
            "before a decision).",
            ["direction", "listener", "outcome"],
            registry=r,
        )
        self.refused = Counter(
            "connect_proxy_refused_connections",
            "Connections closed without being forwarded, by reason.",
            ["direction", "listener", "reason"],
            registry=r,
        )
        self.active = Gauge(
            "connect_proxy_active_connections",
            "Connections forwarding right now.",
            ["direction", "listener"],
            registry=r,
        )
        self.bytes = Counter(
            "connect_proxy_bytes",
            "Bytes forwarded, toward the destination (the app or the upstream instance) or "
            "back toward the source.",
            ["direction", "listener", "toward"],
            registry=r,
        )
        self.handshake = Histogram(
            "connect_proxy_tls_handshake_seconds",
            "TLS handshakes: inbound as server, upstream as client.",
            ["direction"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.authorize = Histogram(
            "connect_proxy_authorize_seconds",
            "Authorize calls to the agent for inbound connections.",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.dial = Histogram(
            "connect_proxy_dial_seconds",
            "Dials of the destination: the local app (inbound), or resolve, connect, TLS and "
            "identity check of an upstream instance (upstream).",
            ["direction", "listener"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "connect_proxy_connection_duration_seconds",
            "Lifetimes of forwarded connections.",
            ["direction", "listener"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        leaf = Gauge(
            "connect_proxy_leaf_expiry_seconds",
            "Seconds until the leaf certificate in use expires (absent before one is loaded).",
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
        observer = ListenerObserver(self, direction, listener, labels)
        self.observers.append(observer)
        return observer

    def forget(self, observer: ListenerObserver) -> None:
        """A listener is gone for good (its connections have finished)."""
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


class ListenerObserver:
    """Counts one listener's connections in our series and Consul's, and logs them."""

    def __init__(
        self, metrics: ProxyMetrics, direction: str, listener: str, labels: Labels
    ) -> None:
        self.metrics = metrics
        self.direction = direction
        self.listener = listener
        self.log = logging.getLogger(f"proxy.{direction}")
        self.consul_labels = labels
        # The series' children, looked up once (a labels() call costs a dict walk and a lock).
        self._active = metrics.active.labels(direction, listener)
        self._to_destination = metrics.bytes.labels(direction, listener, "destination")
        self._to_source = metrics.bytes.labels(direction, listener, "source")
        self._outcomes = {
            outcome: metrics.connections.labels(direction, listener, outcome.value)
            for outcome in Outcome
        }
        self._handshake = metrics.handshake.labels(direction)
        self._dial = metrics.dial.labels(direction, listener)
        self._duration = metrics.duration.labels(direction, listener)
        # Open forwarding connections -> bytes (to destination, to source) already reported.
        self.live: dict[Connection, list[int]] = {}

    def forwarding(self, conn: Connection) -> None:
        self.live[conn] = [0, 0]
        self._active.inc()
        if (telemetry := self.metrics.telemetry) is not None:
            telemetry.set_gauge((self.direction, "conns"), len(self.live), self.consul_labels)

    def finished(self, conn: Connection) -> None:
        try:
            self._finished(conn)
        except Exception:  # an observer must never break a connection's handler
            self.log.exception("metrics failed for a connection")

    def _finished(self, conn: Connection) -> None:
        metrics = self.metrics
        outcome = conn.outcome
        self._outcomes[outcome].inc()
        if conn.handshake is not None:
            self._handshake.observe(conn.handshake)
        if conn.authorize is not None:
            metrics.authorize.observe(conn.authorize)
        if conn.dial is not None:
            self._dial.observe(conn.dial)
        if conn in self.live:
            self._report(conn)
            del self.live[conn]
            self._active.dec()
            if conn.duration is not None:
                self._duration.observe(conn.duration)
            if (telemetry := metrics.telemetry) is not None:
                telemetry.set_gauge((self.direction, "conns"), len(self.live), self.consul_labels)
        if conn.refusal is not None:
            metrics.refused.labels(self.direction, self.listener, conn.refusal.value).inc()
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
        telemetry = self.metrics.telemetry
        if d_dst > 0:
            self._to_destination.inc(d_dst)
            if telemetry is not None:
                telemetry.incr_counter((self.direction, "rx_bytes"), d_dst, self.consul_labels)
        if d_src > 0:
            self._to_source.inc(d_src)
            if telemetry is not None:
                telemetry.incr_counter((self.direction, "tx_bytes"), d_src, self.consul_labels)

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
        self.log.log(level, "connection %s", outcome.value, extra={"fields": access_fields(conn)})


# Refusals that point at a problem on this side (the app, the mesh's instances), not at a
# client that is not welcome.
_WARNINGS = frozenset(
    {
        Refusal.APP_DIAL_FAILED,
        Refusal.AUTHORIZE_FAILED,
        Refusal.NO_HEALTHY_INSTANCE,
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
