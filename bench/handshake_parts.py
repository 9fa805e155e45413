"""Where the instructions of a TLS 1.3 mutual handshake go, inside OpenSSL (valgrind callgrind).

Both ends are the proxy's own `openssl` engine (`listeners.tls.contexts`, memory BIOs,
leaves of the dev agent's CA), built as `tls_state.py` builds them, with its `--groups` on
both ends (default X25519, as the Go load generator and Go reference of `bench/` offer;
`default` keeps OpenSSL's own list, with X25519MLKEM768 first). Two processes under
callgrind make `--small` and `--large` handshakes; each function's inclusive instructions
per handshake is the slope between them, so start-up cancels out. The parts printed are
those issue 13 asks about: the server's whole state machine, its check of the client's
chain, the signatures, the key exchange and the session tickets.

    python bench/handshake_parts.py                  # about 1 minute on 2 cores
    python bench/handshake_parts.py --groups default

Rule 1: nothing here is collected by pytest; valgrind and callgrind_annotate must be on
PATH (else a clear error).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (label, OpenSSL function whose inclusive cost is the part), in the order printed.
PARTS = [
    ("both sides, whole handshake calls", "SSL_do_handshake"),
    ("server: its state machine", "ossl_statem_accept"),
    ("client: its state machine", "ossl_statem_connect"),
    ("chain checks (X509_verify_cert), both sides", "X509_verify_cert"),
    ("  of which the certificate's signature", "X509_verify"),
    ("every ECDSA verification (chains and CertificateVerify)", "EVP_DigestVerify"),
    ("CertificateVerify signing, both sides", "tls_construct_cert_verify"),
    ("key share generation, both sides", "EVP_PKEY_keygen"),
    ("key agreement, both sides", "EVP_PKEY_derive"),
    ("server: session tickets made", "tls_construct_new_session_ticket"),
    ("client: session tickets read", "tls_process_new_session_ticket"),
]


def child(count: int, groups: str) -> None:
    """The measured process: `count` handshakes between a fresh server and client each."""
    from tls_state import contexts

    from listeners.tls.contexts import handshake_in_memory

    server, client = contexts("openssl", "" if groups == "default" else groups, None)
    for _ in range(count):
        srv, cli = handshake_in_memory(server, client)
        if data := srv.take():
            cli.feed(data)
        cli.read(1)  # the session tickets, fed in the last flight, are read here


def inclusive(out: Path) -> dict[str, int]:
    """Inclusive instructions by function name (the largest entry of each name)."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\d,]+) \([^)]*\)\s+\S*?:?([A-Za-z_][\w]*) \[", line)
        if match:
            name, value = match.group(2), int(match.group(1).replace(",", ""))
            costs[name] = max(costs.get(name, 0), value)
    return costs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=10, help="handshakes, first count")
    parser.add_argument("--large", type=int, default=60, help="handshakes, second count")
    parser.add_argument(
        "--groups", default="X25519", help="both ends' group list (default X25519; default)"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.groups)
        return 0
    if not 0 < args.small < args.large:
        print("need 0 < --small < --large", file=sys.stderr)
        return 2
    for tool in ("valgrind", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH (Debian: apt-get install valgrind)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="handshake-parts-") as tmp:

        def run(count: int) -> dict[str, int]:
            out = Path(tmp) / f"cg.{count}"
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            command += [sys.executable, __file__, "--child", str(count), "--groups", args.groups]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"callgrind failed ({count}):\n{done.stderr[-2000:]}")
            return inclusive(out)

        with ThreadPoolExecutor(max_workers=2) as pool:
            small, large = pool.map(run, (args.small, args.large))
    span = args.large - args.small
    per = {name: (large.get(name, 0) - small.get(name, 0)) / span for _, name in PARTS}
    whole = per["SSL_do_handshake"] or 1.0
    print(f"instructions per TLS 1.3 mutual handshake, groups {args.groups}:")
    for label, name in PARTS:
        print(f"  {label:58s} {per[name]:>12,.0f}  ({per[name] / whole:6.1%} of both sides')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
