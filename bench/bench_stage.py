"""What every scenario of a run stands on: the run's parameters, which scenarios `--only`
selects, the dev agent, the backend and the load-generator pool, the services registered,
and where results go.

Rule 1: a scenario's processes and registrations are undone at its end, whether it passed
or failed; a failed scenario leaves `{"error": ...}` as its result and the run goes on.
Rule 2: no scenario here (they are in bench_scenarios and bench_references), and nothing
here measures or renders: processes come from `bench_procs.Processes`, figures from
`bench_measure.Bench`.
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

import bench_goload
import bench_goref
from bench_goload import GoLoad
from bench_load import Target, tls_info
from bench_measure import FULL, QUICK, Bench, Params, Roles
from bench_procs import Pid, Proc, Processes, Scene
from bench_util import AgentHTTP, cpu_busy, cpu_times, free_port, log, source_state


def load_side(args: argparse.Namespace) -> str:
    """`--load`: go or python; without it go when `go` is on PATH, else python."""
    chosen = getattr(args, "load", None)
    if chosen:
        return str(chosen)
    return "go" if shutil.which("go") else "python"


def params_of(args: argparse.Namespace) -> Params:
    """The run's parameters: --quick or the full run, with --clients and --quiet-budget."""
    params = QUICK if args.quick else FULL
    if getattr(args, "clients", 0):
        params = Params(**{**asdict(params), "clients": args.clients})
    if getattr(args, "quiet_budget", None) is not None:
        params = Params(**{**asdict(params), "quiet_budget": args.quiet_budget})
    return params


class Stage:
    """One run's shared state: set-up, `--only`, one scenario's frame, registrations,
    clean-up.

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
        self.trust_domain = ""
        self.load = load_side(args)
        self.goload: GoLoad | None = None

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

    def build_load(self) -> None:
        """With `--load go`, build the compiled load generator (before pinning: the build
        may use every CPU); when it cannot be built, the Python one is used, said in one
        line."""
        if self.load != "go":
            return
        self.versions["go"] = bench_goref.version()
        log(f"building the load generator ({self.versions['go']})")
        binary, why = bench_goload.build(Path(self.procs.tmpdir("bench-goload-")))
        if binary is None:
            log(why)
            self.skipped.append(why)
            self.load = "python"
            return
        self.goload = GoLoad(binary)

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
        if self.goload is not None:  # the far end of the load side, compiled as well
            self.backend, self.plain_port, self.tls_port = self.procs.gobackend(
                self.goload.binary, self.db
            )
        else:
            self.backend, self.plain_port, self.tls_port = self.procs.backend(self.agent_addr)
        if self.goload is None:
            self.pool = multiprocessing.get_context("spawn").Pool(self.params.clients)
        roles = Roles(agent=self.agent, backend=self.backend)
        self.bench = Bench(self.params, self.pool, roles, self.goload)
        profile = getattr(self.args, "profile", None)
        self.bench.profile_dir = Path(profile) if profile else None

    # measuring

    def suite(self, name: str, target: Target, proxies: Sequence[Proc | Pid]) -> dict[str, Any]:
        assert self.bench is not None, "setup() first"
        return self.bench.run_suite(name, target, proxies)

    def measure(self, name: str, target: Target, scene: Scene) -> None:
        """Every figure of `target` through the scene's proxies, and the TLS negotiated on
        the load generator's hop when it is TLS."""
        self.results[name] = self.suite(name, target, scene.proxies)
        if target.tls is not None:
            self.results[name]["tls"] = tls_info(target)

    def inbound_args(self, listen: int) -> list[str]:
        """Our proxy's flags for the inbound layout: db's public listener on `listen`."""
        return [
            *("-service", "db", "-listen", f"127.0.0.1:{listen}"),
            *("-service-addr", f"127.0.0.1:{self.plain_port}"),
        ]

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

    def register_chain(self, scene: Scene, db: str = "db", web: str = "web") -> tuple[int, int]:
        """`db` and `web` (service names, also their IDs) with sidecar registrations, web's
        upstream being `db`; returns (db sidecar port, web's upstream port for db)."""
        db_side, web_side, web_app, up = free_port(), free_port(), free_port(), free_port()
        for service in (
            {
                "Name": db,
                "ID": db,
                "Address": "127.0.0.1",
                "Port": self.plain_port,
                "Connect": {"SidecarService": {"Port": db_side, "Address": "127.0.0.1"}},
            },
            {
                "Name": web,
                "ID": web,
                "Address": "127.0.0.1",
                "Port": web_app,
                "Connect": {
                    "SidecarService": {
                        "Port": web_side,
                        "Address": "127.0.0.1",
                        "Proxy": {"Upstreams": [{"DestinationName": db, "LocalBindPort": up}]},
                    }
                },
            },
        ):
            self.api.put("/v1/agent/service/register", service)
            scene.after.append(functools.partial(self.deregister, str(service["ID"])))
        return db_side, up

    def allow(self, scene: Scene, source: str, destination: str) -> None:
        """An intention `source` -> `destination` allow, deleted at the end of the scene."""
        self.api.put(
            "/v1/config",
            {
                "Kind": "service-intentions",
                "Name": destination,
                "Sources": [{"Name": source, "Action": "allow"}],
            },
        )
        path = f"/v1/config/service-intentions/{destination}"
        scene.after.append(functools.partial(self.api.delete, path))
