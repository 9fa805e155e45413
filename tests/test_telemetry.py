"""proxy.telemetry: Consul's telemetry map, and go-metrics' wire formats on real sockets.

The statsd and dogstatsd servers are UDP sockets on 127.0.0.1:0; the Prometheus side is a
real CollectorRegistry rendered by generate_latest. Time is an injected clock, never a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proxy.errors import ConfigError
from proxy.telemetry import Telemetry, TelemetryConfig, load_telemetry, unknown_keys
from tests.conftest import wait_until

DB = [("dst", "db")]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class UdpServer(asyncio.DatagramProtocol):
    """A statsd server: every datagram it receives, in order."""

    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[bytes] = asyncio.Queue()
        self.address = ""

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams.put_nowait(data)

    async def next(self) -> bytes:
        async with asyncio.timeout(5):
            return await self.datagrams.get()


@pytest.fixture
async def udp() -> AsyncIterator[UdpServer]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(UdpServer, local_addr=("127.0.0.1", 0))
    server.address = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    yield server
    transport.close()


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def scrape(telemetry: Telemetry) -> str:
    registry = CollectorRegistry()
    registry.register(telemetry.collector())
    return generate_latest(registry).decode()


# -- the telemetry map -----------------------------------------------------------------------


def test_load_telemetry_reads_consuls_keys() -> None:
    raw = {
        "metrics_prefix": "consul.proxy.web",
        "disable_hostname": True,
        "statsd_address": "127.0.0.1:8125",
        "statsite_address": "127.0.0.1:8126",
        "dogstatsd_addr": "[::1]:8127",
        "dogstatsd_tags": ["env:test", "team:a"],
        "prometheus_retention_time": "1m30s",
        "filter_default": False,
        "allowed_prefixes": ["consul.proxy.web.inbound"],
        "blocked_prefixes": ["consul.proxy.web.upstream"],
        "prefix_filter": ["+consul.proxy.web.runtime", "-consul.proxy.web.raft"],
    }
    assert load_telemetry(raw) == TelemetryConfig(
        metrics_prefix="consul.proxy.web",
        disable_hostname=True,
        statsd_address="127.0.0.1:8125",
        statsite_address="127.0.0.1:8126",
        dogstatsd_addr="[::1]:8127",
        dogstatsd_tags=("env:test", "team:a"),
        prometheus_retention=90.0,
        filter_default=False,
        allowed_prefixes=("consul.proxy.web.inbound", "consul.proxy.web.runtime"),
        blocked_prefixes=("consul.proxy.web.upstream", "consul.proxy.web.raft"),
    )


def test_an_empty_map_is_the_proxys_defaults_no_prefix_and_no_sinks() -> None:
    assert load_telemetry({}) == TelemetryConfig()
    assert Telemetry(TelemetryConfig(), hostname="h1").sinks == ()


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ({"prometheus_retention_time": "60s"}, 60.0),
        ({"prometheus_retention_time": "250ms"}, 0.25),
        ({"prometheus_retention_time": 45}, 45.0),
        ({"prometheus_retention_time": 0.5}, 0.5),
        ({"prometheus_retention_time": "0"}, 0.0),
        # What a Consul 1.3-1.5 agent serves to a managed proxy: the Go struct, nanoseconds.
        ({"PrometheusOpts": {"Expiration": 60_000_000_000, "Registerer": None}}, 60.0),
        ({"PrometheusOpts": {"Expiration": 0}}, 0.0),
        (
            {"prometheus_retention_time": "10s", "PrometheusOpts": {"Expiration": 60_000_000_000}},
            10.0,
        ),
    ],
)
def test_prometheus_retention_forms(raw: dict[str, Any], seconds: float) -> None:
    assert load_telemetry(raw).prometheus_retention == seconds


def test_keys_match_case_insensitively_and_the_exact_key_wins() -> None:
    assert load_telemetry({"Metrics_Prefix": "a"}).metrics_prefix == "a"
    assert load_telemetry({"METRICS_PREFIX": "b", "metrics_prefix": "a"}).metrics_prefix == "a"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "telemetry: expected a map, got a list"),
        (
            {"disable_hostname": "true"},
            "telemetry.disable_hostname: expected a boolean, got string 'true'",
        ),
        ({"filter_default": 1}, "telemetry.filter_default: expected a boolean, got number 1"),
        ({"metrics_prefix": 3}, "telemetry.metrics_prefix: expected a string, got number 3"),
        ({"statsd_address": None}, "telemetry.statsd_address: expected a string, got null"),
        (
            {"dogstatsd_tags": "env:test"},
            "telemetry.dogstatsd_tags: expected a list of strings, got string 'env:test'",
        ),
        (
            {"dogstatsd_tags": ["env:test", 3]},
            "telemetry.dogstatsd_tags[1]: expected a string, got number 3",
        ),
        (
            {"statsd_address": "localhost"},
            "telemetry.statsd_address: missing port in address 'localhost'",
        ),
        (
            {"statsd_address": "127.0.0.1:99999"},
            "telemetry.statsd_address: port out of range in address '127.0.0.1:99999'",
        ),
        (
            {"dogstatsd_addr": "127.0.0.1:0"},
            "telemetry.dogstatsd_addr: port 0 in address '127.0.0.1:0'",
        ),
        (
            {"dogstatsd_addr": "unix:///var/run/dd.sock"},
            "telemetry.dogstatsd_addr: unix sockets are not supported ('unix:///var/run/dd.sock'); use host:port",
        ),
        (
            {"prometheus_retention_time": "60"},
            'telemetry.prometheus_retention_time: time: invalid duration "60"',
        ),
        (
            {"prometheus_retention_time": "-1s"},
            "telemetry.prometheus_retention_time: must be a duration of 0 or more, got '-1s'",
        ),
        (
            {"prometheus_retention_time": True},
            'telemetry.prometheus_retention_time: expected a duration ("60s") or seconds, got boolean true',
        ),
        (
            {"prefix_filter": ["consul.raft"]},
            'telemetry.prefix_filter[0]: a rule must begin with "+" or "-", got \'consul.raft\'',
        ),
        (
            {"prefix_filter": [""]},
            'telemetry.prefix_filter[0]: a rule must begin with "+" or "-", got \'\'',
        ),
        (
            {"PrometheusOpts": {"Expiration": "60s"}},
            "telemetry.PrometheusOpts.Expiration: expected nanoseconds, got string '60s'",
        ),
    ],
)
def test_a_bad_value_names_its_key(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_telemetry(raw)
    assert str(caught.value) == message


def test_unknown_keys_are_listed_as_written() -> None:
    raw = {
        "circonus_api_token": "t",
        "statsd_address": "127.0.0.1:8125",
        "Disable": True,
        "Metrics_Prefix": "x",
    }
    assert unknown_keys(raw) == ["circonus_api_token", "Disable"]
    assert load_telemetry(raw).statsd_address == "127.0.0.1:8125"
    assert unknown_keys([]) == []


# -- statsd ----------------------------------------------------------------------------------


async def test_statsd_lines_as_go_metrics_writes_them(udp: UdpServer) -> None:
    config = TelemetryConfig(metrics_prefix="consul", statsd_address=udp.address)
    telemetry = Telemetry(config, hostname="h1")
    assert telemetry.sinks == ("statsd",)
    await telemetry.start()
    try:
        telemetry.set_gauge(["inbound", "conns"], 1, DB)
        telemetry.incr_counter(["inbound", "tx_bytes"], 11, DB)
        telemetry.add_sample(["inbound", "dial"], 1.5, DB)
        # float32, as go-metrics' API takes it: 2**24 + 1 is not a float32.
        telemetry.incr_counter(
            ["upstream", "rx_bytes"], 2**24 + 1, [("src", "web"), ("dst", "a b:c")]
        )
        telemetry.set_gauge(["cert", "ttl"], 0.1)
        assert await udp.next() == (
            b"consul.h1.inbound.conns.db:1.000000|g\n"
            b"consul.inbound.tx_bytes.db:11.000000|c\n"
            b"consul.inbound.dial.db:1.500000|ms\n"
            b"consul.upstream.rx_bytes.web.a_b_c:16777216.000000|c\n"
            b"consul.h1.cert.ttl:0.100000|g\n"
        )
    finally:
        await telemetry.aclose()


async def test_statsd_datagrams_hold_at_most_1400_bytes(udp: UdpServer) -> None:
    telemetry = Telemetry(TelemetryConfig(statsd_address=udp.address), hostname="h1")
    await telemetry.start()
    try:
        key = ["k" * 88]  # a line of exactly 100 bytes: 88 + len(":1.000000|c\n")
        for _ in range(30):
            telemetry.incr_counter(key, 1)
        sizes = [len(await udp.next()) for _ in range(3)]
        assert sizes == [1400, 1400, 200]
    finally:
        await telemetry.aclose()


async def test_aclose_sends_what_is_buffered_and_is_idempotent(udp: UdpServer) -> None:
    telemetry = Telemetry(TelemetryConfig(statsd_address=udp.address), hostname="h1")
    await telemetry.start()
    telemetry.incr_counter(["inbound", "rx_bytes"], 7, DB)
    await telemetry.aclose()
    assert await udp.next() == b"inbound.rx_bytes.db:7.000000|c\n"
    await telemetry.aclose()
    telemetry.incr_counter(["inbound", "rx_bytes"], 7, DB)  # after close: no socket, no error


async def test_a_closed_port_never_raises_and_is_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    telemetry = Telemetry(TelemetryConfig(statsd_address=f"127.0.0.1:{port}"), hostname="h1")
    caplog.set_level(logging.DEBUG, logger="proxy.telemetry")
    await telemetry.start()
    try:

        def refused() -> bool:
            # Each poll queues one more line, which a flush sends into the ICMP errors.
            telemetry.set_gauge(["inbound", "conns"], 1, DB)
            return any("sending to statsd" in r.getMessage() for r in caplog.records)

        await wait_until(refused)
        telemetry.set_gauge(["inbound", "conns"], 0, DB)
    finally:
        await telemetry.aclose()
    failures = [r for r in caplog.records if "sending to statsd" in r.getMessage()]
    assert len(failures) == 1  # at most once per 5 s
    assert failures[0].levelno == logging.DEBUG
    assert f"127.0.0.1:{port} failed" in failures[0].getMessage()


async def test_an_address_that_does_not_resolve_is_a_config_error_naming_it() -> None:
    config = TelemetryConfig(
        statsd_address="127.0.0.1:8125", dogstatsd_addr="no-such-host.invalid:8125"
    )
    telemetry = Telemetry(config, hostname="h1")
    with pytest.raises(
        ConfigError, match=r"^telemetry\.dogstatsd_addr: cannot use 'no-such-host\.invalid:8125': "
    ):
        await telemetry.start()
    await telemetry.aclose()


# -- when the flush runs ---------------------------------------------------------------------


class TimerLoop(asyncio.SelectorEventLoop):
    """Plain asyncio that keeps the timers it has yet to fire: each one is a wake-up."""

    def __init__(self) -> None:
        super().__init__()
        self.timers: set[asyncio.TimerHandle] = set()

    def call_at(
        self, when: float, callback: Callable[..., object], *args: object, context: Any = None
    ) -> asyncio.TimerHandle:
        def fire(*fired: object) -> None:
            self.timers.discard(handle)
            callback(*fired)

        handle = super().call_at(when, fire, *args, context=context)
        self.timers.add(handle)
        return handle

    def waiting(self) -> int:
        return sum(not handle.cancelled() for handle in self.timers)


def on_timer_loop(test: Callable[[TimerLoop, UdpServer], Awaitable[None]]) -> None:
    loop = TimerLoop()
    with asyncio.Runner(loop_factory=lambda: loop) as runner:

        async def main() -> None:
            transport, server = await loop.create_datagram_endpoint(
                UdpServer, local_addr=("127.0.0.1", 0)
            )
            server.address = f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
            try:
                await test(loop, server)
            finally:
                transport.close()

        runner.run(main())


def test_an_idle_telemetry_leaves_no_timer_and_a_call_arms_one_flush() -> None:
    async def check(loop: TimerLoop, udp: UdpServer) -> None:
        telemetry = Telemetry(TelemetryConfig(statsd_address=udp.address), hostname="h1")
        await telemetry.start()
        try:
            assert loop.waiting() == 0 and not telemetry.flush_scheduled
            telemetry.incr_counter(["inbound", "rx_bytes"], 7, DB)
            telemetry.incr_counter(["inbound", "tx_bytes"], 3, DB)
            assert loop.waiting() == 1 and telemetry.flush_scheduled
            assert await udp.next() == (
                b"inbound.rx_bytes.db:7.000000|c\ninbound.tx_bytes.db:3.000000|c\n"
            )
            # The flush that sent it has run, and nothing is pending: nothing to wake for.
            assert loop.waiting() == 0 and not telemetry.flush_scheduled
            telemetry.set_gauge(["inbound", "conns"], 0, DB)
            assert await udp.next() == b"h1.inbound.conns.db:0.000000|g\n"
            assert loop.waiting() == 0
        finally:
            await telemetry.aclose()
        assert loop.waiting() == 0

    on_timer_loop(check)


def test_calls_made_before_the_start_are_flushed_after_it() -> None:
    async def check(loop: TimerLoop, udp: UdpServer) -> None:
        telemetry = Telemetry(TelemetryConfig(statsd_address=udp.address), hostname="h1")
        telemetry.incr_counter(["inbound", "rx_bytes"], 7, DB)
        assert not telemetry.flush_scheduled
        await telemetry.start()
        try:
            assert telemetry.flush_scheduled
            assert await udp.next() == b"inbound.rx_bytes.db:7.000000|c\n"
        finally:
            await telemetry.aclose()

    on_timer_loop(check)


def test_a_drain_cut_short_by_a_bug_is_retried_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def check(loop: TimerLoop, udp: UdpServer) -> None:
        telemetry = Telemetry(TelemetryConfig(statsd_address=udp.address), hostname="h1")
        describe = telemetry._describe

        def buggy(kind: int, key: tuple[str, ...], labels: Any) -> Any:
            if key == ("bug",):
                raise RuntimeError("a bug in naming")
            return describe(kind, key, labels)

        telemetry._describe = buggy  # type: ignore[method-assign]
        await telemetry.start()
        try:
            telemetry.incr_counter(["bug"], 1)
            telemetry.incr_counter(["inbound", "rx_bytes"], 7, DB)
            # The first flush stops at the bug; the next one, armed again, sends the rest.
            assert await udp.next() == b"inbound.rx_bytes.db:7.000000|c\n"
            assert loop.waiting() == 0
        finally:
            await telemetry.aclose()
        assert any("metrics dropped" in r.getMessage() for r in caplog.records)

    on_timer_loop(check)


# -- dogstatsd -------------------------------------------------------------------------------


async def test_dogstatsd_messages_as_datadog_go_writes_them(udp: UdpServer) -> None:
    config = TelemetryConfig(
        metrics_prefix="consul", dogstatsd_addr=udp.address, dogstatsd_tags=("env:test",)
    )
    telemetry = Telemetry(config, hostname="h1")
    assert telemetry.sinks == ("dogstatsd",)
    await telemetry.start()
    try:
        telemetry.set_gauge(["inbound", "conns"], 1, DB)
        telemetry.incr_counter(["inbound", "tx_bytes"], 11.9, DB)  # Count(int64(val))
        telemetry.add_sample(["inbound", "dial"], 1.5, DB)
        telemetry.set_gauge(["cert", "ttl"], 0.1, [("flag", ""), ("a:b", "c d")])
        # Global tags first, then the metric's; the hostname is spliced out of the key, and
        # messages are separated by newlines, with none after the last.
        assert await udp.next() == (
            b"consul.inbound.conns:1|g|#env:test,dst:db\n"
            b"consul.inbound.tx_bytes:11|c|#env:test,dst:db\n"
            b"consul.inbound.dial:1.500000|ms|#env:test,dst:db\n"
            b"consul.cert.ttl:0.10000000149011612|g|#env:test,flag,a_b:c_d"
        )
    finally:
        await telemetry.aclose()


async def test_dogstatsd_datagrams_hold_at_most_1432_bytes(udp: UdpServer) -> None:
    telemetry = Telemetry(TelemetryConfig(dogstatsd_addr=udp.address), hostname="h1")
    await telemetry.start()
    try:
        key = ["k" * 96]  # a message of exactly 100 bytes: 96 + len(":1|c")
        for _ in range(20):
            telemetry.incr_counter(key, 1)
        telemetry.incr_counter(["k" * 1500], 1)  # longer than a payload: dropped
        sizes = [len(await udp.next()) for _ in range(2)]
        assert sizes == [14 * 100 + 13, 6 * 100 + 5]
    finally:
        await telemetry.aclose()
    assert udp.datagrams.empty()


# -- key building and the filter -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "line"),
    [
        # Consul forces the hostname off when no external sink runs: dump() shows it.
        (TelemetryConfig(metrics_prefix="consul"), None),
        (
            TelemetryConfig(metrics_prefix="consul", disable_hostname=True),
            b"consul.inbound.conns.db:1.000000|g\n",
        ),
        (TelemetryConfig(), b"h1.inbound.conns.db:1.000000|g\n"),
        (TelemetryConfig(metrics_prefix="consul"), b"consul.h1.inbound.conns.db:1.000000|g\n"),
    ],
)
async def test_the_hostname_goes_after_the_prefix_only_with_an_external_sink(
    udp: UdpServer, utc: None, config: TelemetryConfig, line: bytes | None
) -> None:
    clock = Clock(1_700_000_000.0)
    if line is not None:
        config = TelemetryConfig(
            metrics_prefix=config.metrics_prefix,
            disable_hostname=config.disable_hostname,
            statsd_address=udp.address,
        )
    telemetry = Telemetry(config, hostname="h1", clock=clock)
    await telemetry.start()
    telemetry.set_gauge(["inbound", "conns"], 1, DB)
    await telemetry.aclose()
    if line is None:
        clock.now += 10
        assert (
            telemetry.dump()
            == "[2023-11-14 22:13:20 +0000 UTC][G] 'consul.inbound.conns.db': 1.000\n"
        )
    else:
        assert await udp.next() == line


async def test_the_longest_matching_prefix_decides_then_filter_default(udp: UdpServer) -> None:
    config = TelemetryConfig(
        metrics_prefix="consul",
        statsd_address=udp.address,
        filter_default=False,
        allowed_prefixes=("consul.inbound", "consul.upstream.rx"),
        blocked_prefixes=("consul.inbound.tx", "consul.upstream.rx"),
    )
    telemetry = Telemetry(config, hostname="h1")
    await telemetry.start()
    telemetry.set_gauge(["inbound", "conns"], 1, DB)  # consul.h1.inbound...: no rule, default
    telemetry.incr_counter(["inbound", "rx_bytes"], 1, DB)  # allowed
    telemetry.incr_counter(["inbound", "tx_bytes"], 1, DB)  # the longer, blocking rule
    telemetry.incr_counter(["inboundx"], 1)  # prefixes are strings, not key parts
    telemetry.incr_counter(["upstream", "rx_bytes"], 1)  # in both lists: blocked
    await telemetry.aclose()
    assert (
        await udp.next() == b"consul.inbound.rx_bytes.db:1.000000|c\nconsul.inboundx:1.000000|c\n"
    )


# -- Prometheus ------------------------------------------------------------------------------


async def test_prometheus_series_have_go_metrics_names_and_expire() -> None:
    clock = Clock(1_700_000_000.0)
    config = TelemetryConfig(
        metrics_prefix="consul", disable_hostname=True, prometheus_retention=60.0
    )
    telemetry = Telemetry(config, hostname="h1", clock=clock)
    assert telemetry.sinks == ("prometheus",)
    telemetry.set_gauge(["inbound", "conns"], 1, DB)
    telemetry.incr_counter(["inbound", "tx_bytes"], 11, DB)
    telemetry.incr_counter(["inbound", "tx_bytes"], 11, DB)
    telemetry.incr_counter(
        ["upstream", "tx_bytes"], 5, [("src", "web"), ("dst_type", "service"), ("dst", "db")]
    )
    telemetry.add_sample(["inbound", "handshake-ms"], 3, DB)
    clock.now += 30
    telemetry.set_gauge(["inbound", "conns"], 0, DB)
    assert scrape(telemetry) == (
        "# HELP consul_inbound_conns consul_inbound_conns\n"
        "# TYPE consul_inbound_conns gauge\n"
        'consul_inbound_conns{dst="db"} 0.0\n'
        "# HELP consul_inbound_handshake_ms consul_inbound_handshake_ms\n"
        "# TYPE consul_inbound_handshake_ms summary\n"
        # no observation in the last 10 s: the quantiles are NaN, as client_golang's are
        'consul_inbound_handshake_ms{dst="db",quantile="0.5"} NaN\n'
        'consul_inbound_handshake_ms{dst="db",quantile="0.9"} NaN\n'
        'consul_inbound_handshake_ms{dst="db",quantile="0.99"} NaN\n'
        'consul_inbound_handshake_ms_sum{dst="db"} 3.0\n'
        'consul_inbound_handshake_ms_count{dst="db"} 1.0\n'
        "# HELP consul_inbound_tx_bytes consul_inbound_tx_bytes\n"
        "# TYPE consul_inbound_tx_bytes untyped\n"
        'consul_inbound_tx_bytes{dst="db"} 22.0\n'
        "# HELP consul_upstream_tx_bytes consul_upstream_tx_bytes\n"
        "# TYPE consul_upstream_tx_bytes untyped\n"
        'consul_upstream_tx_bytes{dst="db",dst_type="service",src="web"} 5.0\n'
    )
    clock.now += 30  # exactly the retention since the counters' last update: kept
    assert "consul_inbound_tx_bytes{" in scrape(telemetry)
    clock.now += 0.5
    assert scrape(telemetry) == (
        "# HELP consul_inbound_conns consul_inbound_conns\n"
        "# TYPE consul_inbound_conns gauge\n"
        'consul_inbound_conns{dst="db"} 0.0\n'
    )
    clock.now += 30
    assert scrape(telemetry) == ""


def test_summary_quantiles_over_the_last_10_seconds() -> None:
    clock = Clock()
    telemetry = Telemetry(TelemetryConfig(prometheus_retention=60.0), hostname="h1", clock=clock)
    telemetry.add_sample(["dial"], 1000)
    clock.now += 10  # the first observation leaves the window, not the sum
    for value in range(1, 101):
        telemetry.add_sample(["dial"], value)
    assert scrape(telemetry).splitlines()[2:] == [
        'dial{quantile="0.5"} 50.0',
        'dial{quantile="0.9"} 90.0',
        'dial{quantile="0.99"} 99.0',
        "dial_sum 6050.0",
        "dial_count 101.0",
    ]


def test_without_a_retention_the_collector_is_empty() -> None:
    telemetry = Telemetry(TelemetryConfig(metrics_prefix="consul"), hostname="h1")
    telemetry.set_gauge(["inbound", "conns"], 1, DB)
    assert scrape(telemetry) == ""


# -- the in-memory sink ----------------------------------------------------------------------


def test_dump_prints_the_completed_intervals_as_inmem_signal_does(utc: None) -> None:
    clock = Clock(1_700_000_001.25)  # 2023-11-14 22:13:21.25 UTC; the interval began at :20
    telemetry = Telemetry(TelemetryConfig(metrics_prefix="consul"), hostname="h1", clock=clock)
    telemetry.set_gauge(["inbound", "conns"], 1, DB)
    telemetry.set_gauge(["inbound", "conns"], 2, DB)
    telemetry.incr_counter(["inbound", "tx_bytes"], 11, [("dst", "my db:1")])
    telemetry.incr_counter(["inbound", "tx_bytes"], 11, [("dst", "my db:1")])
    telemetry.add_sample(["inbound", "dial"], 1, DB)
    telemetry.add_sample(["inbound", "dial"], 4, DB)
    assert telemetry.dump() == ""  # the current interval is still being aggregated
    clock.now += 10
    telemetry.incr_counter(["inbound", "rx_bytes"], 3, DB)
    assert telemetry.dump() == (
        "[2023-11-14 22:13:20 +0000 UTC][G] 'consul.inbound.conns.db': 2.000\n"
        "[2023-11-14 22:13:20 +0000 UTC][C] 'consul.inbound.tx_bytes.my_db_1': "
        "Count: 2 Sum: 22.000 LastUpdated: 2023-11-14 22:13:21.25 +0000 UTC\n"
        "[2023-11-14 22:13:20 +0000 UTC][S] 'consul.inbound.dial.db': "
        "Count: 2 Min: 1.000 Mean: 2.500 Max: 4.000 Stddev: 2.121 Sum: 5.000 "
        "LastUpdated: 2023-11-14 22:13:21.25 +0000 UTC\n"
    )


def test_the_in_memory_sink_keeps_one_minute(utc: None) -> None:
    clock = Clock(1_700_000_000.0)
    telemetry = Telemetry(TelemetryConfig(), hostname="h1", clock=clock)
    for i in range(8):
        telemetry.set_gauge(["g"], i)
        clock.now += 10
    # Eight intervals written, six kept; the newest (empty, current) one is not printed.
    assert telemetry.dump() == "".join(
        f"[2023-11-14 22:{m}:{s} +0000 UTC][G] 'g': {i}.000\n"
        for i, (m, s) in zip(
            range(3, 8),
            [("13", "50"), ("14", "00"), ("14", "10"), ("14", "20"), ("14", "30")],
            strict=True,
        )
    )
