"""The compiled load generator (bench/goload, Go standard library only): build, and one
measurement window at a time.

The binary is built at run time like the Go reference proxy (bench_goref.build_module:
offline, every Go directory in a private temporary directory). Each window is one goload
process, started by the harness on the load CPU (it inherits the harness's pinning), with
the client leaf as one JSON line on its standard input, never a file. The process sets up
(TLS configuration, or the connection for RTT and throughput), prints `READY ...`, and
starts when the harness writes `GO`: the harness takes its CPU readings at that instant.
Its result is one line `RESULT <json>`. goload's `backend` mode (the far end of the load side,
with the service leaf on its standard input) is a long-lived process like the Python backend:
`bench_procs.Processes.gobackend` starts it.

Rule 1: every process started here is stopped by PID (`GoRun.close`: SIGTERM, then
SIGKILL), and every read of its output has a deadline.
Rule 2: nothing here measures the proxies: `bench_measure.Bench` does, around `GoRun.go`.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import bench_goref
from bench_load import Target

SOURCE = Path(__file__).resolve().parent / "goload"
SETUP_TIMEOUT = 30.0  # s: from start to READY (an RTT or throughput connection included)
MAX_LINE = 1 << 20


def build(workdir: Path) -> tuple[Path | None, str]:
    """Build goload into `workdir`; (None, one line saying why) when it cannot be."""
    return bench_goref.build_module(
        SOURCE, workdir, "--load go", "compiled load generator (the Python one is used)"
    )


def material_line(target: Target) -> str:
    """The first line of goload's standard input: the client leaf and roots, or `{}`."""
    if target.tls is None:
        return "{}\n"
    return bench_goref.stdin_material(target.tls) + "\n"  # json.dumps: one line


def parse_result(lines: Sequence[str]) -> dict[str, Any]:
    """The window's result from goload's output lines: the JSON of its `RESULT` line.

    Raises:
        RuntimeError: no RESULT line, or one that is not a JSON object; the message quotes
            the last lines of the output (goload's own error is among them).
    """
    for line in reversed(lines):
        if line.startswith("RESULT "):
            try:
                res = json.loads(line[len("RESULT ") :])
            except json.JSONDecodeError as exc:
                raise RuntimeError(f"goload: RESULT line is not JSON ({exc})") from None
            if not isinstance(res, dict):
                raise RuntimeError("goload: RESULT is not a JSON object")
            return res
    tail = " | ".join(x for x in lines[-3:] if x) or "no output"
    raise RuntimeError(f"goload: no RESULT line ({tail})")


class GoRun:
    """One goload process: started, READY, then `go()` and `result()`; `close()` stops it."""

    def __init__(self, binary: Path, argv: Sequence[str], target: Target) -> None:
        self.popen = subprocess.Popen(
            [str(binary), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        assert self.popen.stdout is not None and self.popen.stdin is not None
        os.set_blocking(self.popen.stdout.fileno(), False)
        self._sel.register(self.popen.stdout, selectors.EVENT_READ)
        try:
            with contextlib.suppress(OSError):  # it exited already: the wait reports why
                self.popen.stdin.write(material_line(target).encode())
                self.popen.stdin.flush()
            self._until(lambda ln: ln.startswith("READY "), SETUP_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def _until(self, done: Any, timeout: float) -> str:
        """Read output lines until one satisfies `done` (returned) or the deadline."""
        deadline = time.monotonic() + timeout
        assert self.popen.stdout is not None
        while True:
            while b"\n" in self._buf:
                raw, self._buf = self._buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if done(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"goload: nothing expected within {timeout:g}s ({self._tail()})")
            if not self._sel.select(left):
                continue
            chunk = self.popen.stdout.read(65536)
            if chunk == b"":
                rest = self._buf.decode(errors="replace")
                self.lines += [rest] if rest else []
                raise RuntimeError(f"goload exited ({self._tail()})")
            if chunk:
                self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise RuntimeError("goload: output line too long")

    def _tail(self) -> str:
        return " | ".join(self.lines[-3:]) or "no output"

    def go(self) -> None:
        """Start the window (the harness takes its CPU readings just before)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"GO\n")
        self.popen.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """The window's result, waiting at most `timeout` seconds for it."""
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._until(lambda ln: ln.startswith("RESULT "), timeout)
        return parse_result(self.lines)

    def close(self) -> None:
        """Stop the process by its PID (SIGTERM, then SIGKILL after 5 s) and reap it."""
        p = self.popen
        with contextlib.suppress(OSError):
            assert p.stdin is not None
            p.stdin.close()
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        self._sel.close()
        assert p.stdout is not None
        p.stdout.close()


class GoLoad:
    """The compiled load generator of a run (`binary` from `build`)."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    @staticmethod
    def _base(target: Target, mode: str) -> list[str]:
        argv = ["-mode", mode, "-addr", f"{target.host}:{target.port}"]
        return argv + (["-tls"] if target.tls is not None else [])

    @contextlib.contextmanager
    def start(self, mode: str, target: Target, *args: str) -> Iterator[GoRun]:
        """A goload process in `mode` against `target`, READY; stopped when the block ends."""
        run = GoRun(self.binary, [*self._base(target, mode), *args], target)
        try:
            yield run
        finally:
            run.close()

    def conn_rate(self, target: Target, concurrency: int, duration: float) -> Any:
        """A conn/s window: `concurrency` connect/echo/close loops for `duration` seconds."""
        return self.start(
            "connrate", target, "-concurrency", str(concurrency), "-duration", f"{duration}s"
        )

    def rtt(self, target: Target, count: int, size: int = 64, warmup: int = 50) -> Any:
        """An RTT window on one connection (established before READY)."""
        return self.start(
            "rtt", target, "-count", str(count), "-size", str(size), "-warmup", str(warmup)
        )

    def throughput(self, target: Target, nbytes: int, echo: bool = False) -> Any:
        """A throughput window on one connection (established before READY)."""
        return self.start("throughput", target, "-bytes", str(nbytes), f"-echo={str(echo).lower()}")
