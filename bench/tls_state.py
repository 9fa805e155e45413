"""What OpenSSL keeps per TLS connection, and what a mutual handshake costs, per engine.

Pairs of the proxy's own engines (`listeners.tls.contexts.new_engine`, memory BIOs, the
product's contexts with leaves of the dev agent's CA) make a full TLS 1.3 mutual handshake
and exchange one byte each way, as a forwarded connection does; then:

- memory: bytes held through malloc (glibc's `mallinfo2`: OpenSSL's structures, not
  Python's small objects) per server and per client, the clients freed first;
- instructions: run it twice under callgrind with two `--count`s and take the slope
  (`--count 20` and `--count 120`: the difference / 100 is one handshake, both sides).

Settings to compare (issue 13): `--groups LIST` (OpenSSL group list on both ends, e.g.
`X25519:P-256`; the `openssl` engine only) and `--tickets N` (TLS 1.3 tickets a server
sends; the `ssl` engine only: pyOpenSSL and cryptography's bindings cannot set it).

    python bench/tls_state.py --engine openssl
    python bench/tls_state.py --engine openssl --groups X25519:P-256
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/tls_state.py --engine ssl --tickets 2 --count 120

Rule 1: nothing here is collected by pytest. glibc only (mallinfo2, 2.33+).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ssl
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.bindings.openssl.binding import Binding  # noqa: E402

from listeners.tls.contexts import build_contexts, handshake_in_memory  # noqa: E402
from listeners.tls.engine import TLSContext, TLSEngine  # noqa: E402
from proxy.devagent.ca import CertificateAuthority  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_in_use() -> int:
    """Bytes handed out by malloc and not yet freed (heap and mmap'd blocks)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def contexts(engine: str, groups: str, tickets: int | None) -> tuple[TLSContext, TLSContext]:
    ca = CertificateAuthority("11111111-2222-3333-4444-555555555555")
    roots = [r.cert_pem for r in ca.roots]
    db, web = ca.sign_leaf("db", datacenter="dc1"), ca.sign_leaf("web", datacenter="dc1")
    server = build_contexts(roots, db.cert_pem, db.private_key_pem, engine)[0]
    client = build_contexts(roots, web.cert_pem, web.private_key_pem, engine)[1]
    if groups:
        if isinstance(server, ssl.SSLContext):
            raise SystemExit("--groups: the ssl engine cannot set a group list")
        for ctx in (server, client):
            native = ctx._context  # type: ignore[union-attr]
            if Binding.lib.SSL_CTX_set1_curves_list(native, groups.encode()) != 1:
                raise SystemExit(f"--groups: OpenSSL refused {groups!r}")
    if tickets is not None:
        if not isinstance(server, ssl.SSLContext):
            raise SystemExit("--tickets: the openssl engine cannot set the ticket count")
        server.num_tickets = tickets
    return server, client


def pair(server: TLSContext, client: TLSContext) -> tuple[TLSEngine, TLSEngine]:
    """A mutual handshake in memory, then one byte each way (tickets read past)."""
    srv, cli = handshake_in_memory(server, client)
    cli.write(b"x")
    srv.feed(cli.take())
    srv.write(b"y")
    cli.feed(srv.take())
    if srv.read(16) != b"x" or cli.read(16) != b"y":
        raise RuntimeError("the bytes did not come through")
    srv.take(), cli.take()
    return srv, cli


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--engine", choices=("ssl", "openssl"), default="openssl")
    parser.add_argument("--groups", default="", help="group list, both ends (openssl engine)")
    parser.add_argument("--tickets", type=int, help="TLS 1.3 tickets per server (ssl engine)")
    parser.add_argument("--count", type=int, default=1000, help="pairs (default 1000)")
    args = parser.parse_args()
    server, client = contexts(args.engine, args.groups, args.tickets)
    for _ in range(20):  # warm-up: lazily built tables, caches
        pair(server, client)
    gc.collect()
    start = malloc_in_use()
    pairs = [pair(server, client) for _ in range(args.count)]
    gc.collect()
    both = malloc_in_use()
    servers = [p[0] for p in pairs]
    del pairs
    gc.collect()
    alone = malloc_in_use()
    n = args.count
    label = f"{args.engine}, groups {args.groups or 'default'}, tickets " + (
        "default" if args.tickets is None else str(args.tickets)
    )
    print(f"{label}: {n} connections held after a mutual handshake and a byte each way")
    print(f"  per server {(alone - start) / n / 1024:6.1f} KiB (malloc'd)")
    print(f"  per client {(both - alone) / n / 1024:6.1f} KiB (malloc'd)")
    del servers
    return 0


if __name__ == "__main__":
    sys.exit(main())
