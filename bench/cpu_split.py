"""Where a connection's CPU goes, by library, in our proxy and in the Go reference.

Issue 13 asks for CPU per connection at most the Go reference's. This script shows what that
leaves for the Python work, and gives the ratio from windows that alternate between the two
proxies (`run.py` measures each scenario in a row, so its ratios across scenarios carry
the machine's drift in between). Each proxy in turn is the only process on CPU 0 (the dev
agent, the backend and the load generator on CPU 1); goload connects at concurrency 64:

- `--layout inbound` (default): mTLS clients (TLS 1.3 full handshakes, X25519) to the
  proxy's public listener, a plain echo app behind it;
- `--layout outbound`: plain clients to the proxy's upstream listener, which dials goload's
  mTLS backend registered as a Connect-native `db` (the Go reference without session
  resumption, as Consul's proxy; ours resumes, as it does by default).

Then:

- `--windows` conn/s windows per proxy, alternating, give its CPU per connection (utime +
  stime from /proc, over completed connections; the median is printed);
- one more window per proxy under `perf record` (cpu-clock sampling: this VM has no
  hardware counters) gives the shares of its samples by shared object: OpenSSL
  (`cryptography`'s `_rust.abi3.so`), the interpreter, libc, uvloop and the other
  extension modules, the kernel; for the Go reference its binary and the kernel.

Shares times the median CPU per connection give microseconds per part. What OpenSSL and
the kernel cost ours is a floor no Python code can go under.

    python bench/cpu_split.py                  # about 1.5 minutes
    python bench/cpu_split.py --layout outbound --windows 6
    git worktree add ../base HEAD~3 && python bench/cpu_split.py --baseline ../base

`--baseline DIR` adds a third proxy to the alternation: ours from another checkout (its
`proxy` and `listeners` packages first on the path), for a before/after of a change in the
same windows. `--baseline-python EXE` runs that third proxy with another interpreter (whose
environment has this project's dependencies), with `--baseline .` the same code.
`--ours-flag FLAG` gives our proxy a flag the baseline does not get: with `--baseline .`, the
same code with and without it (`--ours-flag=-authorize-cache`).

Rule 1: nothing here is collected by pytest; `go` and `perf` must be on PATH (else a clear
error). Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_goload  # noqa: E402
import bench_goref  # noqa: E402
from bench_load import Target  # noqa: E402
from bench_procs import Processes, Scene  # noqa: E402
from bench_util import AgentHTTP, TLSMaterial, free_port, proc_cpu_seconds  # noqa: E402

PROXY_CPU, LOAD_CPU = 0, 1
CONCURRENCY = 64

# Shared objects grouped as the report names them (first match wins).
GROUPS = [
    ("OpenSSL 4.0 (cryptography's _rust.abi3.so)", re.compile(r"_rust\.abi3")),
    ("the interpreter (libpython)", re.compile(r"libpython|^python")),
    ("libc (malloc, free, copies, system call wrappers)", re.compile(r"libc\.so|libm\.so|ld-")),
    ("uvloop, _asyncio, cffi and other extensions", re.compile(r"\.so$")),
    ("the kernel", re.compile(r"kernel|vdso")),
    ("the Go reference's own code", re.compile(r"goref")),
]


def window(goload: Path, target: Target, pid: int, seconds: float) -> tuple[float, int]:
    """One conn/s window: (CPU seconds of `pid`, connections completed)."""
    load = bench_goload.GoLoad(goload)
    with load.conn_rate(target, CONCURRENCY, seconds) as run:
        os.sched_setaffinity(run.popen.pid, {LOAD_CPU})
        before = proc_cpu_seconds(pid)
        run.go()
        result = run.result(seconds + 30)
        after = proc_cpu_seconds(pid)
    if result.get("errors"):
        raise RuntimeError(f"errors in the window: {result.get('first_error')}")
    return after - before, int(result["count"])


def perf_shares(data: Path) -> dict[str, float]:
    """Shares of the samples by group of shared object (`GROUPS`)."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "-g", "none"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
        if not match:
            continue
        dso = match.group(2).strip("[]")
        label = next((name for name, rx in GROUPS if rx.search(dso)), "other")
        shares[label] = shares.get(label, 0.0) + float(match.group(1)) / 100
    return shares


@dataclass
class Layout:
    """The proxies of one layout, started: name -> (PID, port), and how goload reaches them."""

    proxies: dict[str, tuple[int, int]]
    client: TLSMaterial | None  # the client leaf for the proxies' ports (inbound), or None
    goload: Path
    plain_port: int  # the backend's plain echo port (a direct connection)
    work: Path


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the layout and the proxies in it (this script's and others')."""
    parser.add_argument("--layout", choices=("inbound", "outbound"), default="inbound")
    parser.add_argument(
        "--baseline", metavar="DIR", type=Path, help="also ours from this other checkout"
    )
    parser.add_argument(
        "--baseline-python",
        metavar="EXE",
        default=sys.executable,
        help="the interpreter of the --baseline proxy (default: this one)",
    )
    parser.add_argument(
        "--ours-flag",
        metavar="FLAG",
        action="append",
        default=[],
        help="one more flag for our proxy only, not the --baseline one (repeatable)",
    )


def layout_problem(args: argparse.Namespace, tools: tuple[str, ...]) -> str | None:
    """Why the layout cannot be run (a bad --baseline, a tool not on PATH), or None."""
    if args.baseline is not None and not (args.baseline / "proxy" / "__main__.py").is_file():
        return f"--baseline {args.baseline}: not a checkout of this project"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    return None


class LayoutError(RuntimeError):
    """The layout could not be started: goload or the Go reference did not build."""


@contextlib.contextmanager
def running_layout(args: argparse.Namespace, name: str) -> Iterator[tuple[Layout, Processes]]:
    """This process on the load CPU, the layout of `args` started; every process of it
    stopped when the block ends.

    Raises:
        LayoutError: as `start_layout`.
    """
    os.sched_setaffinity(0, {LOAD_CPU})
    procs = Processes(PROXY_CPU, LOAD_CPU)
    scene = Scene(name)
    try:
        yield start_layout(procs, scene, args), procs
    finally:
        procs.end(scene)
        procs.close()


def start_layout(procs: Processes, scene: Scene, args: argparse.Namespace) -> Layout:
    """The dev agent, goload's backend, our proxy, the Go reference and (with --baseline) ours
    from the other checkout, each proxy on the proxy CPU, in the layout `args` names.

    Raises:
        LayoutError: goload or the Go reference could not be built.
    """
    work = Path(procs.tmpdir("cpu-split-"))
    goload, why = bench_goload.build(work)
    goref, why_ref = bench_goref.build(work)
    if goload is None or goref is None:
        raise LayoutError(why or why_ref)
    _, agent = procs.agent()
    api = AgentHTTP(agent)
    web, db = api.material("web"), api.material("db")
    # goload's backend: the plain port echoes, the mTLS one presents the db leaf.
    _, plain_port, tls_port = procs.gobackend(goload, db)
    ours_port, base_port = free_port(), free_port()
    if args.layout == "inbound":

        def ours_args(port: int) -> list[str]:
            return [
                *("-service", "db", "-listen", f"127.0.0.1:{port}"),
                *("-service-addr", f"127.0.0.1:{plain_port}"),
            ]

        go_argv = bench_goref.inbound_argv(
            goref, agent, "db", "127.0.0.1:0", f"127.0.0.1:{plain_port}"
        )
        go_material, client = db, web
    else:
        api.put(
            "/v1/agent/service/register",
            {
                "Name": "db",
                "Address": "127.0.0.1",
                "Port": tls_port,
                "Connect": {"Native": True},
            },
        )
        api.wait_connect_instance("db", tls_port)

        def ours_args(port: int) -> list[str]:
            return ["-service", "web", "-upstream", f"db:{port}"]

        roots, _ = api.get("/v1/agent/connect/ca/roots")
        go_argv = bench_goref.outbound_argv(
            goref,
            agent,
            "db",
            "127.0.0.1:0",
            roots["TrustDomain"],
            discovery="watch",
            session_cache=False,
        )
        go_material, client = web, None
    ours = procs.proxy(scene, "ours", [*ours_args(ours_port), *args.ours_flag], agent, None)
    go_port = procs.goref(scene, "go-reference", go_argv, go_material, 1)
    go = scene.proxies[-1]
    proxies = {"ours": (ours.pid, ours_port), "Go reference": (go.pid, go_port)}
    if args.baseline is not None:
        # Safe path: not the current directory first, so the other checkout's packages
        # come before this one's (installed in editable mode).
        where = {"PYTHONPATH": str(args.baseline.resolve()), "PYTHONSAFEPATH": "1"}
        base = procs.proxy(
            scene,
            "baseline",
            ours_args(base_port),
            agent,
            None,
            env=where,
            python=args.baseline_python,
        )
        proxies["baseline"] = (base.pid, base_port)
    return Layout(proxies, client, goload, plain_port, work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_layout_arguments(parser)
    parser.add_argument("--windows", type=int, default=3, help="conn/s windows per proxy")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window")
    args = parser.parse_args()
    problem = layout_problem(args, ("go", "perf"))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    try:
        with running_layout(args, "cpu-split") as (layout, procs):
            proxies, client, goload = layout.proxies, layout.client, layout.goload
            for pid, port in proxies.values():  # warm-up: pools, caches, sessions
                window(goload, Target("127.0.0.1", port, client), pid, 1.0)
            per_conn: dict[str, list[float]] = {name: [] for name in proxies}
            for i in range(args.windows):
                order = list(proxies) if i % 2 == 0 else list(reversed(proxies))
                for name in order:
                    pid, port = proxies[name]
                    cpu, count = window(
                        goload, Target("127.0.0.1", port, client), pid, args.seconds
                    )
                    per_conn[name].append(cpu / max(count, 1) * 1e6)
            shares: dict[str, dict[str, float]] = {}
            for name, (pid, port) in proxies.items():
                data = layout.work / f"perf.{pid}.data"
                recorder = subprocess.Popen(
                    ["perf", "record", "-p", str(pid), "-o", str(data)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    window(goload, Target("127.0.0.1", port, client), pid, args.seconds)
                finally:
                    recorder.send_signal(signal.SIGINT)
                    recorder.wait(30)
                shares[name] = perf_shares(data)
    except LayoutError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"layout {args.layout}, goload at concurrency {CONCURRENCY}:")
    for name, values in per_conn.items():
        median = statistics.median(values)
        spread = ", ".join(f"{x:,.0f}" for x in sorted(values))
        print(f"{name}: {median:,.0f} µs of CPU per connection (windows: {spread})")
        for label, share in sorted(shares[name].items(), key=lambda kv: -kv[1]):
            if share >= 0.001:
                print(f"  {label:52s} {share:6.1%}  {share * median:7,.0f} µs")
    for other in proxies:
        if other != "ours":
            ratio = statistics.median(per_conn["ours"]) / statistics.median(per_conn[other])
            # Each round measures every proxy once, next to each other: the ratio within a
            # round carries less of the machine's drift than the ratio of the medians.
            rounds = sorted(a / b for a, b in zip(per_conn["ours"], per_conn[other], strict=True))
            print(
                f"ours / {other}: {ratio:.2f}x (ratio of the medians); within a round: median "
                f"{statistics.median(rounds):.2f}x, from {rounds[0]:.2f}x to {rounds[-1]:.2f}x"
            )
    for name, entry in procs.logs.items():
        for problem in entry["problems"][:5]:
            print(f"{name}: {problem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
