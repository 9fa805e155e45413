"""The fault suite: the real agent and sidecar processes under hostile clients, bad
certificates, slowloris, descriptor exhaustion, agent faults, churn with CA rotations and
signals, each measured (`tests/faultscenarios.py`) and held to numbers here.

`bench/soak.py` runs the same scenarios longer and prints the README's fault table. The
subjects are child processes, so each test runs on one loop of its own (`one_loop`).
Every test ends with the secrets check: the token in no output line (TRACE level) or argv,
the proxy's private key in no file it could write.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests import faultscenarios as fs
from tests.faultkit import Rig, rig

pytestmark = [pytest.mark.timeout(120), pytest.mark.one_loop]


@contextlib.asynccontextmanager
async def checked_rig(tmp_path: Path, **kwargs: Any) -> AsyncIterator[Rig]:
    """A rig whose secrets are checked once the scenario is done (processes still up)."""
    async with rig(tmp_path, **kwargs) as r:
        yield r
        secrets = await fs.secrets(r)
        assert secrets["output lines"] > 20
        assert secrets["token in output"] == 0
        assert secrets["token in argv"] == 0
        assert secrets["files with the leaf key"] == 0
        assert secrets["files with any private key"] == 0
        assert secrets["regular files held open"] == 0, secrets.values


async def test_hostile_clients_bad_certificates_and_slowloris(tmp_path: Path) -> None:
    async with checked_rig(tmp_path, web=False, db_config={"max_inbound_connections": 400}) as r:
        hostile = await fs.hostile_clients(r, each=3)
        for kind in fs.HOSTILE:
            assert hostile[f"{kind}: closed"] == 3, (kind, hostile.values)
            # Closed at once, or (silent, cut ClientHello) at the handshake timeout.
            assert hostile[f"{kind}: max seconds to close"] < fs.HANDSHAKE_TIMEOUT + 1.5
        assert hostile["app connections from hostile clients"] == 0
        assert hostile["legitimate echoes ok"] >= 1
        assert hostile["refused"].get("handshake_timeout", 0) >= 3  # the silent ones

        bad = await fs.bad_certificates(r)
        assert bad["app connections"] == 0, bad.values
        for name in ("no certificate", "expired", "not yet valid", "no URI SAN",
                     "non-SPIFFE URI", "self-signed lookalike", "foreign CA",
                     "other trust domain"):  # fmt: skip
            assert bad[f"{name}: bytes back"] == 0, name
        # Seven fail the handshake or the SPIFFE check; the foreign trust domain is denied.
        assert sum(bad["refused"].values()) == bad["cases"], bad["refused"]
        assert bad["refused"].get("denied_by_intention") == 1
        assert bad["good leaf still echoes"]

        loris = await fs.slowloris(r, attackers=300, seconds=2.5)
        # 400 connections -> a handshake budget of 100: most attackers are closed at accept.
        assert loris["over_handshake_limit"] >= 100, loris.values
        # All of them on a quiet machine; a loaded one may let a handshake outlast the 1 s
        # timeout of this rig.
        assert loris["authorized tried"] >= 5, loris.values
        assert loris["authorized ok"] >= 0.9 * loris["authorized tried"], loris.values


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))


async def test_descriptor_exhaustion_pauses_then_serves_again(tmp_path: Path) -> None:
    # The cap (1,000) above the descriptor limit (128): descriptors run out first.
    async with checked_rig(
        tmp_path,
        web=False,
        db_config={"max_inbound_connections": 1000},
        db_preexec=_limit_descriptors,
    ) as r:
        f = await fs.descriptor_exhaustion(r, attackers=200)
        assert f["paused"], f.values
        assert f["pause lines"] <= 4  # one per outage, not one per failed accept
        assert f["accept pauses counted"] >= 1, f.values
        assert f["recovered after attackers left, s"] is not None
        assert f["recovered after attackers left, s"] < 5
        assert f["alive"]


def _assert_outage(f: fs.Figures, *, new_refused: bool = True) -> None:
    assert f["held ok fraction"] == 1.0, f.values  # established connections keep flowing
    if new_refused:
        assert f["new ok during"] == 0, f.values
        assert f["app connections during"] == 0, f.values
    assert f["recovery s"] is not None and f["recovery s"] < 3, f.values
    assert f["held still ok after"], f.values


async def test_agent_killed_restarted_then_replaced_by_one_with_a_new_ca(tmp_path: Path) -> None:
    async with checked_rig(tmp_path) as r:
        f = await fs.agent_killed(r, seconds=1.0)
        _assert_outage(f)
        assert f["serial kept during"]
        # The new CA's leaves are served within 2 s of the new agent answering (its own
        # start-up is in "heal to recovery").
        f = await fs.agent_new_ca(r, seconds=1.0)
        _assert_outage(f)
        assert f["recovery s"] < 2, f.values
        assert f["serves the new CA's leaf"]


async def test_agent_answering_500_garbage_a_foreign_leaf_or_hanging(tmp_path: Path) -> None:
    async with checked_rig(tmp_path, relay=True) as r:
        for mode in ("500", "garbage"):
            f = await fs.agent_answers(r, mode, seconds=1.0)
            _assert_outage(f)
            assert f["serial kept during"], (mode, f.values)
        refused = await r.db_proxy.refused()
        assert refused.get("authorize_failed", 0) >= 4, refused
        f = await fs.foreign_leaf(r)
        assert f["refused with"] is not None, f.values
        assert f["serial kept"]
        assert f["new ok"] == 5
        # A hung agent (SIGSTOP): nothing is decided for new connections until it answers.
        f = await fs.agent_hung(r, seconds=1.0)
        _assert_outage(f)


async def test_churn_with_ca_rotations_loses_and_corrupts_nothing(tmp_path: Path) -> None:
    async with checked_rig(tmp_path) as r:
        f = await fs.churn_with_rotations(r, echoes=96, size=65536, rotations=2, concurrency=8)
        assert f["rotations"] == 2
        assert f["intact"] == f["echoes"] == 96, f.values
        assert f["corrupt"] == 0 and f["lost"] == 0
        assert f["db serves a new leaf"]


async def test_sigterm_drains_a_transfer_then_exits_0(tmp_path: Path) -> None:
    # The second SIGTERM: tests/test_scenario_process.py (and bench/soak.py's table).
    async with rig(tmp_path, web=False) as r:
        f = await fs.sigterm(r, second=False)
        assert f["new connection refused"]
        assert f["draining ok"], f.values
        assert f["exit code"] == 0
