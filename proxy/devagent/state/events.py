"""User events: firing, the agent's ring of recent events, and in-process subscribers.

A user event is Consul's `UserEvent` (`ID`, `Name`, `Payload`, `NodeFilter`,
`ServiceFilter`, `TagFilter`, `Version`, `LTime`). Firing validates the filters as
Consul's agent does, then delivers the event to this agent as gossip would: it is received
only when its filters match the agent (the node filter against the node name, the service
filter against the IDs of the local services, the tag filter against those services'
tags; Go's `MatchString`, so unanchored). A received event goes to every subscriber and,
unless it is a remote-exec event (`_rexec`), into the ring of the last 256, which
`/v1/event/list` reads. The list's index is not a Raft index but Consul's: the two halves
of the last event's UUID xor-ed (`id_to_index`), so a blocking list waits while that is
unchanged.

In-process subscribers (the remote-exec side of the agent) use `subscribe`:

    with state.events.subscribe("_rexec") as sub:
        async for event in sub:       # UserEvent records, in the order received
            ...

A subscription buffers up to `maxsize` events; when full, the oldest is dropped and
counted in `dropped` (delivery is best effort, as over gossip). `close()` (or leaving the
`with`) ends the iteration; so does the agent's shutdown (`Events.close`).

Rule 1: no Raft index is taken: events wake list queries through the notifier's `events`
topic only, as Consul's agent-local event buffer does.
Rule 2: ACLs: firing needs event:write on the name (refused with Consul's plain
"Permission denied"); the list is filtered by event:read.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.state.blocking import Notifier
from proxy.devagent.state.records import Node, StateError

REMOTE_EXEC = "_rexec"
RING_SIZE = 256
VERSION = 1
TOPIC = "events"


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One user event (Consul's `agent.UserEvent`)."""

    id: str
    name: str
    payload: bytes | None = None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    version: int = VERSION
    ltime: int = 0

    def to_api(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Payload": base64.b64encode(self.payload).decode() if self.payload else None,
            "NodeFilter": self.node_filter,
            "ServiceFilter": self.service_filter,
            "TagFilter": self.tag_filter,
            "Version": self.version,
            "LTime": self.ltime,
        }


def id_to_index(event_id: str) -> int:
    """Consul's `uuidToUint64` (the api package's `IDToIndex`): the UUID's two 64-bit
    halves xor-ed."""
    hexdigits = event_id.replace("-", "")
    return int(hexdigits[:16], 16) ^ int(hexdigits[16:32], 16)


class SubscriptionClosed(Exception):
    """`EventSubscription.get()` on a closed subscription."""


class EventSubscription:
    """Events received by the agent, as they arrive (see the module docstring)."""

    def __init__(self, events: Events, name: str | None, maxsize: int) -> None:
        self._events = events
        self.name = name
        self._queue: collections.deque[UserEvent] = collections.deque(maxlen=maxsize)
        self._wakeup: asyncio.Event | None = None
        self.dropped = 0
        self.closed = False

    def _offer(self, event: UserEvent) -> None:
        if self.closed or (self.name is not None and event.name != self.name):
            return
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # the deque drops the oldest
        self._queue.append(event)
        if self._wakeup is not None:
            self._wakeup.set()

    async def get(self) -> UserEvent:
        """The next event, waiting for one.

        Raises:
            SubscriptionClosed: the subscription (or the agent) was closed.
        """
        # Each pass returns or awaits a new offer or the close.
        while not self._queue:
            if self.closed:
                raise SubscriptionClosed
            self._wakeup = self._wakeup or asyncio.Event()
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> UserEvent:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving; a waiting `get()` raises `SubscriptionClosed`. Idempotent."""
        self.closed = True
        self._queue.clear()
        self._events._subscribers.discard(self)
        if self._wakeup is not None:
            self._wakeup.set()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _compile(kind: str, pattern: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise StateError(f"Invalid {kind} filter: error parsing regexp: {exc}") from exc


class Events:
    """The ring of recent events and the subscribers; see the module docstring."""

    def __init__(
        self, notifier: Notifier, node: Node, services: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self._notifier = notifier
        self._node = node
        self._services = services
        self._ring: collections.deque[UserEvent] = collections.deque(maxlen=RING_SIZE)
        self._subscribers: set[EventSubscription] = set()
        self._ltime = 0

    def fire(
        self,
        name: str,
        payload: bytes | None,
        authz: Authorizer,
        *,
        node_filter: str = "",
        service_filter: str = "",
        tag_filter: str = "",
    ) -> UserEvent:
        """`PUT /v1/event/fire/:name`: validate, authorize, deliver to this agent.

        Returns:
            The event as Consul's fire answers it (`LTime` 0: the Lamport time is given on
            receipt, so only the listed copy carries it).

        Raises:
            StateError: a bad filter (500, Consul's text) or event:write refused (403).
        """
        if not name:
            raise StateError("User event missing name")
        if tag_filter and not service_filter:
            raise StateError("Cannot provide tag filter without service filter")
        _compile("node", node_filter)
        _compile("service", service_filter)
        _compile("tag", tag_filter)
        if not authz.allowed("event", name, "write"):
            raise StateError("Permission denied", status=403)
        event = UserEvent(
            id=str(uuid.uuid4()),
            name=name,
            payload=payload or None,
            node_filter=node_filter,
            service_filter=service_filter,
            tag_filter=tag_filter,
        )
        self._ltime += 1
        self._receive(replace(event, ltime=self._ltime))
        return event

    def matches(self, event: UserEvent) -> bool:
        """Whether `event`'s filters select this agent (Consul's `shouldProcessUserEvent`)."""
        try:
            node_re = _compile("node", event.node_filter)
            service_re = _compile("service", event.service_filter)
            tag_re = _compile("tag", event.tag_filter)
        except StateError:
            return False  # Consul's agent drops an event whose filter does not compile
        if node_re is not None and not node_re.search(self._node.name):
            return False
        if service_re is None:
            return True
        for service_id, svc in self._services.items():
            if not service_re.search(service_id):
                continue
            if tag_re is None or any(tag_re.search(t) for t in svc.get("Tags") or ()):
                return True
        return False

    def _receive(self, event: UserEvent) -> None:
        if not self.matches(event):
            return
        if event.name != REMOTE_EXEC:
            self._ring.append(event)
            self._notifier.notify((TOPIC,))
        for sub in list(self._subscribers):
            sub._offer(event)

    def recent(self, name: str, authz: Authorizer) -> tuple[list[UserEvent], bool]:
        """`GET /v1/event/list`: the ring, oldest first, of `name` if given, filtered by
        event:read. Returns `(events, whether ACLs removed any)`."""
        named = [e for e in self._ring if not name or e.name == name]
        readable = [e for e in named if authz.allowed("event", e.name, "read")]
        return readable, len(readable) != len(named)

    @staticmethod
    def index_of(events: list[UserEvent]) -> int:
        """The list's `X-Consul-Index`: the last event's `id_to_index`, 1 when empty."""
        return id_to_index(events[-1].id) if events else 1

    def subscribe(self, name: str | None = None, *, maxsize: int = RING_SIZE) -> EventSubscription:
        """Receive the events this agent receives (of `name` only, if given), `_rexec`
        included, from now on."""
        sub = EventSubscription(self, name, maxsize)
        self._subscribers.add(sub)
        return sub

    def close(self) -> None:
        """End every subscription (agent shutdown)."""
        for sub in list(self._subscribers):
            sub.close()
