"""DecisionCache: the agent's authorize answers, per client identity, while they are current.

Consul's agent decides from the client's SPIFFE URI alone (its `agent/connect_auth.go`: the
target and the token are fixed for one proxy, the serial is not read, a revocation check is
a TODO there), the intentions that match the target, and the default policy. So the key is
the URI, and an answer stays good for as long as nothing it was made from has changed: the
cache asks a `Freshness` (`proxy.intentwatch.IntentionsFollower`) for the current generation
at each look-up, and an answer is reused only under the generation it was fetched in.

Rule 1: a stale decision never outlives a change the watch has reported. An answer is
stored only if the generation is the same when it arrives as when it was asked for (one
fetched before a change and arriving after it serves its own connection, which asked before
the change, and is dropped); a new generation empties the cache before the next look-up.
Rule 2: no generation (the watch has not answered yet, or is failing): every look-up is a
call (`bypasses`), and the first of a run of them is logged, once.
Rule 3: only decisions are kept, allows and denials alike, and only those the watched
intentions support (`Freshness.vouches`: an agent still answering from older intentions is
not trusted twice); an error (`AgentError`: the agent unreachable, a non-200, a bad body) is
raised to the caller and never stored.
Rule 4: bounded: at most `size` identities, the least recently used goes first. Look-ups of
one identity made while its call is in flight share that call (`shared`): a burst of
connections from one client, or a re-check pass, costs one call.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from proxy.answers import AuthorizeResult

log = logging.getLogger("proxy.authorize")

DEFAULT_SIZE = 4096  # client identities remembered; a mesh rarely has more callers of one service


class Freshness(Protocol):
    def generation(self) -> Hashable | None:
        """The state decisions are made from now, or None when it cannot be vouched for."""
        ...

    def vouches(self, client_uri: str, allowed: bool) -> bool:
        """Whether the state behind the current generation supports this answer."""
        ...


@dataclass(slots=True)
class CacheCounts:
    """What the cache did, for the life of a proxy (the metrics and `/config` read it)."""

    hits: int = 0  # answered from the cache
    shared: int = 0  # answered by another look-up's call in flight
    misses: int = 0  # a call of its own, then stored if still current
    bypasses: int = 0  # a call: no current generation (the watch not answering)
    discarded: int = 0  # answers that arrived after a change, not stored
    disagreed: int = 0  # answers the watched intentions do not support, not stored
    entries: int = 0  # identities held now

    def as_dict(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "shared": self.shared,
            "misses": self.misses,
            "bypasses": self.bypasses,
            "discarded": self.discarded,
            "disagreed": self.disagreed,
            "entries": self.entries,
        }


Fetch = Callable[[], Awaitable[AuthorizeResult]]


class DecisionCache:
    """The agent's authorize answers by client URI, under one generation of `freshness`.

    Args:
        freshness: says which generation is current, or None (then every look-up is a call).
        size: identities held at most (least recently used evicted).
        counts: where to count (one `CacheCounts` may outlive several caches).
    """

    def __init__(
        self,
        freshness: Freshness,
        *,
        size: int = DEFAULT_SIZE,
        counts: CacheCounts | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"authorize cache size must be at least 1, got {size}")
        self.freshness = freshness
        self.size = size
        self.counts = counts if counts is not None else CacheCounts()
        self._generation: Hashable | None = None
        self._entries: collections.OrderedDict[str, AuthorizeResult] = collections.OrderedDict()
        self._inflight: dict[tuple[Hashable, str], asyncio.Task[AuthorizeResult]] = {}
        self._bypassing = False

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uri: object) -> bool:
        return uri in self._entries

    async def decide(self, uri: str, fetch: Fetch) -> AuthorizeResult:
        """The agent's answer for `uri`: from the cache, or by `fetch()` (the agent's call).

        Raises:
            AgentError: from `fetch`, never stored.
        """
        counts = self.counts
        generation = self.freshness.generation()
        if generation is None:
            counts.bypasses += 1
            if not self._bypassing:
                self._bypassing = True
                log.warning(
                    "Authorize cache bypassed: the intentions watch is not current; "
                    "one authorize call per connection until it is"
                )
            return await fetch()
        if self._bypassing:
            self._bypassing = False
            log.info("Authorize cache in use again: the intentions watch is current")
        if generation != self._generation:
            self.clear()
            self._generation = generation
        entries = self._entries
        found = entries.get(uri)
        if found is not None:
            entries.move_to_end(uri)
            counts.hits += 1
            return found
        key = (generation, uri)
        task = self._inflight.get(key)
        if task is not None:
            counts.shared += 1
        else:
            counts.misses += 1
            # Its own task: a connection that gives up (cancelled) does not cancel the call
            # the others are waiting on.
            task = asyncio.ensure_future(self._fetch(generation, uri, fetch))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(task)

    async def _fetch(self, generation: Hashable, uri: str, fetch: Fetch) -> AuthorizeResult:
        result = await fetch()
        if self.freshness.generation() != generation:
            self.counts.discarded += 1  # asked before a change: it serves only its callers
            return result
        if not self.freshness.vouches(uri, result.allowed):
            # The agent answered from intentions older than the watch's (its own cache not
            # refreshed yet): right for these callers as a call would be, not kept.
            self.counts.disagreed += 1
            return result
        entries = self._entries
        entries[uri] = result
        entries.move_to_end(uri)
        while len(entries) > self.size:
            entries.popitem(last=False)
        self.counts.entries = len(entries)
        return result

    def _settled(self, key: tuple[Hashable, str], task: asyncio.Task[AuthorizeResult]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every caller may have gone

    def clear(self) -> None:
        self._entries.clear()
        self.counts.entries = 0
