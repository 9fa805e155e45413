"""TLS over an asyncio TCP transport, driven through a TLS engine, with half-close.

Why not asyncio's own SSL transport: it cannot `write_eof()`, and it turns a received
close_notify into a full shutdown, so a client that sends a request and then shuts down its
write side would lose the response (Consul's Go proxy loses it too, `connect/proxy/conn.go`).
Here a local EOF sends close_notify while we keep reading, and a received close_notify is
delivered as `eof_received()` while we keep writing (both allowed by RFC 8446 and OpenSSL).

Owning the raw byte stream from the first packet also means no early ClientHello can be lost
between accept and the start of TLS, and the context is chosen per connection (the one
current at accept), which is how certificates are hot-swapped. The TLS protocol itself is an
engine (`listeners.tls.engine`): the stdlib `ssl` module or pyOpenSSL, by the kind of context.

Rule 1: this module knows nothing of Consul. It is a transport: bytes in, bytes out, flow
control, half-close, close.
Rule 2: decrypted data is only produced while an app protocol is attached and reading is not
paused, so memory stays bounded by the kernel buffers and the transports' high-water marks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from listeners.tls.contexts import new_engine
from listeners.tls.engine import TLSContext, TLSError, TLSSession

# Application data handed to the app per call, at most: up to 16 TLS records, one write
# downstream instead of one per record.
READ_SIZE = 256 * 1024


class HandshakeError(ConnectionError):
    """The TLS handshake timed out, or the peer went away during it."""


class HandshakeTimeout(HandshakeError):
    """The TLS handshake did not finish in time."""


class TLSTransport(asyncio.Protocol):
    """The protocol of a raw TCP transport, and the transport of an app protocol above it.

    Lifecycle: create it as the protocol of a TCP connection (`create_connection`,
    `create_server`) with the context to use, await `handshake()`, inspect
    `peer_certificate()`, then `attach(app_protocol)` to start the byte flow.

    Slotted, as every object that lives as long as a connection (bench/README.md, "Memory
    per idle connection"); a subclass adds its own `__slots__`.
    """

    __slots__ = (
        "_app",
        "_closed",
        "_context",
        "_engine",
        "_eof_received",
        "_eof_sent",
        "_handshake",
        "_held",
        "_lost",
        "_on_first_data",
        "_raw",
        "_reading_paused",
        "_server_side",
        "_writing_paused",
        "received_any",
    )

    def __init__(
        self,
        context: TLSContext,
        *,
        server_side: bool,
        session: TLSSession | None = None,
        server_name: str | None = None,
        key_share: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._context = context
        self._server_side = server_side
        self._engine = new_engine(
            context,
            server_side=server_side,
            session=session,
            server_name=server_name,
            key_share=key_share,
        )
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.BaseProtocol | None = None
        if loop is None:
            loop = asyncio.get_running_loop()
        self._handshake: asyncio.Future[None] = loop.create_future()
        self._reading_paused = False
        self._writing_paused = False  # the raw transport asked us to stop writing
        self._eof_sent = False
        self._eof_received = False
        self._closed = False
        self._lost = False
        # A TLS 1.3 server's session tickets, held back to go out with its next write
        # (`_step_handshake`).
        self._held = b""
        # Whether the peer sent anything at all: a TCP health check connects and closes
        # without a byte, which is no TLS failure.
        self.received_any = False
        self._on_first_data: Callable[[], None] | None = None

    # -- raw side (asyncio.Protocol) -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they provide its methods.
        self._raw = cast(asyncio.Transport, transport)
        if not self._server_side:
            self._step_handshake()

    def data_received(self, data: bytes) -> None:
        if self._app is not None and not self._reading_paused and not self._eof_received:
            self._read_records(data)
            return
        self._engine.feed(data)
        if not self._handshake.done():
            self.received_any = True
            self._step_handshake()
        elif self._app is not None and not self._reading_paused:
            self._read_records()

    def eof_received(self) -> bool:
        # TCP FIN from the peer. Before the handshake it is a failure; after it, a peer that
        # ended without close_notify (a "ragged" EOF): deliver what we have, then EOF.
        if not self._handshake.done():
            self._fail_handshake(HandshakeError("connection closed during TLS handshake"))
            return False
        self._engine.feed_eof()
        if self._app is not None and not self._reading_paused:
            self._read_records()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._on_first_data = None  # it may refer back to this transport: no cycle left
        if not self._handshake.done():
            self._fail_handshake(exc or HandshakeError("connection closed during TLS handshake"))
            return
        app, self._app = self._app, None  # it refers back to this transport: no cycle left
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._app is not None:
            self._app.resume_writing()

    # -- handshake -----------------------------------------------------------------------

    def _step_handshake(self) -> None:
        try:
            done = self._engine.do_handshake()
        except TLSError as exc:
            self._flush()  # send the alert, if OpenSSL produced one
            self._fail_handshake(exc)
            return
        if done and self._server_side and self._engine.version() == "TLSv1.3":
            # What a TLS 1.3 server makes as the client's Finished completes the handshake is
            # its session tickets, which nobody waits for: they go out in front of the next
            # write (the app's first bytes, or close_notify), one write() where there were
            # two (bench/README.md, "Tickets held for the first write"). TLS 1.2's last
            # flight, by contrast, is the server's Finished, which the client waits for.
            self._held = self._engine.take()
        else:
            self._flush()
        if not done:
            return
        # Hold further records in the incoming BIO until someone attaches: nothing is
        # decrypted for a connection that has not been authorized yet.
        if self._raw is not None:
            self._raw.pause_reading()
        self._handshake.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc)
            # Retrieved here so an unawaited failure never logs "exception never retrieved".
            self._handshake.exception()
        if self._raw is not None:
            self._raw.abort()

    async def handshake(self, timeout: float) -> None:
        """Wait for the handshake to complete.

        Raises:
            HandshakeError: timeout, or the peer closed during the handshake.
            TLSError: the handshake failed (bad certificate, protocol mismatch, ...).
        """
        if self._handshake.done():
            self._handshake.result()  # raises the failure, if it failed
            return
        # A loop timer that fails the handshake, not `asyncio.timeout()` around the await: the
        # same deadline with no timeout context to enter and leave on every connection.
        timer = self._handshake.get_loop().call_later(timeout, self._time_out, timeout)
        try:
            await asyncio.shield(self._handshake)
        finally:
            timer.cancel()

    def _time_out(self, timeout: float) -> None:
        self._closed = True
        self._fail_handshake(HandshakeTimeout(f"TLS handshake timed out after {timeout:g}s"))

    # -- app side (transport-like) -------------------------------------------------------

    def attach(self, app: asyncio.BaseProtocol) -> None:
        """Make `app` the protocol above this transport (`app.connection_made(self)`).

        Reading stays paused until the app calls `resume_reading()`.
        """
        if not self._handshake.done() or self._handshake.exception() is not None:
            raise RuntimeError("attach() before a successful handshake")
        self._app = app
        self._reading_paused = True
        app.connection_made(self)  # type: ignore[arg-type]
        if self._lost:
            app.connection_lost(None)
            return
        if self._writing_paused:
            app.pause_writing()

    def _read_records(self, fed: bytes | None = None) -> None:
        app: Any = self._app
        engine = self._engine
        while not self._reading_paused and not self._eof_received:
            try:
                if fed is None:
                    chunk = engine.read(READ_SIZE)
                else:
                    chunk, fed = engine.feed_read(fed, READ_SIZE), None
            except TLSError as exc:
                self._flush()
                self._abort_with(exc)
                return
            if chunk is None:
                break
            if not chunk:
                # close_notify from the peer, or TCP EOF without it: the peer's write side is
                # done. Ours stays open until the app says otherwise.
                self._eof_received = True
                self._flush()
                if not app.eof_received():
                    self.close()
                return
            # A bytearray of its own (the engine never touches it again): bytes-like, and
            # taken by asyncio's, uvloop's and our transports as bytes are.
            app.data_received(cast(bytes, chunk))
            if self._on_first_data is not None:
                callback, self._on_first_data = self._on_first_data, None
                callback()
        # TLS 1.3 key updates and session tickets may have produced records to send.
        self._flush()

    def when_data_arrives(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, right after the first application data from the peer has
        gone to the app. On a client, a TLS 1.3 server's session tickets, which it sends
        straight after the handshake, have been read by then."""
        self._on_first_data = callback

    def _abort_with(self, exc: Exception) -> None:
        if self._raw is not None:
            self._raw.abort()
        if self._app is not None and not self._lost:
            self._lost = True
            app, self._app = self._app, None
            app.connection_lost(exc)

    def _flush(self) -> None:
        data = self._engine.take()
        raw = self._raw
        if data and raw is not None and not raw.is_closing():
            self._send(raw, data)

    def _send(self, raw: asyncio.Transport, data: bytes) -> None:
        if self._held:
            data, self._held = self._held + data, b""
        raw.write(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent or self._closed:
            raise RuntimeError("write after write_eof() or close()")
        if not data:
            return
        out = self._engine.seal(data)
        raw = self._raw
        if out and raw is not None and not raw.is_closing():
            self._send(raw, out)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify and keep reading: TLS half-close."""
        if self._eof_sent or self._closed:
            return
        self._eof_sent = True
        self._engine.shutdown()
        self._flush()

    def pause_reading(self) -> None:
        self._reading_paused = True
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._reading_paused = False
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()
        if self._app is not None:
            self._read_records()  # what arrived while paused (the engine knows; cheap if none)

    def is_reading(self) -> bool:
        return not self._reading_paused

    def close(self) -> None:
        """Send close_notify (if not yet sent), flush, and close the TCP connection."""
        if self._closed:
            return
        self.write_eof()
        self._closed = True
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closed = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closed or self._raw is None or self._raw.is_closing()

    def get_write_buffer_size(self) -> int:
        # Ciphertext never waits in the engine: every write and read ends with a flush. Held
        # session tickets wait here, until the next write.
        return len(self._held) + (self._raw.get_write_buffer_size() if self._raw is not None else 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._engine.native  # ssl.SSLObject or OpenSSL.SSL.Connection
        if name == "peercert":
            return self.peer_certificate() if self._handshake_ok() else None
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    # -- inspection ----------------------------------------------------------------------

    def _handshake_ok(self) -> bool:
        return self._handshake.done() and self._handshake.exception() is None

    def peer_certificate(self) -> bytes | None:
        """The peer's leaf certificate, DER, once the handshake has completed."""
        return self._engine.peer_certificate()

    def peer_chain(self) -> list[bytes]:
        """The peer's chain as sent, DER, leaf first (`TLSEngine.peer_chain`)."""
        return self._engine.peer_chain()

    def version(self) -> str | None:
        return self._engine.version()

    def key_share(self) -> str | None:
        """The key exchange group of the completed handshake (`TLSEngine.key_share`)."""
        return self._engine.key_share()

    @property
    def context(self) -> TLSContext:
        return self._context

    @property
    def session(self) -> TLSSession | None:
        """The TLS session, for resuming a later connection to the same server."""
        return self._engine.session

    @property
    def session_reused(self) -> bool:
        """Whether the handshake resumed a session (False until it has completed)."""
        return self._handshake_ok() and self._engine.session_reused
