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
import json
import multiprocessing
import multiprocessing.pool
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_goref  # noqa: E402
import bench_peers  # noqa: E402
from bench_load import (  # noqa: E402
    Target,
    close_all,
    conn_rate_worker,
    latency,
    open_idle,
    rtt,
    throughput,
    tls_info,
)
from bench_procs import ENGINE_VAR, Pid, Proc, Processes, Scene, children, pin, reap  # noqa: E402
from bench_report import heading, render  # noqa: E402
from bench_util import (  # noqa: E402
    CLK_TCK,
    AgentHTTP,
    cpu_busy,
    cpu_times,
    free_port,
    log,
    percentile,
    proc_cpu_seconds,
    proc_rss_kib,
    source_state,
)

MiB = 1 << 20
GiB = 1 << 30
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


def _cpu(procs: Sequence[Proc | Pid]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(OSError):
            total += proc_cpu_seconds(p.pid)
    return total


def _rss(procs: Sequence[Proc | Pid]) -> int:
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
        self.profile_dir: Path | None = None

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

    def _ours(self, proxies: Sequence[Proc | Pid]) -> float:
        return _cpu(proxies) + sum(self._others().values())

    def quiet(self, proxies: Sequence[Proc | Pid]) -> float:
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
        self, proxies: Sequence[Proc | Pid], fn: Callable[[], dict[str, Any]], attempts: int = 3
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

    def windowed(
        self, proxies: Sequence[Proc | Pid], fn: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """`fn()` with the other load on the machine while it ran (`foreign_cpu_frac`)."""
        t0, a, ours_a = time.monotonic(), cpu_times(), self._ours(proxies)
        res = fn()
        b, ours_b = cpu_times(), self._ours(proxies)
        res["foreign_cpu_frac"] = self._foreign(
            cpu_busy(a, b), ours_b - ours_a, time.monotonic() - t0
        )
        return res

    def conn_rate(
        self,
        target: Target,
        proxies: Sequence[Proc | Pid],
        concurrency: int,
        duration: float | None = None,
    ) -> dict[str, Any]:
        dur = self.p.rate_duration if duration is None else duration
        n = self.p.clients
        split = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
        start_at = time.monotonic() + 0.6
        pending = [
            self.pool.apply_async(conn_rate_worker, (target, c, start_at, dur)) for c in split if c
        ]
        time.sleep(max(0.0, start_at - time.monotonic()))
        each_a = [_cpu([p]) for p in proxies]
        cpu_a, others_a, busy_a = sum(each_a), self._others(), cpu_times()
        time.sleep(max(0.0, start_at + dur - time.monotonic()))
        each_b = [_cpu([p]) for p in proxies]
        cpu_b, others_b, busy_b = sum(each_b), self._others(), cpu_times()
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
            res["proxy_cpu_frac_each"] = {
                p.name: (b - a) / dur for p, a, b in zip(proxies, each_a, each_b, strict=True)
            }
        return res

    def run_suite(self, name: str, target: Target, proxies: Sequence[Proc | Pid]) -> dict[str, Any]:
        p = self.p
        out: dict[str, Any] = {"scenario": name, "proxy_processes": len(proxies)}

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
        if self.profile_dir is not None and proxies:
            out["profile"] = self.profile(name, target, proxies)
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

    def profile(self, name: str, target: Target, proxies: Sequence[Proc | Pid]) -> dict[str, Any]:
        """One extra conn/s window at 64 with py-spy sampling each Python proxy process.

        Not part of any figure (sampling slows the proxy a little). Writes py-spy's raw
        collapsed stacks to `<dir>/<scenario>.<process>.txt` and returns, per process, the
        functions with the largest inclusive share of the samples.
        """
        assert self.profile_dir is not None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not os.path.exists(spy):
            return {"skipped": "py-spy not installed (pip install py-spy)"}
        dur = max(self.p.rate_duration, 5.0)
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        spies: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        for proc in proxies:
            try:
                with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"python" not in cmdline:
                continue
            out = self.profile_dir / f"{name}.{proc.name}.txt".replace("/", "-")
            argv = [spy, "record", "-p", str(proc.pid), "-d", str(int(dur) + 1), "-r", "250"]
            argv += ["-n", "-f", "raw", "-o", str(out)]
            spies.append(
                (
                    proc.name,
                    out,
                    subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                )
            )
        if not spies:
            return {"skipped": "no Python proxy process"}
        log(f"{name}: profile with py-spy at concurrency 64 ({dur:g}s, not counted)")
        self.conn_rate(target, proxies, 64, duration=dur)
        result: dict[str, Any] = {}
        for proc_name, out, popen in spies:
            try:
                _, err = popen.communicate(timeout=dur + 30)
            except subprocess.TimeoutExpired:
                popen.kill()
                _, err = popen.communicate()
            top = top_frames(out)
            if not top:
                text = err.decode(errors="replace").strip().splitlines()
                result[proc_name] = {"skipped": f"py-spy failed: {text[-1] if text else '?'}"}
                continue
            result[proc_name] = {"file": str(out), "top": top}
        return result

    def run_rates(
        self, name: str, target: Target, proxies: Sequence[Proc | Pid], concurrency: int = 64
    ) -> dict[str, Any]:
        """Only the conn/s runs at `concurrency` (median of the repetitions)."""
        p = self.p
        runs = []
        for i in range(p.repeats):
            log(f"{name}: conn/s at concurrency {concurrency} ({p.rate_duration:g}s, run {i + 1})")
            runs.append(
                self.measured(
                    proxies, functools.partial(self.conn_rate, target, proxies, concurrency)
                )
            )
        runs.sort(key=lambda x: x["conn_per_s"])
        median = dict(runs[len(runs) // 2])
        median["all_conn_per_s"] = [round(x["conn_per_s"], 1) for x in runs]
        return {"scenario": name, "conn_rate": {str(concurrency): median}}

    def throughput(
        self, target: Target, proxies: Sequence[Proc | Pid], nbytes: int
    ) -> dict[str, Any]:
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

    def idle_rss(self, target: Target, proxies: Sequence[Proc | Pid]) -> dict[str, Any]:
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


LAYOUTS = ("inbound", "outbound", "chain")


def params_of(args: argparse.Namespace) -> Params:
    """The run's parameters: --quick or the full run, with --clients and --quiet-budget."""
    params = QUICK if args.quick else FULL
    if getattr(args, "clients", 0):
        params = Params(**{**asdict(params), "clients": args.clients})
    if getattr(args, "quiet_budget", None) is not None:
        params = Params(**{**asdict(params), "quiet_budget": args.quiet_budget})
    return params


def named(base: str, engine: str | None) -> str:
    """A scenario of ours under one TLS engine: `inbound/openssl` (`inbound` for None)."""
    return base if engine is None else f"{base}/{engine}"


class Harness:
    """One run: set-up, every scenario selected by `--only`, clean-up.

    `results` maps each scenario's name to its figures (from `Bench`), with its `kind`
    (direct, ours, peer, go, workers), its layout (`base`) and what else names it.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.params = params_of(args)
        self.engines: list[str | None] = list(getattr(args, "engine", None) or [None])
        self.only: set[str] = set(getattr(args, "only", None) or [])
        self.bench: Bench | None = None
        cpus = sorted(os.sched_getaffinity(0))
        self.proxy_cpu: int | None = cpus[0] if len(cpus) >= 2 else None
        self.load_cpu: int | None = cpus[1] if len(cpus) >= 2 else None
        self.procs = Processes(self.proxy_cpu, self.load_cpu)
        self.results: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.pool: multiprocessing.pool.Pool | None = None
        self.elapsed = 0.0
        self.busy_before: dict[str, float] = {}
        self.sources: dict[str, Any] = {}
        self.versions: dict[str, str | None] = {}
        self.goref: Path | None = None
        cache = getattr(args, "go_session_cache", "both")
        self.go_resume = {"off": [False], "on": [True], "both": [False, True]}[cache]
        self.trust_domain = ""

    @property
    def logs(self) -> dict[str, Any]:
        """Per stopped process: exit code and problem lines of its output."""
        return self.procs.logs

    def want(self, name: str, kind: str, base: str = "") -> bool:
        """Whether `--only` selects this scenario (by name, kind or base; all without it)."""
        if not self.only:
            return True
        return bool(self.only & {name, name.split("/", maxsplit=1)[0], kind, base})

    @contextlib.contextmanager
    def scenario(self, name: str, kind: str, base: str = "", **info: Any) -> Iterator[Scene]:
        """One scenario: its result is stored under `name` with `kind`, `base` and `info`."""
        scene = Scene(name)
        try:
            yield scene
        except Exception as exc:
            log(f"{name}: FAILED: {exc}")
            self.results[name] = {"scenario": name, "error": str(exc)}
        finally:
            self.procs.end(scene)
            if name in self.results:
                self.results[name].update(kind=kind, base=base, **info)

    def cleanup(self) -> None:
        if self.pool is not None:
            self.pool.terminate()  # SIGTERM to each worker, by its PID
            self.pool.join()
            self.pool = None
        self.procs.close()

    # set-up

    def build_goref(self) -> None:
        """Build the Go reference proxy (before pinning: the build may use every CPU)."""
        if not any(self.want(f"{b}-go", "go", b) for b in LAYOUTS):
            return
        self.versions["go"] = bench_goref.version()
        directory = self.procs.tmpdir("bench-goref-")
        if self.versions["go"]:
            log(f"building the Go reference proxy ({self.versions['go']})")
        binary, why = bench_goref.build(Path(directory))
        if binary is None:
            log(why)
            self.skipped.append(why)
        self.goref = binary

    def setup(self) -> None:
        """Pin ourselves, start the dev agent, the backend and the load-generator pool."""
        self.build_goref()
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
        self.agent, self.agent_addr = self.procs.agent()
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
        self.trust_domain = str(self.api.get("/v1/agent/connect/ca/roots")[0]["TrustDomain"])
        log("starting the backend")
        self.backend, self.plain_port, self.tls_port = self.procs.backend(self.agent_addr)
        self.pool = multiprocessing.get_context("spawn").Pool(self.params.clients)
        self.bench = Bench(self.params, self.pool, Roles(agent=self.agent, backend=self.backend))
        profile = getattr(self.args, "profile", None)
        self.bench.profile_dir = Path(profile) if profile else None

    # the run

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.setup()
            self.direct()
            for engine in self.engines:
                self.inbound(engine)
            self.peers()
            self.go("inbound", resume=False)
            for engine in self.engines:
                self.outbound(engine)
            for resume in self.go_resume:
                self.go("outbound", resume=resume)
            for engine in self.engines:
                self.chain(engine)
            for resume in self.go_resume:
                self.go("chain", resume=resume)
            for engine in self.engines:
                self.workers(engine)
        finally:
            self.cleanup()
            self.elapsed = time.monotonic() - t0

    def suite(self, name: str, target: Target, proxies: Sequence[Proc | Pid]) -> dict[str, Any]:
        assert self.bench is not None, "setup() first"
        return self.bench.run_suite(name, target, proxies)

    def measure(self, name: str, target: Target, scene: Scene) -> None:
        """Every figure of `target` through the scene's proxies, and the TLS negotiated on
        the load generator's hop when it is TLS."""
        self.results[name] = self.suite(name, target, scene.proxies)
        if target.tls is not None:
            self.results[name]["tls"] = tls_info(target)

    # registrations

    def deregister(self, service_id: str) -> None:
        self.api.put(f"/v1/agent/service/deregister/{service_id}", None)

    def register_native_db(self, scene: Scene) -> None:
        """The mTLS backend, registered as a Connect-native db instance."""
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

    def register_chain(self, scene: Scene) -> tuple[int, int]:
        """db and web with sidecar registrations; returns (db sidecar port, web's upstream
        port for db)."""
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
        return db_side, up

    # the scenarios

    def direct(self) -> None:
        """The baselines: plain TCP and mTLS straight to the backend."""
        for name, target in (
            ("direct-plain", Target("127.0.0.1", self.plain_port)),
            ("direct-mtls", Target("127.0.0.1", self.tls_port, self.web)),
        ):
            if not self.want(name, "direct"):
                continue
            with self.scenario(name, "direct"):
                # "tls" is recorded for both baselines (None for plain TCP).
                self.results[name] = self.suite(name, target, [])
                self.results[name]["tls"] = tls_info(target)

    def inbound_args(self, listen: int) -> list[str]:
        return [
            *("-service", "db", "-listen", f"127.0.0.1:{listen}"),
            *("-service-addr", f"127.0.0.1:{self.plain_port}"),
        ]

    def proxy(self, scene: Scene, name: str, args: Sequence[str], engine: str | None) -> Proc:
        """`python -m proxy <args>` against our agent, pinned to the proxy CPU."""
        return self.procs.proxy(scene, name, args, self.agent_addr, engine)

    def inbound(self, engine: str | None) -> None:
        """mTLS with web's leaf -> our public listener for db -> the plain backend."""
        name = named("inbound", engine)
        if not self.want(name, "ours", "inbound"):
            return
        with self.scenario(name, "ours", "inbound", engine=engine) as scene:
            listen = free_port()
            self.proxy(scene, f"proxy-{name}", self.inbound_args(listen), engine)
            self.measure(name, Target("127.0.0.1", listen, self.web), scene)

    def outbound(self, engine: str | None) -> None:
        """Plain -> our upstream listener -> the mTLS backend, registered as Connect-native db."""
        name = named("outbound", engine)
        if not self.want(name, "ours", "outbound"):
            return
        with self.scenario(name, "ours", "outbound", engine=engine) as scene:
            self.register_native_db(scene)
            up = free_port()
            self.proxy(scene, f"proxy-{name}", ["-service", "web", "-upstream", f"db:{up}"], engine)
            self.measure(name, Target("127.0.0.1", up), scene)

    def chain(self, engine: str | None) -> None:
        """Plain -> web sidecar's upstream -> db sidecar's public listener -> plain backend."""
        name = named("chain", engine)
        if not self.want(name, "ours", "chain"):
            return
        with self.scenario(name, "ours", "chain", engine=engine) as scene:
            db_side, up = self.register_chain(scene)
            self.proxy(scene, f"proxy-{name}-db", ["-sidecar-for", "db"], engine)
            self.proxy(scene, f"proxy-{name}-web", ["-sidecar-for", "web"], engine)
            self.api.wait_connect_instance("db", db_side)
            self.measure(name, Target("127.0.0.1", up), scene)

    def go(self, base: str, *, resume: bool) -> None:
        """The Go reference proxy in the `base` layout (inbound, outbound or chain); with
        `resume`, its upstream dials resume TLS sessions (name suffixed `-resume`)."""
        name = f"{base}-go{'-resume' if resume else ''}"
        if self.goref is None or not self.want(name, "go", base):
            return
        info = {
            "gomaxprocs": self.args.go_maxprocs,
            "discovery": self.args.go_discovery,
            "session_cache": resume,
        }
        layout = {"inbound": self._go_inbound, "outbound": self._go_outbound}
        with self.scenario(name, "go", base, **info) as scene:
            target = layout.get(base, self._go_chain)(scene, self.goref, resume)
            latency(target, 1, warmup=0)  # one end-to-end check before measuring
            self.measure(name, target, scene)

    def _goref(self, scene: Scene, name: str, argv: Sequence[str], web: bool) -> int:
        material = self.web if web else self.db
        return self.procs.goref(scene, name, argv, material, self.args.go_maxprocs)

    def _go_inbound_argv(self, binary: Path, listen: str) -> list[str]:
        backend = f"127.0.0.1:{self.plain_port}"
        return bench_goref.inbound_argv(binary, self.agent_addr, "db", listen, backend)

    def _go_outbound_argv(self, binary: Path, listen: int, resume: bool) -> list[str]:
        return bench_goref.outbound_argv(
            binary,
            self.agent_addr,
            "db",
            f"127.0.0.1:{listen}",
            self.trust_domain,
            discovery=self.args.go_discovery,
            session_cache=resume,
        )

    def _go_inbound(self, scene: Scene, binary: Path, resume: bool) -> Target:
        argv = self._go_inbound_argv(binary, "127.0.0.1:0")
        port = self._goref(scene, "goref-inbound", argv, web=False)
        return Target("127.0.0.1", port, self.web)

    def _go_outbound(self, scene: Scene, binary: Path, resume: bool) -> Target:
        self.register_native_db(scene)
        up = free_port()
        self._goref(scene, "goref-outbound", self._go_outbound_argv(binary, up, resume), web=True)
        return Target("127.0.0.1", up)

    def _go_chain(self, scene: Scene, binary: Path, resume: bool) -> Target:
        db_side, up = self.register_chain(scene)
        argv = self._go_inbound_argv(binary, f"127.0.0.1:{db_side}")
        self._goref(scene, "goref-chain-db", argv, web=False)
        self.api.wait_connect_instance("db", db_side)
        self._goref(scene, "goref-chain-web", self._go_outbound_argv(binary, up, resume), web=True)
        return Target("127.0.0.1", up)

    def workers(self, engine: str | None) -> None:
        """Inbound conn/s at 64 with -workers 1 and -workers 2, every proxy process free to
        run on both CPUs (the load side stays on its CPU)."""
        both = {c for c in (self.proxy_cpu, self.load_cpu) if c is not None} or None
        for n in (1, 2):
            name = named(f"inbound-w{n}", engine)
            if not self.want(name, "workers", "workers"):
                continue
            with self.scenario(name, "workers", "inbound", engine=engine, workers=n) as scene:
                self._workers(scene, name, n, engine, both)

    def _workers(
        self, scene: Scene, name: str, n: int, engine: str | None, both: set[int] | None
    ) -> None:
        listen = free_port()
        args = [*self.inbound_args(listen), "-workers", str(n)]
        main = self.procs.proxy(
            scene, f"proxy-{name}", args, self.agent_addr, engine, cpus=both, ready=n
        )
        kids = children(main.pid)
        if len(kids) != n - 1:
            raise RuntimeError(f"expected {n - 1} worker process(es), found {kids}")
        procs: list[Proc | Pid] = [main]
        for i, pid in enumerate(kids, 1):
            procs.append(Pid(f"{main.name}-worker{i}", pid))
            pin(pid, both)
        scene.after.append(functools.partial(reap, procs[1:]))
        target = Target("127.0.0.1", listen, self.web)
        latency(target, 1, warmup=0)
        assert self.bench is not None
        res = self.bench.run_rates(name, target, procs)
        res["cpus_allowed"] = sorted(both) if both else None
        self.results[name] = res

    def peers(self) -> None:
        """HAProxy, nginx and stunnel as inbound mTLS terminators, when installed."""
        detected, skipped = bench_peers.detect()
        found = [s for s in detected if self.want(f"inbound-{s.name}", "peers", "inbound")]
        for name, line in skipped:
            if self.want(f"inbound-{name}", "peers", "inbound"):
                log(line)
                self.skipped.append(line)
        for spec in found:
            self.peer(spec)

    def peer(self, spec: bench_peers.PeerSpec) -> None:
        """One peer in the inbound layout; skipped (with one line) when it cannot be started
        or passes no traffic."""
        name = f"inbound-{spec.name}"
        self.versions[spec.name] = bench_peers.version(spec)
        directory = self.procs.tmpdir(f"bench-{spec.name}-")  # mode 0700
        with self.scenario(name, "peer", "inbound") as scene:
            scene.after.append(functools.partial(shutil.rmtree, directory, ignore_errors=True))
            try:
                files = bench_peers.write_material(Path(directory), self.db)
                listen = free_port()
                argv = bench_peers.command(spec, Path(directory), files, listen, self.plain_port)
                self.procs.peer(scene, f"peer-{spec.name}", argv, listen)
                target = Target("127.0.0.1", listen, self.web)
                latency(target, 1, warmup=0)  # one end-to-end check before measuring
            except Exception as exc:
                msg = f"{name}: could not be started or passed no traffic ({exc}); skipped"
                log(msg)
                self.skipped.append(msg)
                return
            self.measure(name, target, scene)


def top_frames(path: Path, count: int = 30) -> list[tuple[str, float]]:
    """The functions with the largest inclusive share of py-spy's raw (collapsed) samples."""
    if not path.exists():
        return []
    total = 0
    inclusive: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        samples = int(n)
        total += samples
        seen = set()
        for frame in stack.split(";"):
            # "function (file:line)": keep the function and the file, not the line.
            fn, _, where = frame.partition(" (")
            if fn.startswith("0x"):
                continue  # a native frame without a symbol says nothing
            key = f"{fn} ({where.rsplit(':', 1)[0]})" if where else fn
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + samples
    if not total:
        return []
    # The trunk every sample shares (interpreter start, the event loop) is left out.
    branches = {k: v for k, v in inclusive.items() if v < total * 0.995}
    ranked = sorted(branches.items(), key=lambda kv: -kv[1])[:count]
    return [(k, round(v / total, 4)) for k, v in ranked]


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
        "engines": h.engines,
        "versions": h.versions,
    }


def _engines(value: str) -> list[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in names if not re.fullmatch(r"[a-z0-9_]+", x)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"engine names are lowercase words, got {value!r}")
    return list(dict.fromkeys(names))


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
    parser.add_argument(
        "--engine",
        type=_engines,
        default=None,
        metavar="LIST",
        help=f"run our proxy's scenarios once per TLS engine, e.g. ssl,openssl ({ENGINE_VAR} "
        "passed to the proxy processes; names get a /ENGINE suffix). Default: the variable "
        "is not set",
    )
    parser.add_argument(
        "--only",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        metavar="LIST",
        help="run only these scenarios: names (inbound, chain-go, inbound-w2, ...), layouts "
        "(inbound, outbound, chain) or kinds (direct, ours, peers, go, workers)",
    )
    parser.add_argument(
        "--go-maxprocs",
        type=int,
        default=1,
        metavar="N",
        help="GOMAXPROCS of the Go reference proxy (default 1: one core, as our proxy)",
    )
    parser.add_argument(
        "--go-discovery",
        choices=("watch", "per-conn"),
        default="watch",
        help="outbound upstream discovery of the Go reference proxy: one blocking watch "
        "(default, as our proxy) or one health query per connection (as Consul's proxy)",
    )
    parser.add_argument(
        "--go-session-cache",
        choices=("off", "on", "both"),
        default="both",
        help="TLS session resumption on the Go reference proxy's upstream dials: off (as "
        "Consul's proxy), on (as ours), or both: outbound-go and chain-go, then "
        "outbound-go-resume and chain-go-resume (default)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after the conn/s runs of each scenario of ours, one more run at concurrency 64 "
        "(not counted) with py-spy sampling every proxy process; raw stacks go to DIR, the "
        "top functions into the report",
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
    print(heading(info))
    print(report)
    if args.json:
        data = {"meta": info, "scenarios": h.results, "skipped": h.skipped, "process_logs": h.logs}
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    failed = [n for n, r in h.results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
