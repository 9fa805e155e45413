"""TLS engines: the TLS state of one connection over memory buffers, behind one interface.

`listeners.tls.transport.TLSTransport` owns the socket side (asyncio, flow control,
half-close); an engine owns the TLS protocol. Ciphertext goes in with `feed()` and comes out
with `take()`; application data is read and written as bytes. Two implementations, named in
`TLS_ENGINES`; `listeners.tls.contexts` builds the contexts of either and picks the engine
of a context by its type (`new_engine`):

- `ssl`, `StdlibEngine`: `ssl.SSLObject` over two `ssl.MemoryBIO`s, on the OpenSSL CPython
  links (the system's);
- `openssl`, `OpenSSLEngine` (`listeners.tls.openssl`): a pyOpenSSL `Connection` with memory
  BIOs, on the OpenSSL bundled in the `cryptography` wheel (newer; faster handshakes, issue
  5). It is imported on first use, so the stdlib engine never loads pyOpenSSL.

Rule 1: no I/O, no asyncio, no Consul: every call returns at once and the caller moves the
bytes. `read()` decrypts only when asked: an engine never reads ahead of its caller.
Rule 2: failures leave as `TLSError` carrying OpenSSL's words (and the certificate verify
result where there is one). A close_notify and a transport EOF without one both read as
b"" (EOF): either way the peer has stopped writing.
"""

from __future__ import annotations

import _ssl
import contextlib
import ssl
from typing import TYPE_CHECKING, Protocol, TypeAlias, cast

if TYPE_CHECKING:
    from OpenSSL import SSL

# The engines by name (the proxy's configuration names them so: proxy.config imports these).
TLS_ENGINES = ("ssl", "openssl")
# The engine when none is named, chosen by measurement (bench/README.md, "TLS engine"): per
# connection the proxy spends a quarter less CPU on it.
DEFAULT_TLS_ENGINE = "openssl"

# The context of either engine, and the session that a context's connections can resume.
TLSContext: TypeAlias = "ssl.SSLContext | SSL.Context"
TLSSession: TypeAlias = "ssl.SSLSession | SSL.Session"

# The largest plaintext of one TLS record, and the largest record on the wire (RFC 8446
# 5.2: 2^14 bytes of plaintext, at most 256 of expansion, a 5-byte header). SSL_read returns
# at most one record per call.
RECORD_SIZE = 16 * 1024
RECORD_WIRE_SIZE = RECORD_SIZE + 256 + 5

# The most plaintext an engine encrypts, or ciphertext it feeds OpenSSL, in one go. A memory
# BIO keeps the capacity of the most it ever held for the rest of its connection (a third
# more, as OpenSSL grows buffers): fed and written whole, one 256 KiB read from the socket and
# one write of it left 1,354 KiB in a pair of idle connections, 243 KiB in slices of this size
# (bench/README.md, "Memory BIOs kept at their largest"). Larger data is held by the engine
# and handed over a slice at a time, as the BIO empties.
BIO_SLICE = 2 * RECORD_SIZE


class TLSError(ConnectionError):
    """A TLS protocol failure: a refused certificate, an alert from the peer, a bad record."""


class TLSEngine(Protocol):
    """One TLS connection, driven by its caller over memory buffers."""

    def feed(self, data: bytes) -> None:
        """Hand over ciphertext received from the peer."""

    def feed_eof(self) -> None:
        """The peer's transport ended (TCP FIN): no more ciphertext will come."""

    def take(self) -> bytes:
        """Ciphertext to send to the peer (b"" when there is none)."""

    def do_handshake(self) -> bool:
        """Advance the handshake with what has been fed.

        Returns:
            True once the handshake has completed; False while it needs more ciphertext.

        Raises:
            TLSError: the handshake failed (any alert to send is ready in `take()`).
        """

    def read(self, size: int) -> bytearray | bytes | None:
        """Decrypt up to `size` bytes of application data, from as many records as are complete.

        When more than one record waits, they are decrypted into one buffer, allocated for
        this call and never touched again by the engine: a batch costs one allocation and no
        copy beyond OpenSSL's, and goes downstream as one write instead of one per record
        (16 KiB each at most). When at most one record waits, it is returned as it comes.

        Returns:
            The data (bytes, or a bytearray of its own); b"" once the peer has stopped writing
            (close_notify or transport EOF, and every call after that); None while no
            complete record is buffered.

        Raises:
            TLSError: a record failed (bad MAC, fatal alert). Data decrypted before the bad
            record is returned first, the error on the next call.
        """

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt application data; the records are then ready in `take()`.

        Raises:
            TLSError: the connection can no longer send.
        """

    def feed_read(self, data: bytes, size: int) -> bytearray | bytes | None:
        """`feed(data)`, then `read(size)`: one call on the path of every record received
        once the handshake is over (each call saved shortens a relayed message's way)."""

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """`write(data)`, then `take()`: the ciphertext to send, and anything that waited."""

    def shutdown(self) -> None:
        """Queue a close_notify (TLS half-close); reading goes on until the peer's EOF."""

    def peer_certificate(self) -> bytes | None:
        """The peer's leaf certificate, DER, once the handshake has completed."""

    def peer_chain(self) -> list[bytes]:
        """The peer's chain as it sent it, DER, once the handshake has completed: its leaf
        first, then what it sent with it (intermediates, cross-signed roots), unverified.

        Read on demand (`proxy/reauth.py`, at a roots rotation), never per connection. After
        a resumed handshake no Certificate message came: a server side knows the client's
        leaf only (the list is the leaf alone), a client side may still have the server's
        chain from the session it resumed.
        """

    def version(self) -> str | None:
        """The negotiated protocol ("TLSv1.3", "TLSv1.2"), once the handshake has completed."""

    def key_share(self) -> str | None:
        """The key exchange group of the completed handshake, by OpenSSL's name ("x25519",
        "X25519MLKEM768"), or None where the engine cannot tell (the stdlib engine)."""

    @property
    def session(self) -> TLSSession | None:
        """The session to offer when dialling the same server again (client side)."""

    @property
    def session_reused(self) -> bool:
        """Whether the completed handshake resumed a session instead of a full exchange."""

    @property
    def native(self) -> object:
        """The underlying object (`ssl.SSLObject` or `OpenSSL.SSL.Connection`), for tests."""


class SlicedBIOs:
    """Memory BIOs that never hold more than a slice (`BIO_SLICE`), in both directions.

    Ciphertext fed beyond a slice is held back and handed to OpenSSL a slice at a time as
    its BIO empties (`_feed_more`, called by the engine when OpenSSL wants more); an EOF fed
    meanwhile waits until all of it is in. Plaintext written beyond a slice is encrypted a
    slice at a time, each slice's records taken out of the BIO at once and kept here until
    `take()`. An engine gives `read`, `_bio_write`, `_bio_eof`, `_encrypt` and `_bio_take`,
    and sets `_held`, `_eof_held` and `_out` when it is made; `feed_read` and `seal` are the
    plain compositions, which an engine may shorten.
    """

    __slots__ = ("_eof_held", "_held", "_out")

    _held: memoryview | None  # ciphertext not yet in the BIO
    _eof_held: bool  # the transport's EOF, after what is held
    _out: list[bytes] | None  # records made slice by slice, not yet taken

    def _bio_write(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _bio_eof(self) -> None:
        raise NotImplementedError

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _bio_take(self) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        if self._held is not None:
            self._held = memoryview(bytes(self._held) + data)  # rare: fed again while held
        elif len(data) > BIO_SLICE:
            self._held = memoryview(data)
            self._feed_more()
        else:
            self._bio_write(data)

    def _feed_more(self) -> bool:
        """Move the next slice of held ciphertext into the BIO (False when none is held)."""
        held = self._held
        if held is None:
            return False
        self._held = held[BIO_SLICE:] if len(held) > BIO_SLICE else None
        self._bio_write(held[:BIO_SLICE])
        if self._held is None and self._eof_held:
            self._bio_eof()
        return True

    def feed_eof(self) -> None:
        if self._held is not None:
            self._eof_held = True
            return
        self._bio_eof()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) <= BIO_SLICE:
            self._encrypt(data)
            return
        view = memoryview(data).cast("B")
        out = self._out if self._out is not None else []
        for start in range(0, len(view), BIO_SLICE):
            self._encrypt(view[start : start + BIO_SLICE])
            out.append(self._bio_take())
        self._out = out

    def feed_read(self, data: bytes, size: int) -> bytearray | bytes | None:
        self.feed(data)
        return self.read(size)

    def read(self, size: int) -> bytearray | bytes | None:
        raise NotImplementedError

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        self.write(data)
        return self.take()

    def take(self) -> bytes:
        data = self._bio_take()
        if self._out is None:
            return data
        chunks, self._out = self._out, None
        chunks.append(data)
        return b"".join(chunks)


class StdlibEngine(SlicedBIOs):
    """The engine on CPython's `ssl` module: `SSLObject` over `MemoryBIO`s."""

    __slots__ = ("_eof", "_error", "_incoming", "_outgoing", "_ssl")

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        session: ssl.SSLSession | None,
        server_name: str | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # server_name is sent as SNI only: the contexts never check host names.
        self._ssl = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_name,
            session=session,
        )
        self._eof = False
        self._error: TLSError | None = None
        self._held = self._out = None  # `SlicedBIOs`
        self._eof_held = False

    def _bio_write(self, data: bytes | memoryview) -> None:
        self._incoming.write(data)

    def _bio_eof(self) -> None:
        self._incoming.write_eof()

    def _bio_take(self) -> bytes:
        # MemoryBIO.read() sizes its result from what is pending: one allocation, one copy.
        return self._outgoing.read() if self._outgoing.pending else b""

    def do_handshake(self) -> bool:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                if self._feed_more():
                    continue
                return False
            except ssl.SSLError as exc:
                raise TLSError(str(exc)) from exc
            return True

    def read(self, size: int) -> bytearray | bytes | None:
        if self._error is not None:
            raise self._error
        if self._eof:
            return b""
        incoming, obj = self._incoming, self._ssl
        held = 0 if self._held is None else len(self._held)
        fed = incoming.pending + obj.pending() + held
        # Nothing fed and nothing decrypted: a read could only raise SSLWantReadError, which
        # costs more than this check.
        if not fed and not incoming.eof:
            return None
        if fed <= RECORD_WIRE_SIZE and not held:
            # One record at most (small messages): nothing to gather, no buffer to size.
            try:
                return obj.read(min(size, RECORD_SIZE)) or self._at_eof()
            except ssl.SSLWantReadError:
                return None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return self._at_eof()
            except ssl.SSLError as exc:
                raise TLSError(str(exc)) from exc
        # The plaintext to come is smaller than the ciphertext that waits (but for the rest of
        # a record OpenSSL has begun, which the next call reads: it stays pending).
        buf = bytearray(min(size, fed))
        got = 0
        with memoryview(buf) as view:
            while got < len(buf):
                if not incoming.pending and not obj.pending():
                    if self._held is not None:
                        self._feed_more()
                    elif got:
                        break  # the same check between records: the common end of a batch
                # A slice of our own, released after each call (as in the `openssl` engine:
                # a failure kept for the next read must not keep `buf` exported).
                rest = view[got:]
                try:
                    # Given a buffer, read() returns a count (typeshed says bytes).
                    n = cast(int, obj.read(len(buf) - got, rest))
                except ssl.SSLWantReadError:
                    if self._feed_more():
                        continue  # the BIO is empty: the next slice of what is held
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._at_eof()
                    break
                except ssl.SSLError as exc:
                    if not got:
                        raise TLSError(str(exc)) from exc
                    self._error = TLSError(str(exc))
                    self._error.__cause__ = exc
                    break
                finally:
                    rest.release()
                if not n:
                    self._eof = True
                    break
                got += n
        if not got:
            return b"" if self._eof else None
        del buf[got:]
        return buf

    def _at_eof(self) -> bytes:
        # A close_notify, or (SSLEOFError) a transport EOF without one: a "ragged" EOF.
        self._eof = True
        return b""

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise TLSError(str(exc)) from exc

    def shutdown(self) -> None:
        # unwrap() queues close_notify, then wants the peer's: we keep reading for that.
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()

    def peer_certificate(self) -> bytes | None:
        return self._ssl.getpeercert(binary_form=True)

    def peer_chain(self) -> list[bytes]:
        public = getattr(self._ssl, "get_unverified_chain", None)
        if public is not None:  # Python 3.13+: a list of DER (empty when none)
            chain: list[bytes] = public()
        else:
            # Python 3.10-3.12 have the method on the private `_ssl._SSLSocket` only, where it
            # returns `_ssl.Certificate` objects (3.13 made it public, with this same
            # conversion). The leaf is first on both sides: CPython adds it on a server, where
            # OpenSSL's SSL_get_peer_cert_chain() leaves it out.
            certs = self._ssl._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
            chain = [c.public_bytes(_ssl.ENCODING_DER) for c in certs or ()]
        if chain:
            return chain
        leaf = self.peer_certificate()
        return [leaf] if leaf else []

    def version(self) -> str | None:
        return self._ssl.version()

    def key_share(self) -> str | None:
        return None  # CPython's ssl does not say (nor can it choose a client's key shares)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._ssl.session

    @property
    def session_reused(self) -> bool:
        return self._ssl.session_reused

    @property
    def native(self) -> ssl.SSLObject:
        return self._ssl
