#!/usr/bin/env python3
"""Benchmark of connect-proxy against direct connections (and peers, when installed).

    python bench/run.py [--quick] [--json out.json]

See bench/README.md for what is measured and how. In short: the dev agent, a backend
process (plain and mTLS echo/sink servers) and the load generator run on one CPU; the
proxy process(es) on the other, started for real with `python -m proxy ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import hashlib
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_peers  # noqa: E402
from bench_load import (  # noqa: E402
    Target,
    close_all,
    conn_rate_worker,
    latency,
    open_idle,
    rtt,
    throughput,
)
from bench_util import (  # noqa: E402
    CLK_TCK,
    AgentHTTP,
    cpu_busy,
    cpu_times,
    free_port,
    percentile,
    proc_cpu_seconds,
    proc_rss_kib,
)

MiB = 1 << 20
GiB = 1 << 30
READY_LINE = "Proxy loaded config and ready to serve"
DIRECT = ("direct-plain", "direct-mtls")
QUIET = 0.1  # core: the machine counts as quiet when other load stays under this
DISTURBED = 0.15  # core: a measurement with more other load than this is retried


@dataclass(frozen=True, slots=True)
class Params:
    latency_conns: int
    rtt_count: int
    throughput_mib: int
    idle_conns: int
    rate_duration: float
    repeats: int
    clients: int
    quiet_budget: float
    concurrencies: tuple[int, ...] = (16, 64)


FULL = Params(
    latency_conns=300,
    rtt_count=3000,
    throughput_mib=2048,
    idle_conns=1000,
    rate_duration=3.0,
    repeats=3,
    clients=2,
    quiet_budget=180.0,
)
QUICK = Params(
    latency_conns=100,
    rtt_count=1000,
    throughput_mib=512,
    idle_conns=1000,
    rate_duration=1.5,
    repeats=1,
    clients=2,
    quiet_budget=20.0,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------------------


def pin(pid: int, cpu: int | None) -> None:
    """Pin every thread of `pid` to `cpu` (new threads inherit it)."""
    if cpu is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {cpu})


class Proc:
    """A child process whose stdout+stderr is drained by a thread (it must never block on a
    full pipe) and scanned for warnings and errors."""

    PROBLEM = re.compile(r"\[(WARN|ERROR|CRIT|ALERT|EMERG)\]|Traceback|LOG[0-3]\[", re.IGNORECASE)

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        problem_filter: Callable[[str], bool] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,  # a Ctrl-C on the terminal reaches only us; we stop them
        )
        pin(self.popen.pid, cpu)
        self.cpu = cpu
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=200)
        self.problems: list[str] = []
        self.problem_count = 0
        self.problem_filter = problem_filter
        self.eof = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.rstrip("\n")
            with self._cond:
                if len(self.head) < 2000:
                    self.head.append(line)
                self.tail.append(line)
                if self.PROBLEM.search(line) and (
                    self.problem_filter is None or self.problem_filter(line)
                ):
                    self.problem_count += 1
                    if len(self.problems) < 20:
                        self.problems.append(line)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line (of the first 2000) matching `pattern`.

        Raises:
            RuntimeError: the process ended first, or `timeout` passed.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.head[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.head)
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    why = "exited" if self.eof else f"gave no {pattern!r} within {timeout:g}s"
                    out = "\n    ".join(list(self.tail)[-15:])
                    raise RuntimeError(f"{self.name} {why}; last output:\n    {out}")
                self._cond.wait(min(left, 0.5))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; by PID only."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._thread.join(2)


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            out = "\n    ".join(list(proc.tail)[-15:])
            raise RuntimeError(f"{proc.name} exited; last output:\n    {out}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: port {port} not accepting within {timeout:g}s")


# -- measurement ----------------------------------------------------------------------------


@dataclass
class Roles:
    """The long-lived processes of the load side, for CPU accounting (the pool's workers
    report their own CPU)."""

    agent: Proc | None = None
    backend: Proc | None = None


def summary(samples: list[float], scale: float) -> dict[str, Any]:
    """p50/p90/p99/max of `samples` (seconds) times `scale`, and how many there were."""
    return {
        "n": len(samples),
        "p50": percentile(samples, 0.5) * scale,
        "p90": percentile(samples, 0.9) * scale,
        "p99": percentile(samples, 0.99) * scale,
        "max": max(samples) * scale if samples else None,
    }


def _cpu(procs: Sequence[Proc]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p.pid)
    return total


def _rss(procs: Sequence[Proc]) -> int:
    return sum(proc_rss_kib(p.pid) for p in procs)


class Bench:
    def __init__(
        self,
        params: Params,
        pool: multiprocessing.pool.Pool,
        roles: Roles,
    ) -> None:
        self.p = params
        self.pool = pool
        self.roles = roles
        self.quiet_left = params.quiet_budget
        self.waited = 0.0

    def _others(self) -> dict[str, float]:
        """CPU seconds so far of the agent, the backend and this process (all threads)."""
        out = {"harness": proc_cpu_seconds(os.getpid())}
        if self.roles.agent is not None:
            out["agent"] = _cpu([self.roles.agent])
        if self.roles.backend is not None:
            out["backend"] = _cpu([self.roles.backend])
        return out

    @staticmethod
    def _foreign(busy: dict[int, dict[str, float]], ours_s: float, seconds: float) -> float:
        """Busy CPU time of the machine not used by our processes, as a fraction of a core:
        other programs, and kernel work not charged to any process.

        A lower bound: /proc counts in clock ticks, so each CPU and each of our processes
        may be off by a tick; that slack is taken off (short windows read as 0 unless the
        other load is large).
        """
        raw = (sum(v["busy_s"] for v in busy.values()) - ours_s) / seconds
        slack = (len(busy) + 6) / CLK_TCK / seconds
        return max(0.0, raw - slack)

    def _ours(self, proxies: Sequence[Proc]) -> float:
        return _cpu(proxies) + sum(self._others().values())

    def quiet(self, proxies: Sequence[Proc]) -> float:
        """Wait until the rest of the machine uses less than QUIET of a core (over 0.5 s),
        spending at most what is left of the run's quiet budget. Returns the last load seen."""
        while True:
            t0, a, ours_a = time.monotonic(), cpu_times(), self._ours(proxies)
            time.sleep(0.5)
            b, ours_b = cpu_times(), self._ours(proxies)
            spent = time.monotonic() - t0
            foreign = self._foreign(cpu_busy(a, b), ours_b - ours_a, spent)
            if foreign < QUIET or self.quiet_left <= 0:
                return foreign
            self.quiet_left -= spent
            self.waited += spent

    def measured(
        self, proxies: Sequence[Proc], fn: Callable[[], dict[str, Any]], attempts: int = 3
    ) -> dict[str, Any]:
        """Run `fn` once the machine is quiet; again (up to `attempts`) while other load
        disturbed it and quiet budget is left. Keeps the least disturbed result."""
        best: dict[str, Any] | None = None
        for i in range(attempts):
            self.quiet(proxies)
            res = fn()
            res["attempts"] = i + 1
            if best is None or res["foreign_cpu_frac"] < best["foreign_cpu_frac"]:
                best = res
            if res["foreign_cpu_frac"] <= DISTURBED or self.quiet_left <= 0:
                break
        assert best is not None
        return best

    def windowed(self, proxies: Sequence[Proc], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`fn()` with the other load on the machine while it ran (`foreign_cpu_frac`)."""
        t0, a, ours_a = time.monotonic(), cpu_times(), self._ours(proxies)
        res = fn()
        b, ours_b = cpu_times(), self._ours(proxies)
        res["foreign_cpu_frac"] = self._foreign(
            cpu_busy(a, b), ours_b - ours_a, time.monotonic() - t0
        )
        return res

    def conn_rate(
        self, target: Target, proxies: Sequence[Proc], concurrency: int
    ) -> dict[str, Any]:
        dur = self.p.rate_duration
        n = self.p.clients
        split = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
        start_at = time.monotonic() + 0.6
        pending = [
            self.pool.apply_async(conn_rate_worker, (target, c, start_at, dur)) for c in split if c
        ]
        time.sleep(max(0.0, start_at - time.monotonic()))
        cpu_a, others_a, busy_a = _cpu(proxies), self._others(), cpu_times()
        time.sleep(max(0.0, start_at + dur - time.monotonic()))
        cpu_b, others_b, busy_b = _cpu(proxies), self._others(), cpu_times()
        outs = [r.get(timeout=dur + 60) for r in pending]
        count = sum(o["count"] for o in outs)
        errors = sum(o["errors"] for o in outs)
        busy = cpu_busy(busy_a, busy_b)
        proxy_cpu = cpu_b - cpu_a
        lg_cpu = sum(o["cpu_s"] for o in outs)
        others = sum(others_b.values()) - sum(others_a.values())
        res: dict[str, Any] = {
            "concurrency": concurrency,
            "clients": len(outs),
            "connections": count,
            "conn_per_s": count / dur,
            "errors": errors,
            "first_error": next((o["first_error"] for o in outs if o["first_error"]), ""),
            "loadgen_cpu_frac": lg_cpu / dur,
            "cpu_busy": {str(k): v for k, v in busy.items()},
            "other_cpu_frac": {k: (others_b[k] - others_a[k]) / dur for k in others_b},
            "foreign_cpu_frac": self._foreign(busy, proxy_cpu + lg_cpu + others, dur),
        }
        if proxies:
            res["proxy_cpu_frac"] = proxy_cpu / dur
            res["proxy_cpu_us_per_conn"] = proxy_cpu / count * 1e6 if count else None
        return res

    def run_suite(self, name: str, target: Target, proxies: Sequence[Proc]) -> dict[str, Any]:
        p = self.p
        out: dict[str, Any] = {"scenario": name}

        def lat() -> dict[str, Any]:
            samples, cpu = latency(target, p.latency_conns)
            return {**summary(samples, 1e3), "loadgen_cpu_ms_per_conn": cpu / len(samples) * 1e3}

        def rt() -> dict[str, Any]:
            samples = rtt(target, p.rtt_count)
            return {**summary(samples, 1e6), "over_1ms": sum(x > 1e-3 for x in samples)}

        log(f"{name}: latency ({p.latency_conns} sequential connections)")
        out["latency_ms"] = self.measured(proxies, lambda: self.windowed(proxies, lat))
        log(f"{name}: 64-byte RTT ({p.rtt_count} round trips)")
        out["rtt_us"] = self.measured(proxies, lambda: self.windowed(proxies, rt))
        if proxies:
            log(f"{name}: RSS with {p.idle_conns} idle connections")
            out["idle"] = self.idle_rss(target, proxies)
        rates: dict[str, Any] = {}
        for c in p.concurrencies:
            runs = []
            for i in range(p.repeats):
                log(f"{name}: conn/s at concurrency {c} ({p.rate_duration:g}s, run {i + 1})")
                runs.append(
                    self.measured(proxies, functools.partial(self.conn_rate, target, proxies, c))
                )
            runs.sort(key=lambda x: x["conn_per_s"])
            median = dict(runs[len(runs) // 2])
            median["all_conn_per_s"] = [round(x["conn_per_s"], 1) for x in runs]
            rates[str(c)] = median
        out["conn_rate"] = rates
        runs = []
        for i in range(p.repeats):
            log(f"{name}: throughput ({p.throughput_mib} MiB, run {i + 1})")
            runs.append(
                self.measured(
                    proxies, lambda: self.throughput(target, proxies, p.throughput_mib * MiB)
                )
            )
        runs.sort(key=lambda x: x["mib_per_s"])
        tp = dict(runs[len(runs) // 2])
        tp["all_mib_per_s"] = [round(x["mib_per_s"], 1) for x in runs]
        out["throughput"] = tp
        return out

    def throughput(self, target: Target, proxies: Sequence[Proc], nbytes: int) -> dict[str, Any]:
        marks: dict[str, Any] = {}

        def on_start() -> None:
            marks["cpu"] = _cpu(proxies)
            marks["others"] = self._others()
            marks["busy"] = cpu_times()

        counted, secs, lg_cpu = throughput(target, nbytes, on_start)
        cpu = _cpu(proxies) - marks["cpu"]
        others = self._others()
        busy = cpu_busy(marks["busy"], cpu_times())
        ours = cpu + sum(others.values()) - sum(marks["others"].values())
        res: dict[str, Any] = {
            "bytes_sent": nbytes,
            "bytes_counted_far_end": counted,
            "seconds": secs,
            "mib_per_s": counted / secs / MiB,
            "loadgen_cpu_frac": lg_cpu / secs,
            "cpu_busy": {str(k): v for k, v in busy.items()},
            "other_cpu_frac": {k: (others[k] - marks["others"][k]) / secs for k in others},
            "foreign_cpu_frac": self._foreign(busy, ours, secs),
        }
        if counted != nbytes:
            res["error"] = f"far end counted {counted} of {nbytes} bytes"
        if proxies:
            res["proxy_cpu_s"] = cpu
            res["proxy_cpu_s_per_gib"] = cpu / (counted / GiB) if counted else None
            res["proxy_cpu_frac"] = cpu / secs
        return res

    def idle_rss(self, target: Target, proxies: Sequence[Proc]) -> dict[str, Any]:
        time.sleep(0.3)
        before = _rss(proxies)
        socks = open_idle(target, self.p.idle_conns, time.monotonic() + 120)
        n = len(socks)
        try:
            time.sleep(0.5)
            after = _rss(proxies)
        finally:
            close_all(socks)
        return {
            "connections": n,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_conn": (after - before) / n if n else None,
        }


# -- scenarios ------------------------------------------------------------------------------


@dataclass
class Scene:
    """What one scenario started: processes stopped at its end, then `after` callbacks run."""

    name: str
    proxies: list[Proc] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.params = QUICK if args.quick else FULL
        if getattr(args, "clients", 0):
            self.params = Params(**{**asdict(self.params), "clients": args.clients})
        if getattr(args, "quiet_budget", None) is not None:
            self.params = Params(**{**asdict(self.params), "quiet_budget": args.quiet_budget})
        self.bench: Bench | None = None
        cpus = sorted(os.sched_getaffinity(0))
        self.proxy_cpu: int | None = cpus[0] if len(cpus) >= 2 else None
        self.load_cpu: int | None = cpus[1] if len(cpus) >= 2 else None
        self.procs: list[Proc] = []
        self.tmpdirs: list[str] = []
        self.results: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.logs: dict[str, Any] = {}
        self.pool: multiprocessing.pool.Pool | None = None
        self.elapsed = 0.0
        self.busy_before: dict[str, float] = {}
        self.sources: dict[str, Any] = {}

    # processes

    def start(self, name: str, argv: Sequence[str], cpu: int | None, **kw: Any) -> Proc:
        proc = Proc(name, argv, cpu=cpu, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.logs[proc.name] = {
            "exit_code": proc.popen.returncode,
            "problem_lines": proc.problem_count,
            "problems": proc.problems,
        }

    def proxy(self, scene: Scene, name: str, args: Sequence[str]) -> Proc:
        """Start `python -m proxy <args>` on the proxy CPU and wait for its ready line."""
        argv = [sys.executable, "-m", "proxy", *args, "-http-addr", self.agent_addr]
        argv += ["-drain-timeout", "1s"]
        proc = self.start(name, argv, self.proxy_cpu)
        scene.proxies.append(proc)
        proc.wait_for(re.escape(READY_LINE), 60)
        pin(proc.pid, self.proxy_cpu)  # threads started since
        return proc

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[Scene]:
        scene = Scene(name)
        try:
            yield scene
        except Exception as exc:
            log(f"{name}: FAILED: {exc}")
            self.results[name] = {"scenario": name, "error": str(exc)}
        finally:
            for p in scene.proxies:
                self.stop(p)
            for fn in scene.after:
                try:
                    fn()
                except Exception as exc:
                    log(f"{name}: clean-up step failed: {exc}")

    def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.terminate()  # SIGTERM to each worker, by its PID
            self.pool.join()
            self.pool = None
        for proc in reversed(self.procs):
            if proc.name not in self.logs:
                self.stop(proc)
        for d in self.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)

    # set-up

    def setup(self) -> None:
        """Pin ourselves, start the dev agent, the backend and the load-generator pool."""
        if self.load_cpu is not None:
            os.sched_setaffinity(0, {self.load_cpu})  # children inherit it
        else:
            self.skipped.append("fewer than 2 CPUs: nothing pinned")
        self.sources = source_state()
        before = cpu_times()
        time.sleep(1.0)
        self.busy_before = {str(k): v["busy"] for k, v in cpu_busy(before, cpu_times()).items()}
        if any(v > 0.1 for v in self.busy_before.values()):
            log(f"the machine is busy before we start anything: {self.busy_before}")
        log("starting the dev agent")
        self.agent = self.start(
            "dev-agent",
            [
                *(sys.executable, "-m", "proxy", "dev-agent"),
                *("-http-addr", "127.0.0.1:0", "-sidecar-check-interval", "1s"),
            ],
            self.load_cpu,
        )
        m = self.agent.wait_for(r"HTTP API address:\s*(\S+)", 60)
        self.agent_addr = m.group(1)
        self.api = AgentHTTP(self.agent_addr)
        self.api.put(
            "/v1/config",
            {
                "Kind": "service-intentions",
                "Name": "db",
                "Sources": [{"Name": "web", "Action": "allow"}],
            },
        )
        self.web = self.api.material("web")
        self.db = self.api.material("db")
        log("starting the backend")
        self.backend = self.start(
            "backend",
            [sys.executable, str(HERE / "bench_backend.py"), "-http-addr", self.agent_addr],
            self.load_cpu,
        )
        m = self.backend.wait_for(r"READY plain=(\d+) tls=(\d+)", 60)
        self.plain_port, self.tls_port = int(m.group(1)), int(m.group(2))
        self.pool = multiprocessing.get_context("spawn").Pool(self.params.clients)
        self.bench = Bench(self.params, self.pool, Roles(agent=self.agent, backend=self.backend))

    # scenarios

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.setup()
            self.direct()
            self.inbound()
            self.peers()
            self.outbound()
            self.chain()
        finally:
            self.cleanup()
            self.elapsed = time.monotonic() - t0

    def direct(self) -> None:
        for name, target in (
            ("direct-plain", Target("127.0.0.1", self.plain_port)),
            ("direct-mtls", Target("127.0.0.1", self.tls_port, self.web)),
        ):
            with self.scenario(name):
                self.results[name] = self.suite(name, target, [])

    def start_inbound(self, scene: Scene) -> Target:
        """mTLS with web's leaf -> our public listener for db -> the plain backend."""
        listen = free_port()
        self.proxy(
            scene,
            "proxy-inbound",
            [
                *("-service", "db", "-listen", f"127.0.0.1:{listen}"),
                *("-service-addr", f"127.0.0.1:{self.plain_port}"),
            ],
        )
        return Target("127.0.0.1", listen, self.web)

    def inbound(self) -> None:
        with self.scenario("inbound") as scene:
            target = self.start_inbound(scene)
            self.results["inbound"] = self.suite("inbound", target, scene.proxies)

    def start_outbound(self, scene: Scene) -> Target:
        """Plain -> our upstream listener -> the mTLS backend, registered as Connect-native db."""
        self.api.put(
            "/v1/agent/service/register",
            {
                "Name": "db",
                "ID": "db-native",
                "Address": "127.0.0.1",
                "Port": self.tls_port,
                "Connect": {"Native": True},
            },
        )
        scene.after.append(functools.partial(self.deregister, "db-native"))
        self.api.wait_connect_instance("db", self.tls_port)
        up = free_port()
        self.proxy(scene, "proxy-outbound", ["-service", "web", "-upstream", f"db:{up}"])
        return Target("127.0.0.1", up)

    def outbound(self) -> None:
        with self.scenario("outbound") as scene:
            target = self.start_outbound(scene)
            self.results["outbound"] = self.suite("outbound", target, scene.proxies)

    def start_chain(self, scene: Scene) -> Target:
        """Plain -> web sidecar's upstream -> db sidecar's public listener -> plain backend."""
        db_side, web_side, web_app, up = free_port(), free_port(), free_port(), free_port()
        for service in (
            {
                "Name": "db",
                "ID": "db",
                "Address": "127.0.0.1",
                "Port": self.plain_port,
                "Connect": {"SidecarService": {"Port": db_side, "Address": "127.0.0.1"}},
            },
            {
                "Name": "web",
                "ID": "web",
                "Address": "127.0.0.1",
                "Port": web_app,
                "Connect": {
                    "SidecarService": {
                        "Port": web_side,
                        "Address": "127.0.0.1",
                        "Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": up}]},
                    }
                },
            },
        ):
            self.api.put("/v1/agent/service/register", service)
            scene.after.append(functools.partial(self.deregister, str(service["ID"])))
        self.proxy(scene, "proxy-chain-db", ["-sidecar-for", "db"])
        self.proxy(scene, "proxy-chain-web", ["-sidecar-for", "web"])
        self.api.wait_connect_instance("db", db_side)
        return Target("127.0.0.1", up)

    def suite(self, name: str, target: Target, proxies: Sequence[Proc]) -> dict[str, Any]:
        assert self.bench is not None, "setup() first"
        return self.bench.run_suite(name, target, proxies)

    def deregister(self, service_id: str) -> None:
        self.api.put(f"/v1/agent/service/deregister/{service_id}", None)

    def chain(self) -> None:
        with self.scenario("chain") as scene:
            target = self.start_chain(scene)
            self.results["chain"] = self.suite("chain", target, scene.proxies)

    def peers(self) -> None:
        """HAProxy, nginx and stunnel as inbound mTLS terminators, when installed."""
        found, skipped = bench_peers.detect()
        self.skipped.extend(skipped)
        for line in skipped:
            log(line)
        for spec in found:
            name = f"inbound-{spec.name}"
            directory = tempfile.mkdtemp(prefix=f"bench-{spec.name}-")  # mode 0700
            self.tmpdirs.append(directory)
            with self.scenario(name) as scene:
                scene.after.append(functools.partial(shutil.rmtree, directory, ignore_errors=True))
                try:
                    files = bench_peers.write_material(Path(directory), self.db)
                    listen = free_port()
                    argv = bench_peers.command(
                        spec, Path(directory), files, listen, self.plain_port
                    )
                    proc = self.start(f"peer-{spec.name}", argv, self.proxy_cpu)
                    scene.proxies.append(proc)
                    wait_port(proc, listen, 20)
                    pin(proc.pid, self.proxy_cpu)
                    target = Target("127.0.0.1", listen, self.web)
                    latency(target, 1, warmup=0)  # one end-to-end check before measuring
                except Exception as exc:
                    msg = f"{name}: could not be started or passed no traffic ({exc}); skipped"
                    log(msg)
                    self.skipped.append(msg)
                    continue
                self.results[name] = self.suite(name, target, scene.proxies)


# -- report ---------------------------------------------------------------------------------


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float | int):
        return f"{v:,.{digits}f}"
    return str(v)


def _ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def metrics(res: dict[str, Any]) -> dict[str, Any]:
    c64 = _get(res, "conn_rate", "64") or {}
    return {
        "lat_p50": _get(res, "latency_ms", "p50"),
        "lat_p99": _get(res, "latency_ms", "p99"),
        "cps16": _get(res, "conn_rate", "16", "conn_per_s"),
        "cps64": c64.get("conn_per_s"),
        "mibs": _get(res, "throughput", "mib_per_s"),
        "rtt50": _get(res, "rtt_us", "p50"),
        "rtt99": _get(res, "rtt_us", "p99"),
        "kib_idle": _get(res, "idle", "kib_per_conn"),
        "us_conn": c64.get("proxy_cpu_us_per_conn"),
        "s_gib": _get(res, "throughput", "proxy_cpu_s_per_gib"),
        "proxy64": c64.get("proxy_cpu_frac"),
        "lg64": c64.get("loadgen_cpu_frac"),
        "busy64": {k: v["busy"] for k, v in (c64.get("cpu_busy") or {}).items()},
        "sirq64": {k: v["softirq"] for k, v in (c64.get("cpu_busy") or {}).items()},
        "steal64": sum(v["steal"] for v in (c64.get("cpu_busy") or {}).values()),
        "agent64": _get(c64, "other_cpu_frac", "agent"),
        "backend64": _get(c64, "other_cpu_frac", "backend"),
        "errors": sum((_get(res, "conn_rate", str(c), "errors") or 0) for c in (16, 64)),
        "foreign64": c64.get("foreign_cpu_frac"),
        "foreign_max": max(
            [
                x
                for x in (
                    *(_get(res, "conn_rate", str(c), "foreign_cpu_frac") for c in (16, 64)),
                    _get(res, "throughput", "foreign_cpu_frac"),
                    _get(res, "latency_ms", "foreign_cpu_frac"),
                    _get(res, "rtt_us", "foreign_cpu_frac"),
                )
                if x is not None
            ],
            default=None,
        ),
    }


def bottleneck(m: dict[str, Any], proxy_cpu: int | None, load_cpu: int | None) -> str:
    load_busy = m["busy64"].get(str(load_cpu)) if load_cpu is not None else None
    proxy = m["proxy64"]
    if proxy is not None and proxy >= 0.9:
        return "proxy (CPU-bound)"
    if load_busy is not None and load_busy >= 0.95:
        return f"load side (CPU {load_cpu} full)"
    return "neither core full"


def render(h: Harness) -> str:
    rows = [(n, metrics(r)) for n, r in h.results.items() if "error" not in r]
    lines: list[str] = []
    head = (
        f"{'scenario':<16}{'lat p50':>9}{'lat p99':>9}{'conn/s16':>10}{'conn/s64':>10}"
        f"{'MiB/s':>8}{'RTT p50':>9}{'RTT p99':>9}{'KiB/idle':>9}{'µs/conn':>9}{'s/GiB':>7}"
    )
    lines += [head, f"{'':<16}{'ms':>9}{'ms':>9}{'':>10}{'':>10}{'':>8}{'µs':>9}{'µs':>9}", ""]
    for n, m in rows:
        lines.append(
            f"{n:<16}{_fmt(m['lat_p50'], 2):>9}{_fmt(m['lat_p99'], 2):>9}{_fmt(m['cps16']):>10}"
            f"{_fmt(m['cps64']):>10}{_fmt(m['mibs']):>8}{_fmt(m['rtt50']):>9}{_fmt(m['rtt99']):>9}"
            f"{_fmt(m['kib_idle'], 1):>9}{_fmt(m['us_conn']):>9}{_fmt(m['s_gib'], 2):>7}"
        )
    for n, r in h.results.items():
        if "error" in r:
            lines.append(f"{n:<16}FAILED: {r['error'].splitlines()[0]}")
    base = dict(rows)
    plain, mtls = base.get("direct-plain"), base.get("direct-mtls")
    peers = [n for n, _ in rows if n.startswith("inbound-")]
    lines += ["", "Ratios (conn/s and latency vs direct-mtls; MiB/s and RTT vs direct-plain):"]
    lines.append(
        f"{'scenario':<16}{'conn/s16':>10}{'conn/s64':>10}{'lat p50':>9}{'MiB/s':>8}{'RTT p50':>9}"
        + "".join(f"{'c64/' + q.removeprefix('inbound-'):>14}" for q in peers)
    )
    for n, m in rows:
        if n in DIRECT:
            continue
        line = (
            f"{n:<16}{_ratio(m['cps16'], mtls and mtls['cps16']):>10}"
            f"{_ratio(m['cps64'], mtls and mtls['cps64']):>10}"
            f"{_ratio(m['lat_p50'], mtls and mtls['lat_p50']):>9}"
            f"{_ratio(m['mibs'], plain and plain['mibs']):>8}"
            f"{_ratio(m['rtt50'], plain and plain['rtt50']):>9}"
        )
        line += "".join(f"{_ratio(m['cps64'], base[q]['cps64']):>14}" for q in peers)
        lines.append(line)
    if peers:
        lines += ["", "inbound vs peers (MiB/s, RTT p50):"]
        ours = base.get("inbound")
        for q in peers:
            if ours:
                lines.append(
                    f"  inbound / {q}: MiB/s {_ratio(ours['mibs'], base[q]['mibs'])}, "
                    f"RTT p50 {_ratio(ours['rtt50'], base[q]['rtt50'])}"
                )
    lines += [
        "",
        "Who was busy at concurrency 64 (fraction of one core; CPU busy from /proc/stat):",
        f"{'scenario':<16}{'proxy':>7}{'loadgen':>9}{'agent':>7}{'backend':>9}{'other':>7}"
        f"{'cpu' + str(h.proxy_cpu):>7}{'cpu' + str(h.load_cpu):>7}{'errors':>8}  bottleneck",
    ]
    for n, m in rows:
        lines.append(
            f"{n:<16}{_fmt(m['proxy64'], 2):>7}{_fmt(m['lg64'], 2):>9}{_fmt(m['agent64'], 2):>7}"
            f"{_fmt(m['backend64'], 2):>9}{_fmt(m['foreign64'], 2):>7}"
            f"{_fmt(m['busy64'].get(str(h.proxy_cpu)), 2):>7}"
            f"{_fmt(m['busy64'].get(str(h.load_cpu)), 2):>7}{m['errors']:>8}  "
            f"{bottleneck(m, h.proxy_cpu, h.load_cpu)}"
        )
    lines += [
        "",
        "Who was busy during the throughput run (same columns):",
        f"{'scenario':<16}{'proxy':>7}{'loadgen':>9}{'agent':>7}{'backend':>9}{'other':>7}"
        f"{'cpu' + str(h.proxy_cpu):>7}{'cpu' + str(h.load_cpu):>7}{'':>8}  bottleneck",
    ]
    for n, r in h.results.items():
        tp = r.get("throughput")
        if not tp:
            continue
        busy = {k: v["busy"] for k, v in (tp.get("cpu_busy") or {}).items()}
        t = {
            "proxy64": tp.get("proxy_cpu_frac"),
            "busy64": busy,
        }
        lines.append(
            f"{n:<16}{_fmt(tp.get('proxy_cpu_frac'), 2):>7}"
            f"{_fmt(tp.get('loadgen_cpu_frac'), 2):>9}"
            f"{_fmt(_get(tp, 'other_cpu_frac', 'agent'), 2):>7}"
            f"{_fmt(_get(tp, 'other_cpu_frac', 'backend'), 2):>9}"
            f"{_fmt(tp.get('foreign_cpu_frac'), 2):>7}"
            f"{_fmt(busy.get(str(h.proxy_cpu)), 2):>7}{_fmt(busy.get(str(h.load_cpu)), 2):>7}"
            f"{'':>8}  {bottleneck(t, h.proxy_cpu, h.load_cpu)}"
        )
    lines.append(
        "  other = busy CPU time not used by our processes (other programs, kernel work not "
        "charged to a process)"
    )
    noisy = [n for n, m in rows if (m["foreign_max"] or 0) > 0.1]
    if noisy:
        lines.append(
            "  WARNING: more than 0.1 core of other load during "
            + ", ".join(noisy)
            + ": those figures are disturbed; run again on a quiet machine"
        )
    if h.skipped:
        lines += ["", "Skipped:"] + [f"  {s}" for s in h.skipped]
    problems = {k: v for k, v in h.logs.items() if v["problem_lines"]}
    if problems:
        lines += ["", "Warnings/errors in process logs:"]
        for k, v in problems.items():
            lines.append(f"  {k}: {v['problem_lines']} line(s), e.g.")
            lines += [f"    {x[:200]}" for x in v["problems"][:5]]
    return "\n".join(lines)


def _git(*args: str) -> str | None:
    """A read-only git command (no optional locks: `status` must not rewrite the index)."""
    try:
        res = subprocess.run(
            ["git", "--no-optional-locks", *args],
            check=True,
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def source_state() -> dict[str, Any]:
    """Which proxy code was measured: HEAD, files changed since, and a digest of the sources
    (the tree may be changing while we run)."""
    root = HERE.parent
    head = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--", "proxy", "listeners")
    digest = hashlib.sha256()
    for path in sorted([*root.glob("proxy/**/*.py"), *root.glob("listeners/**/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "git_head": head.strip() if head else None,
        "git_changed": [x.strip() for x in (changed or "").splitlines() if x.strip()],
        "sources_sha256": digest.hexdigest()[:16],
    }


def meta(h: Harness) -> dict[str, Any]:
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = None
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": uv,
        "kernel": platform.release(),
        "cpu_model": model,
        "proxy_cpu": h.proxy_cpu,
        "load_cpu": h.load_cpu,
        "quick": bool(h.args.quick),
        "params": asdict(h.params),
        "elapsed_s": round(h.elapsed, 1),
        "machine_busy_before": h.busy_before,
        "waited_for_quiet_s": round(h.bench.waited, 1) if h.bench else None,
        "sources": h.sources,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--clients", type=int, default=0, help="load-generator processes (default 2)"
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="at most this long in all to wait for other load on the machine to stop "
        "(default 180, 20 with --quick; 0: never wait)",
    )
    args = parser.parse_args(argv)
    h = Harness(args)
    try:
        h.run()
    except KeyboardInterrupt:
        log("interrupted; every process stopped")
        return 130
    report = render(h)
    info = meta(h)
    print(
        f"\nconnect-proxy benchmark, {info['date']}, Python {info['python']}, {info['openssl']}, "
        f"uvloop {info['uvloop']}, proxy on CPU {h.proxy_cpu}, load on CPU {h.load_cpu}, "
        f"{'quick' if args.quick else 'full'} run in {info['elapsed_s']:g}s, "
        f"code at {info['sources'].get('git_head')}"
        f"{' + local changes' if info['sources'].get('git_changed') else ''}\n"
    )
    print(report)
    if args.json:
        data = {"meta": info, "scenarios": h.results, "skipped": h.skipped, "process_logs": h.logs}
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    failed = [n for n, r in h.results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
