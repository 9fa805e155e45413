"""The fault scenarios: each starts from a running rig (`tests/faultkit.py`), does one kind of
harm to the real processes, and returns what it measured as a `Figures` record.

`tests/test_faults.py` calls them at small sizes and asserts; `bench/soak.py` calls them at
large sizes and prints the README's table. A scenario never asserts: it measures, so that
the soak run reports every row even when one of them goes wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faultkit import (
    HANDSHAKE_TIMEOUT_MS,
    SECRET,
    Held,
    Process,
    Rig,
    client_context,
    closed_after,
    echo,
    first_success,
    p50_ms,
    self_signed_root,
    sign_leaf,
)

HANDSHAKE_TIMEOUT = HANDSHAKE_TIMEOUT_MS / 1000
ATTACKER = "127.0.0.2"  # the slowloris's own address (all of 127/8 is loopback on Linux)


@dataclass
class Figures:
    """What one scenario measured: named numbers, plus a line for the README's table."""

    fault: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value


def client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), from an in-memory handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HOSTILE: dict[str, bytes] = {
    "plain text": b"hello, is anyone there?\r\n" * 4,
    "HTTP request": b"GET / HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n",
    "random bytes (64 KiB)": os.urandom(65536),
    "truncated ClientHello": client_hello()[:40],
    "silent": b"",
}


async def hostile_clients(rig: Rig, each: int = 3) -> Figures:
    """Bytes that are not TLS, a cut ClientHello, silence: closed, none reaches the app; a
    legitimate client echoes meanwhile."""
    figures = Figures("hostile clients")
    ctx = await rig.web_context()
    before = rig.app.connections
    legit_times: list[float] = []
    legit_ok = 0
    stop = asyncio.Event()

    async def legit() -> None:
        nonlocal legit_ok
        for _ in range(1000):  # bounded; ends when the attack is over
            if stop.is_set():
                return
            started = time.monotonic()
            if await echo(rig.db_port, ctx, b"legit") == b"legit":
                legit_ok += 1
                legit_times.append(time.monotonic() - started)

    legit_task = asyncio.create_task(legit())
    results: dict[str, list[tuple[bool, float, bytes]]] = {}
    try:
        for kind, payload in HOSTILE.items():
            results[kind] = list(
                await asyncio.gather(
                    *(
                        closed_after(rig.db_port, payload, HANDSHAKE_TIMEOUT + 5)
                        for _ in range(each)
                    )
                )
            )
    finally:
        stop.set()
        await legit_task
    for kind, outcomes in results.items():
        figures[f"{kind}: closed"] = sum(closed for closed, _, _ in outcomes)
        figures[f"{kind}: max seconds to close"] = round(max(s for _, s, _ in outcomes), 2)
        figures[f"{kind}: bytes back"] = sum(len(got) for _, _, got in outcomes)
    figures["each"] = each
    figures["legitimate echoes ok"] = legit_ok
    figures["legitimate p50 ms"] = p50_ms(legit_times)
    figures["app connections from hostile clients"] = rig.app.connections - before - legit_ok
    figures["refused"] = await rig.db_proxy.refused()
    return figures


async def bad_certificates(rig: Rig) -> Figures:
    """Client certificates that must not pass: refused, 0 bytes reach the app."""
    figures = Figures("bad client certificates")
    roots = await rig.agent.roots()
    root_pem = roots[-1]
    key = rig.agent.ca_key
    domain = rig.agent.trust_domain
    web = f"spiffe://{domain}/ns/default/dc/dc1/svc/web"
    lookalike_pem, lookalike_key = self_signed_root("Consul CA 7")
    foreign_pem, foreign_key = self_signed_root("Foreign CA")
    cases: dict[str, tuple[str, str] | None] = {
        "no certificate": None,
        "expired": sign_leaf(root_pem, key, uri=web, days=(-3, -1)),
        "not yet valid": sign_leaf(root_pem, key, uri=web, days=(1, 3)),
        "no URI SAN": sign_leaf(root_pem, key, uri=None),
        "non-SPIFFE URI": sign_leaf(root_pem, key, uri="https://web.example.com/"),
        "self-signed lookalike": sign_leaf(lookalike_pem, lookalike_key, uri=web),
        "foreign CA": sign_leaf(foreign_pem, foreign_key, uri=web),
        "other trust domain": sign_leaf(
            root_pem,
            key,
            uri="spiffe://11111111-0000-0000-0000-000000000000.consul/ns/default/dc/dc1/svc/web",
        ),
    }
    before = rig.app.connections
    refused_before = await rig.db_proxy.refused()
    for name, chain in cases.items():
        got = await echo(rig.db_port, client_context(roots, chain), b"let me in")
        figures[f"{name}: bytes back"] = len(got)
    figures["cases"] = len(cases)
    figures["app connections"] = rig.app.connections - before
    after = await rig.db_proxy.refused()
    figures["refused"] = {
        k: v - refused_before.get(k, 0) for k, v in after.items() if v != refused_before.get(k, 0)
    }
    figures["good leaf still echoes"] = (
        await echo(rig.db_port, await rig.web_context(), b"ok") == b"ok"
    )
    return figures


# A slowloris in a process of its own (so the measuring client keeps its own CPU): N silent
# connections from ATTACKER, each reopened as soon as the proxy closes it, for S seconds;
# prints how many it opened.
SLOWLORIS = """
import asyncio, sys

async def main(port, n, seconds, source):
    opened = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def one():
        nonlocal opened
        while loop.time() < end:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                continue
            opened += 1
            try:
                await asyncio.wait_for(reader.read(1), max(0.01, end - loop.time()))
            except (OSError, asyncio.TimeoutError):
                pass
            writer.transport.abort()

    await asyncio.gather(*(one() for _ in range(n)))
    print(opened, flush=True)

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
"""


async def slowloris(rig: Rig, attackers: int = 300, seconds: float = 3.0) -> Figures:
    """Silent connections kept up (reopened as the proxy closes them) beyond the handshake
    budget by another process from another address, while authorized clients echo."""
    figures = Figures("slowloris")
    ctx = await rig.web_context()
    refused_before = await rig.db_proxy.refused()
    attack = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SLOWLORIS,
        str(rig.db_port),
        str(attackers),
        str(seconds + 0.5),
        ATTACKER,
        stdout=asyncio.subprocess.PIPE,
    )
    times: list[float] = []
    tried = ok = 0
    try:
        # Under way once the handshake budget has refused or evicted its first attacker.
        async def flooded() -> bool:
            return (await rig.db_proxy.refused()).get(
                "over_handshake_limit", 0
            ) > refused_before.get("over_handshake_limit", 0)

        await first_success(flooded, 10)
        end = time.monotonic() + seconds
        while time.monotonic() < end and tried < 100_000:
            tried += 1
            started = time.monotonic()
            if await echo(rig.db_port, ctx, b"authorized") == b"authorized":
                ok += 1
                times.append(time.monotonic() - started)
        out, _ = await asyncio.wait_for(attack.communicate(), 30)
    finally:
        if attack.returncode is None:
            attack.kill()
            await attack.wait()
    after = await rig.db_proxy.refused()
    figures["attackers"] = attackers
    figures["attacker connections opened"] = int(out or 0)
    figures["authorized tried"] = tried
    figures["authorized ok"] = ok
    figures["authorized p50 ms"] = p50_ms(times)
    for reason in ("over_handshake_limit", "handshake_timeout", "over_connection_limit"):
        figures[reason] = after.get(reason, 0) - refused_before.get(reason, 0)
    return figures


async def descriptor_exhaustion(rig: Rig, attackers: int = 200) -> Figures:
    """The db sidecar runs out of descriptors (its limit below its connection cap): it
    pauses accepting, says so once, and serves again once the attackers are gone."""
    figures = Figures("descriptor exhaustion")
    mark = len(rig.db_proxy.process.lines)
    socks = []
    for _ in range(attackers):
        with contextlib.suppress(OSError):
            socks.append(await asyncio.open_connection("127.0.0.1", rig.db_port))
    paused = True
    try:
        await rig.db_proxy.process.wait_for("paused accepting", after=mark, timeout=10)
    except TimeoutError:
        paused = False
    figures["attackers"] = len(socks)
    figures["paused"] = paused
    for _, writer in socks:
        writer.transport.abort()
    released = time.monotonic()
    ctx = await rig.web_context()

    async def served() -> bool:
        return await echo(rig.db_port, ctx, b"back", timeout=3) == b"back"

    recovery = await first_success(served, 20)
    figures["recovered after attackers left, s"] = (
        None if recovery is None else round(time.monotonic() - released, 2)
    )
    metrics = await rig.db_proxy.metrics()
    figures["accept pauses counted"] = sum(
        v for (name, _), v in metrics.items() if name == "connect_proxy_accept_pauses_total"
    )
    figures["pause lines"] = sum(
        "paused accepting" in line for line in rig.db_proxy.process.lines[mark:]
    )
    figures["alive"] = rig.db_proxy.process.proc.returncode is None
    return figures


async def _outage(
    rig: Rig,
    fault: str,
    harm: Callable[[], Awaitable[None]],
    heal: Callable[[], Awaitable[None]],
    seconds: float,
    *,
    new_context: Callable[[], Awaitable[ssl.SSLContext]] | None = None,
) -> Figures:
    """Held connections (inbound and through the upstream) ping through `harm` .. `heal`;
    new connections are tried meanwhile; then the time until new ones succeed again, both
    inbound and through the upstream (each sidecar has followed the agent)."""
    figures = Figures(fault)
    ctx = await rig.web_context()
    async with contextlib.AsyncExitStack() as stack:
        inbound = await Held.open(rig.db_port, ctx)
        stack.callback(inbound.close)
        outbound = await Held.open(rig.upstream_port, None)
        stack.callback(outbound.close)
        serial = await rig.served_serial()
        app_before = rig.app.connections
        await harm()
        end = time.monotonic() + seconds
        new_tried = new_ok = 0
        while time.monotonic() < end and inbound.sent < 10_000:
            await inbound.ping()
            await outbound.ping()
            if new_tried < 3:
                new_tried += 1
                new_ok += (
                    await echo(rig.db_port, ctx, b"new", timeout=min(1.0, seconds / 3)) == b"new"
                )
            else:
                await asyncio.sleep(0.1)
        figures["held pings ok"] = f"{inbound.ok + outbound.ok}/{inbound.sent + outbound.sent}"
        figures["held ok fraction"] = (inbound.ok + outbound.ok) / (inbound.sent + outbound.sent)
        figures["new connections during the fault ok"] = f"{new_ok}/{new_tried}"
        figures["new ok during"] = new_ok
        figures["serial kept during"] = await rig.served_serial() == serial
        figures["app connections during"] = rig.app.connections - app_before
        healed = time.monotonic()
        await heal()
        if new_context is not None:
            ctx = await new_context()

        async def served() -> bool:
            return (
                await echo(rig.db_port, ctx, b"after", timeout=3) == b"after"
                and await echo(rig.upstream_port, None, b"after", timeout=3) == b"after"
            )

        took = await first_success(served, 30)
        figures["recovery s"] = None if took is None else round(took, 2)
        figures["heal to recovery s"] = (
            None if took is None else round(time.monotonic() - healed, 2)
        )
        figures["held still ok after"] = await inbound.ping() and await outbound.ping()
    return figures


async def agent_killed(rig: Rig, seconds: float = 2.0) -> Figures:
    """SIGKILL the agent, then start it again on the same port with the same CA."""

    async def harm() -> None:
        await rig.agent.kill()

    # The clients after the restart take their leaf and roots from the new agent: a dev agent
    # (like `consul agent -dev`) keeps no state, so its root certificate is new even with the
    # same key, and the proxy has to follow it.
    return await _outage(
        rig,
        f"agent killed {seconds:g} s, restarted (same CA key)",
        harm,
        rig.agent.start,
        seconds,
        new_context=rig.web_context,
    )


async def agent_new_ca(rig: Rig, seconds: float = 2.0) -> Figures:
    """SIGKILL the agent, start a new one on the same port with a new CA: clients with the new
    CA's leaves must be served within seconds of it answering."""

    async def harm() -> None:
        await rig.agent.kill()
        rig.agent.new_ca()

    figures = await _outage(
        rig,
        f"agent replaced after {seconds:g} s by one with a new CA",
        harm,
        rig.agent.start,
        seconds,
        new_context=rig.web_context,
    )
    figures["serves the new CA's leaf"] = (await rig.served_serial()) == (
        await rig.agent.leaf("db")
    )[2]
    return figures


async def agent_hung(rig: Rig, seconds: float = 2.0) -> Figures:
    """SIGSTOP the agent (it accepts TCP, answers nothing), SIGCONT it after `seconds`; one
    client that connects as it stops waits for its decision (the authorize call's 10 s
    timeout, or the agent's answer once woken)."""
    ctx = await rig.web_context()
    waiting: list[asyncio.Task[tuple[bytes, float]]] = []

    async def decided() -> tuple[bytes, float]:
        started = time.monotonic()
        got = await echo(rig.db_port, ctx, b"waiting", timeout=30)
        return got, time.monotonic() - started

    async def harm() -> None:
        rig.agent.pause()
        waiting.append(asyncio.create_task(decided()))

    async def heal() -> None:
        rig.agent.resume()

    figures = await _outage(rig, f"agent hung {seconds:g} s (SIGSTOP)", harm, heal, seconds)
    got, took = await waiting[0]
    figures["client waiting from the start: decided after s"] = round(took, 2)
    figures["client waiting from the start: forwarded"] = got == b"waiting"
    return figures


async def agent_answers(rig: Rig, mode: str, seconds: float = 2.0) -> Figures:
    """The agent, through the relay, answers 500, garbage, or hangs, then heals."""
    assert rig.relay is not None
    relay = rig.relay
    names = {
        "500": "agent answers 500",
        "garbage": "agent answers malformed JSON",
        "hang": "agent hangs (relay)",
    }

    async def harm() -> None:
        relay.set_mode(mode)

    async def heal() -> None:
        relay.set_mode("pass")

    return await _outage(rig, f"{names[mode]} for {seconds:g} s", harm, heal, seconds)


async def foreign_leaf(rig: Rig) -> Figures:
    """The agent hands the db sidecar a leaf from a CA that is not in its roots: the proxy
    keeps the leaf it has and goes on serving."""
    assert rig.relay is not None
    figures = Figures("agent serves a leaf from a foreign CA")
    foreign_pem, foreign_key = self_signed_root("Foreign CA")
    domain = rig.agent.trust_domain
    cert, key = sign_leaf(
        foreign_pem, foreign_key, uri=f"spiffe://{domain}/ns/default/dc/dc1/svc/db"
    )
    serial = await rig.served_serial()
    mark = len(rig.db_proxy.process.lines)
    rig.relay.foreign_leaf = {
        "SerialNumber": "0f:0f",
        "CertPEM": cert,
        "PrivateKeyPEM": key,
        "Service": "db",
        "ServiceURI": f"spiffe://{domain}/ns/default/dc/dc1/svc/db",
        "ValidAfter": "2026-01-01T00:00:00Z",
        "ValidBefore": "2099-01-01T00:00:00Z",
        "CreateIndex": 1,
    }
    rig.relay.set_mode("foreign-leaf")
    try:
        line = await rig.db_proxy.process.wait_for(
            "keeping the previous one", after=mark, timeout=10
        )
        figures["refused with"] = line.split("[ERROR]")[-1].strip()[:160]
    except TimeoutError:
        figures["refused with"] = None
    figures["serial kept"] = await rig.served_serial() == serial
    ctx = await rig.web_context()
    oks = [await echo(rig.db_port, ctx, b"still") == b"still" for _ in range(5)]
    figures["new connections ok"] = f"{sum(oks)}/{len(oks)}"
    figures["new ok"] = sum(oks)
    rig.relay.set_mode("pass")
    return figures


async def churn_with_rotations(
    rig: Rig, echoes: int = 120, size: int = 65536, rotations: int = 2, concurrency: int = 8
) -> Figures:
    """Echoes through both sidecars (web's upstream -> db's public listener -> app) while the
    CA rotates: every byte comes back intact, none is lost."""
    figures = Figures(
        f"churn: {echoes} x {size // 1024} KiB echoes through two sidecars, {rotations} CA rotations"
    )
    serial = await rig.served_serial()
    done = ok = corrupt = 0
    queue = iter(range(echoes))
    rotate_every = max(1, echoes // (rotations + 1))
    rotated = 0
    lock = asyncio.Lock()

    async def worker() -> None:
        nonlocal done, ok, corrupt, rotated
        for _ in queue:
            payload = os.urandom(size)
            got = await echo(rig.upstream_port, None, payload, timeout=20)
            done += 1
            if got == payload:
                ok += 1
            elif got:
                corrupt += 1
            if done % rotate_every == 0 and rotated < rotations:
                async with lock:
                    if rotated < rotations:
                        rotated += 1
                        await rig.agent.rotate_ca()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    figures["echoes"] = done
    figures["intact"] = ok
    figures["corrupt"] = corrupt
    figures["lost"] = done - ok - corrupt
    figures["rotations"] = rotated
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["db serves a new leaf"] = await rig.served_serial() != serial
    return figures


async def sigterm(rig: Rig, second: bool) -> Figures:
    """SIGTERM the db sidecar with a transfer in flight: it drains, refusing new connections,
    and exits 0 when the transfer ends; a second SIGTERM makes it exit at once."""
    figures = Figures("second SIGTERM" if second else "SIGTERM with a transfer in flight")
    proc = rig.db_proxy.process
    ctx = await rig.web_context()
    held = await Held.open(rig.db_port, ctx)
    mark = len(proc.lines)
    proc.signal(signal.SIGTERM)
    await proc.wait_for("stopped accepting", after=mark)
    figures["new connection refused"] = await echo(rig.db_port, ctx, b"x", timeout=2) == b""
    if second:
        sent = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = await proc.exit_code()
        figures["exit after the second signal s"] = round(time.monotonic() - sent, 2)
    else:
        pings = [await held.ping(65536) for _ in range(20)]
        figures["transfer pings ok while draining"] = f"{sum(pings)}/{len(pings)}"
        figures["draining ok"] = all(pings)
        held.close()
        code = await proc.exit_code()
    held.close()
    figures["exit code"] = code
    return figures


async def secrets(rig: Rig) -> Figures:
    """After a run at TRACE: the token in no output line and in no argv; the db sidecar's
    private key in no file it could have written, and no regular file held open by it."""
    figures = Figures("secrets")
    output = rig.outputs()
    procs = [p.process for p in (rig.db, rig.web) if p is not None]
    figures["output lines"] = len(output.splitlines())
    figures["token in output"] = output.count(SECRET)
    figures["token in argv"] = sum(SECRET in _cmdline(p) for p in procs)
    _, key_pem, _ = await rig.agent.leaf("db")
    needle = key_pem.splitlines()[1].encode()  # the first line of the key's base64
    homes = [rig.base / "db-home", rig.base / "web-home"]
    others = [Path(tempfile.gettempdir()), Path("/var/tmp"), Path("/dev/shm")]
    scanned, with_key, with_pem = _scan(
        homes, others, rig.started, needle, exclude=rig.base / "agent"
    )
    figures["files scanned"] = scanned
    figures["files with the leaf key"] = with_key
    figures["files with any private key"] = with_pem
    figures["regular files held open"] = sum(_open_files(p) for p in procs)
    return figures


def _cmdline(process: Process) -> str:
    try:
        return Path(f"/proc/{process.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _open_files(process: Process) -> int:
    """Regular files on a filesystem that the process holds open (memfds and devices aside)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{process.proc.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
                    count += 1
    return count


def _files(homes: list[Path], others: list[Path]) -> Iterator[Path]:
    """Every file under `homes`; the files at depth 1-2 of `others` (shared temp dirs)."""
    for home in homes:
        if home.is_dir():
            yield from home.rglob("*")
    for other in others:
        if other.is_dir():
            with contextlib.suppress(OSError):
                yield from other.glob("*")
                yield from other.glob("*/*")


def _scan(
    homes: list[Path], others: list[Path], since: float, needle: bytes, exclude: Path
) -> tuple[int, int, int]:
    """(files modified since `since`, those holding `needle`, those holding any PEM key)."""
    scanned = with_needle = with_pem = 0
    for count, path in enumerate(_files(homes, others)):
        if count > 100_000:
            break
        with contextlib.suppress(OSError):
            if exclude in path.parents or not path.is_file() or path.stat().st_mtime < since - 1:
                continue
            scanned += 1
            data = path.read_bytes()[:4_000_000]
            with_needle += needle in data
            with_pem += b"PRIVATE KEY-----" in data
    return scanned, with_needle, with_pem
