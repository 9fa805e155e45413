"""The wire formats of Consul's telemetry sinks, as go-metrics writes them.

Owns the naming and formatting per sink of one metric (`describe`), the in-memory sink and
its SIGUSR1 text, the packing of statsd and dogstatsd lines into UDP datagrams, and the
Prometheus series with their expiry. `proxy.telemetry` drives them. Sources: armon/go-metrics
v0.3 (`statsd.go`, `inmem.go`, `inmem_signal.go`, `datadog/dogstatsd.go`,
`prometheus/prometheus.go`) and the datadog-go v3.2 client it pins (`statsd/format.go`,
`statsd/buffer.go`).

Rule 1: no I/O but `UdpSink`'s; nothing here raises into a metric call.
Rule 2: a format changes only with the test that pins it against the Go source.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass
from decimal import Decimal

from prometheus_client.metrics_core import Metric

from proxy.addr import split_host_port
from proxy.errors import ConfigError

log = logging.getLogger("proxy.telemetry")

GAUGE, COUNTER, SAMPLE = 0, 1, 2
STATSD_MAX = 1400  # go-metrics statsdMaxLen
DOGSTATSD_MAX = 1432  # datadog-go OptimalUDPPayloadSize
_INMEM_INTERVAL = 10.0  # Consul: NewInmemSink(10*time.Second, time.Minute)
_INMEM_KEEP = 6
_SUMMARY_MAX_AGE = 10.0  # go-metrics' Prometheus summaries: MaxAge 10 s
_QUANTILES = (("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99))
_MAX_DATAGRAMS = 256  # datagrams kept for a sink that is not sending (before start)
_ERROR_EVERY = 5.0

_F32 = struct.Struct("f")
_SANITIZE = str.maketrans({":": "_", " ": "_"})
_PROM_FORBIDDEN = re.compile(r"[ .=\-/]")
_PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_PROM_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# -- formatting, as Go prints ---------------------------------------------------------------


def f32(value: float) -> float:
    try:
        result: float = _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)
    return result


def go_fixed(value: float, precision: int) -> str:
    """Go's `%.<precision>f`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:.{precision}f}"


def go_shortest(value: float) -> str:
    """Go's strconv.FormatFloat(v, 'f', -1, 64): the shortest digits, never an exponent."""
    if not math.isfinite(value):
        return go_fixed(value, 0)
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def go_int64(value: float) -> int:
    return int(value) if math.isfinite(value) and abs(value) < 2**63 else -(2**63)


def go_time(t: float) -> str:
    """Go's time.Time.String() of a wall time (without the monotonic reading)."""
    micros = round(t * 1_000_000)
    seconds, micro = divmod(micros, 1_000_000)
    tm = time.localtime(seconds)
    fraction = f".{micro:06d}".rstrip("0") if micro else ""
    offset = tm.tm_gmtoff or 0
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", tm)
    return f"{stamp}{fraction} {sign}{hours:02d}{minutes:02d} {tm.tm_zone}"


# -- the in-memory sink ----------------------------------------------------------------------


class Aggregate:
    """go-metrics' AggregateSample: count, sum, min, max and the spread of one key."""

    __slots__ = ("count", "last", "max", "min", "sum", "sumsq")

    def __init__(self) -> None:
        self.count = 0
        self.sum = self.sumsq = self.min = self.max = self.last = 0.0

    def ingest(self, value: float, t: float) -> None:
        self.count += 1
        self.sum += value
        self.sumsq += value * value
        if value < self.min or self.count == 1:
            self.min = value
        if value > self.max or self.count == 1:
            self.max = value
        self.last = t

    def stddev(self) -> float:
        div = float(self.count * (self.count - 1))
        if div == 0:
            return 0.0
        ratio = (self.count * self.sumsq - self.sum**2) / div
        return math.sqrt(ratio) if ratio >= 0 else math.nan

    def text(self) -> str:
        if self.count == 0:
            return "Count: 0"
        updated = go_time(self.last)
        stddev = self.stddev()
        if stddev == 0:
            return f"Count: {self.count} Sum: {go_fixed(self.sum, 3)} LastUpdated: {updated}"
        mean = self.sum / self.count
        figures = " ".join(
            f"{name}: {go_fixed(v, 3)}"
            for name, v in (
                ("Min", self.min),
                ("Mean", mean),
                ("Max", self.max),
                ("Stddev", stddev),
                ("Sum", self.sum),
            )
        )
        return f"Count: {self.count} {figures} LastUpdated: {updated}"


class Interval:
    __slots__ = ("counters", "gauges", "samples", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.gauges: dict[str, tuple[str, float]] = {}
        self.counters: dict[str, tuple[str, Aggregate]] = {}
        self.samples: dict[str, tuple[str, Aggregate]] = {}


# -- datagrams -------------------------------------------------------------------------------


class Packer:
    """Lines packed into datagrams as the Go clients pack them.

    statsd (`joined=False`): every line ends in a newline; a line that would overflow the
    limit ships the buffer first (a single longer line still goes out alone). datadog-go
    (`joined=True`): lines are separated by newlines; a line longer than the limit is dropped.
    """

    def __init__(self, limit: int, *, joined: bool) -> None:
        self.limit = limit
        self.joined = joined
        self.ready: list[bytes] = []
        self._buf = bytearray()

    def add(self, line: bytes) -> None:
        extra = 1 if self.joined and self._buf else 0
        if len(self._buf) + extra + len(line) > self.limit:
            self.cut()
            extra = 0
            if self.joined and len(line) > self.limit:
                return
        if extra:
            self._buf += b"\n"
        self._buf += line

    def cut(self) -> None:
        if self._buf:
            if len(self.ready) < _MAX_DATAGRAMS:
                self.ready.append(bytes(self._buf))
            self._buf.clear()


class UdpSink:
    """One connected UDP socket and its packer; sends never raise (Rule 2)."""

    def __init__(self, name: str, key: str, address: str, packer: Packer) -> None:
        self.name, self.key, self.address, self.packer = name, key, address, packer
        self.sock: socket.socket | None = None
        self._next_report = -math.inf

    async def open(self) -> None:
        host, port = split_host_port(self.address, f"telemetry.{self.key}")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host or "127.0.0.1", port, type=socket.SOCK_DGRAM)
            family, kind, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"telemetry.{self.key}: cannot use {self.address!r}: {exc}") from exc
        try:
            sock.setblocking(False)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"telemetry.{self.key}: cannot use {self.address!r}: {exc}") from exc
        self.sock = sock

    def send(self) -> None:
        self.packer.cut()
        datagrams, self.packer.ready = self.packer.ready, []
        if self.sock is None:
            self.packer.ready = datagrams
            return
        for datagram in datagrams:
            try:
                self.sock.send(datagram)
            except OSError as exc:  # ICMP refused, full buffer: the datagram is lost
                now = time.monotonic()
                if now >= self._next_report:
                    self._next_report = now + _ERROR_EVERY
                    log.debug(
                        "telemetry: sending to %s at %s failed: %s", self.name, self.address, exc
                    )

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# -- series ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Series:
    """Everything a sink needs of one (kind, key, labels), computed once."""

    kind: int
    inmem_key: str
    dump_name: str
    statsd: tuple[str, str]
    dogstatsd: tuple[str, str]
    prom_id: tuple[int, str]
    prom_name: str
    prom_labels: dict[str, str]


class PromSeries:
    __slots__ = ("count", "kind", "labels", "name", "sum", "updated", "value", "window")

    def __init__(self, kind: int, name: str, labels: dict[str, str]) -> None:
        self.kind, self.name, self.labels = kind, name, labels
        self.value = self.sum = self.updated = 0.0
        self.count = 0
        self.window: deque[tuple[float, float]] = deque()

    def record(self, value: float, t: float) -> None:
        self.updated = t
        if self.kind == GAUGE:
            self.value = value
        elif self.kind == COUNTER:
            if value >= 0:  # client_golang refuses (panics on) a counter that decreases
                self.value += value
        else:
            self.count += 1
            self.sum += value
            self.window.append((t, value))
            while self.window and self.window[0][0] <= t - _SUMMARY_MAX_AGE:
                self.window.popleft()

    def quantiles(self, now: float) -> list[tuple[str, float]]:
        recent = sorted(v for t, v in self.window if t > now - _SUMMARY_MAX_AGE)
        if not recent:
            return [(label, math.nan) for label, _ in _QUANTILES]
        n = len(recent)
        return [(label, recent[max(0, math.ceil(q * n) - 1)]) for label, q in _QUANTILES]


def describe(
    kind: int,
    parts: tuple[str, ...],
    labels: tuple[tuple[str, str], ...],
    *,
    hostname: str,
    dog_tags: tuple[str, ...],
) -> Series:
    """Name one metric for every sink; `parts` is the full key (prefix, hostname, key)."""
    name = ".".join(parts).replace(" ", "_")
    inmem_key = name + "".join(f";{n}={v}".replace(" ", "_") for n, v in labels)
    dump_name = name + "".join("." + v.translate(_SANITIZE) for _, v in labels)
    # statsd (flattenKeyLabels): label values join the key.
    flat = ".".join((*parts, *(v for _, v in labels))).translate(_SANITIZE)
    # dogstatsd: the first key part equal to the hostname is spliced out; labels are tags,
    # after the global tags (datadog-go appendTags).
    dog_parts = list(parts)
    if hostname in dog_parts:
        dog_parts.remove(hostname)
    tags = list(dog_tags)
    for n, v in labels:
        n, v = n.translate(_SANITIZE).replace("\n", ""), v.translate(_SANITIZE).replace("\n", "")
        tags.append(f"{n}:{v}" if v else n)
    dog_suffix = ("|g", "|c", "|ms")[kind] + ("|#" + ",".join(tags) if tags else "")
    prom_name = _PROM_FORBIDDEN.sub("_", "_".join(parts))
    return Series(
        kind=kind,
        inmem_key=inmem_key,
        dump_name=dump_name,
        statsd=(flat + ":", ("|g\n", "|c\n", "|ms\n")[kind]),
        dogstatsd=(".".join(dog_parts).translate(_SANITIZE) + ":", dog_suffix),
        prom_id=(kind, prom_name + "".join(f";{n}={v}" for n, v in labels)),
        prom_name=prom_name,
        prom_labels=dict(sorted(dict(labels).items())),  # client_golang sorts label pairs
    )


def statsd_line(series: Series, value: float) -> bytes:
    return f"{series.statsd[0]}{go_fixed(value, 6)}{series.statsd[1]}".encode()


def dogstatsd_line(series: Series, value: float) -> bytes:
    if series.kind == GAUGE:
        text = go_shortest(value)  # datadog-go: FormatFloat(v, 'f', -1, 64)
    elif series.kind == COUNTER:
        text = str(go_int64(value))  # go-metrics: client.Count(key, int64(val))
    else:
        text = go_fixed(value, 6)  # datadog-go: timings with 6 decimals
    return f"{series.dogstatsd[0]}{text}{series.dogstatsd[1]}".encode()


class InmemSink:
    """go-metrics' InmemSink as Consul sets it up: 10 s intervals, the last minute kept."""

    def __init__(self) -> None:
        self._intervals: list[Interval] = []

    def interval(self, t: float) -> Interval:
        start = math.floor(t / _INMEM_INTERVAL) * _INMEM_INTERVAL
        if not self._intervals or self._intervals[-1].start != start:
            self._intervals.append(Interval(start))
            del self._intervals[:-_INMEM_KEEP]
        return self._intervals[-1]

    def record(self, series: Series, value: float, t: float) -> None:
        interval = self.interval(t)
        if series.kind == GAUGE:
            interval.gauges[series.inmem_key] = (series.dump_name, value)
            return
        table = interval.counters if series.kind == COUNTER else interval.samples
        entry = table.get(series.inmem_key)
        if entry is None:
            entry = table[series.inmem_key] = (series.dump_name, Aggregate())
        entry[1].ingest(value, t)

    def dump(self, now: float) -> str:
        """inmem_signal.go's text of the completed intervals (not the one at `now`)."""
        self.interval(now)
        lines: list[str] = []
        for interval in self._intervals[:-1]:
            stamp = go_time(interval.start)
            for _, (name, value) in sorted(interval.gauges.items()):
                lines.append(f"[{stamp}][G] '{name}': {go_fixed(value, 3)}\n")
            for tag, table in (("C", interval.counters), ("S", interval.samples)):
                for _, (name, agg) in sorted(table.items()):
                    lines.append(f"[{stamp}][{tag}] '{name}': {agg.text()}\n")
        return "".join(lines)


def prometheus_families(
    table: dict[tuple[int, str], PromSeries], retention: float, now: float, bad_names: set[str]
) -> list[Metric]:
    """The live series of `table` as metric families; expired series are deleted from it.

    Families and series are sorted as client_golang's Gather sorts them. Counters are
    exposed untyped so that their names stay go-metrics' names: prometheus_client names a
    counter family `<name>_total`.
    """
    families: dict[tuple[str, int], Metric] = {}

    def order(item: tuple[tuple[int, str], PromSeries]) -> tuple[str, int, list[tuple[str, str]]]:
        return item[1].name, item[1].kind, sorted(item[1].labels.items())

    for prom_id, series in sorted(table.items(), key=order):
        if series.updated + retention < now:
            del table[prom_id]
            continue
        if not (_PROM_NAME.match(series.name) and all(map(_PROM_LABEL.match, series.labels))):
            if series.name not in bad_names:
                bad_names.add(series.name)
                log.debug("telemetry: %r is not a Prometheus name; not exposed", series.name)
            continue
        family = families.get((series.name, series.kind))
        if family is None:
            kind = ("gauge", "unknown", "summary")[series.kind]
            family = Metric(series.name, series.name, kind)
            families[(series.name, series.kind)] = family
        if series.kind == SAMPLE:
            for label, value in series.quantiles(now):
                family.add_sample(series.name, {**series.labels, "quantile": label}, value)
            family.add_sample(series.name + "_sum", series.labels, series.sum)
            family.add_sample(series.name + "_count", series.labels, float(series.count))
        else:
            family.add_sample(series.name, series.labels, series.value)
    return list(families.values())
