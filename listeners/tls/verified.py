"""Peer chains already verified against the current roots, for the `openssl` engine: each
distinct chain is checked against the roots once, by OpenSSL, and then trusted by its exact
bytes until its root expires or the roots change.

A full check of a peer's chain, the root's signature on it included, was a fifth of the
instructions of each side of a TLS 1.3 mutual handshake, spent again on every connection
of the same few leaves; without it a server's handshake takes 16 % fewer, a client's 18 %
(bench/README.md, "Chains verified once"). Here the context's own trust store stays empty.
OpenSSL still runs its whole check of every chain on every handshake: the peer's proof of
its key (CertificateVerify), the leaf's validity dates and purpose, the CA flags and
signatures of the intermediates the peer sent. Only the last link is missing: no issuer of
the top certificate is found, and OpenSSL asks this module's verify callback. The callback
takes the chain as built so far and
- trusts it if the same chain (SHA-256 of each certificate) verified before against these
  roots, and the root it ended at has not expired since;
- else has OpenSSL check it in full against a second store that holds the roots (no
  purpose: the handshake's check already tests the leaf's), and remembers it if it passes;
- refuses every other error, and every chain that fails there, with the error that OpenSSL
  gave (so the words on a refusal are OpenSSL's: "unable to get local issuer certificate",
  "permitted subtree violation", ...).

Rule 1: only successes are remembered, at most `MAX_CHAINS`, the oldest dropped first; a
chain is never trusted on less than its exact bytes, its root's validity, and the roots of
the context that checks it (contexts are rebuilt when the roots change, and with them this).
Rule 2: the callback never raises: an exception inside it refuses the chain.
Rule 3: `CHECKS` counts the callback's answers for the life of the process, across the
contexts of every rotation (the metrics read it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

log = logging.getLogger(__name__)

_lib: Any = Binding.lib
_ffi: Any = Binding.ffi


@dataclass(slots=True)
class ChainChecks:
    """The verify callback's answers to "no trusted issuer for this chain" and to OpenSSL's
    other refusals, in this process (one or two answers per full handshake)."""

    known: int = 0  # trusted: the same chain passed a full check before
    verified: int = 0  # passed a full check against the roots now
    refused: int = 0  # failed that check, or refused by OpenSSL's own


CHECKS = ChainChecks()

# How many verified chains a context keeps: one per client leaf (and its intermediates) in
# use, which change at each leaf rotation.
MAX_CHAINS = 4096

# The verify errors that mean only "no trusted issuer here": the top of the chain was not
# found in the (empty) store, or is self-signed and not in it. Anything else is a real
# fault of the chain, and is refused as OpenSSL reports it.
ANCHOR_ERRORS = frozenset(
    {
        _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
        _lib.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        _lib.X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        _lib.X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        _lib.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
    }
)

_DIGEST_SIZE = 32
_SHA256: Any = _lib.EVP_get_digestbyname(b"sha256")

# OpenSSL's X509_V_ERR_UNSPECIFIED, for a failure that left no error code.
_UNSPECIFIED = 1


class _Digest(threading.local):
    """A certificate's SHA-256, into buffers of this thread's (cffi lets go of the GIL in C
    calls, so a buffer shared between threads could be overwritten before it is read)."""

    def __init__(self) -> None:
        self._buffer = _ffi.new("unsigned char[]", 64)
        self._size = _ffi.new("unsigned int *")

    def of(self, cert: Any) -> bytes:
        if not _lib.X509_digest(cert, _SHA256, self._buffer, self._size):
            raise ValueError("X509_digest failed")
        return _ffi.buffer(self._buffer, _DIGEST_SIZE)[:]  # type: ignore[no-any-return]


_DIGEST = _Digest()


def _load_der(der: bytes) -> Any:
    """A native X509 (to be freed) of a DER certificate."""
    bio = _lib.BIO_new_mem_buf(der, len(der))
    if bio == _ffi.NULL:
        raise MemoryError("BIO_new_mem_buf")
    try:
        cert = _lib.d2i_X509_bio(bio, _ffi.NULL)
    finally:
        _lib.BIO_free(bio)
    if cert == _ffi.NULL:
        _lib.ERR_clear_error()
        raise ValueError("the root does not parse as DER")
    return cert


def _failed(exc_type: Any, exc: Any, tb: Any) -> None:
    log.error("verify callback failed, the chain is refused: %s", exc)


def _free_chain(chain: Any) -> None:
    """Free a chain from X509_STORE_CTX_get1_chain (its certificates were up-referenced)."""
    for i in range(_lib.sk_X509_num(chain)):
        _lib.X509_free(_lib.sk_X509_value(chain, i))
    _lib.sk_X509_free(chain)


class VerifyingContext(SSL.Context):
    """A pyOpenSSL context that holds the `VerifiedChains` whose callback it calls."""

    verified: VerifiedChains | None = None


class VerifiedChains:
    """The verify callback of one pair of contexts, with the chains it has verified.

    `hits` and `misses` count the callback's answers from what it remembered and from a
    full check (OpenSSL asks once or twice per handshake).
    """

    __slots__ = (
        "__weakref__",
        "_callback",
        "_chains",
        "_root_ends",
        "_store",
        "clock",
        "hits",
        "misses",
    )

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        store = _lib.X509_STORE_new()
        if store == _ffi.NULL:
            raise MemoryError("X509_STORE_new")
        self._store = _ffi.gc(store, _lib.X509_STORE_free)
        # Each root's SHA-256 -> the end of its validity (seconds since the epoch).
        self._root_ends: dict[bytes, float] = {}
        for root in roots:
            native = _load_der(root.public_bytes(Encoding.DER))
            try:
                # The store takes a reference of its own. A root given twice is refused
                # ("cert already in hash table"), which changes nothing.
                _lib.X509_STORE_add_cert(self._store, native)
                end = root.not_valid_after_utc.timestamp()
                self._root_ends[_DIGEST.of(native)] = end
            finally:
                _lib.X509_free(native)
        _lib.ERR_clear_error()
        self._chains: dict[bytes, float] = {}
        self.hits = 0
        self.misses = 0
        # Seconds since the epoch, as OpenSSL's own date checks read them.
        self.clock: Callable[[], float] = time.time
        # The callback reaches this object through a weak reference: a bound method would
        # make a cycle (this -> callback -> this), left to the garbage collector.
        me = weakref.ref(self)

        def decide(ok: int, store_ctx: Any) -> int:
            verified = me()
            return 0 if verified is None else verified._decide(ok, store_ctx)

        self._callback = _ffi.callback(
            "int (*)(int, X509_STORE_CTX *)", decide, error=0, onerror=_failed
        )

    def install(self, context: VerifyingContext) -> bool:
        """Make `context` check peers through this; its own trust store must stay empty.

        Returns:
            False if pyOpenSSL's `_context` (its SSL_CTX pointer) is missing: the context
            is left as it was, and its trust store must get the roots.
        """
        native = getattr(context, "_context", None)
        if native is None:
            return False
        mode = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        _lib.SSL_CTX_set_verify(native, mode, self._callback)
        context.verified = self  # the callback lives as long as the context
        return True

    def __len__(self) -> int:
        return len(self._chains)

    def _decide(self, ok: int, store_ctx: Any) -> int:
        if ok:
            return 1
        if _lib.X509_STORE_CTX_get_error(store_ctx) not in ANCHOR_ERRORS:
            CHECKS.refused += 1
            return 0
        if _lib.X509_STORE_CTX_get_error_depth(store_ctx) == 0:
            # The chain is the leaf alone (its top is at depth 0): no copy of it needed.
            leaf = _lib.X509_STORE_CTX_get_current_cert(store_ctx)
            if leaf == _ffi.NULL:
                CHECKS.refused += 1
                return 0
            return self._answer(store_ctx, _DIGEST.of(leaf), leaf, _ffi.NULL)
        chain = _lib.X509_STORE_CTX_get1_chain(store_ctx)
        if chain == _ffi.NULL:
            CHECKS.refused += 1
            return 0
        try:
            count = _lib.sk_X509_num(chain)
            key = b"".join([_DIGEST.of(_lib.sk_X509_value(chain, i)) for i in range(count)])
            return self._answer(store_ctx, key, _lib.sk_X509_value(chain, 0), chain)
        finally:
            _free_chain(chain)

    def _answer(self, store_ctx: Any, key: bytes, leaf: Any, chain: Any) -> int:
        """Accept (1) a chain known by `key` or passing the full check now, else refuse (0)."""
        end = self._chains.get(key)
        if end is not None:
            if self.clock() < end:
                self.hits += 1
                CHECKS.known += 1
                _lib.X509_STORE_CTX_set_error(store_ctx, _lib.X509_V_OK)
                return 1
            self._chains.pop(key, None)
        self.misses += 1
        error, end = self._verify(leaf, chain)
        if error != _lib.X509_V_OK:
            CHECKS.refused += 1
            _lib.X509_STORE_CTX_set_error(store_ctx, error)
            return 0
        CHECKS.verified += 1
        if end > self.clock():
            if len(self._chains) >= MAX_CHAINS:
                # Contexts used from several threads: another may change the dict between
                # these two steps. A chain not dropped now is dropped the next time.
                with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                    del self._chains[next(iter(self._chains))]
            self._chains[key] = end
        _lib.X509_STORE_CTX_set_error(store_ctx, _lib.X509_V_OK)
        return 1

    def _verify(self, leaf: Any, chain: Any) -> tuple[int, float]:
        """OpenSSL's full check of `leaf` (and `chain`, as sent, or NULL) against the roots:
        (error, end of the root it led to)."""
        ctx = _lib.X509_STORE_CTX_new()
        if ctx == _ffi.NULL:
            return _lib.X509_V_ERR_OUT_OF_MEM, 0.0
        try:
            if not _lib.X509_STORE_CTX_init(ctx, self._store, leaf, chain):
                return _UNSPECIFIED, 0.0
            if _lib.X509_verify_cert(ctx) != 1:
                return _lib.X509_STORE_CTX_get_error(ctx) or _UNSPECIFIED, 0.0
            verified = _lib.X509_STORE_CTX_get1_chain(ctx)
            if verified == _ffi.NULL:
                return _lib.X509_V_OK, 0.0  # verified, but not remembered
            try:
                top = _lib.sk_X509_value(verified, _lib.sk_X509_num(verified) - 1)
                return _lib.X509_V_OK, self._root_ends.get(_DIGEST.of(top), 0.0)
            finally:
                _free_chain(verified)
        finally:
            _lib.X509_STORE_CTX_free(ctx)
            _lib.ERR_clear_error()
