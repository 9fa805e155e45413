"""An embedded, Consul-compatible dev agent for Connect.

It serves the parts of a Consul agent's HTTP API that a Connect proxy uses, with the same
paths, parameters, JSON shapes, headers, blocking semantics and error texts, so that the
proxy can be run and tested on a machine without Consul: in-process (`DevAgent`) or
standalone (`connect-proxy dev-agent`).

Modules, from the bottom up: `decode` (field-name normalisation), `ca` (X.509, pure), `acl`
(rules and tokens, pure), `config` (config files), `state/` (one class per table: catalog,
checks, config entries, intentions, queries, Connect CA, ACL tokens, KV, sessions, events;
the shared index and blocking), `http/` (routes only, one route table), `agent` (runtime:
HTTP server, check runners, leaf renewal, session TTL timers). It takes from `proxy/` only
the level-0 modules (`errors`, `identity`, `addr`, `counter`, `goflags`) and nothing from
`listeners/`: it is a separate program that ships in the same package.

Differences from a real Consul agent (what it leaves out or does differently):

- One node, one datacenter, no Raft, no gossip, no persistence: state lives in memory and is
  gone when the agent stops. `?stale`/`?consistent` are accepted and change nothing; a `dc`
  other than the agent's gets 500 `No path to datacenter`.
- Only the endpoints a Connect proxy, `connect envoy` and the tests use (listed in the
  README); anything else is 404 `404 page not found`. No transactions (`/v1/txn`),
  snapshots, DNS, UI, gRPC or xDS server. `/v1/agent/self` reports `ports.grpc` (default
  8502) as the xDS port so `connect envoy -bootstrap` can render a bootstrap, but nothing
  listens there.
- Peering works between two dev agents only (their own NDJSON-over-mTLS channel on the
  peering port, not Consul's gRPC; see `peerlink`), without mesh gateways.
- Namespaces and partitions are always `default`; sameness groups, L7 intention
  permissions beyond "an L7 intention denies at L4", JWT and `?filter=` are not implemented.
- Health checks: TTL, TCP, HTTP and alias checks run for real (intervals below 1 s are
  raised to 1 s, as in Consul). Script checks are refused as
  on an agent without `enable_script_checks`; gRPC, H2PING, Docker, UDP and OS-service checks
  are refused with a 400 naming the type. TCP/HTTP checks run once at registration and then
  every interval (Consul staggers the first run randomly within the interval).
- Sidecar checks use a 10 s interval like Consul; `sidecar_check_interval` (an option of the
  dev agent, not a Consul setting) shortens it for tests.
- CA: only the built-in `consul` provider. Root rotation happens on request (`rotate_ca()`,
  or `PUT /v1/connect/ca/configuration` with a new key, key type/size, or the dev-agent
  field `"Rotate": true` in `Config`); old roots are kept in the list and never pruned.
  Leaves are re-issued at once on rotation (Consul spreads that over 30 s). Leaf TTLs below
  Consul's 1 h minimum are accepted so tests can watch renewals; renewal is at a random
  point between 60 % and 90 % of the lifetime, as in Consul.
- The leaf cache is keyed by service name only (Consul also keys by token).
- KV, sessions, events: a session's node must be this agent's node (any other is Consul's
  "Missing node registration"); `serfHealth` is always passing. An event fired here is
  received only by this agent, at once (no gossip); `/v1/event/list` ignores `?node=`,
  `?service=` and `?tag=` as Consul's agent does (only `?name=` filters). Filters are
  Python regular expressions (Consul's are Go RE2), so a bad pattern's error text differs
  after "error parsing regexp: ". KV tombstones are kept for the last 10,000 deletes
  (Consul reaps them after `tombstone_ttl`). Remote exec (`_rexec` events, off unless
  `disable_remote_exec = false`) runs at most 64 jobs at once and raises a job `Wait` below
  50 ms to 50 ms (Consul would write heartbeats in a busy loop).
- ACLs: management tokens, service and node identities, and policies with `service`,
  `node`, `agent`, `query`, `key`, `session`, `event` rules (exact and `_prefix`), plus
  single-word `operator`/`acl`/`mesh` rules. No roles, auth methods, token expiry,
  replication or legacy ACLs. 403 bodies follow Consul's `Permission denied: token with
  AccessorID '...' lacks permission 'service:write' on "web"` and `ACL not found`.
- Prepared queries: static queries by ID or name (`Service`, `OnlyPassing`, `Tags` with `!`
  negation, `IgnoreCheckIDs`, `Connect`); no templates, failover or `Near` sorting.
- The content hash of `/v1/agent/service/:id` is FNV-64a over the rendered JSON: opaque and
  stable, but not byte-equal to Consul's hashstructure value.
- `emulate_consul_1_2` (a dev-agent option) answers `/v1/agent/service/:id` with 404, as
  Consul 1.2 did, to exercise a proxy's fallback to the managed-proxy endpoint.
- The legacy managed-proxy endpoint `/v1/agent/connect/proxy/:id` serves any connect-proxy
  registered with a `DestinationServiceID`; the agent starts no managed processes and issues
  no proxy tokens.
"""

from __future__ import annotations

from proxy.devagent.agent import DevAgent
from proxy.devagent.config import AgentConfig, load_files

__all__ = ["AgentConfig", "DevAgent", "load_files"]
