"""The Go reference proxy (bench/goref, standard library only): build and command lines.

The binary is built at run time into a temporary directory when `go` is on PATH, with every
Go directory (build cache, GOPATH) inside that temporary directory, no network
(GOPROXY=off, GOTOOLCHAIN=local) and no VCS stamping, so nothing is written into the
repository. Key material reaches the process as JSON on its standard input, never as a file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from bench_util import TLSMaterial

SOURCE = Path(__file__).resolve().parent / "goref"
BUILD_TIMEOUT = 300.0


def go_env(workdir: Path) -> dict[str, str]:
    """The environment of `go build`: private caches, offline, no user configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOCACHE=str(workdir / "cache"),
        GOPATH=str(workdir / "gopath"),
        GOMODCACHE=str(workdir / "gopath" / "mod"),
        GOENV="off",
        GOFLAGS="-mod=readonly",  # never rewrite go.mod
        GOTOOLCHAIN="local",
        GOPROXY="off",
        GOSUMDB="off",
        GONOSUMDB="*",
        GOWORK="off",
        GO111MODULE="on",
        GOTELEMETRY="off",
        CGO_ENABLED="0",
        HOME=str(workdir),  # anything else Go might want to write goes here too
    )
    return env


def version() -> str | None:
    go = shutil.which("go")
    if go is None:
        return None
    try:
        out = subprocess.run(
            [go, "version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def build(workdir: Path) -> tuple[Path | None, str]:
    """Build the reference proxy into `workdir` (a private temporary directory).

    Returns:
        (path of the binary, "") on success; (None, one line saying why) otherwise.
    """
    return build_module(SOURCE, workdir, "inbound-go, outbound-go, chain-go", "Go reference proxy")


def build_module(source: Path, workdir: Path, skips: str, what: str) -> tuple[Path | None, str]:
    """Build the Go module in `source` (standard library only) into `workdir`, offline.

    `skips` names what is skipped without it, `what` the program (for the line saying why).

    Returns:
        (path of the binary, "") on success; (None, one line saying why) otherwise.
    """
    go = shutil.which("go")
    if go is None:
        return None, f"{skips}: `go` not on PATH, {what} skipped"
    out = workdir / source.name
    try:
        res = subprocess.run(
            [go, "build", "-trimpath", "-buildvcs=false", "-o", str(out), "."],
            check=False,
            cwd=source,
            env=go_env(workdir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{skips}: `go build` failed ({exc}); skipped"
    if res.returncode != 0 or not out.exists():
        why = " | ".join((res.stderr or res.stdout).strip().splitlines()[:3])
        return None, f"{skips}: `go build` failed ({why}); skipped"
    return out, ""


def stdin_material(mat: TLSMaterial) -> str:
    return json.dumps(
        {"CertPEM": mat.cert_pem, "PrivateKeyPEM": mat.key_pem, "RootsPEM": mat.roots_pem}
    )


def inbound_argv(binary: Path, agent: str, service: str, listen: str, backend: str) -> list[str]:
    return [
        str(binary),
        *("-mode", "inbound", "-agent", agent, "-service", service),
        *("-listen", listen, "-backend", backend),
    ]


def outbound_argv(
    binary: Path,
    agent: str,
    upstream: str,
    listen: str,
    trust_domain: str,
    *,
    discovery: str,
    session_cache: bool,
) -> list[str]:
    return [
        str(binary),
        *("-mode", "outbound", "-agent", agent, "-upstream", upstream),
        *("-listen", listen, "-trust-domain", trust_domain, "-discovery", discovery),
        f"-session-cache={'true' if session_cache else 'false'}",
    ]
