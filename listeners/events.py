"""What the listeners tell about each connection: one record per connection, and its observer.

A listener makes a `Connection` when it accepts one, fills it in as the connection goes
(peer identity, destination, how long the handshake, the authorize call and the dial took,
why it was refused), keeps it in its set of open connections while it lives, and hands it
to its `Observer` twice at most: `forwarding()` when bytes start to flow, `finished()` once
when it is over, whatever the outcome. Metrics, the access log and the admin endpoint are
observers or readers of these records (`proxy/observe.py`, `proxy/admin.py`).

Rule 1: plain values (and, once forwarding, the handles that cut the connection and read
its peer's chain) and a Protocol; no I/O, no logging, no clock reads but `now()`.
Rule 2: an observer is called synchronously on the event loop and must not block or raise.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from listeners.pump import PipeStats

INBOUND = "inbound"
UPSTREAM = "upstream"


class Refusal(enum.StrEnum):
    """Why a connection was closed without being forwarded (a metric label value)."""

    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HANDSHAKE_FAILURE = "handshake_failure"
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    NOT_SPIFFE = "not_spiffe"
    DENIED = "denied_by_intention"
    AUTHORIZE_FAILED = "authorize_failed"
    APP_DIAL_FAILED = "app_dial_failed"
    NO_HEALTHY_INSTANCE = "no_healthy_instance"
    WRONG_SERVER_IDENTITY = "wrong_server_identity"
    UPSTREAM_DIAL_FAILED = "upstream_dial_failed"
    # Closed at accept, before any byte was read (`listeners/serve.py`).
    OVER_CONNECTION_LIMIT = "over_connection_limit"
    OVER_HANDSHAKE_LIMIT = "over_handshake_limit"
    # Forwarded, then closed by live re-authorization (`proxy/reauth.py`).
    REVOKED = "revoked_by_intention"
    ROOT_REMOVED = "root_removed"


class Outcome(enum.StrEnum):
    FORWARDED = "forwarded"  # reached its destination; bytes flowed both ways
    REFUSED = "refused"  # closed by us, for a `Refusal`
    CLOSED = "closed"  # the client went away before a decision (a TCP health check, say)


def now() -> float:
    return time.monotonic()


@dataclass(slots=True, eq=False)
class Connection:
    """One accepted connection, from accept to close.

    Durations are seconds, None when the step did not happen. For an inbound connection the
    source is the remote client and the peer ID the client certificate's SPIFFE URI; for an
    upstream connection the source is the local client and the peer ID the server's.
    """

    direction: str  # INBOUND or UPSTREAM
    listener: str  # "public_listener", or the upstream's destination name
    source: str  # host:port of the accepted side
    started: float = field(default_factory=now)  # monotonic
    started_at: float = field(default_factory=time.time)  # wall clock, for people
    peer_id: str = ""
    destination: str = ""  # host:port dialled (the app, or the upstream instance)
    handshake: float | None = None
    resumed: bool | None = None  # once a TLS handshake completed: whether it resumed a session
    authorize: float | None = None
    dial: float | None = None
    duration: float | None = None  # set when finished
    refusal: Refusal | None = None
    detail: str = ""  # the error or the authorizer's reason, for the access log
    forwarded: bool = False
    stats: PipeStats | None = None  # live byte counts once forwarding
    # Inbound, while forwarding: reads the client's leaf, DER, from the live TLS connection,
    # for re-checks (`proxy/reauth.py`). A handle, not the bytes (half a KiB per idle
    # connection, bench/README.md "Memory per idle connection"): see `peer_der`.
    peer_leaf: Callable[[], bytes | None] | None = field(default=None, repr=False)
    abort: Callable[[], None] | None = field(default=None, repr=False)  # once forwarding
    # Inbound, while forwarding: reads the client's chain as sent, leaf first, DER, from the
    # live TLS connection (`TLSTransport.peer_chain`). A handle, not the chain: only a roots
    # rotation reads it (`proxy/reauth.py`), so a connection pays nothing for it.
    peer_chain: Callable[[], list[bytes]] | None = field(default=None, repr=False)

    @property
    def outcome(self) -> Outcome:
        if self.refusal is not None:
            return Outcome.REFUSED
        return Outcome.FORWARDED if self.forwarded else Outcome.CLOSED

    @property
    def peer_der(self) -> bytes:
        """Inbound, while forwarding: the client's leaf, DER (b"" otherwise)."""
        leaf = self.peer_leaf
        return (leaf() or b"") if leaf is not None else b""

    @property
    def to_destination(self) -> int:
        """Bytes copied from the source to the destination so far."""
        return self.stats.a_to_b if self.stats is not None else 0

    @property
    def to_source(self) -> int:
        """Bytes copied from the destination back to the source so far."""
        return self.stats.b_to_a if self.stats is not None else 0

    def age(self) -> float:
        return (self.duration if self.duration is not None else now() - self.started) or 0.0

    def refuse(self, reason: Refusal, detail: str) -> None:
        self.refusal = reason
        self.detail = detail


class Observer(Protocol):
    """Told about connections by the listeners (metrics, access log)."""

    def forwarding(self, conn: Connection) -> None:
        """The destination is connected and bytes start to flow."""

    def finished(self, conn: Connection) -> None:
        """The connection is over: forwarded and closed, refused, or closed by the client."""

    def accept_paused(self) -> None:
        """Accepting paused for want of descriptors (once per pause of the backoff)."""


class NullObserver:
    """Sees nothing (a listener made without an observer)."""

    def forwarding(self, conn: Connection) -> None:
        pass

    def accept_paused(self) -> None:
        pass

    def finished(self, conn: Connection) -> None:
        pass
