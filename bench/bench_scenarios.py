"""The scenarios of the benchmark, and their order: the baselines (direct), ours in the
inbound, outbound and chain layouts, the references of each layout (the peers and the Go
reference, from bench_references) and worker scaling.

Rule 1: a scenario's processes and registrations are undone at its end, whether it passed
or failed; a failed scenario leaves `{"error": ...}` as its result and the run goes on
(`Stage.scenario`).
Rule 2: nothing here measures or renders: processes come from `bench_procs.Processes`,
figures from `bench_measure.Bench`.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Sequence

from bench_load import Target, latency, tls_info
from bench_observe import Observe
from bench_procs import Pid, Proc, Scene, children, pin, reap
from bench_references import GoReference, Peers
from bench_stage import Stage
from bench_util import free_port


def named(base: str, engine: str | None) -> str:
    """A scenario of ours under one TLS engine: `inbound/openssl` (`inbound` for None)."""
    return base if engine is None else f"{base}/{engine}"


class Harness(Stage):
    """One run: set-up, every scenario selected by `--only` in the order of the report,
    clean-up. The shared state and `results` are the `Stage`'s."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.peers = Peers(self)
        self.go = GoReference(self)
        self.observe = Observe(self)

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.go.build()  # before setup() pins us: the builds may use every CPU
            self.build_load()
            self.setup()
            self.direct()
            for engine in self.engines:
                self.inbound(engine)
                self.observe.run("inbound", engine)
            self.peers.run()
            self.go.run("inbound", resume=False)
            for engine in self.engines:
                self.outbound(engine)
                self.observe.run("outbound", engine)
            for resume in self.go.resume:
                self.go.run("outbound", resume=resume)
            for engine in self.engines:
                self.chain(engine)
                self.observe.run("chain", engine)
            for resume in self.go.resume:
                self.go.run("chain", resume=resume)
            for engine in self.engines:
                self.workers(engine)
        finally:
            self.cleanup()
            self.elapsed = time.monotonic() - t0

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

    # ours

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

    # worker scaling

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
