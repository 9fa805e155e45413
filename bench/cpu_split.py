"""Where an inbound connection's CPU goes, by library, in our proxy and in the Go reference.

Issue 13 asks for CPU per connection at most the Go reference's. This script shows what that
leaves for the Python work: each proxy in turn is the only process on CPU 0 (the dev agent,
the backend and the load generator on CPU 1), goload makes mTLS connections at concurrency
64 (TLS 1.3 full handshakes, X25519), and:

- `--windows` conn/s windows per proxy, alternating, give its CPU per connection (utime +
  stime from /proc, over completed connections; the median is printed);
- one more window per proxy under `perf record` (cpu-clock sampling: this VM has no
  hardware counters) gives the shares of its samples by shared object: OpenSSL
  (`cryptography`'s `_rust.abi3.so`), the interpreter, libc, uvloop and the other
  extension modules, the kernel; for the Go reference its binary and the kernel.

Shares times the median CPU per connection give microseconds per part. What OpenSSL and
the kernel cost ours is a floor no Python code can go under.

    python bench/cpu_split.py                  # about 1 minute
    python bench/cpu_split.py --windows 6 --seconds 3

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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_goload  # noqa: E402
import bench_goref  # noqa: E402
from bench_load import Target  # noqa: E402
from bench_util import AgentHTTP, dev_agent_process, free_port, proc_cpu_seconds  # noqa: E402

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


@contextlib.contextmanager
def started(argv: list[str], cpu: int, **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    """A child process pinned to `cpu`, stopped by its PID (SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(argv, text=True, **kwargs)  # type: ignore[call-overload]
    try:
        os.sched_setaffinity(proc.pid, {cpu})
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Until something listens on 127.0.0.1:`port` (read from /proc, no probe connection)."""
    deadline = time.monotonic() + timeout
    needle = f":{port:04X} 00000000:0000 0A"
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if needle in f.read():
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:g}s")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--windows", type=int, default=3, help="conn/s windows per proxy")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each window")
    args = parser.parse_args()
    for tool in ("go", "perf"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH", file=sys.stderr)
            return 2
    os.sched_setaffinity(0, {LOAD_CPU})
    with (
        tempfile.TemporaryDirectory(prefix="cpu-split-") as tmp,
        dev_agent_process(LOAD_CPU) as (agent, _),
    ):
        work = Path(tmp)
        goload, why = bench_goload.build(work)
        goref, why_ref = bench_goref.build(work)
        if goload is None or goref is None:
            print(why or why_ref, file=sys.stderr)
            return 2
        api = AgentHTTP(agent)
        web, db = api.material("web"), api.material("db")
        backend_port, ours_port, go_port = free_port(), free_port(), free_port()
        python = sys.executable
        echo = (
            "import asyncio, uvloop\n"
            "class Echo(asyncio.Protocol):\n"
            "    def connection_made(self, t): self.t = t\n"
            "    def data_received(self, d): self.t.write(d)\n"
            "async def main():\n"
            "    loop = asyncio.get_running_loop()\n"
            f"    await loop.create_server(Echo, '127.0.0.1', {backend_port})\n"
            "    await asyncio.Event().wait()\n"
            "uvloop.run(main())\n"
        )
        ours_argv = [python, "-m", "proxy", "-service", "db", "-listen"]
        ours_argv += [f"127.0.0.1:{ours_port}", "-service-addr", f"127.0.0.1:{backend_port}"]
        ours_argv += ["-http-addr", agent, "-drain-timeout", "1s"]
        go_argv = bench_goref.inbound_argv(
            goref, agent, "db", f"127.0.0.1:{go_port}", f"127.0.0.1:{backend_port}"
        )
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        with (
            started([python, "-c", echo], LOAD_CPU, **quiet),
            started(ours_argv, PROXY_CPU, cwd=ROOT, **quiet) as ours,
            started(
                go_argv,
                PROXY_CPU,
                stdin=subprocess.PIPE,
                env={**os.environ, "GOMAXPROCS": "1"},
                **quiet,
            ) as go,
        ):
            assert go.stdin is not None
            go.stdin.write(bench_goref.stdin_material(db))
            go.stdin.close()
            for port in (backend_port, ours_port, go_port):
                wait_listening(port)
            proxies = {"ours": (ours.pid, ours_port), "Go reference": (go.pid, go_port)}
            for pid, port in proxies.values():  # warm-up: pools, caches
                window(goload, Target("127.0.0.1", port, web), pid, 1.0)
            per_conn: dict[str, list[float]] = {name: [] for name in proxies}
            for i in range(args.windows):
                order = list(proxies) if i % 2 == 0 else list(reversed(proxies))
                for name in order:
                    pid, port = proxies[name]
                    cpu, count = window(goload, Target("127.0.0.1", port, web), pid, args.seconds)
                    per_conn[name].append(cpu / max(count, 1) * 1e6)
            shares: dict[str, dict[str, float]] = {}
            for name, (pid, port) in proxies.items():
                data = work / f"perf.{pid}.data"
                recorder = subprocess.Popen(
                    ["perf", "record", "-p", str(pid), "-o", str(data)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    window(goload, Target("127.0.0.1", port, web), pid, args.seconds)
                finally:
                    recorder.send_signal(signal.SIGINT)
                    recorder.wait(30)
                shares[name] = perf_shares(data)
    for name, values in per_conn.items():
        median = statistics.median(values)
        spread = ", ".join(f"{x:,.0f}" for x in sorted(values))
        print(f"{name}: {median:,.0f} µs of CPU per connection (windows: {spread})")
        for label, share in sorted(shares[name].items(), key=lambda kv: -kv[1]):
            if share >= 0.001:
                print(f"  {label:52s} {share:6.1%}  {share * median:7,.0f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
