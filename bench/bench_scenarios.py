"""The scenarios of the benchmark: what runs in each (direct, ours in the inbound, outbound
and chain layouts, the peers, the Go reference, worker scaling), in which order, and the
results they leave.

Rule 1: a scenario's processes and registrations are undone at its end, whether it passed
or failed; a failed scenario leaves `{"error": ...}` as its result and the run goes on.
Rule 2: nothing here measures or renders: processes come from `bench_procs.Processes`,
figures from `bench_measure.Bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import multiprocessing.pool
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import bench_goref
import bench_peers
from bench_load import Target, latency, tls_info
from bench_measure import FULL, QUICK, Bench, Params, Roles
from bench_procs import Pid, Proc, Processes, Scene, children, pin, reap
from bench_util import AgentHTTP, cpu_busy, cpu_times, free_port, log, source_state

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
