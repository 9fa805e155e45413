"""AgentAuthorizer: an inbound peer's certificate -> identity -> the agent's decision.

Owns the inbound identity rules of Consul's proxy (`newServerSideVerifier` in Consul's
`connect/tls.go`): the leaf must carry a URI SAN that parses as a Connect *service* SPIFFE
ID; the agent is asked once per connection with the target service name, the URI and the
colon-hex serial; any failure denies.

Rule 1: fail closed. A transport error, a non-200 answer or an unreadable body is a denial
with a reason, never an exception and never an allow.
Rule 2: the decision is a value (`Decision`); logging it is the listener's job.
Rule 3: with a `DecisionCache` (`-authorize-cache`), the agent's answer for a client URI is
reused while the intentions watch says nothing has changed (`proxy.authzcache`); every local
check above still applies to every connection (its outcome is kept per leaf: it depends on
the certificate alone), and an error is never reused.
"""

from __future__ import annotations

import functools

from listeners.events import Refusal
from proxy.agent import AgentClient
from proxy.authzcache import DecisionCache
from proxy.errors import AgentError, IdentityError
from proxy.identity import Decision, SpiffeIDService, encode_serial, parse_spiffe_id, peer_identity


@functools.lru_cache(maxsize=1024)
def _client(peer_der: bytes) -> tuple[str, str, str] | Decision:
    """The local checks of a client leaf: (its URI, the URI to ask about, the colon-hex
    serial), or the denial. Cached: they depend on the certificate alone, and a client
    presents the same leaf on every connection until its next rotation.
    """
    try:
        peer = peer_identity(peer_der)
    except IdentityError as exc:
        return Decision(False, f"connect: invalid leaf certificate: {exc}", Refusal.NOT_SPIFFE)
    uri = peer.uri or ""
    if not uri:
        return Decision(False, "connect: invalid leaf certificate", Refusal.NOT_SPIFFE)
    try:
        ident = parse_spiffe_id(uri)
    except IdentityError:
        ident = None
    if not isinstance(ident, SpiffeIDService):
        return Decision(False, "connect: invalid leaf certificate URI", Refusal.NOT_SPIFFE, uri)
    return uri, ident.uri(), encode_serial(peer.serial)


class AgentAuthorizer:
    """Authorizes inbound connections to `target` (the proxied service name) by asking the agent.

    Satisfies `listeners.public.InboundAuthorizer` (not to be confused with the dev agent's ACL
    `proxy.devagent.acl.Authorizer`).
    """

    def __init__(self, agent: AgentClient, target: str, cache: DecisionCache | None = None) -> None:
        self.agent = agent
        self.target = target
        self.cache = cache

    async def authorize(self, peer_der: bytes | None) -> Decision:
        if not peer_der:
            return Decision(False, "connect: no client certificate", Refusal.NO_CLIENT_CERTIFICATE)
        client = _client(peer_der)
        if isinstance(client, Decision):
            return client
        uri, client_uri, serial = client
        try:
            if self.cache is None:
                result = await self.agent.authorize(self.target, client_uri, serial)
            else:
                result = await self.cache.decide(
                    client_uri, lambda: self.agent.authorize(self.target, client_uri, serial)
                )
        except AgentError as exc:
            # An answer without a boolean `Authorized` reads "unexpected answer from the agent".
            return Decision(
                False, f"connect: authz call failed: {exc}", Refusal.AUTHORIZE_FAILED, uri
            )
        if not result.allowed:
            return Decision(False, f"connect: authz denied: {result.reason}", Refusal.DENIED, uri)
        return Decision(True, result.reason, "", uri)
