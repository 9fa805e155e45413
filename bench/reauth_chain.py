"""What the roots check through intermediates costs (issue 12), timed with `timeit`.

    python bench/reauth_chain.py [--repeat R]

Per connection, always (`listeners/public.py` while forwarding): the record takes a handle to
the TLS connection's chain reader and drops it when the connection ends, that is one bound
method and two slot stores. Timed against the same two stores of None (what any other field
costs), with a real `TLSTransport`.

Only at a roots rotation, per open connection (`Reauthorizer.check_roots`): reading the
client's chain from the live TLS object (`peer_chain()`, each engine, a client that sent
its leaf and one intermediate), and per distinct chain the path walk
(`chained_to_removed_root`, signature checks: a chain that ends in a removed root, one that
also reaches a current root through a cross-signed intermediate, and the chain of a second
client of the same intermediate, whose intermediate the pass has checked already).

Every figure is the best of R runs (the least disturbed), in µs per call. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402

from listeners.events import INBOUND, Connection  # noqa: E402
from listeners.tls.contexts import build_contexts, handshake_in_memory  # noqa: E402
from listeners.tls.engine import TLS_ENGINES, TLSEngine  # noqa: E402
from listeners.tls.transport import TLSTransport  # noqa: E402
from proxy.devagent.ca import CertificateAuthority, Root  # noqa: E402
from proxy.devagent.cakeys import key_id  # noqa: E402
from proxy.reauth import Checked, chained_to_removed_root  # noqa: E402


def best(stmt: Callable[[], object], number: int, repeat: int) -> float:
    """µs per call, best of `repeat` runs of `number` calls."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e6


def handshake(ca: CertificateAuthority, engine: str) -> TLSEngine:
    """The server engine of one in-memory mutual handshake (client: leaf + intermediate)."""
    roots = [r.cert_pem for r in ca.roots]
    db, web = ca.sign_leaf("db", datacenter="dc1"), ca.sign_leaf("web", datacenter="dc1")
    server_ctx = build_contexts(roots, db.cert_pem, db.private_key_pem, engine)[0]
    client_ctx = build_contexts(roots, web.cert_pem, web.private_key_pem, engine)[1]
    return handshake_in_memory(server_ctx, client_ctx)[0]


def cross_sign(cert: x509.Certificate, issuer: Root) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(issuer.cert.subject)
        .public_key(cert.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.AuthorityKeyIdentifier):
            value = x509.AuthorityKeyIdentifier(key_id(issuer.key.public_key()), None, None)
        builder = builder.add_extension(value, ext.critical)
    return builder.sign(issuer.key, hashes.SHA256())


async def per_connection(repeat: int) -> tuple[float, float]:
    ca = CertificateAuthority(use_intermediate=True)
    leaf = ca.sign_leaf("db", datacenter="dc1")
    roots = [r.cert_pem for r in ca.roots]
    server_ctx = build_contexts(roots, leaf.cert_pem, leaf.private_key_pem, "ssl")[0]
    tls = TLSTransport(server_ctx, server_side=True)
    conn = Connection(INBOUND, "public_listener", "127.0.0.1:1")

    def handle() -> None:
        conn.peer_chain = tls.peer_chain
        conn.peer_chain = None

    def plain() -> None:
        conn.peer_chain = None
        conn.peer_chain = None

    return best(handle, 200_000, repeat), best(plain, 200_000, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with_handle, without = asyncio.run(per_connection(args.repeat))
    print("per connection, always:")
    print(f"  handle set and cleared  {with_handle:8.3f} µs")
    print(f"  two stores of None      {without:8.3f} µs")
    print(f"  added                   {with_handle - without:8.3f} µs")

    ca = CertificateAuthority(use_intermediate=True)
    print("per open connection, at a roots rotation only: peer_chain()")
    for engine in TLS_ENGINES:
        srv = handshake(ca, engine)
        assert len(srv.peer_chain()) == 2
        print(f"  {engine:8s}                {best(srv.peer_chain, 20_000, args.repeat):8.3f} µs")

    leaf = ca.sign_leaf("web", datacenter="dc1")
    other_leaf = ca.sign_leaf("api", datacenter="dc1")
    (inter_pem,) = ca.active_root.intermediates
    old = ca.active_root
    ca.rotate(2)
    new = ca.active_root
    chain = [
        c.public_bytes(Encoding.DER)
        for c in x509.load_pem_x509_certificates(leaf.cert_pem.encode())
    ]
    cross = cross_sign(x509.load_pem_x509_certificate(inter_pem.encode()), new)
    crossed = [*chain, cross.public_bytes(Encoding.DER)]
    removed, current = [old.cert], [new.cert]
    assert chained_to_removed_root(chain, removed, current)
    assert not chained_to_removed_root(crossed, removed, current)
    other = [
        c.public_bytes(Encoding.DER)
        for c in x509.load_pem_x509_certificates(other_leaf.cert_pem.encode())
    ]
    print("per distinct chain, at a roots rotation only: chained_to_removed_root()")
    for label, walked, memo in [
        ("leaf, intermediate -> removed root (closed)", chain, False),
        ("+ intermediate cross-signed by current root (kept)", crossed, False),
        ("another leaf, intermediate already checked in the pass", other, True),
    ]:
        checked: Checked = {}
        if memo:
            chained_to_removed_root(chain, removed, current, checked)
        first = {k: v for k, v in checked.items() if k[0] != walked[0]}

        def walk(walked: list[bytes] = walked, first: Checked = first) -> bool:
            return chained_to_removed_root(walked, removed, current, dict(first))

        print(f"  {label:55s} {best(walk, 200, args.repeat):8.1f} µs")


if __name__ == "__main__":
    main()
