"""The references ours is measured against, each in the layouts of ours: the peers
(HAProxy, nginx, stunnel; inbound only) and the Go reference proxy (inbound, outbound,
chain, with and without session resumption).

Rule 1: everything a reference needs (the dev agent, the backend, registrations, one
scenario's frame, the results) comes from the `Stage` it is given; it keeps only its own
settings and, for Go, the binary it built.
Rule 2: a reference that is not installed or cannot be built is skipped with one line,
never an error; the binaries and key files it needs live in temporary directories the
stage deletes.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from pathlib import Path

import bench_goref
import bench_peers
from bench_load import Target, latency
from bench_procs import Scene
from bench_stage import Stage
from bench_util import free_port, log

LAYOUTS = ("inbound", "outbound", "chain")


class Peers:
    """HAProxy, nginx and stunnel as inbound mTLS terminators, when installed."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def run(self) -> None:
        """Every peer installed and selected by `--only`, one line for each one missing."""
        s = self.stage
        detected, skipped = bench_peers.detect()
        found = [p for p in detected if s.want(f"inbound-{p.name}", "peers", "inbound")]
        for name, line in skipped:
            if s.want(f"inbound-{name}", "peers", "inbound"):
                log(line)
                s.skipped.append(line)
        for spec in found:
            self.peer(spec)

    def peer(self, spec: bench_peers.PeerSpec) -> None:
        """One peer in the inbound layout; skipped (with one line) when it cannot be started
        or passes no traffic."""
        s = self.stage
        name = f"inbound-{spec.name}"
        s.versions[spec.name] = bench_peers.version(spec)
        directory = s.procs.tmpdir(f"bench-{spec.name}-")  # mode 0700
        with s.scenario(name, "peer", "inbound") as scene:
            scene.after.append(functools.partial(shutil.rmtree, directory, ignore_errors=True))
            try:
                files = bench_peers.write_material(Path(directory), s.db)
                listen = free_port()
                argv = bench_peers.command(spec, Path(directory), files, listen, s.plain_port)
                s.procs.peer(scene, f"peer-{spec.name}", argv, listen)
                target = Target("127.0.0.1", listen, s.web)
                latency(target, 1, warmup=0)  # one end-to-end check before measuring
            except Exception as exc:
                msg = f"{name}: could not be started or passed no traffic ({exc}); skipped"
                log(msg)
                s.skipped.append(msg)
                return
            s.measure(name, target, scene)


class GoReference:
    """The Go reference proxy (bench/goref), built once, in the three layouts.

    `resume` lists the session-cache settings `--go-session-cache` asks for (outbound and
    chain run once per setting; inbound dials no TLS upstream).
    """

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.binary: Path | None = None
        cache = getattr(stage.args, "go_session_cache", "both")
        self.resume = {"off": [False], "on": [True], "both": [False, True]}[cache]

    def build(self) -> None:
        """Build the Go reference proxy (before pinning: the build may use every CPU)."""
        s = self.stage
        if not any(s.want(f"{b}-go", "go", b) for b in LAYOUTS):
            return
        s.versions["go"] = bench_goref.version()
        directory = s.procs.tmpdir("bench-goref-")
        if s.versions["go"]:
            log(f"building the Go reference proxy ({s.versions['go']})")
        binary, why = bench_goref.build(Path(directory))
        if binary is None:
            log(why)
            s.skipped.append(why)
        self.binary = binary

    def run(self, base: str, *, resume: bool) -> None:
        """The Go reference proxy in the `base` layout (inbound, outbound or chain); with
        `resume`, its upstream dials resume TLS sessions (name suffixed `-resume`)."""
        s = self.stage
        name = f"{base}-go{'-resume' if resume else ''}"
        if self.binary is None or not s.want(name, "go", base):
            return
        info = {
            "gomaxprocs": s.args.go_maxprocs,
            "discovery": s.args.go_discovery,
            "session_cache": resume,
        }
        layout = {"inbound": self._inbound, "outbound": self._outbound}
        with s.scenario(name, "go", base, **info) as scene:
            target = layout.get(base, self._chain)(scene, self.binary, resume)
            latency(target, 1, warmup=0)  # one end-to-end check before measuring
            s.measure(name, target, scene)

    def _start(self, scene: Scene, name: str, argv: Sequence[str], web: bool) -> int:
        s = self.stage
        material = s.web if web else s.db
        return s.procs.goref(scene, name, argv, material, s.args.go_maxprocs)

    def _inbound_argv(self, binary: Path, listen: str) -> list[str]:
        s = self.stage
        backend = f"127.0.0.1:{s.plain_port}"
        return bench_goref.inbound_argv(binary, s.agent_addr, "db", listen, backend)

    def _outbound_argv(self, binary: Path, listen: int, resume: bool) -> list[str]:
        s = self.stage
        return bench_goref.outbound_argv(
            binary,
            s.agent_addr,
            "db",
            f"127.0.0.1:{listen}",
            s.trust_domain,
            discovery=s.args.go_discovery,
            session_cache=resume,
        )

    def _inbound(self, scene: Scene, binary: Path, resume: bool) -> Target:
        argv = self._inbound_argv(binary, "127.0.0.1:0")
        port = self._start(scene, "goref-inbound", argv, web=False)
        return Target("127.0.0.1", port, self.stage.web)

    def _outbound(self, scene: Scene, binary: Path, resume: bool) -> Target:
        self.stage.register_native_db(scene)
        up = free_port()
        self._start(scene, "goref-outbound", self._outbound_argv(binary, up, resume), web=True)
        return Target("127.0.0.1", up)

    def _chain(self, scene: Scene, binary: Path, resume: bool) -> Target:
        s = self.stage
        db_side, up = s.register_chain(scene)
        argv = self._inbound_argv(binary, f"127.0.0.1:{db_side}")
        self._start(scene, "goref-chain-db", argv, web=False)
        s.api.wait_connect_instance("db", db_side)
        self._start(scene, "goref-chain-web", self._outbound_argv(binary, up, resume), web=True)
        return Target("127.0.0.1", up)
