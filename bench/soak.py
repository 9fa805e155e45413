"""The fault suite at soak sizes: every scenario of `tests/faultscenarios.py` against real
processes (the dev agent, two sidecars, an echo app), longer and bigger than the tests run
them, printed as the README's fault table (Markdown) and, with --json, as raw figures.

    python bench/soak.py                 # about 3 minutes on 2 cores
    python bench/soak.py --only slowloris,churn --json results.json

Not collected by pytest, and not in CI: `tests/test_faults.py` runs the same scenarios at
small sizes and asserts on them. A scenario measures and never asserts, so one that goes
wrong shows in its row instead of hiding the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import faultscenarios as fs  # noqa: E402
from tests.faultkit import Rig, rig  # noqa: E402

AGENT_OUTAGE = 8.0  # seconds, as in the run that filed issue 12
HANG = 12.0  # beyond the authorize call's 10 s timeout


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _outage_row(f: fs.Figures, extra: str = "") -> tuple[str, str, str]:
    recovery = f["recovery s"]
    return (
        f.fault,
        "established connections keep flowing (inbound and through the upstream); new "
        "connections are refused, none reaches the app; the certificates in use stay" + extra,
        f"held connections {f['held pings ok']} pings ok; new connections during the fault "
        f"{f['new connections during the fault ok']} forwarded, app saw "
        f"{f['app connections during']}; first new connection served "
        f"{'never' if recovery is None else f'{recovery} s'} after the agent answered again",
    )


async def hostile(base: Path) -> list[tuple[str, str, str]]:
    rows = []
    async with rig(base, web=False, db_config={"max_inbound_connections": 2000}) as r:
        h = await fs.hostile_clients(r, each=50)
        kinds = ", ".join(
            f"{kind} {h[f'{kind}: closed']}/{h['each']} closed "
            f"(max {h[f'{kind}: max seconds to close']} s)"
            for kind in fs.HOSTILE
        )
        rows.append(
            (
                "hostile clients: not TLS, a cut ClientHello, silence",
                "closed, at once or at the handshake timeout (1 s here); nothing reaches the app",
                f"{kinds}; app connections from them: "
                f"{h['app connections from hostile clients']}; a legitimate client meanwhile: "
                f"{h['legitimate echoes ok']} echoes ok, p50 {h['legitimate p50 ms']} ms",
            )
        )
        b = await fs.bad_certificates(r)
        refused = ", ".join(f"{k} {v:g}" for k, v in sorted(b["refused"].items()))
        rows.append(
            (
                "bad client certificates (none, expired, not yet valid, no URI SAN, "
                "non-SPIFFE URI, self-signed lookalike, foreign CA, other trust domain)",
                "refused before the app is dialled; the reason is counted",
                f"{b['cases']}/{b['cases']} refused ({refused}); 0 bytes back to each; "
                f"app connections: {b['app connections']}",
            )
        )
        s = await fs.slowloris(r, attackers=1000, seconds=10)
        rows.append(
            (
                "slowloris: 1,000 silent connections from one address, each reopened "
                "when closed, handshake budget 500",
                "silent connections give their place to newer ones (the flooding address "
                "first); authorized clients keep succeeding",
                f"{s['attacker connections opened']} attacker connections in 10 s, "
                f"{s['over_handshake_limit']:g} closed for the budget; authorized "
                f"{s['authorized ok']}/{s['authorized tried']} ok, p50 {s['authorized p50 ms']} ms",
            )
        )
        rows.append(await _secrets_row(r))
    return rows


async def exhaustion(base: Path) -> list[tuple[str, str, str]]:
    async with rig(
        base,
        web=False,
        db_config={"max_inbound_connections": 1000},
        db_preexec=_limit_descriptors,
    ) as r:
        f = await fs.descriptor_exhaustion(r, attackers=600)
    return [
        (
            "descriptor exhaustion: `ulimit -n 256`, 600 connections, cap set above it",
            "accepting pauses with a backoff (one log line per outage), then resumes",
            f"paused: {f['paused']} ({f['accept pauses counted']:g} pauses counted), "
            f"{f['pause lines']} pause line(s); served again "
            f"{f['recovered after attackers left, s']} s after the attackers left; "
            f"process alive: {f['alive']}",
        )
    ]


async def agent_restarts(base: Path) -> list[tuple[str, str, str]]:
    async with rig(base) as r:
        killed = await fs.agent_killed(r, seconds=AGENT_OUTAGE)
        new_ca = await fs.agent_new_ca(r, seconds=AGENT_OUTAGE)
    return [
        _outage_row(killed),
        _outage_row(new_ca, "; the new CA's roots and leaf are taken as soon as it answers"),
    ]


async def agent_faults(base: Path) -> list[tuple[str, str, str]]:
    rows = []
    async with rig(base, relay=True) as r:
        for mode in ("500", "garbage"):
            rows.append(_outage_row(await fs.agent_answers(r, mode, seconds=AGENT_OUTAGE)))
        f = await fs.foreign_leaf(r)
        rows.append(
            (
                f.fault,
                "the new leaf is refused (it does not chain to the roots); the leaf in use stays",
                f"refused: {f['refused with']!r}; serial kept: {f['serial kept']}; new "
                f"connections {f['new connections ok']} ok",
            )
        )
        hung = await fs.agent_hung(r, seconds=HANG)
        decided = hung["client waiting from the start: decided after s"]
        verdict = "forwarded" if hung["client waiting from the start: forwarded"] else "refused"
        rows.append(
            _outage_row(
                hung,
                f"; a client that connected as it hung was {verdict} after {decided} s "
                "(the authorize call's timeout is 10 s)",
            )
        )
    return rows


async def churn(base: Path) -> list[tuple[str, str, str]]:
    async with rig(base) as r:
        f = await fs.churn_with_rotations(r, echoes=2000, size=65536, rotations=4, concurrency=16)
    return [
        (
            f.fault,
            "every byte comes back intact; new leaves are served after each rotation",
            f"{f['intact']}/{f['echoes']} intact, {f['corrupt']} corrupt, {f['lost']} lost, "
            f"{f['rotations']} rotations, {f['seconds']} s",
        )
    ]


async def signals(base: Path) -> list[tuple[str, str, str]]:
    rows = []
    for second in (False, True):
        async with rig(base / ("second" if second else "first"), web=False) as r:
            f = await fs.sigterm(r, second=second)
        if second:
            what = "exits at once, without waiting for the drain"
            figure = f"exit {f['exit code']} after {f['exit after the second signal s']} s"
        else:
            what = "stops accepting at once, finishes the transfer in flight, exits 0"
            figure = (
                f"new connection refused: {f['new connection refused']}; transfer "
                f"{f['transfer pings ok while draining']} ok while draining; exit {f['exit code']}"
            )
        rows.append((f.fault, what, figure))
    return rows


async def _secrets_row(r: Rig) -> tuple[str, str, str]:
    f = await fs.secrets(r)
    return (
        "secrets after a run at TRACE",
        "the ACL token (from CONSUL_HTTP_TOKEN) in no output line or argv; the private key "
        "in no file",
        f"{f['output lines']} lines, token in {f['token in output']}; "
        f"argv {f['token in argv']}; {f['files scanned']} new files scanned, "
        f"{f['files with the leaf key']} with the leaf key, "
        f"{f['files with any private key']} with any key; "
        f"{f['regular files held open']} regular files open",
    )


GROUPS: dict[str, Callable[[Path], Awaitable[list[tuple[str, str, str]]]]] = {
    "hostile": hostile,
    "exhaustion": exhaustion,
    "restarts": agent_restarts,
    "agent": agent_faults,
    "churn": churn,
    "signals": signals,
}


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| fault | what happens | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


async def main(only: list[str], dump: Path | None) -> None:
    rows: list[tuple[str, str, str]] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for name in only:
            started = time.monotonic()
            group = await GROUPS[name](Path(tmp) / name)
            print(f"# {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            rows += group
            raw[name] = group
    print(table(rows))
    if dump is not None:
        with dump.open("w") as out:
            json.dump(raw, out, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GROUPS), help="groups: " + ",".join(GROUPS))
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    args = parser.parse_args()
    wanted = [g for g in args.only.split(",") if g]
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s): {', '.join(unknown)}")
    asyncio.run(main(wanted, args.json))
