"""Process control of the benchmark: starting, pinning, watching and stopping every process
it runs (the dev agent, the backend, our proxy, the peers and the Go reference proxy).

Rule 1: every process started here is stopped by PID (SIGTERM, then SIGKILL), never by
name, and its output is drained continuously so it can never block on a full pipe.
Rule 2: nothing here measures or decides what a scenario is: `Processes` starts what it is
asked to, on the CPU of its role, and waits until it is ready.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_goref
from bench_util import TLSMaterial, log

HERE = Path(__file__).resolve().parent
READY_LINE = "Proxy loaded config and ready to serve"
ENGINE_VAR = "CONNECT_PROXY_TLS_ENGINE"  # our proxy's TLS engine (`ssl`, `openssl`)
# Our proxy's access log: one line per connection (`proxy.inbound: connection forwarded: ...`).
ACCESS_LINE = re.compile(r"\bproxy\.(inbound|upstream): connection \w+")


def pin(pid: int, cpu: int | set[int] | None) -> None:
    """Pin every thread of `pid` to `cpu` (one CPU or a set; new threads inherit it)."""
    if cpu is None:
        return
    mask = {cpu} if isinstance(cpu, int) else set(cpu)
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), mask)


def children(pid: int) -> list[int]:
    """The child processes of `pid` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    return sorted(set(out))


@dataclass(frozen=True, slots=True)
class Pid:
    """A process we did not start ourselves (a -workers child), for CPU and RSS accounting."""

    name: str
    pid: int


TRACEBACK_LINES = 60  # at most this many lines of a traceback kept after its first


class Proc:
    """A child process whose stdout+stderr is drained by a thread (it must never block on a
    full pipe) and scanned for warnings and errors (a traceback is kept whole, up to its
    exception line)."""

    PROBLEM = re.compile(r"\[(WARN|ERROR|CRIT|ALERT|EMERG)\]|Traceback|LOG[0-3]\[", re.IGNORECASE)

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpu: int | None,
        problem_filter: Callable[[str], bool] | None = None,
        env: dict[str, str] | None = None,
        stdin_data: str | None = None,
        counted: re.Pattern[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL if stdin_data is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,  # a Ctrl-C on the terminal reaches only us; we stop them
            env=env,
        )
        pin(self.popen.pid, cpu)
        if stdin_data is not None:
            assert self.popen.stdin is not None
            # Key material for the Go reference proxy: a pipe, never a file. The process
            # reads it all before anything else, so this cannot block for long.
            try:
                self.popen.stdin.write(stdin_data)
                self.popen.stdin.close()
            except OSError:
                pass  # it exited already: wait_for reports its output
        self.cpu = cpu
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=200)
        self.problems: list[str] = []
        self.problem_count = 0
        self.problem_filter = problem_filter
        self._traceback_left = 0  # lines of a traceback still to keep with its first line
        self.counted = counted
        self.lines = 0  # every line drained
        self.counted_lines = 0  # lines matching `counted`
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
                self.lines += 1
                if self.counted is not None and self.counted.search(line):
                    self.counted_lines += 1
                if len(self.head) < 2000:
                    self.head.append(line)
                self.tail.append(line)
                if self._traceback_left and self.problems:
                    # The body of a traceback goes with its first line, so that the JSON
                    # says where it came from (a problem seen once is still diagnosable).
                    self.problems[-1] += "\n" + line
                    indented = line.startswith((" ", "\t"))
                    self._traceback_left = self._traceback_left - 1 if indented else 0
                elif self._is_problem(line):
                    self.problem_count += 1
                    if len(self.problems) < 20:
                        self.problems.append(line)
                        if line.startswith("Traceback"):
                            self._traceback_left = TRACEBACK_LINES
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def _is_problem(self, line: str) -> bool:
        if not self.PROBLEM.search(line):
            return False
        return self.problem_filter is None or self.problem_filter(line)

    def _failure(self, why: str) -> RuntimeError:
        out = "\n    ".join(list(self.tail)[-15:])
        return RuntimeError(f"{self.name} {why}; last output:\n    {out}")

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
                    raise self._failure(
                        "exited" if self.eof else f"gave no {pattern!r} within {timeout:g}s"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_count(self, pattern: str, count: int, timeout: float) -> None:
        """Until `count` output lines (of the first 2000) match `pattern`.

        Raises:
            RuntimeError: the process ended first, or `timeout` passed.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if sum(1 for line in self.head if rx.search(line)) >= count:
                    return
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    raise self._failure(
                        "exited" if self.eof else f"gave fewer than {count} {pattern!r}"
                    )
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


def listening(port: int) -> bool:
    """Whether a TCP socket listens on 127.0.0.1:`port` (from /proc/net/tcp: no connection
    is made, so the listener logs nothing about a probe)."""
    want = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) > 3 and fields[1] == want and fields[3] == "0A":  # LISTEN
                return True
    return False


def wait_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            out = "\n    ".join(list(proc.tail)[-15:])
            raise RuntimeError(f"{proc.name} exited; last output:\n    {out}")
        if listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: port {port} not listening within {timeout:g}s")


def reap(procs: Sequence[Proc | Pid]) -> None:
    """Stop -workers children that outlived their parent (it passes its signals on, so this
    is only for a parent that had to be killed), by PID, after checking it is still ours."""
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                if b"proxy" not in f.read():
                    continue  # the PID was reused by something else
        except OSError:
            continue  # gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)


@dataclass
class Scene:
    """What one scenario started: processes stopped at its end, then `after` callbacks run."""

    name: str
    proxies: list[Proc] = field(default_factory=list)
    after: list[Callable[[], None]] = field(default_factory=list)


class Processes:
    """Every process of one run, on the CPU of its role: the proxies (ours, the peers, the
    Go reference) on `proxy_cpu`, the load side (agent, backend) on `load_cpu`.

    `logs` holds, per stopped process, its exit code and the problem lines of its output.
    A proxy is added to its scene before it is waited for, so a proxy that never gets
    ready is still stopped at the end of its scenario.
    """

    def __init__(self, proxy_cpu: int | None, load_cpu: int | None) -> None:
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self.started: list[Proc] = []
        self.tmpdirs: list[str] = []
        self.logs: dict[str, Any] = {}

    def start(self, name: str, argv: Sequence[str], cpu: int | None, **kw: Any) -> Proc:
        proc = Proc(name, argv, cpu=cpu, **kw)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.logs[proc.name] = {
            "exit_code": proc.popen.returncode,
            "lines": proc.lines,
            "problem_lines": proc.problem_count,
            "problems": proc.problems,
        }

    def tmpdir(self, prefix: str) -> str:
        """A fresh private (0700) directory, deleted by `close` at the latest."""
        directory = tempfile.mkdtemp(prefix=prefix)
        self.tmpdirs.append(directory)
        return directory

    def end(self, scene: Scene) -> None:
        """Stop the scene's processes, then run its clean-up steps (each failure logged)."""
        for p in scene.proxies:
            self.stop(p)
        for fn in scene.after:
            try:
                fn()
            except Exception as exc:
                log(f"{scene.name}: clean-up step failed: {exc}")

    def close(self) -> None:
        """Stop every process still running, newest first, and delete the directories."""
        for proc in reversed(self.started):
            if proc.name not in self.logs:
                self.stop(proc)
        for d in self.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)

    # the load side

    def agent(self) -> tuple[Proc, str]:
        """Start the dev agent; returns it and its HTTP address."""
        proc = self.start(
            "dev-agent",
            [
                *(sys.executable, "-m", "proxy", "dev-agent"),
                *("-http-addr", "127.0.0.1:0", "-sidecar-check-interval", "1s"),
            ],
            self.load_cpu,
        )
        m = proc.wait_for(r"HTTP API address:\s*(\S+)", 60)
        return proc, m.group(1)

    def backend(self, agent_addr: str) -> tuple[Proc, int, int]:
        """Start the backend; returns it, its plain port and its mTLS port."""
        proc = self.start(
            "backend",
            [sys.executable, str(HERE / "bench_backend.py"), "-http-addr", agent_addr],
            self.load_cpu,
        )
        m = proc.wait_for(r"READY plain=(\d+) tls=(\d+)", 60)
        return proc, int(m.group(1)), int(m.group(2))

    def gobackend(self, binary: Path, material: TLSMaterial) -> tuple[Proc, int, int]:
        """Start goload's backend mode (the same echo-or-sink servers, compiled), with the
        service leaf on its standard input; returns it, its plain port and its mTLS port."""
        proc = self.start(
            "backend",
            [str(binary), "-mode", "backend"],
            self.load_cpu,
            stdin_data=bench_goref.stdin_material(material) + "\n",
        )
        m = proc.wait_for(r"READY plain=(\d+) tls=(\d+)", 60)
        return proc, int(m.group(1)), int(m.group(2))

    # the proxies

    def proxy(
        self,
        scene: Scene,
        name: str,
        args: Sequence[str],
        agent_addr: str,
        engine: str | None,
        *,
        cpus: set[int] | None = None,
        ready: int = 1,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> Proc:
        """Start `python -m proxy <args>` on the proxy CPU (or on `cpus`) with the TLS engine
        `engine` (CONNECT_PROXY_TLS_ENGINE; unset for None) and `env` added to ours, and wait
        for `ready` ready lines (one per -workers process). Its access-log lines are counted
        (`Proc.counted_lines`). `python`: the interpreter (this one unless given)."""
        argv = [python, "-m", "proxy", *args, "-http-addr", agent_addr]
        argv += ["-drain-timeout", "1s"]
        extra = {**(env or {}), **({} if engine is None else {ENGINE_VAR: engine})}
        proc = self.start(
            name,
            argv,
            self.proxy_cpu if cpus is None else None,
            env={**os.environ, **extra} if extra else None,
            counted=ACCESS_LINE,
        )
        scene.proxies.append(proc)
        proc.wait_count(re.escape(READY_LINE), ready, 60)
        pin(proc.pid, self.proxy_cpu if cpus is None else cpus)  # threads started since
        return proc

    def goref(
        self,
        scene: Scene,
        name: str,
        argv: Sequence[str],
        material: TLSMaterial,
        maxprocs: int,
    ) -> int:
        """Start the Go reference proxy on the proxy CPU with GOMAXPROCS=`maxprocs`; returns
        the port it listens on."""
        env = {**os.environ, "GOMAXPROCS": str(maxprocs)}
        proc = self.start(
            name,
            argv,
            self.proxy_cpu,
            env=env,
            stdin_data=bench_goref.stdin_material(material),
        )
        scene.proxies.append(proc)
        m = proc.wait_for(r"READY listen=\S+:(\d+)", 30)
        pin(proc.pid, self.proxy_cpu)  # threads started since
        return int(m.group(1))

    def peer(self, scene: Scene, name: str, argv: Sequence[str], port: int) -> Proc:
        """Start a peer (HAProxy, nginx, stunnel) on the proxy CPU and wait until it listens
        on `port` (seen in /proc/net/tcp: a probe would make it log a handshake error)."""
        proc = self.start(name, argv, self.proxy_cpu)
        scene.proxies.append(proc)
        wait_port(proc, port, 20)
        pin(proc.pid, self.proxy_cpu)
        return proc
