"""py-spy profiles of the proxy processes during one extra conn/s window (`--profile DIR`).

Rule 1: a profiled window is never counted in any figure (sampling slows the proxy a
little); the caller runs it after the measured windows.
Rule 2: only Python processes are sampled, each by its PID; py-spy's raw collapsed stacks
are kept in the directory given, and only a summary goes into the report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_procs import Pid, Proc
from bench_util import log

RATE_HZ = 250
TOP = 30  # functions per process in the report

_Spy = tuple[str, Path, "subprocess.Popen[bytes]"]


def _spy_binary() -> str:
    return shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def _is_python(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"python" in f.read()
    except OSError:
        return False


def _start_spies(
    spy: str, directory: Path, name: str, proxies: Sequence[Proc | Pid], seconds: float
) -> list[_Spy]:
    spies: list[_Spy] = []
    for proc in proxies:
        if not _is_python(proc.pid):
            continue
        out = directory / f"{name}.{proc.name}.txt".replace("/", "-")
        argv = [spy, "record", "-p", str(proc.pid), "-d", str(int(seconds) + 1), "-r"]
        argv += [str(RATE_HZ), "-n", "-f", "raw", "-o", str(out)]
        popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        spies.append((proc.name, out, popen))
    return spies


def _collect(spies: list[_Spy], seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for proc_name, out, popen in spies:
        try:
            _, err = popen.communicate(timeout=seconds + 30)
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


def profile(
    directory: Path,
    name: str,
    proxies: Sequence[Proc | Pid],
    seconds: float,
    window: Callable[[], object],
) -> dict[str, Any]:
    """Run `window` (a conn/s run of `seconds` at concurrency 64) with py-spy sampling each
    Python proxy process.

    Writes py-spy's raw collapsed stacks to `<directory>/<scenario>.<process>.txt`.

    Returns:
        per process, the functions with the largest inclusive share of the samples (or why
        there is no profile).
    """
    spy = _spy_binary()
    if not os.path.exists(spy):
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    directory.mkdir(parents=True, exist_ok=True)
    spies = _start_spies(spy, directory, name, proxies, seconds)
    if not spies:
        return {"skipped": "no Python proxy process"}
    log(f"{name}: profile with py-spy at concurrency 64 ({seconds:g}s, not counted)")
    window()
    return _collect(spies, seconds)


def _frame_key(frame: str) -> str | None:
    """A py-spy frame `function (file:line)` as `function (file)` (the line left out); None
    for a native frame without a symbol (it says nothing)."""
    fn, _, where = frame.partition(" (")
    if fn.startswith("0x"):
        return None
    return f"{fn} ({where.rsplit(':', 1)[0]})" if where else fn


def _inclusive(path: Path) -> tuple[int, dict[str, int]]:
    """The samples in all, and per function the samples whose stack contains it."""
    total = 0
    inclusive: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        samples = int(n)
        total += samples
        # Each function once per sample (recursion), in stack order: ties rank by it.
        keys = dict.fromkeys(k for k in map(_frame_key, stack.split(";")) if k is not None)
        for key in keys:
            inclusive[key] = inclusive.get(key, 0) + samples
    return total, inclusive


def top_frames(path: Path, count: int = TOP) -> list[tuple[str, float]]:
    """The functions with the largest inclusive share of py-spy's raw (collapsed) samples."""
    if not path.exists():
        return []
    total, inclusive = _inclusive(path)
    if not total:
        return []
    # The trunk every sample shares (interpreter start, the event loop) is left out.
    branches = {k: v for k, v in inclusive.items() if v < total * 0.995}
    ranked = sorted(branches.items(), key=lambda kv: -kv[1])[:count]
    return [(k, round(v / total, 4)) for k, v in ranked]
