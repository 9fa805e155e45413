"""Where a round trip's time goes, through our proxy and through the Go reference.

Issue 13 asks that the latency a proxy adds to a round trip on an established connection be
at most the Go reference's. `run.py` measures each scenario's RTT in a row, and single
windows move by ±10 µs here, about the size of the difference. This script alternates RTT
windows (goload on one established connection, 64-byte round trips) between our proxy, the
Go reference, ours from `--baseline` and a direct connection to the backend, in the layout
of `cpu_split.py` (same flags; each proxy alone on CPU 0, the rest on CPU 1), and prints:

- each proxy's p50 (the median of its windows) and what it adds over the direct p50;
- ours against each other proxy within each round (the rounds carry less drift);
- the proxy's CPU per round trip (utime + stime from /proc over the window);
- with `--trace` (`perf` on PATH): one more window per proxy under the system-call
  tracepoints, and the time from the end of each `read()` to the next `write()` before the
  proxy waits again, per socket: the proxy's own part of forwarding a message, without the
  kernel's (the write itself, which wakes the far end, is the same for every proxy).

    python bench/rtt_path.py --trace                  # about 1.5 minutes
    python bench/rtt_path.py --layout outbound --windows 8 --baseline ../base

Rule 1: nothing here is collected by pytest; every process is started here and stopped by
its PID.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_goload  # noqa: E402
from bench_load import Target  # noqa: E402
from bench_util import proc_cpu_seconds  # noqa: E402
from cpu_split import (  # noqa: E402
    LOAD_CPU,
    LayoutError,
    add_layout_arguments,
    layout_problem,
    running_layout,
)

DIRECT = "direct"
_EVENT = re.compile(
    r"\s*\S+\s+(\d+)\s+\[\d+\]\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(.*)"
)
_READ, _WRITES, _WAITS = 0, {1, 20, 44, 46}, {7, 23, 232, 270, 271, 281}  # x86-64 numbers


def rtt_window(goload: Path, target: Target, pid: int | None, count: int) -> tuple[float, float]:
    """One RTT window: (p50 in µs, CPU of `pid` per round trip in µs; 0 without a PID)."""
    with bench_goload.GoLoad(goload).rtt(target, count) as run:
        os.sched_setaffinity(run.popen.pid, {LOAD_CPU})
        before = proc_cpu_seconds(pid) if pid else 0.0
        run.go()
        result = run.result(count * 0.01 + 60)
        after = proc_cpu_seconds(pid) if pid else 0.0
    if "p50" not in result:
        raise RuntimeError(f"the RTT window failed: {result}")
    return float(result["p50"]), (after - before) / count * 1e6


def read_to_write(perf_data: Path) -> dict[str, float]:
    """p50 µs from the end of a read() to the next write() before the next wait, per socket
    read (the fd, as perf prints the first argument)."""
    text = subprocess.run(
        ["perf", "script", "-i", str(perf_data)], capture_output=True, text=True, check=True
    ).stdout
    by_thread: dict[int, list[tuple[float, str, int, str]]] = defaultdict(list)
    for line in text.splitlines():
        match = _EVENT.match(line)
        if match:
            tid, when, kind, nr, rest = match.groups()
            by_thread[int(tid)].append((float(when), kind, int(nr), rest))
    gaps: dict[str, list[float]] = defaultdict(list)
    for events in by_thread.values():
        fd, read_end = "", None
        for when, kind, nr, rest in events:
            if kind == "enter" and nr == _READ:
                fd = rest.split(",")[0].strip(" (")
            elif kind == "exit" and nr == _READ:
                read_end = when
            elif kind == "enter" and nr in _WRITES and read_end is not None:
                gaps[fd].append((when - read_end) * 1e6)
                read_end = None
            elif kind == "enter" and nr in _WAITS:
                read_end = None
    return {fd: statistics.median(values) for fd, values in gaps.items() if len(values) >= 100}


def traced(goload: Path, target: Target, pid: int, count: int, data: Path) -> dict[str, float]:
    """One more RTT window with `pid`'s system calls traced: `read_to_write` of it."""
    recorder = subprocess.Popen(
        [
            *("perf", "record", "-e", "raw_syscalls:sys_enter", "-e", "raw_syscalls:sys_exit"),
            *("-p", str(pid), "-o", str(data)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # perf writes its file's header once the tracepoints are attached: the window
        # starts after that, or its first round trips would go unseen.
        deadline = time.monotonic() + 10
        while not (data.exists() and data.stat().st_size > 0):
            if time.monotonic() > deadline or recorder.poll() is not None:
                raise RuntimeError("perf record did not start")
            time.sleep(0.05)
        rtt_window(goload, target, pid, count)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)
    return read_to_write(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_layout_arguments(parser)
    parser.add_argument("--windows", type=int, default=6, help="RTT windows per proxy")
    parser.add_argument("--count", type=int, default=5000, help="round trips per window")
    parser.add_argument("--trace", action="store_true", help="the read()-to-write() times")
    args = parser.parse_args()
    problem = layout_problem(args, ("go", "perf") if args.trace else ("go",))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    gaps: dict[str, dict[str, float]] = {}
    try:
        with running_layout(args, "rtt-path") as (layout, _):
            targets: dict[str, tuple[int | None, Target]] = {
                name: (pid, Target("127.0.0.1", port, layout.client))
                for name, (pid, port) in layout.proxies.items()
            }
            targets[DIRECT] = (None, Target("127.0.0.1", layout.plain_port, None))
            seen: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
            for i in range(args.windows):
                for name in list(targets) if i % 2 == 0 else list(reversed(targets)):
                    pid, target = targets[name]
                    seen[name].append(rtt_window(layout.goload, target, pid, args.count))
            if args.trace:
                for name, (pid, target) in targets.items():
                    if pid is not None:
                        data = layout.work / f"syscalls.{pid}.data"
                        gaps[name] = traced(layout.goload, target, pid, max(args.count, 2000), data)
    except LayoutError as exc:
        print(exc, file=sys.stderr)
        return 2
    direct = statistics.median(p50 for p50, _ in seen[DIRECT])
    print(f"layout {args.layout}: {args.windows} windows of {args.count} 64-byte round trips")
    for name, windows in seen.items():
        p50 = statistics.median(p for p, _ in windows)
        spread = f"windows {min(p for p, _ in windows):.1f}-{max(p for p, _ in windows):.1f}"
        if name == DIRECT:
            print(f"{name:14s} p50 {p50:6.1f} µs ({spread})")
            continue
        cpu = statistics.median(c for _, c in windows)
        print(
            f"{name:14s} p50 {p50:6.1f} µs, +{p50 - direct:.1f} over direct ({spread}); "
            f"CPU {cpu:.0f} µs per round trip"
        )
    for other, windows in seen.items():
        if other not in ("ours", DIRECT):
            rounds = sorted(a[0] / b[0] for a, b in zip(seen["ours"], windows, strict=True))
            print(
                f"ours / {other}: p50 within a round: median {statistics.median(rounds):.3f}x, "
                f"from {rounds[0]:.3f}x to {rounds[-1]:.3f}x"
            )
    for name, by_fd in gaps.items():
        times = ", ".join(f"{value:.0f}" for _, value in sorted(by_fd.items()))
        print(f"{name}: read() end to write() p50, µs per socket read: {times or 'none seen'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
