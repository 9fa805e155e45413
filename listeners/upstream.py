"""An upstream listener: local plain TCP -> resolve -> mTLS dial -> verify identity -> pump.

Per connection (Consul's `connect/service.go` `Dial`, `connect/resolver.go`, and where we differ):
- a connection that arrives before certificates are ready waits for them, up to the connect
  timeout, instead of failing with `tls: no certificates configured` (Consul issue #12286);
- instances are resolved, then tried in random order until one completes the TCP dial, the
  TLS handshake and the identity check, all within the connect timeout (Go tries one);
- the server's chain is verified by OpenSSL against the current roots, then its first URI
  SAN against the expected service identity (trust domain ignored, case-insensitive); a
  mismatch closes that connection before one byte of application data is sent;
- a peered upstream (`destination_peer`) gets contexts that trust the peer's roots only;
  each instance sends its `PeerMeta.SNI` and must show one of its `PeerMeta.SpiffeID`s
  exactly (the exporter's trust domain and datacenter included).

Rule 1: the local client's bytes are not read until the upstream connection is verified.
Rule 2: this module takes from `proxy/` only level-0 modules (`proxy.addr`, `proxy.errors`,
`proxy.identity`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from listeners.events import UPSTREAM, Connection, Observer, Refusal, now
from listeners.pump import Pipe, Side
from listeners.serve import Listener, Slot
from listeners.sockets import is_loopback, peer_address, tune_accepted, tune_socket
from listeners.tls.engine import TLSContext, TLSSession
from listeners.tls.transport import TLSTransport
from proxy.addr import join_host_port
from proxy.deadline import Deadline
from proxy.errors import IdentityError, ProxyError
from proxy.identity import Endpoint, PeerTarget, peer_identity, server_matches

log = logging.getLogger("proxy.upstream")


class ClientContexts(Protocol):
    def client_context(self) -> TLSContext | None: ...
    async def wait_ready(self) -> None: ...


class Resolver(Protocol):
    async def resolve(self) -> Sequence[Endpoint]: ...


def _factory(protocol: TLSTransport) -> Callable[[], TLSTransport]:
    return lambda: protocol


class _Local(Side):
    """The accepted local connection, as side A of its pipe from the first byte.

    Reading is paused at once (the pump's rule: nothing flows before `Pipe.start()`); bytes
    an event loop delivers anyway, or that a client sends with its connect, wait in the pipe
    while the upstream connection is dialled.
    """

    __slots__ = ("listener", "slot")

    def __init__(self, listener: UpstreamListener, slot: Slot) -> None:
        super().__init__()
        self.listener = listener
        self.slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tune_accepted(transport)
        listener = self.listener
        source = peer_address(transport)
        listener.spawn(
            listener.handle(self.pipe, source),
            f"upstream {listener.name} {source}",
            transport,
            self.slot,
        )


class UpstreamListener(Listener):
    """Listens on `LocalBindAddress:LocalBindPort` and forwards to one upstream service.

    Its clients are local and make no handshake with it, so it has a connection cap
    (`max_connections`, default derived from the descriptor limit) but no handshake budget.
    """

    direction = UPSTREAM

    def __init__(
        self,
        *,
        name: str,
        bind_host: str,
        bind_port: int,
        contexts: ClientContexts,
        resolver: Resolver,
        connect_timeout: float = 10.0,
        close_timeout: float = 10.0,
        reuse_port: bool = False,
        observer: Observer | None = None,
        max_connections: int | None = None,
    ) -> None:
        super().__init__(
            name,
            bind_host or "127.0.0.1",
            bind_port,
            log,
            reuse_port=reuse_port,
            observer=observer,
            max_connections=max_connections,
        )
        self.contexts = contexts
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.failed = 0  # connections closed for want of a verified upstream
        self.resumed = 0
        # Per server: a session to resume (TLS 1.3 ticket or 1.2 session), tied to the client
        # context that made it, and the URI SAN of the certificate the server showed in the
        # full handshake that made it. A rotation brings a new context, hence full handshakes
        # again.
        self._sessions: dict[tuple[str, int], _Resumable] = {}
        # Per server: the key exchange group it picked last time, so that the next dial
        # offers a key share for that group only (`listeners.tls.openssl`).
        self._key_shares: dict[tuple[str, int], str] = {}
        self.bytes_out = 0  # local client -> upstream
        self.bytes_in = 0  # upstream -> local client

    async def start(self) -> None:
        """Bind now; connections that come before certificates wait for them."""
        await self.bind(self._accept)

    def _accept(self, slot: Slot) -> asyncio.BaseProtocol:
        return Pipe(
            _Local(self, slot), close_timeout=self.close_timeout, loop=self.running_loop()
        ).a

    async def handle(self, pipe: Pipe, source: str = "") -> None:
        """Dial the upstream for the local connection on side A of `pipe`, then pump."""
        local = pipe.a.transport
        assert local is not None
        conn = self.track(Connection(UPSTREAM, self.name, source))
        tls: TLSTransport | None = None
        endpoint = ("", 0)
        try:
            started = now()
            try:
                with Deadline(self.connect_timeout, self.running_loop()):
                    tls, endpoint = await self._dial(conn)
            except TimeoutError:
                conn.refuse(
                    Refusal.UPSTREAM_DIAL_FAILED, f"timed out after {self.connect_timeout:g}s"
                )
            except _DialFailed as exc:
                conn.refuse(exc.reason, str(exc))
            except ProxyError as exc:  # the resolver's: the agent cannot say
                conn.refuse(Refusal.NO_HEALTHY_INSTANCE, str(exc))
            conn.dial = now() - started
            if tls is None or pipe.a.lost:
                self.failed += tls is None
                if tls is not None:
                    tls.close()
                local.close()
                return
            known = self._sessions.get(endpoint)
            if known is None or known.context is not tls.context:
                # No session for this server yet: take this connection's once its tickets
                # are in, not only when it ends, so that the dials meanwhile (the first
                # burst, or all of them while long-lived connections stay open) resume.
                tls.when_data_arrives(
                    functools.partial(self._remember_session, tls, endpoint, conn.peer_id)
                )
            tls.attach(pipe.b)
            conn.forwarded = True
            conn.stats = pipe.stats
            self.observer.forwarding(conn)
            pipe.start()
            stats = await pipe.done
            self.bytes_out += stats.a_to_b
            self.bytes_in += stats.b_to_a
            self._remember_session(tls, endpoint, conn.peer_id)
        except asyncio.CancelledError:
            pipe.abort()
            if tls is not None and pipe.b.transport is None:
                tls.abort()  # dialled, not yet the pipe's
            raise
        finally:
            self.untrack(conn)

    def _remember_session(self, tls: TLSTransport, endpoint: tuple[str, int], uri: str) -> None:
        context = self.contexts.client_context()
        if context is None or tls.context is not context:
            return  # a rotation happened meanwhile: this session belongs to the old context
        known = self._sessions.get(endpoint)
        if tls.session_reused and known is not None and known.context is context:
            # The kept session still resumes. Reading SSLObject.session copies the whole
            # session (peer certificate and all), so it is read only after a full handshake.
            return
        # TLS 1.3 tickets arrive after the handshake; by the end of the connection they have.
        # A session without one (the server sent none) is not offered by OpenSSL: that dial
        # makes a full handshake, and its own session replaces this one.
        session = tls.session
        if session is not None:
            self._sessions[endpoint] = _Resumable(context, session, uri)

    def _forget_all_but(self, endpoints: Sequence[Endpoint]) -> None:
        """Drop what is kept for servers the resolver no longer returns (instances come and
        go with deployments; without this the two maps would only grow)."""
        current = {(host, port) for host, port, _ in endpoints}
        for kept in (self._sessions, self._key_shares):
            for endpoint in [e for e in kept if e not in current]:
                del kept[endpoint]

    async def _dial(self, conn: Connection) -> tuple[TLSTransport, tuple[str, int]]:
        """Resolve and connect to the first instance that passes every check.

        Raises:
            _DialFailed: no instance could be reached and verified (the last reason).
            ProxyError: the resolver could not say which instances there are.
        """
        await self.contexts.wait_ready()
        endpoints = await self.resolver.resolve()
        if not endpoints:
            raise _DialFailed(Refusal.NO_HEALTHY_INSTANCE, "no healthy instances found")
        if len(self._sessions) + len(self._key_shares) > 4 * len(endpoints) + _KEPT_SLACK:
            self._forget_all_but(endpoints)
        loop = self.running_loop()
        last: Exception | None = None
        for host, port, expected in endpoints:
            context = self.contexts.client_context()
            if context is None:  # a peered upstream whose peer's bundle is gone or refused
                raise _DialFailed(
                    Refusal.UPSTREAM_DIAL_FAILED,
                    f"no trust bundle for peer {getattr(expected, 'peer', '?')}",
                )
            known = self._sessions.get((host, port))
            if known is not None and known.context is not context:
                known = None
            session = known.session if known is not None else None
            sni = expected.sni if isinstance(expected, PeerTarget) else None
            key_share = self._key_shares.get((host, port))
            tls = TLSTransport(
                context,
                server_side=False,
                session=session,
                server_name=sni,
                key_share=key_share,
                loop=loop,
            )
            addr = join_host_port(host, port)
            conn.destination = addr
            try:
                raw, _ = await loop.create_connection(_factory(tls), host, port)
                if not is_loopback(host):  # as the public listener's app dial
                    tune_socket(raw)
                started = now()
                await tls.handshake(self.connect_timeout)
                conn.handshake = now() - started
                if known is not None and tls.session_reused:
                    # Resumed: the server holds the secret of the full handshake in which it
                    # showed this URI (its certificate, kept in the session, is that one), so
                    # the URI is not read again; it is still checked against this dial's.
                    uri: str | None = known.uri
                else:
                    uri = peer_identity(tls.peer_certificate() or b"").uri
                conn.peer_id = uri or ""
                if uri is None or not server_matches(uri, expected):
                    raise IdentityError(
                        f"peer certificate mismatch got {uri}, want {expected.uri()}"
                    )
            except (OSError, IdentityError) as exc:  # OSError: HandshakeError, TLSError too
                tls.abort()
                self._sessions.pop((host, port), None)
                self._key_shares.pop((host, port), None)
                last = exc
                log.debug(
                    "failed to connect to instance addr=%s upstream=%s error=%s",
                    addr,
                    self.name,
                    exc,
                )
                continue
            log.debug(
                "successfully connected to service instance addr=%s identity=%s resumed=%s",
                addr,
                uri,
                tls.session_reused,
            )
            self.resumed += tls.session_reused
            conn.resumed = tls.session_reused
            picked = tls.key_share()
            if picked is not None and picked != key_share:
                self._key_shares[(host, port)] = picked
            return tls, (host, port)
        reason = (
            Refusal.WRONG_SERVER_IDENTITY
            if isinstance(last, IdentityError)
            else Refusal.UPSTREAM_DIAL_FAILED
        )
        tried = f" ({len(endpoints)} instances tried)" if len(endpoints) > 1 else ""
        raise _DialFailed(reason, f"{last}{tried}")


# Entries kept beyond those of the current instances before the maps are pruned: a few
# instances that left, whose sessions may serve again if they come back.
_KEPT_SLACK = 32


class _Resumable(NamedTuple):
    context: TLSContext  # the client context the session was made with
    session: TLSSession
    uri: str  # the server's URI SAN in the full handshake that made it


class _DialFailed(ProxyError):
    """No instance of the upstream could be connected to and verified."""

    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason
