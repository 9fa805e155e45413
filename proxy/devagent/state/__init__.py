"""The dev agent's state: one module per table, as Consul's `agent/consul/state` package.

    store          State: builds the tables over one Index and one Notifier
    catalog        services and sidecars; agent, catalog, health, managed-proxy views
    checks         health checks, their results, alias checks
    config_entries config entries; service-intentions validation
    intentions     the legacy intentions API and the authorize decision (over entries)
    queries        prepared queries
    connect_ca     roots, CA configuration, the leaf cache
    acl_tokens     ACL tokens and policies made through the API
    kv             the key/value store, check-and-set, session locks
    sessions       sessions: checks, TTLs, invalidation (releases or deletes their keys)
    events         user events: the ring of recent events, in-process subscribers
    blocking       Index, Notifier, Watch, content hashes      (no tables)
    registration   service/check definitions -> records        (pure)
    render         records -> Consul's JSON shapes             (pure)
    records        StateError tree, status words, Node         (pure)

Each table is one class holding its own records. A write takes the shared index for its
records (`index.next` to stamp them, then one `index.bump(topics)`), which wakes the
blocking queries watching those topics. A read that a blocking query makes comes with a
`*_watch()` method returning a `Watch` (topics plus the current index or hash), and reads
filter by the request's ACL `Authorizer` here, not in the HTTP layer.

How a new table plugs in (peering, ...): write `state/<table>.py` with one
class whose constructor takes the `Index` (and any table it reads, which must be built
before it), name its topics after the table (`kv:<key>`, `sessions`, ...), raise
`StateError`s for refusals, and render with plain functions (in `render` or beside the
table). Build it in `State.__init__` as one more attribute, then add its routes in
`devagent/http/` and their rows in the one route table. No other table changes, unless it
reads the new one.

Rule 1: no HTTP here. Errors are raised as `StateError` subclasses carrying the status code
and the plain-text body Consul would send; the HTTP layer only renders them.
Rule 2: nothing here runs health checks or timers; the agent drives those and reports results
through the tables (`checks.update_check`, `connect_ca.issue_leaf`), so every state change
goes through a table that takes an index.
"""

from __future__ import annotations

from proxy.devagent.state.connect_ca import LeafEntry
from proxy.devagent.state.records import (
    CRITICAL,
    MAINTENANCE,
    PASSING,
    WARNING,
    BadRequest,
    NotFound,
    StateError,
)
from proxy.devagent.state.store import State

__all__ = [
    "CRITICAL",
    "MAINTENANCE",
    "PASSING",
    "WARNING",
    "BadRequest",
    "LeafEntry",
    "NotFound",
    "State",
    "StateError",
]
