"""Optional peers: HAProxy, nginx (stream) and stunnel as inbound mTLS terminators.

Each is used only when its binary is on PATH; nothing is installed. They terminate mutual
TLS with the same `db` leaf and roots as our proxy and forward plain TCP to the same echo
backend; none of them authorizes (they verify the client chain only).

These programs read key material from files, so `write_material` writes the leaf, its key
and the roots into a private directory (0700, files 0600) that the caller deletes at the end.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench_util import TLSMaterial

NGINX_STREAM_MODULES = (
    "/usr/lib/nginx/modules/ngx_stream_module.so",
    "/usr/share/nginx/modules/ngx_stream_module.so",
)


@dataclass(frozen=True, slots=True)
class PeerSpec:
    name: str
    binary: str


@dataclass(frozen=True, slots=True)
class Files:
    cert: str
    key: str
    combined: str  # cert then key (HAProxy's `crt`)
    roots: str


def detect() -> tuple[list[PeerSpec], list[tuple[str, str]]]:
    """The peers found on PATH, and (name, one line) for each peer that is not."""
    found: list[PeerSpec] = []
    skipped: list[tuple[str, str]] = []
    for name, candidates in (
        ("haproxy", ("haproxy",)),
        ("nginx", ("nginx",)),
        ("stunnel", ("stunnel4", "stunnel")),
    ):
        binary = next((b for b in map(shutil.which, candidates) if b), None)
        if binary is None:
            names = " or ".join(candidates)
            skipped.append((name, f"inbound-{name}: not installed ({names} not on PATH), skipped"))
        else:
            found.append(PeerSpec(name, binary))
    return found, skipped


def version(spec: PeerSpec) -> str | None:
    """The first line of the peer's version output."""
    flag = {"haproxy": "-v", "nginx": "-v", "stunnel": "-version"}[spec.name]
    try:
        res = subprocess.run(
            [spec.binary, flag], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    if spec.name == "stunnel":
        lines = [ln for ln in lines if ln.startswith("stunnel ")] or lines
    return lines[0] if lines else None


def _write_private(path: Path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return str(path)


def write_material(directory: Path, mat: TLSMaterial) -> Files:
    """Write the leaf, key and roots into `directory` (which must be private, 0700)."""
    if directory.stat().st_mode & 0o077:
        raise PermissionError(f"{directory} is not private (0700)")
    return Files(
        cert=_write_private(directory / "leaf.crt", mat.cert_pem),
        key=_write_private(directory / "leaf.key", mat.key_pem),
        combined=_write_private(directory / "leaf.pem", mat.cert_pem + mat.key_pem),
        roots=_write_private(directory / "roots.pem", mat.roots_pem),
    )


def max_connections() -> int:
    """Client connections a peer may hold: each needs two descriptors (client and backend)
    and the peers refuse to start when they cannot raise their limit to that."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(1024, min(10000, (hard - 100) // 2))


def command(spec: PeerSpec, directory: Path, files: Files, listen: int, backend: int) -> list[str]:
    """Write the peer's configuration into `directory` and return its foreground argv."""
    conns = max_connections()
    if spec.name == "haproxy":
        cfg = f"""\
global
    maxconn {conns}
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend public
    bind 127.0.0.1:{listen} ssl crt {files.combined} ca-file {files.roots} verify required
    default_backend app
backend app
    server app 127.0.0.1:{backend}
"""
        path = _write_private(directory / "haproxy.cfg", cfg)
        return [spec.binary, "-db", "-f", path]
    if spec.name == "nginx":
        module = next((m for m in NGINX_STREAM_MODULES if os.path.exists(m)), None)
        load = f"load_module {module};\n" if module else ""
        cfg = f"""\
{load}daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {2 * conns + 64};
pid {directory}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {2 * conns}; }}
stream {{
    server {{
        listen 127.0.0.1:{listen} ssl;
        ssl_certificate {files.cert};
        ssl_certificate_key {files.key};
        ssl_client_certificate {files.roots};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        proxy_pass 127.0.0.1:{backend};
    }}
}}
"""
        path = _write_private(directory / "nginx.conf", cfg)
        return [spec.binary, "-e", "stderr", "-p", str(directory), "-c", path]
    if spec.name == "stunnel":
        cfg = f"""\
foreground = yes
pid =
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[db]
accept = 127.0.0.1:{listen}
connect = 127.0.0.1:{backend}
cert = {files.cert}
key = {files.key}
CAfile = {files.roots}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2
"""
        path = _write_private(directory / "stunnel.conf", cfg)
        return [spec.binary, path]
    raise ValueError(spec.name)
