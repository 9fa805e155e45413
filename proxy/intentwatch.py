"""IntentionsFollower: the one watch of the intentions that match the proxied service.

Owns the blocking query `/v1/connect/intentions/match?by=destination&name=<service>`
(`watch.changes`) for both of its users: the authorize cache (`proxy.authzcache`) asks it for
the current generation at each look-up, and the re-authorizer (`proxy.reauth`) waits on
`changes` to re-check the open connections.

The generation is (intentions generation, TLS rotations). The first part moves on every
changed answer of the watch and on every failed fetch; the second is the TLS store's
rotation count, read at each call, so a new set of roots (or leaf) counts from the moment
it is swapped in, not from when a task gets to run.

Rule 1: `generation()` is None (nothing may be reused) until the first answer, and from the
first failed fetch until the next answer. A failure moves the generation too: what changed
while the watch was down is unknown, so nothing cached before it is reused after it.
Rule 2: the state moves in the same step as the answer arrives (no `await` in between), so
no look-up can see the new answer's health with the old generation.
Rule 3: `vouches` checks an authorize answer against the watched rules: where a rule matches
the client, the answer must be that rule's action. Consul's agent answers authorize from its
own cache of the same intentions, refreshed apart from this watch, so just after a change
it may still answer from the old ones; such an answer is used but not kept. Where no rule
matches (the default policy decides, which the watch does not show) the answer stands.
"""

from __future__ import annotations

import contextlib
import logging

from proxy.agent import AgentClient
from proxy.answers import IntentionRule
from proxy.counter import Counter
from proxy.errors import IdentityError
from proxy.identity import SpiffeIDService, parse_spiffe_id
from proxy.tlsstore import TLSStore
from proxy.watch import BACKOFF_BASE, INDEX, changes

log = logging.getLogger("proxy.intentions")


class IntentionsFollower:
    """Follows the intentions of `service` as destination; `run()` until cancelled.

    Args:
        agent: the agent client (the watch).
        service: the proxied service (the intentions' destination).
        tls: the proxy's TLS store (its `rotations` are part of the generation).
        backoff_base: the watch's retry backoff (`watch.changes`).
    """

    def __init__(
        self,
        agent: AgentClient,
        service: str,
        tls: TLSStore,
        *,
        backoff_base: float = BACKOFF_BASE,
    ) -> None:
        self.agent = agent
        self.service = service
        self.tls = tls
        self.backoff_base = backoff_base
        self.healthy = False  # answered, and not failing since
        self.rules: tuple[IntentionRule, ...] = ()  # the last answer, precedence order
        self.changes = Counter()  # distinct answers received (the first one included)
        self.failures = 0  # failed fetches
        self._intentions = 0  # the first part of the generation

    def generation(self) -> tuple[int, int] | None:
        """The current generation, or None while the watch has no current answer."""
        if not self.healthy:
            return None
        return self._intentions, self.tls.rotations.value

    def vouches(self, client_uri: str, allowed: bool) -> bool:
        """Whether the watched rules support the agent's answer `allowed` for `client_uri`."""
        try:
            ident = parse_spiffe_id(client_uri)
        except IdentityError:
            return False
        if not isinstance(ident, SpiffeIDService):
            return False
        names = {"*", "*/*", f"{ident.namespace}/*", f"{ident.namespace}/{ident.service}"}
        if ident.namespace == "default":
            names.add(ident.service)  # a rule without SourceNS
        for rule in sorted(self.rules, key=lambda r: -r.precedence):
            if rule.source in names:
                return allowed == (rule.action == "allow")
        return True

    async def run(self) -> None:
        async def fetch(index: int) -> tuple[tuple[IntentionRule, ...], int]:
            match = await self.agent.intentions_match(self.service, index)
            if not self.healthy:
                # Healed (or first): an unchanged answer is not yielded, so health returns
                # here; the generation already moved at the failure.
                self.healthy = True
            return match.rules, match.index

        values = changes(
            "connect_intentions",
            fetch,
            INDEX,
            log=log,
            backoff_base=self.backoff_base,
            service=self.service,
            on_error=self._failed,
        )
        async with contextlib.aclosing(values):
            async for rules in values:
                self.rules = rules
                self._intentions += 1
                self.changes.add()

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.healthy:
            self.healthy = False
            self._intentions += 1
