"""TLS contexts for either engine: Consul's settings, the leaf key loaded from memory, a
check that a leaf chains to its roots, and the engine that drives a context.

Owns: building a server and a client context from PEM (Consul's TLS settings of
`connect/tls.go`) for an engine named in `TLS_ENGINES`: the two builders sit side by side
because they must agree setting by setting; checking a new pair with one in-memory mutual
handshake through the same engine the listeners drive; `new_engine`, which picks the engine of
a context by its type; the plain words for a chain OpenSSL refuses where Go accepts it.

Rule 1: the private key exists only in memory. The `openssl` engine takes the parsed key
object itself; `ssl` only reads paths, so on Linux the key goes through an anonymous memory
file (memfd), elsewhere through a 0600 file in a private directory, unlinked at once.
Rule 2: no state. Which material is current is the caller's business (the proxy's TLS
store); this module builds and checks what it is given, and raises `TLSMaterialError` when
that does not load or does not chain.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from listeners.tls.engine import (
    DEFAULT_TLS_ENGINE,
    StdlibEngine,
    TLSContext,
    TLSEngine,
    TLSError,
    TLSSession,
)
from proxy import keyload
from proxy.errors import TLSMaterialError

if TYPE_CHECKING:
    from OpenSSL import SSL

    from listeners.tls.openssl import OpenSSLEngine

# Consul's TLS 1.2 cipher suites, in its preference order (TLS 1.3 suites are not configurable).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ]
)

# TLS 1.3 suites in Go's order on CPUs with AES instructions (pyOpenSSL engine only: CPython's
# ssl cannot set them).
TLS13_CIPHERS = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# TLS 1.3 session tickets a server of the `ssl` engine sends after a full handshake (Go: 1).
SERVER_TICKETS = 1

# OpenSSL's SSL_MODE_NO_AUTO_CHAIN (ssl.h, the same value since 1.0.2), which cryptography's
# bindings do not name; pyOpenSSL's set_mode() passes any mode bit through. The `ssl` engine
# cannot set it (CPython's ssl has no way to set a mode): `_with_issuing_root` instead.
SSL_MODE_NO_AUTO_CHAIN = 0x00000008


def new_engine(
    context: TLSContext,
    *,
    server_side: bool,
    session: TLSSession | None = None,
    server_name: str | None = None,
    key_share: str | None = None,
) -> TLSEngine:
    """An engine for one connection, of the kind that built `context`.

    Args:
        context: a server or client context from `build_contexts` (either engine).
        server_side: accept (True) or connect (False).
        session: client side, a session of an earlier connection made with `context`.
        server_name: client side, the SNI to send (a peered upstream's `PeerMeta.SNI`);
            sent only, never checked against the server's certificate.
        key_share: client side, the group this server picked before (`TLSEngine.key_share`):
            the one key share to offer (`openssl` engine; the `ssl` engine ignores it).
    """
    if isinstance(context, ssl.SSLContext):
        assert session is None or isinstance(session, ssl.SSLSession)
        return StdlibEngine(
            context, server_side=server_side, session=session, server_name=server_name
        )
    assert session is None or not isinstance(session, ssl.SSLSession)
    return _openssl_engine()(
        context,
        server_side=server_side,
        session=session,
        server_name=server_name,
        key_share=key_share,
    )


@functools.cache
def _openssl_engine() -> type[OpenSSLEngine]:
    # pyOpenSSL is loaded on first use only, so the stdlib engine never loads it; and once,
    # not with an import statement run for every connection.
    from listeners.tls.openssl import OpenSSLEngine

    return OpenSSLEngine


def build_contexts(
    roots: Sequence[str], cert_pem: str, key_pem: str, engine: str = DEFAULT_TLS_ENGINE
) -> tuple[TLSContext, TLSContext]:
    """Server and client contexts of `engine` for a leaf and a set of roots (not yet checked).

    Raises:
        TLSMaterialError: the roots, the certificate or the key do not load.
    """
    if engine == "openssl":
        return _openssl_contexts(roots, cert_pem, key_pem)
    server = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), roots)
    client = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), roots)
    # The peer's identity is its URI SAN, checked by the proxy; there is no host name.
    client.check_hostname = False
    chain = _with_issuing_root(cert_pem, roots)
    load_cert_chain(server, chain, key_pem)
    load_cert_chain(client, chain, key_pem)
    # One TLS 1.3 ticket per full handshake, as Go's crypto/tls sends, not OpenSSL's two: a
    # client of ours keeps one session per server, so the second ticket was work for both
    # ends and nothing else (bench/README.md, "OpenSSL settings": 9 % of the instructions of
    # a mutual handshake, both sides). The `openssl` engine cannot say so: neither pyOpenSSL
    # nor cryptography's bindings expose SSL_CTX_set_num_tickets.
    server.num_tickets = SERVER_TICKETS
    return server, client


def _with_issuing_root(cert_pem: str, roots: Sequence[str]) -> str:
    """`cert_pem`, and after it the root that signed it when it is a leaf alone.

    CPython's ssl cannot set SSL_MODE_NO_AUTO_CHAIN. Given a chain of one, OpenSSL completes
    it from the trust store on every handshake, with a full check of our own leaf's
    signature, and sends the root along. Given the root as the chain's second certificate,
    it sends the same certificates and checks nothing (bench/README.md, "No auto chain").
    A leaf with intermediates, or one no root signed, is left as it is.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_pem.strip().encode())
    except ValueError:
        return cert_pem  # the load below says what is wrong with it
    if len(certs) != 1:
        return cert_pem
    for pem in roots:
        try:
            candidates = x509.load_pem_x509_certificates(pem.strip().encode())
        except ValueError:
            continue  # the roots' own load says what is wrong with them
        for root in candidates:
            try:
                certs[0].verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return cert_pem.strip() + "\n" + root.public_bytes(Encoding.PEM).decode()
    return cert_pem


def load_cert_chain(
    ctx: ssl.SSLContext, cert_pem: str, key_pem: str, *, use_memfd: bool = True
) -> None:
    """Load a certificate chain and its private key into `ctx` from memory, never from a
    file on disk (`proxy.keyload`).

    Raises:
        TLSMaterialError: the certificate or key does not load.
    """
    try:
        keyload.load_cert_chain(
            ctx, cert_pem, key_pem, name="connect-proxy-leaf", use_memfd=use_memfd
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSMaterialError(f"failed to load the leaf certificate and key: {exc}") from exc


def _base(ctx: ssl.SSLContext, roots: Sequence[str]) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # No ALPN: Consul's proxy neither offers nor selects a protocol.
    try:
        ctx.load_verify_locations(cadata="\n".join(r.strip() for r in roots) + "\n")
    except (ssl.SSLError, ValueError) as exc:
        raise TLSMaterialError(f"failed to load the CA roots: {exc}") from exc
    return ctx


def _openssl_contexts(
    roots: Sequence[str], cert_pem: str, key_pem: str
) -> tuple[SSL.Context, SSL.Context]:
    """pyOpenSSL server and client contexts with the settings `_base` gives the stdlib ones.

    Certificates and key go in as parsed objects: nothing is written anywhere, not even to
    a memory file.
    """
    # pyOpenSSL is loaded on first use only, as in `new_engine`.
    from OpenSSL import SSL, crypto

    from listeners.tls.openssl_errors import error_text
    from listeners.tls.verified import VerifiedChains, VerifyingContext

    try:
        root_certs = [
            cert for pem in roots for cert in x509.load_pem_x509_certificates(pem.strip().encode())
        ]
    except ValueError as exc:
        raise TLSMaterialError(f"failed to load the CA roots: {exc}") from exc
    # Both contexts check peers' chains through one `VerifiedChains`: each distinct chain
    # in full once, then by its bytes (listeners.tls.verified).
    verified = VerifiedChains(root_certs)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem.strip().encode())
        key = load_pem_private_key(key_pem.strip().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TLSMaterialError(f"failed to load the leaf certificate and key: {exc}") from exc
    signing = (
        ec.EllipticCurvePrivateKey,
        rsa.RSAPrivateKey,
        ed25519.Ed25519PrivateKey,
        ed448.Ed448PrivateKey,
        dsa.DSAPrivateKey,
    )
    if not isinstance(key, signing):
        raise TLSMaterialError(
            f"failed to load the leaf certificate and key: a {type(key).__name__} cannot sign"
        )
    contexts: list[SSL.Context] = []
    for server_side in (True, False):
        ctx = VerifyingContext(SSL.TLS_SERVER_METHOD if server_side else SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(TLS12_CIPHERS.encode())
        # Go's crypto/tls (Consul's proxy) prefers AES-128-GCM when the CPU has AES
        # instructions; OpenSSL's default puts AES-256 first. With server preference on, the
        # server picks AES-128 whatever the client's order: cheaper bulk encryption.
        ctx.set_tls13_ciphersuites(TLS13_CIPHERS.encode())
        options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
        if server_side:
            options |= SSL.OP_CIPHER_SERVER_PREFERENCE  # Consul's order, as CPython's ssl
        ctx.set_options(options)
        # As CPython's ssl: idle connections give their record buffers back. Unlike
        # pyOpenSSL's default, SSL_write encrypts all it is given in one call (a memory BIO
        # never blocks, so partial writes would only add round trips through Python).
        # No auto chain: without it, OpenSSL completes our own chain from the trust store
        # for every handshake, with a full check of our leaf's signature, and sends the root
        # along. We send what the agent gave (leaf, then its intermediates), as Consul's Go
        # proxy does; a root in the chain is of no use to a peer, which must hold it
        # already. 19 % fewer instructions per server handshake, 21 % per client one, 536
        # bytes less each way (bench/README.md, "No auto chain").
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN)
        ctx.clear_mode(Binding.lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        # No ALPN and no host name check, as `_base`: the proxy checks the peer's URI SAN.
        if not verified.install(ctx):
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
            store = ctx.get_cert_store()
            assert store is not None
            for cert in root_certs:
                store.add_cert(crypto.X509.from_cryptography(cert))
        if server_side:
            # OpenSSL refuses to resume a session of a verified peer without a session ID
            # context (CPython's ssl sets one too).
            ctx.set_session_id(b"connect-proxy")
            # Resumption is by stateless tickets only, which need no cache. Without one, the
            # stateful tickets sent to clients that cannot resume (`OpenSSLEngine.feed`),
            # and TLS 1.2 sessions without tickets, are never kept: no memory held for
            # them after the connection.
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        try:
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(key)
            ctx.check_privatekey()
        except (SSL.Error, IndexError, TypeError) as exc:
            text = error_text(None, exc) if isinstance(exc, SSL.Error) else str(exc)
            raise TLSMaterialError(f"failed to load the leaf certificate and key: {text}") from exc
        contexts.append(ctx)
    return contexts[0], contexts[1]


def check_contexts(
    server: TLSContext, client: TLSContext, roots: Sequence[str], leaf_cn: str | None = None
) -> None:
    """Check that the leaf of a new pair of contexts chains to their roots, as peers will.

    One mutual handshake between the two contexts in memory, through their engine: the
    client verifies the server's chain (server purpose) and the server verifies the client's
    (client purpose), both with OpenSSL and the new roots.

    Args:
        leaf_cn: the leaf's subject common name, for the words on a name-constraint refusal.

    Raises:
        TLSMaterialError: either side refused the other, or the handshake did not complete.
    """
    try:
        handshake_in_memory(server, client)
    except TLSError as exc:
        raise TLSMaterialError(
            "the leaf certificate does not verify against the CA roots: "
            + explain_verify_failure(str(exc), roots, leaf_cn)
        ) from exc


def handshake_in_memory(server: TLSContext, client: TLSContext) -> tuple[TLSEngine, TLSEngine]:
    """One mutual handshake between a fresh server and client engine over memory BIOs.

    Returns:
        (server engine, client engine), handshake done.

    Raises:
        TLSError: a side refused the other, or the handshake did not complete.
    """
    srv = new_engine(server, server_side=True)
    cli = new_engine(client, server_side=False)
    done = [False, False]
    for _ in range(8):  # a TLS 1.3 mutual handshake takes 3 flights
        for i, side in enumerate((cli, srv)):
            if not done[i]:
                # With TLS 1.3 the server checks the client's chain in its last step, which
                # completes only once that chain has verified.
                done[i] = side.do_handshake()
        if data := cli.take():
            srv.feed(data)
        if data := srv.take():
            cli.feed(data)
        if all(done):
            return srv, cli
    raise TLSError("self-test handshake did not complete")


def explain_verify_failure(
    error: str, roots: Sequence[str] | None = None, leaf_cn: str | None = None
) -> str:
    """Plain words for a chain OpenSSL rejects where Go would accept it.

    OpenSSL checks a subject common name that looks like a host name against the CA's DNS
    name constraints when the leaf has no DNS SAN; Go never does. Consul 1.7-1.10 leaves
    (`CN=<svc>.svc.<ns>.<td8>.consul`) under a constrained root hit this. Any other error
    comes back unchanged.

    Args:
        error: OpenSSL's words (a `TLSError`'s text).
        roots: the CA roots (PEM each) the chain was checked against, when known: their
            permitted DNS names are quoted.
        leaf_cn: the refused leaf's subject common name, when known.
    """
    if "subtree" not in error and "name constraint" not in error.lower():
        return error
    if roots is None:
        constraints = "a name constraint of the CA rejects"
    else:
        permitted = ", ".join(_permitted_dns_names(roots)) or "unknown"
        constraints = f"the CA's name constraints (permitted DNS names: {permitted}) reject"
    cn = f" {leaf_cn!r}" if leaf_cn else ""
    return (
        f"{error}: {constraints} the leaf's subject common name{cn}. OpenSSL checks a common "
        "name that looks like a host name against DNS name constraints when the leaf has no "
        "DNS SAN; Consul's Go proxy does not. Leaves with an empty subject (Consul 1.11 and "
        "later) avoid this."
    )


def _permitted_dns_names(pems: Sequence[str]) -> list[str]:
    permitted: list[str] = []
    for pem in pems:
        try:
            certs = x509.load_pem_x509_certificates(pem.strip().encode())
        except ValueError:
            continue
        for cert in certs:
            with contextlib.suppress(x509.ExtensionNotFound):
                nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
                permitted += [str(n.value) for n in nc.permitted_subtrees or []]
    return permitted


def describe_engine(engine: str) -> str:
    """Which TLS engine, on which OpenSSL: for the startup log."""
    if engine == "openssl":
        import cryptography
        import OpenSSL
        from OpenSSL import SSL

        library = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
        return (
            f"openssl ({library}, bundled by cryptography {cryptography.__version__}; "
            f"pyOpenSSL {OpenSSL.__version__})"
        )
    return f"ssl ({ssl.OPENSSL_VERSION}, linked by CPython's ssl module)"
