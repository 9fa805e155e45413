"""Shared helpers of the benchmark: TLS material in memory, the agent's HTTP API, /proc,
the progress log and the state of the code measured.

Rule 1: nothing here writes key material to a regular file: keys are loaded into `ssl`
through an anonymous memory file (memfd), by the proxy's own `proxy.keyload`.
Rule 2: nothing here imports another bench module (they all import this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent  # the repository
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.keyload import load_cert_chain  # noqa: E402  # the proxy's own memfd loading


def log(msg: str) -> None:
    """One progress line on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """A leaf (certificate chain PEM and key PEM) and the CA roots (PEM), all in memory."""

    cert_pem: str
    key_pem: str
    roots_pem: str


def client_context(mat: TLSMaterial) -> ssl.SSLContext:
    """An mTLS client context: presents the leaf, verifies the server against the roots."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=mat.roots_pem)
    load_cert_chain(ctx, mat.cert_pem, mat.key_pem, name="bench-leaf")
    return ctx


def server_context(mat: TLSMaterial) -> ssl.SSLContext:
    """An mTLS server context: presents the leaf, requires a client leaf from the roots."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=mat.roots_pem)
    load_cert_chain(ctx, mat.cert_pem, mat.key_pem, name="bench-leaf")
    return ctx


# -- the agent's HTTP API (stdlib only, never through an HTTP proxy) ------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AgentHTTP:
    """Blocking JSON calls to a Consul-compatible agent at `addr` (`host:port`)."""

    def __init__(self, addr: str) -> None:
        self.base = f"http://{addr}"

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 15.0
    ) -> tuple[Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                raw = resp.read()
                headers = {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        return (json.loads(raw) if raw.strip() else None), headers

    def get(self, path: str, timeout: float = 15.0) -> tuple[Any, dict[str, str]]:
        return self.call("GET", path, timeout=timeout)

    def put(self, path: str, body: Any) -> Any:
        return self.call("PUT", path, body)[0]

    def delete(self, path: str) -> None:
        self.call("DELETE", path)

    def material(self, service: str) -> TLSMaterial:
        leaf, _ = self.get(f"/v1/agent/connect/ca/leaf/{service}")
        roots, _ = self.get("/v1/agent/connect/ca/roots")
        roots_pem = "".join(r["RootCert"].strip() + "\n" for r in roots["Roots"])
        return TLSMaterial(leaf["CertPEM"], leaf["PrivateKeyPEM"], roots_pem)

    def wait_connect_instance(self, service: str, port: int, timeout: float = 60.0) -> None:
        """Block (blocking queries with index/wait) until `/v1/health/connect/<service>?passing`
        lists an instance on `port`.

        Raises:
            TimeoutError: not within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        index = "0"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no passing Connect instance of {service} on port {port}")
            wait = max(1, min(10, int(left)))
            body, headers = self.get(
                f"/v1/health/connect/{service}?passing&index={index}&wait={wait}s",
                timeout=wait + 10,
            )
            for entry in body or []:
                if int(entry["Service"]["Port"]) == port:
                    return
            index = headers.get("x-consul-index", index)


# -- /proc ---------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, dead ones included), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> dict[int, list[int]]:
    """Per CPU: the jiffies of /proc/stat (user nice system idle iowait irq softirq steal)."""
    out: dict[int, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                out[int(name[3:])] = [int(v) for v in vals[:8]]
    return out


def cpu_busy(
    before: dict[int, list[int]], after: dict[int, list[int]]
) -> dict[int, dict[str, float]]:
    """Per CPU between two `cpu_times()` readings: the busy fraction (all but idle and
    iowait) and the fractions of user, system, softirq and steal time."""
    res: dict[int, dict[str, float]] = {}
    for cpu, now in after.items():
        then = before.get(cpu, now)
        d = dict(zip(_STAT_FIELDS, (a - b for a, b in zip(now, then, strict=True)), strict=True))
        total = sum(d.values())
        if total <= 0:
            continue
        res[cpu] = {
            "busy": round((total - d["idle"] - d["iowait"]) / total, 3),
            "busy_s": (total - d["idle"] - d["iowait"]) / CLK_TCK,
            "user": round((d["user"] + d["nice"]) / total, 3),
            "system": round(d["system"] / total, 3),
            "softirq": round((d["softirq"] + d["irq"]) / total, 3),
            "steal": round(d["steal"] / total, 3),
        }
    return res


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (for flags that need a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, int(q * 1000) - 1)]


# -- the code measured ----------------------------------------------------------------------


def _git(*args: str) -> str | None:
    """A read-only git command (no optional locks: `status` must not rewrite the index)."""
    try:
        res = subprocess.run(
            ["git", "--no-optional-locks", *args],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def source_state() -> dict[str, Any]:
    """Which proxy code was measured: HEAD, files changed since, and a digest of the sources
    (the tree may be changing while we run)."""
    head = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--", "proxy", "listeners")
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("proxy/**/*.py"), *ROOT.glob("listeners/**/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "git_head": head.strip() if head else None,
        "git_changed": [x.strip() for x in (changed or "").splitlines() if x.strip()],
        "sources_sha256": digest.hexdigest()[:16],
    }


def callgrind_slopes(script: str, variants: list[str], small: int, large: int) -> dict[str, float]:
    """Instructions per connection of each variant of `script`, under valgrind's callgrind.

    `script --child VARIANT N` runs N connections; each (variant, count) is one process, run
    in parallel, and the cost per connection is the slope between `small` and `large`
    (start-up cancels out).

    Raises:
        RuntimeError: valgrind is missing, or a run failed (with the end of its output).
    """
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not on PATH (Debian: apt-get install valgrind)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def instructions(variant: str, n: int, out: Path) -> int:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        command += [sys.executable, script, "--child", variant, str(n)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        match = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"{variant} {n}: callgrind failed:\n{done.stderr[-2000:]}")
        return int(match.group(1).replace(",", ""))

    runs = [(v, n) for v in variants for n in (small, large)]
    with (
        tempfile.TemporaryDirectory(prefix="callgrind-") as tmp,
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
    ):
        futures = {
            (v, n): pool.submit(instructions, v, n, Path(tmp) / f"cg.{v}.{n}") for v, n in runs
        }
        ir = {run: f.result() for run, f in futures.items()}
    return {v: (ir[(v, large)] - ir[(v, small)]) / (large - small) for v in variants}


async def connect_many(
    port: int, n: int, payload: bytes, *, concurrency: int = 8, ctx: ssl.SSLContext | None = None
) -> None:
    """`n` connections to 127.0.0.1:`port`, `concurrency` at a time: each sends `payload`,
    reads as many bytes back, and closes."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            writer = await exchange(port, payload, ctx)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(n)))


async def exchange(
    port: int, payload: bytes, ctx: ssl.SSLContext | None = None
) -> asyncio.StreamWriter:
    """Open a connection to 127.0.0.1:`port` (TLS with `ctx`), send `payload`, read as many
    bytes back; the connection stays open (its writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=None)
    writer.write(payload)
    await reader.readexactly(len(payload))
    return writer


def leaf_material(ca: Any, service: str) -> TLSMaterial:
    """A leaf for `service` from a dev agent's CA (`proxy.devagent.ca.CertificateAuthority`),
    with that CA's roots."""
    leaf = ca.sign_leaf(service, datacenter="dc1")
    roots = "".join(r.cert_pem for r in ca.roots)
    return TLSMaterial(cert_pem=leaf.cert_pem, key_pem=leaf.private_key_pem, roots_pem=roots)


@contextlib.contextmanager
def dev_agent_process(cpu: int | None = None) -> Iterator[tuple[str, int]]:
    """A dev agent in its own process (`python -m proxy dev-agent`), pinned to `cpu` if given:
    its HTTP address and PID. Stopped (SIGTERM, then SIGKILL after 5 s) on exit.

    Raises:
        RuntimeError: it did not print its address within 30 s.
    """
    agent = subprocess.Popen(
        [sys.executable, "-m", "proxy", "dev-agent", "-http-addr", "127.0.0.1:0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        if cpu is not None:
            os.sched_setaffinity(agent.pid, {cpu})
        addr = None
        assert agent.stdout is not None
        deadline = time.monotonic() + 30
        while addr is None and time.monotonic() < deadline:
            line = agent.stdout.readline()
            if not line:
                break
            m = re.search(r"HTTP API address: (?:http://)?(\S+)", line)
            addr = m.group(1) if m else None
        if addr is None:
            raise RuntimeError("the dev agent did not say its address")
        yield addr, agent.pid
    finally:
        agent.terminate()
        try:
            agent.wait(5)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An `asyncio.start_server` handler that echoes until EOF (the in-process scripts' app)."""
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
