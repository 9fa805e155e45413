"""Consul's HTTP conventions, shared by every route module: reading requests, writing answers.

Owns: the token (`?token=`, `X-Consul-Token`, `Authorization: Bearer`), the blocking
parameters (`?index=`, `?wait=` with Consul's jitter), flags, `?dc=`, bodies decoded with
Consul's field names, and JSON answers with the `X-Consul-*` headers.

Rule 1: no decisions about the agent's data; a request becomes arguments for a table.
Rule 2: a malformed parameter or body is a `BadRequest` with Consul's text, never an
unhandled exception, and a token is never logged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.devagent import decode
from proxy.devagent.acl import Authorizer
from proxy.devagent.state import BadRequest, State, StateError
from proxy.goflags import parse_duration

MAX_BODY = 1 << 20
DEFAULT_WAIT = 300.0  # RPC-backed endpoints (catalog, health, queries)
CACHE_WAIT = 600.0  # agent-cache-backed endpoints (roots, leaf) when no wait is given
HASH_WAIT = 300.0  # hash-blocking agent endpoints
MAX_WAIT = 600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Settings:
    """What the routes know of the agent besides its state."""

    grpc_port: int = 8502
    # Answer /v1/agent/service/:id with 404, as Consul 1.2 did (see AgentConfig).
    emulate_consul_1_2: bool = False
    # The default `bind_address` of a legacy managed proxy.
    bind_address: str = "127.0.0.1"


STATE_KEY: web.AppKey[State] = web.AppKey("state", State)
SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings", Settings)


def state_of(request: web.Request) -> State:
    return request.app[STATE_KEY]


def settings_of(request: web.Request) -> Settings:
    return request.app[SETTINGS_KEY]


def local_port(request: web.Request) -> int:
    """The port this request arrived on: the agent's HTTP port, also when bound to port 0."""
    sockname = request.get_extra_info("sockname")
    return int(sockname[1]) if isinstance(sockname, tuple) and len(sockname) >= 2 else 0


def text(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain", headers=headers)


def answer(
    request: web.Request,
    data: Any,
    *,
    index: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON answer; with `index`, the blocking-query headers too. `?pretty` indents."""
    pretty = "pretty" in request.query
    body = json.dumps(data, indent=4 if pretty else None, separators=None if pretty else (",", ":"))
    response = web.Response(text=body, content_type="application/json")
    if index is not None:
        # Consul never sends index 0, so a client that starts at 0 cannot busy-loop.
        response.headers["X-Consul-Index"] = str(max(index, 1))
        response.headers["X-Consul-KnownLeader"] = "true"
        response.headers["X-Consul-LastContact"] = "0"
    if headers:
        response.headers.update(headers)
    return response


def secret(request: web.Request) -> str:
    # Consul's order: ?token=, then X-Consul-Token, then Authorization: Bearer.
    if request.query.get("token"):
        return request.query["token"]
    if request.headers.get("X-Consul-Token"):
        return request.headers["X-Consul-Token"]
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ""


def authz(request: web.Request) -> Authorizer:
    """The request token's authorizer (raises ACLNotFound for an unknown token)."""
    return state_of(request).acl.resolve(secret(request))


def check_dc(request: web.Request) -> None:
    dc = request.query.get("dc")
    if dc and dc != state_of(request).node.datacenter:
        raise StateError("No path to datacenter")


def consistency(request: web.Request) -> None:
    if "stale" in request.query and "consistent" in request.query:
        raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")


def wait(request: web.Request, default: float) -> float:
    raw = request.query.get("wait")
    value = default
    if raw is not None and raw != "":
        try:
            value = parse_duration(raw)
        except ValueError as exc:
            raise BadRequest("Invalid wait time") from exc
        if value <= 0:
            value = default
    value = min(value, MAX_WAIT)
    # Random jitter up to wait/16 spreads the wake-ups of many watchers (agent/consul/rpc.go).
    return value + random.uniform(0, value / 16)


def index(request: web.Request) -> int:
    raw = request.query.get("index")
    if raw is None or raw == "":
        return 0
    if not raw.isdigit():
        raise BadRequest("Invalid index")
    value = int(raw)
    if value >= 1 << 64:
        raise BadRequest("Invalid index")
    return value


def flag(request: web.Request, name: str) -> bool:
    if name not in request.query:
        return False
    raw = request.query[name].lower()
    if raw in ("", "1", "t", "true"):
        return True
    if raw in ("0", "f", "false"):
        return False
    raise BadRequest(f"Invalid value for ?{name}")


async def body(request: web.Request, schema: decode.Schema | None = None) -> dict[str, Any]:
    """The JSON object body, decoded with `schema`'s field names (empty allowed without)."""
    raw = await request.read()
    if not raw.strip():
        if schema is None:
            return {}
        raise BadRequest("Request decode failed: EOF")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Request decode failed: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest(
            f"Request decode failed: json: cannot unmarshal {decode._json_type(data)} into Go "
            f"value of type structs.{schema.name if schema else 'object'}"
        )
    return decode.decode(data, schema) if schema is not None else data
