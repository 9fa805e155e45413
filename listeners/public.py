"""The public listener: inbound mTLS -> authorize -> dial the local app -> pump.

Order per connection (Consul's `connect/proxy/listener.go`, `connect/tls.go`; where we differ):
1. accept, and start TLS at once with the server context current at accept;
2. the handshake must finish within the handshake timeout (Go parses
   `handshake_timeout_ms` and ignores it);
3. the client chain is verified by OpenSSL against the current roots, then the leaf's SPIFFE
   URI and serial are authorized by the agent, once;
4. only then is the local app dialled (Go dials it before the handshake, so the app sees
   connections from clients that are later refused);
5. bytes are pumped with half-close.

Rule 1: no byte from the client reaches the app, and no connection is opened to the app,
before the authorizer has allowed the connection.
Rule 2: a forwarded connection's record keeps handles that read its peer's leaf and chain
from the live TLS connection and the handle that cuts it until it ends, so it can be
re-checked later;
`revoke()` cuts both of its sides at once (`proxy/reauth.py`).
Rule 3: this module takes from `proxy/` only level-0 modules (`proxy.addr`,
`proxy.identity`); its collaborators are Protocols.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from listeners.events import INBOUND, Connection, Observer, Refusal, now
from listeners.limits import default_handshake_limit
from listeners.pump import Pipe
from listeners.serve import Listener, Slot
from listeners.sockets import (
    is_loopback,
    is_routine_close,
    peer_address,
    pending_bytes,
    tune_accepted,
    tune_socket,
)
from listeners.tls.contexts import explain_verify_failure
from listeners.tls.engine import TLSContext
from listeners.tls.transport import HandshakeTimeout, TLSTransport
from proxy.addr import join_host_port
from proxy.deadline import Deadline
from proxy.identity import Decision

log = logging.getLogger("proxy.inbound")


def _handshake_refusal(exc: OSError, text: str) -> Refusal:
    if isinstance(exc, HandshakeTimeout):
        return Refusal.HANDSHAKE_TIMEOUT
    # OpenSSL's reason when a client sends no certificate (both engines report it so).
    if "did not return a certificate" in text:
        return Refusal.NO_CLIENT_CERTIFICATE
    return Refusal.HANDSHAKE_FAILURE


class ServerContexts(Protocol):
    def server_context(self) -> TLSContext | None: ...
    async def wait_ready(self) -> None: ...


class InboundAuthorizer(Protocol):
    async def authorize(self, peer_der: bytes | None) -> Decision: ...


class _InboundTLS(TLSTransport):
    __slots__ = ("listener", "slot")

    def __init__(self, listener: PublicListener, context: TLSContext, slot: Slot) -> None:
        super().__init__(context, server_side=True, loop=listener.running_loop())
        self.listener = listener
        self.slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tune_accepted(transport)
        self.slot.watch(
            transport.abort,  # type: ignore[attr-defined]
            lambda: not self.received_any and pending_bytes(transport) == 0,
        )
        source = peer_address(transport)
        self.listener.spawn(
            self.listener.handle(self, source, self.slot), f"inbound {source}", transport, self.slot
        )


class PublicListener(Listener):
    """Accepts mTLS connections for the proxied service and forwards authorized ones."""

    def __init__(
        self,
        *,
        bind_host: str,
        bind_port: int,
        app_host: str,
        app_port: int,
        contexts: ServerContexts,
        authorizer: InboundAuthorizer,
        handshake_timeout: float = 10.0,
        app_connect_timeout: float = 1.0,
        close_timeout: float = 10.0,
        name: str = "public_listener",
        reuse_port: bool = False,
        observer: Observer | None = None,
        max_connections: int | None = None,
        handshake_limit: int | None = None,
    ) -> None:
        """Budgets (`listeners.serve.Listener`): `max_connections` None takes the default
        derived from the descriptor limit, `handshake_limit` None a quarter of it."""
        super().__init__(
            name,
            bind_host,
            bind_port,
            log,
            reuse_port=reuse_port,
            observer=observer,
            max_connections=max_connections,
        )
        if handshake_limit is None:
            handshake_limit = default_handshake_limit(self.max_connections)
        if handshake_limit < 1:
            raise ValueError(f"handshake_limit must be at least 1, got {handshake_limit}")
        self.handshake_limit = handshake_limit
        # Go dials ":8080" as the local host; Python needs a name or an address.
        self.app_host = app_host or "127.0.0.1"
        self.app_port = app_port
        self.contexts = contexts
        self.authorizer = authorizer
        self.handshake_timeout = handshake_timeout
        self.app_connect_timeout = app_connect_timeout
        self.app_address = join_host_port(self.app_host, self.app_port)
        # Keepalive finds a peer gone without a word across a network; on loopback the
        # kernel ends both sides itself, so the probes could find nothing (and the option
        # costs a socket object and system calls per connection).
        self._app_keepalive = not is_loopback(self.app_host)
        self.close_timeout = close_timeout
        self.denied = 0  # refused by authorize
        self.forwarded = 0  # authorized and connected to the app
        self.bytes_in = 0  # client -> app
        self.bytes_out = 0  # app -> client

    def forwarding(self) -> list[Connection]:
        """The open connections that are past authorize and forwarding, with a client leaf."""
        return [c for c in self.connections if c.abort is not None and c.peer_leaf is not None]

    def revoke(self, conn: Connection, reason: Refusal, detail: str) -> bool:
        """Close a forwarded connection now, both sides, as refused for `reason`.

        Returns False if it is no longer open (it ended, or was revoked, meanwhile).
        """
        abort = conn.abort
        if abort is None or conn not in self.connections:
            return False
        conn.abort = None
        conn.refuse(reason, detail)
        abort()
        return True

    async def start(self) -> None:
        """Wait for certificates, then bind (a public listener never serves without them)."""
        await self.contexts.wait_ready()
        await self.bind(self._accept)

    def _accept(self, slot: Slot) -> asyncio.BaseProtocol:
        context = self.contexts.server_context()
        assert context is not None  # bound only once ready
        return _InboundTLS(self, context, slot)

    async def handle(self, tls: TLSTransport, source: str = "", slot: Slot | None = None) -> None:
        conn = self.track(Connection(INBOUND, self.name, source))
        pipe: Pipe | None = None
        try:
            started = now()
            try:
                await tls.handshake(self.handshake_timeout)
            except OSError as exc:  # HandshakeError, TLSError, resets
                conn.handshake = now() - started
                if slot is not None and slot.evicted:
                    conn.refuse(
                        Refusal.OVER_HANDSHAKE_LIMIT,
                        "evicted: it had sent nothing, and a newer connection needed its place "
                        f"in the handshake budget ({self.handshake_limit})",
                    )
                    return
                if not tls.received_any:
                    conn.detail = "closed without sending a byte"  # a TCP health check
                    return
                text = explain_verify_failure(str(exc) or type(exc).__name__)
                conn.refuse(_handshake_refusal(exc, text), text)
                return
            conn.handshake = now() - started
            conn.resumed = tls.session_reused
            if slot is not None:
                # Through the handshake: this connection no longer counts against the
                # handshake budget (test_budget's slowloris test fails if it does).
                slot.handshake_over()
            started = now()
            peer_der = tls.peer_certificate()
            decision = await self.authorizer.authorize(peer_der)
            has_leaf, peer_der = bool(peer_der), None  # read again on demand: `peer_leaf`
            conn.authorize = now() - started
            conn.peer_id = decision.peer_uri
            if not decision.allowed:
                self.denied += 1
                conn.refuse(Refusal(decision.refusal or Refusal.DENIED), decision.reason)
                tls.close()
                return
            conn.detail = decision.reason
            loop = self.running_loop()
            pipe = Pipe(close_timeout=self.close_timeout, loop=loop)
            b = pipe.b
            conn.destination = self.app_address
            started = now()
            try:
                with Deadline(self.app_connect_timeout, loop):
                    transport, _ = await loop.create_connection(
                        lambda: b, self.app_host, self.app_port
                    )
            except (OSError, TimeoutError) as exc:
                conn.dial = now() - started
                conn.refuse(
                    Refusal.APP_DIAL_FAILED,
                    str(exc) or f"timed out after {self.app_connect_timeout:g}s",
                )
                tls.close()
                return
            conn.dial = now() - started
            if self._app_keepalive:
                tune_socket(transport)
            self.forwarded += 1
            tls.attach(pipe.a)
            conn.forwarded = True
            conn.stats = pipe.stats
            if has_leaf:
                conn.peer_leaf = tls.peer_certificate
            conn.abort = pipe.abort
            conn.peer_chain = tls.peer_chain
            self.observer.forwarding(conn)
            pipe.start()
            stats = await pipe.done
            self.bytes_in += stats.a_to_b
            self.bytes_out += stats.b_to_a
            if conn.refusal is not None:
                pass  # revoked: its reason stays the detail
            elif pipe.error is not None and not is_routine_close(pipe.error):
                conn.detail = f"connection failed: {pipe.error}"
        except asyncio.CancelledError:
            if pipe is not None:
                pipe.abort()
            tls.abort()
            raise
        finally:
            conn.abort = None
            conn.peer_chain = conn.peer_leaf = None  # the TLS connection is over: let it go
            self.untrack(conn)
