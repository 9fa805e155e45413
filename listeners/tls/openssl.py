"""The TLS engine on the OpenSSL bundled by `cryptography`: a pyOpenSSL `Connection` over
memory BIOs (see `listeners.tls.engine` for the interface and its rules).

pyOpenSSL reads into a buffer of its own and copies the result out (`recv_into`,
`bio_read`), on both the plaintext and the ciphertext side, so each byte is copied once more
than with the stdlib engine: its public API cannot read into a caller's buffer. Records are
gathered into one buffer per read as in `StdlibEngine`. Outgoing ciphertext is read from
OpenSSL's memory BIO (pyOpenSSL's `_from_ssl`) into one buffer per thread; where that
attribute is missing, with one `bio_read` sized from what was just written, so the common
paths raise no WantReadError.

A client offers a key share for one group only when it is told which group the server
picked before (`key_share`). Left alone, OpenSSL 3.5 and later make two, for X25519MLKEM768
and for X25519, and keep both for the life of the connection. A server that picks X25519
leaves the ML-KEM one unused: about 150 µs of CPU and 11 KiB of memory per connection. A
server that picks the hybrid leaves the X25519 one unused. Every group stays in the list,
so a server that now wants another asks for it (HelloRetryRequest) and gets it: no group
is given up. Setting the list reads pyOpenSSL's `_ssl`; without it, OpenSSL's own list
stays.

The calls made for every record (SSL_do_handshake, SSL_read, SSL_write, BIO_write) go
straight to cryptography's binding with pyOpenSSL's own pointers (`_ssl`, `_into_ssl`).
pyOpenSSL's wrappers raise WantReadError where OpenSSL only wants more ciphertext (three
times per inbound connection), allocate a buffer for every read and copy out of it;
straight, a gathering read lands in the caller's buffer, and only an outcome other than
data or "want read" goes through pyOpenSSL (`_raise_ssl_error`), so every error is the
exception it raises for the same call. Without those attributes, pyOpenSSL's public
methods do the same work.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL, crypto

from listeners.tls.engine import BIO_SLICE, RECORD_SIZE, RECORD_WIRE_SIZE, SlicedBIOs, TLSError
from listeners.tls.hello import offers_resumption
from listeners.tls.openssl_errors import error_text

# Smallest ciphertext read: a whole handshake flight (certificates included) fits.
_TAKE_MIN = 32 * 1024

_binding = Binding()
_lib: Any = _binding.lib
_ffi: Any = _binding.ffi
_WANT_READ = _lib.SSL_ERROR_WANT_READ

# False: pyOpenSSL's public methods for every call (the tests run both ways).
DIRECT = True

# Outgoing ciphertext is read from the memory BIO into one buffer per thread, made once.
# pyOpenSSL's `bio_read` allocates a new buffer for every call and raises WantReadError
# when there is nothing to read, which three of the seven flushes of a connection find; it
# has no way to ask first (no BIO_ctrl_pending in the bindings).
_scratch = threading.local()


# The groups of OpenSSL 3.5's default list, in its order. "?" lets an OpenSSL skip a name
# it does not know; one older than 3.5 refuses the syntax, and keeps its own list, which
# has a key share for X25519 only anyway.
_GROUPS = (
    "X25519MLKEM768",
    "X25519",
    "secp256r1",
    "X448",
    "secp384r1",
    "secp521r1",
    "ffdhe2048",
    "ffdhe3072",
)


@functools.cache  # keyed by the names OpenSSL gives its own groups: a handful
def _groups_led_by(group: str) -> bytes:
    """The group list with `group` first: OpenSSL makes a key share for the first only."""
    rest = (f"?{name}" for name in _GROUPS if name.lower() != group.lower())
    return ":".join((group, *rest)).encode()


# OpenSSL's SSL_session_reused() as cryptography's binding gives it (None if it did not).
_SESSION_REUSED: Any = getattr(_lib, "SSL_session_reused", None)


def _scratch_buffer() -> Any:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = _ffi.new("char[]", _TAKE_MIN)
    return buffer


class OpenSSLEngine(SlicedBIOs):
    """The engine on pyOpenSSL: `OpenSSL.SSL.Connection(context, None)` (memory BIOs)."""

    __slots__ = (
        "_buffer",
        "_conn",
        "_eof",
        "_error",
        "_fed",
        "_fed_eof",
        "_hello",
        "_in_bio",
        "_out_bio",
        "_out_hint",
        "_ptr",
        "_renew",
        "_reused",
    )

    def __init__(
        self,
        context: SSL.Context,
        *,
        server_side: bool,
        session: SSL.Session | None,
        server_name: str | None = None,
        key_share: str | None = None,
    ) -> None:
        conn = SSL.Connection(context, None)
        if server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            if server_name:
                conn.set_tlsext_host_name(server_name.encode())  # SNI only, never checked
            pointer = getattr(conn, "_ssl", None) if key_share else None
            if pointer is not None and not _lib.SSL_set1_curves_list(
                pointer, _groups_led_by(key_share)
            ):
                # Refused (an OpenSSL before 3.5): the connection keeps the context's list,
                # and no error is left queued for a later call to report as its own.
                _lib.ERR_clear_error()
            if session is not None:
                conn.set_session(session)  # ValueError unless made with this same context
        self._conn = conn
        # The memory BIO OpenSSL writes ciphertext to: pyOpenSSL's own (private) attribute,
        # read once; without it, `take` uses the public `bio_read`.
        self._out_bio: Any = getattr(conn, "_from_ssl", None)
        # The SSL pointer and incoming BIO for straight calls (the module's docstring).
        direct = DIRECT and hasattr(conn, "_raise_ssl_error")
        self._ptr: Any = getattr(conn, "_ssl", None) if direct else None
        self._in_bio: Any = getattr(conn, "_into_ssl", None) if self._ptr is not None else None
        if self._in_bio is None:
            self._ptr = None
        self._fed = 0  # bytes of ciphertext fed since OpenSSL last wanted more
        self._fed_eof = False
        self._held = self._out = None  # `SlicedBIOs`
        self._eof_held = False
        # Fresh memory BIOs (`_renew_bios`): 0 before the handshake completes, 1 due once
        # its last flight is taken, 2 done.
        self._renew = 0
        self._eof = False
        self._error: TLSError | None = None
        self._out_hint = _TAKE_MIN
        self._reused: bool | None = None
        self._hello = server_side  # the client's first bytes are still to come
        # This thread's scratch buffer: an engine is driven by one event loop's thread.
        self._buffer = _scratch_buffer()

    def _failure(self, exc: SSL.Error) -> TLSError:
        error = TLSError(error_text(self._conn, exc))
        error.__cause__ = exc
        return error

    def feed(self, data: bytes) -> None:
        if self._hello:
            self._hello = False
            if offers_resumption(data) is False:
                # A client that cannot resume: no stateless tickets for it. OpenSSL then
                # sends small stateful ones, which the server's session cache, switched
                # off (`listeners.tls.contexts`), never keeps. 14 % of a server's full
                # handshake (bench/README.md, "Tickets nobody can use").
                self._conn.set_options(SSL.OP_NO_TICKET)
        super().feed(data)

    def _bio_write(self, data: bytes | memoryview) -> None:
        bio = self._in_bio
        if bio is None:
            self._conn.bio_write(data)
        # bytes go as they are (cffi passes their own pointer): no buffer object to make.
        elif _lib.BIO_write(
            bio, data if type(data) is bytes else _ffi.from_buffer(data), len(data)
        ) != len(data):
            # A memory BIO takes all or, out of memory, nothing.
            _lib.ERR_clear_error()
            raise MemoryError("OpenSSL could not grow its memory BIO")
        self._fed += len(data)

    def _bio_eof(self) -> None:
        self._conn.bio_shutdown()
        self._fed_eof = True

    def take(self) -> bytes:
        data = super().take()
        if self._renew == 1:
            self._renew = 2
            self._renew_bios()
        return data

    def _renew_bios(self) -> None:
        """Give the connection two new, empty memory BIOs once the handshake is over.

        A memory BIO keeps the capacity of the most it ever held; after a handshake that is
        the largest flight, certificates (and an ML-KEM key share) included: 5.3 KiB for the
        two, for the life of the connection (bench/README.md, "Memory BIOs kept at their
        largest"). What the peer sent after its last handshake message moves to the new
        incoming BIO; the outgoing one has just been emptied. This reads pyOpenSSL's private
        `_ssl` and `_into_ssl`, and sets `_into_ssl` and `_from_ssl`, which its `bio_write`,
        `bio_shutdown` and `bio_read` use; without them, the BIOs stay.
        """
        conn = self._conn
        pointer = getattr(conn, "_ssl", None)
        old_in = getattr(conn, "_into_ssl", None)
        if pointer is None or old_in is None or self._out_bio is None or self._fed_eof:
            return
        new_in = _lib.BIO_new(_lib.BIO_s_mem())
        new_out = _lib.BIO_new(_lib.BIO_s_mem())
        if _ffi.NULL in (new_in, new_out):
            for bio in (new_in, new_out):
                if bio != _ffi.NULL:
                    _lib.BIO_free(bio)
            return
        buffer = self._buffer
        while (got := _lib.BIO_read(old_in, buffer, _TAKE_MIN)) > 0:
            _lib.BIO_write(new_in, buffer, got)
        # Both differ from the BIOs in place: OpenSSL frees those and owns these.
        _lib.SSL_set_bio(pointer, new_in, new_out)
        conn._into_ssl = new_in
        conn._from_ssl = new_out
        self._out_bio = new_out
        if self._in_bio is not None:
            self._in_bio = new_in

    def _bio_take(self) -> bytes:
        bio = self._out_bio
        if bio is None:
            return self._take_public()
        self._out_hint = _TAKE_MIN
        read, buffer = _lib.BIO_read, self._buffer
        got = read(bio, buffer, _TAKE_MIN)
        if got <= 0:  # empty (a memory BIO never fails otherwise)
            return b""
        data: bytes = _ffi.unpack(buffer, got)
        if got < _TAKE_MIN:
            return data
        chunks = [data]
        while (got := read(bio, buffer, _TAKE_MIN)) > 0:
            chunks.append(_ffi.unpack(buffer, got))
        return b"".join(chunks)

    def _take_public(self) -> bytes:
        size, self._out_hint = self._out_hint, _TAKE_MIN
        conn = self._conn
        try:
            data = conn.bio_read(size)
        except SSL.WantReadError:
            return b""
        if len(data) < size:
            return data
        chunks = [data]
        while True:
            try:
                chunks.append(conn.bio_read(_TAKE_MIN))
            except SSL.WantReadError:
                break
            if len(chunks[-1]) < _TAKE_MIN:
                break
        return b"".join(chunks)

    def do_handshake(self) -> bool:
        ptr = self._ptr
        while True:
            try:
                if ptr is None:
                    self._conn.do_handshake()
                    done = True
                else:
                    result = _lib.SSL_do_handshake(ptr)
                    done = result == 1
                    if not done and _lib.SSL_get_error(ptr, result) != _WANT_READ:
                        self._conn._raise_ssl_error(ptr, result)
                        done = True  # nothing raised: pyOpenSSL's do_handshake returns too
            except SSL.WantReadError:
                done = False
            except SSL.Error as exc:
                raise self._failure(exc) from exc
            if done:
                if not self._renew:
                    self._renew = 1
                return True
            self._fed = 0
            if not self._feed_more():
                return False

    def read(self, size: int) -> bytearray | bytes | None:
        if self._error is not None:
            raise self._error
        if self._eof:
            return b""
        held = 0 if self._held is None else len(self._held)
        if not self._fed and not self._fed_eof and not held:
            return None  # nothing new since OpenSSL last asked for more
        if self._fed <= RECORD_WIRE_SIZE and not held:
            return self._read_one(size)
        conn, ptr = self._conn, self._ptr
        # The plaintext to come is smaller than the ciphertext fed since then (but for the rest
        # of a record begun before, which the next call reads: `_fed` stays set until OpenSSL
        # wants more). pyOpenSSL does not show how full its memory BIO is.
        buf = bytearray(min(size, self._fed + held))
        got = 0
        with memoryview(buf) as view:
            while got < len(buf):
                if not self._fed and not self._feed_more():
                    break  # OpenSSL asked for more, and nothing is held
                # A slice of our own, released after each call. Left to the garbage, it
                # lives as long as anything refers to it: a failure kept for the next read
                # does (its traceback's frames hold the slice), and so does anything that
                # walks the heap (`gc.get_objects()`). While it lives, `buf` stays exported
                # and cannot be trimmed below: BufferError, and the connection was lost with
                # what it had read.
                rest = view[got:]
                try:
                    if ptr is None:
                        got += conn.recv_into(rest, RECORD_SIZE)
                        continue
                    with _ffi.from_buffer(rest) as into:  # read in place: no copy
                        result = _lib.SSL_read(ptr, into, min(len(rest), RECORD_SIZE))
                    if result > 0:
                        got += result
                        continue
                    if _lib.SSL_get_error(ptr, result) == _WANT_READ:
                        self._fed = 0
                        continue
                    conn._raise_ssl_error(ptr, result)
                    break  # nothing raised: no bytes either, as from pyOpenSSL's recv_into
                except SSL.WantReadError:
                    self._fed = 0  # the BIO is empty: the next turn feeds what is held
                    continue
                except SSL.ZeroReturnError:
                    self._eof = True
                    break
                except SSL.SysCallError as exc:
                    # Memory BIOs make no system calls: this is the end of what was fed,
                    # without a close_notify (a "ragged" EOF), which the stdlib engine reads
                    # as EOF too.
                    if not self._fed_eof:
                        raise self._failure(exc) from exc
                    self._eof = True
                    break
                except SSL.Error as exc:
                    if not got:
                        raise self._failure(exc) from exc
                    self._error = self._failure(exc)
                    break
                finally:
                    rest.release()
        if not got:
            return b"" if self._eof else None
        del buf[got:]
        return buf

    def feed_read(self, data: bytes, size: int) -> bytearray | bytes | None:
        if (
            self._hello
            or self._held is not None
            or self._error is not None
            or self._eof
            or self._fed + len(data) > RECORD_WIRE_SIZE
        ):
            self.feed(data)
            return self.read(size)
        # What `feed` and `read` would do here, without the calls in between.
        self._bio_write(data)
        return self._read_one(size)

    def _read_one(self, size: int) -> bytes | None:
        """`read` of one record at most (small messages): nothing to gather, no buffer to
        size. Something has been fed since OpenSSL last wanted more."""
        conn, ptr = self._conn, self._ptr
        try:
            if ptr is None:
                return conn.recv(min(size, RECORD_SIZE))
            buffer = self._buffer
            got = _lib.SSL_read(ptr, buffer, min(size, RECORD_SIZE))
            if got > 0:
                return _ffi.unpack(buffer, got)  # type: ignore[no-any-return]
            if _lib.SSL_get_error(ptr, got) == _WANT_READ:
                self._fed = 0
                return None
            conn._raise_ssl_error(ptr, got)
            return b""  # nothing raised: pyOpenSSL's recv gives no bytes too
        except SSL.WantReadError:
            self._fed = 0
            return None
        except SSL.ZeroReturnError:
            self._eof = True
            return b""
        except SSL.SysCallError as exc:
            if not self._fed_eof:
                raise self._failure(exc) from exc
            self._eof = True  # a "ragged" EOF, as in `read`
            return b""
        except SSL.Error as exc:
            raise self._failure(exc) from exc

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        if self._renew == 1 or self._out is not None or len(data) > BIO_SLICE:
            return super().seal(data)
        # What `write` and `take` would do here, without the calls in between.
        self._encrypt(data)
        return self._bio_take()

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        conn, ptr = self._conn, self._ptr
        try:
            if ptr is None:
                sent = conn.send(data)
            else:
                if type(data) is bytes:  # as it is, as in `_bio_write`
                    sent = _lib.SSL_write(ptr, data, len(data))
                else:
                    with _ffi.from_buffer(data) as plain:
                        sent = _lib.SSL_write(ptr, plain, len(plain))
                if sent <= 0:
                    conn._raise_ssl_error(ptr, sent)
            if sent < len(data):
                # Only with SSL_MODE_ENABLE_PARTIAL_WRITE, which listeners.tls.contexts clears so
                # that one SSL_write encrypts everything into the memory BIO.
                view = memoryview(data).cast("B")
                while sent < len(view):
                    sent += conn.send(view[sent:])
        except SSL.Error as exc:
            raise self._failure(exc) from exc
        self._out_hint += len(data) + (len(data) >> 9)  # + record overhead (22 B per 16 KiB)

    def shutdown(self) -> None:
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()  # False: sent ours, the peer's is still to come

    def peer_certificate(self) -> bytes | None:
        cert = self._conn.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)

    def peer_chain(self) -> list[bytes]:
        leaf = self.peer_certificate()
        if leaf is None:
            return []
        # SSL_get_peer_cert_chain(): on a server, what the client sent after its leaf (the
        # leaf is not in it); on a client, the server's leaf first. None on a server after a
        # resumed handshake.
        sent = self._conn.get_peer_cert_chain() or []
        chain = [crypto.dump_certificate(crypto.FILETYPE_ASN1, cert) for cert in sent]
        return chain if chain and chain[0] == leaf else [leaf, *chain]

    def version(self) -> str | None:
        return self._conn.get_protocol_version_name()

    def key_share(self) -> str | None:
        try:
            return self._conn.get_group_name()
        except NotImplementedError:  # pyOpenSSL's answer on an OpenSSL before 3.2
            return None

    @property
    def session(self) -> SSL.Session | None:
        return self._conn.get_session()

    @property
    def session_reused(self) -> bool:
        # pyOpenSSL has no session_reused(): OpenSSL's SSL_session_reused() through
        # cryptography's binding and pyOpenSSL's `_ssl`. Without that attribute, the public
        # way: a resumed handshake carries no Certificate message, so no chain is verified
        # ("If the session is resumed peers do not send certificates so a NULL pointer is
        # returned", OpenSSL, SSL_get0_verified_chain(3)), and contexts from
        # listeners.tls.contexts always verify the peer. That way builds a pyOpenSSL X509
        # for each certificate of the chain: 3 % of an inbound proxy's samples (py-spy).
        # tests/test_engine.py checks both ways against the stdlib engine's
        # SSL_session_reused() on the other end of the same connections.
        if self._reused is None:
            pointer = getattr(self._conn, "_ssl", None)
            if pointer is not None and _SESSION_REUSED is not None:
                self._reused = bool(_SESSION_REUSED(pointer))
            else:
                self._reused = self._conn.get_verified_chain() is None
        return self._reused

    @property
    def native(self) -> SSL.Connection:
        return self._conn
