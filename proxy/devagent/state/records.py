"""Values every table of the dev agent's state shares: the error tree, status words, the node.

    StateError (status 500 unless given)
    ├── BadRequest (400)
    └── NotFound (404)

Rule 1: pure values and functions; imports nothing from the dev agent.
Rule 2: an error's `str()` is the plain-text body Consul would send, and `status` its code;
the HTTP layer renders them and decides nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
STATUS_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2, MAINTENANCE: 3}
CONNECT_PROXY = "connect-proxy"


class StateError(Exception):
    """A request the state refuses; `status` and `str()` are what the client receives."""

    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(StateError):
    status = 400


class NotFound(StateError):
    status = 404


@dataclass(frozen=True, slots=True)
class Node:
    """The agent's one node: its identity in every rendering and the index it was made at."""

    id: str
    name: str
    address: str
    datacenter: str
    create_index: int


def worst_status(statuses: Iterable[str]) -> str:
    """The most severe of `statuses` (passing when there are none)."""
    worst = PASSING
    for s in statuses:
        if STATUS_RANK.get(s, 2) > STATUS_RANK[worst]:
            worst = s
    return worst


def service_topics(svc: Mapping[str, Any]) -> list[str]:
    """The blocking topics a change to service record `svc` touches.

    `svc:<name>` and `connect:<name>` are what health and catalog watches of one service
    name wait on, so a watch is not woken by changes to other services.
    """
    topics = ["services", f"svc:{svc['Service']}", f"sid:{svc['ID']}"]
    proxy = svc.get("Proxy") or {}
    if svc.get("Kind") == CONNECT_PROXY and proxy.get("DestinationServiceName"):
        topics.append(f"connect:{proxy['DestinationServiceName']}")
    if (svc.get("Connect") or {}).get("Native"):
        topics.append(f"connect:{svc['Service']}")
    return topics


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
