"""TLSStore: the current roots and leaf, as ready-to-use server and client TLS contexts.

Owns: building contexts from PEM (Consul's TLS settings, consul-spec.md 3.1) for the TLS engine
in use (`listeners.tls.engine`: `ssl`, CPython's module on the system OpenSSL, or `openssl`,
pyOpenSSL on the OpenSSL bundled by `cryptography`), loading the leaf key without it ever
touching the filesystem, checking that a new leaf chains to the roots before it is used (one
in-memory handshake through the same engine the listeners drive), and swapping the contexts
in with one assignment.

Rule 1: a rotation that fails (bad PEM, leaf not chaining to the roots) logs once and keeps
the previous material; new connections never see a half-built state.
Rule 2: the private key exists only in memory. The `openssl` engine takes the parsed key
object itself; `ssl` only reads paths, so on Linux the key goes through an anonymous memory
file (memfd), elsewhere through a 0600 file in a private directory, unlinked at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from listeners.tls.engine import TLSContext, TLSError, new_engine
from proxy.config import DEFAULT_TLS_ENGINE, TLS_ENGINES
from proxy.errors import TLSMaterialError
from proxy.identity import PeerIdentity, peer_identity

if TYPE_CHECKING:
    from OpenSSL import SSL

log = logging.getLogger("proxy.tls")

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

KEY_LOADER = "memfd" if hasattr(os, "memfd_create") else "tempfile"


def load_cert_chain(
    ctx: ssl.SSLContext, cert_pem: str, key_pem: str, *, use_memfd: bool = True
) -> None:
    """Load a certificate chain and its private key into `ctx` from memory.

    `ssl.SSLContext.load_cert_chain` only reads paths. On Linux the path is an anonymous
    memory file (`/proc/self/fd/N` of a memfd), so the key is never written to any
    filesystem. Elsewhere it is a 0600 file inside a fresh 0700 directory, removed right
    after OpenSSL has read it.

    Raises:
        TLSMaterialError: the certificate or key does not load.
    """
    data = (cert_pem.strip() + "\n" + key_pem.strip() + "\n").encode()
    try:
        if use_memfd and hasattr(os, "memfd_create"):
            fd = os.memfd_create("connect-proxy-leaf", os.MFD_CLOEXEC)
            try:
                os.write(fd, data)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        directory = tempfile.mkdtemp(prefix="connect-proxy-")  # created 0700
        path = os.path.join(directory, "leaf.pem")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            ctx.load_cert_chain(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.rmdir(directory)
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
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.bindings.openssl.binding import Binding
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import SSL, crypto

    from listeners.tls.openssl import error_text

    try:
        trusted = [
            crypto.X509.from_cryptography(cert)
            for pem in roots
            for cert in x509.load_pem_x509_certificates(pem.strip().encode())
        ]
    except ValueError as exc:
        raise TLSMaterialError(f"failed to load the CA roots: {exc}") from exc
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
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server_side else SSL.TLS_CLIENT_METHOD)
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
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
        ctx.clear_mode(Binding.lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        # No ALPN and no host name check, as `_base`: the proxy checks the peer's URI SAN.
        store = ctx.get_cert_store()
        assert store is not None
        for cert in trusted:
            store.add_cert(cert)
        if server_side:
            # OpenSSL refuses to resume a session of a verified peer without a session ID
            # context (CPython's ssl sets one too).
            ctx.set_session_id(b"connect-proxy")
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
    load_cert_chain(server, cert_pem, key_pem)
    load_cert_chain(client, cert_pem, key_pem)
    return server, client


def _self_handshake(server: TLSContext, client: TLSContext) -> None:
    """Run one mutual handshake between the two contexts in memory, through their engine.

    This checks the new leaf exactly as peers will: the client verifies the server's chain
    (server purpose) and the server verifies the client's (client purpose), both with
    OpenSSL and the new roots.

    Raises:
        TLSError: either side refused the other, or the handshake did not complete.
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
            return
    raise TLSError("self-test handshake did not complete")


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


def _name_constraints(pems: Sequence[str]) -> list[str]:
    from cryptography import x509

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


def explain_verify_failure(error: str, roots: Sequence[str], leaf_cn: str | None = None) -> str:
    """Plain words for a chain OpenSSL rejects where Go would accept it (consul-spec.md 9).

    OpenSSL checks a subject common name that looks like a host name against the CA's DNS
    name constraints when the leaf has no DNS SAN; Go never does. Consul 1.7-1.10 leaves
    (`CN=<svc>.svc.<ns>.<td8>.consul`) under a constrained root hit this.
    """
    if "subtree" not in error and "name constraint" not in error.lower():
        return error
    permitted = ", ".join(_name_constraints(roots)) or "unknown"
    cn = f" {leaf_cn!r}" if leaf_cn else ""
    return (
        f"{error}: the CA's name constraints (permitted DNS names: {permitted}) reject the "
        f"leaf's subject common name{cn}. OpenSSL checks a common name that looks like a host "
        "name against DNS name constraints when the leaf has no DNS SAN; Consul's Go proxy "
        "does not. Leaves with an empty subject (Consul 1.11 and later) avoid this."
    )


@dataclass(frozen=True, slots=True)
class TLSMaterial:
    """One consistent set of roots, leaf and the contexts built from them."""

    roots: tuple[str, ...]
    cert_pem: str
    server: TLSContext
    client: TLSContext
    leaf: PeerIdentity


def _leaf_identity(cert_pem: str) -> PeerIdentity:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        leaf = x509.load_pem_x509_certificates(cert_pem.encode())[0]
    except (ValueError, IndexError) as exc:
        raise TLSMaterialError(f"the leaf certificate does not parse: {exc}") from exc
    return peer_identity(leaf.public_bytes(Encoding.DER))


class TLSStore:
    """Holds the current `TLSMaterial`; `ready` is set once roots and a leaf that chains exist.

    Args:
        engine: the TLS engine whose contexts it builds, one of `proxy.config.TLS_ENGINES`.
    """

    def __init__(self, engine: str = DEFAULT_TLS_ENGINE) -> None:
        if engine not in TLS_ENGINES:
            raise ValueError(f"unknown TLS engine {engine!r}, expected one of {TLS_ENGINES}")
        self.engine = engine
        self._roots: tuple[str, ...] | None = None
        self._leaf: tuple[str, str] | None = None
        # The last roots and leaf that were swapped in together.
        self._good: tuple[tuple[str, ...], tuple[str, str]] | None = None
        self.material: TLSMaterial | None = None
        self.ready = asyncio.Event()
        self.rotations = 0
        self._swapped: asyncio.Event | None = None

    def server_context(self) -> TLSContext | None:
        m = self.material
        return m.server if m is not None else None

    def client_context(self) -> TLSContext | None:
        m = self.material
        return m.client if m is not None else None

    async def wait_ready(self) -> None:
        await self.ready.wait()

    async def until_rotations(self, count: int) -> None:
        """Return once `count` sets of material have been swapped in (bound it with a timeout)."""
        while self.rotations < count:
            self._swapped = asyncio.Event()
            try:
                await self._swapped.wait()
            finally:
                self._swapped = None

    def set_roots(self, roots: Sequence[str]) -> bool:
        """Adopt new roots (PEM each). Returns whether the contexts were swapped."""
        roots = tuple(r for r in roots if r.strip())
        self._roots = roots
        return self._try(roots, self._leaf, self._good_leaf())

    def set_leaf(self, cert_pem: str, key_pem: str) -> bool:
        """Adopt a new leaf (CertPEM may carry intermediates). Returns whether it was swapped."""
        leaf = (cert_pem, key_pem)
        self._leaf = leaf
        return self._try_leaf(leaf)

    def _good_leaf(self) -> tuple[str, str] | None:
        return self._good[1] if self._good else None

    def _try_leaf(self, leaf: tuple[str, str]) -> bool:
        good_roots = self._good[0] if self._good else None
        for roots in dict.fromkeys(r for r in (self._roots, good_roots) if r):
            if self._swap(roots, leaf, log_failure=roots is good_roots or not good_roots):
                return True
        return False

    def _try(
        self,
        roots: tuple[str, ...],
        latest_leaf: tuple[str, str] | None,
        good_leaf: tuple[str, str] | None,
    ) -> bool:
        # The newest roots go with the newest leaf; if that pair is refused (say, a bad leaf
        # is still pending), they go with the last leaf that worked. Roots and leaf arrive on
        # two watches, so either may come first during a rotation.
        candidates = list(dict.fromkeys(x for x in (latest_leaf, good_leaf) if x))
        for n, leaf in enumerate(candidates):
            if self._swap(roots, leaf, log_failure=n == len(candidates) - 1):
                return True
        return False

    def _swap(self, roots: tuple[str, ...], leaf: tuple[str, str], *, log_failure: bool) -> bool:
        if not roots:
            return False
        cert_pem, key_pem = leaf
        try:
            identity = _leaf_identity(cert_pem)
            server, client = build_contexts(roots, cert_pem, key_pem, self.engine)
            try:
                _self_handshake(server, client)
            except TLSError as exc:
                raise TLSMaterialError(
                    "the leaf certificate does not verify against the CA roots: "
                    + explain_verify_failure(str(exc), roots, identity.subject_cn)
                ) from exc
        except TLSMaterialError as exc:
            if log_failure:
                log.error("failed to rotate TLS material, keeping the previous one: %s", exc)
            return False
        self._good = (roots, leaf)
        # One assignment: a connection accepted from now on sees the whole new set.
        self.material = TLSMaterial(roots, cert_pem, server, client, identity)
        self.rotations += 1
        if self._swapped is not None:
            self._swapped.set()
        if not self.ready.is_set():
            log.info("Parsed TLS identity uri=%s", identity.uri)
            self.ready.set()
        else:
            log.info("TLS material updated uri=%s serial=%x", identity.uri, identity.serial)
        return True
