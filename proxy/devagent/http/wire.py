"""Consul's HTTP conventions, shared by every route module: reading requests, writing answers.

Owns: the token (`?token=`, `X-Consul-Token`, `Authorization: Bearer`), the blocking
parameters (`?index=`, `?wait=` with Consul's jitter), flags, `?dc=`, bodies decoded with
Consul's field names, and JSON answers with the `X-Consul-*` headers.

Rule 1: no decisions about the agent's data; a request becomes arguments for a table.
Rule 2: a malformed parameter or body is a `BadRequest` with Consul's text, never an
unhandled exception, and a token is never logged.
Rule 3: every JSON body is parsed by `load_json`, here and nowhere else: each way a body can
be bad (syntax, invalid UTF-8, nesting too deep, a number no Go type holds, the wrong
top-level type) is a 400 "Request decode failed: ...", never a RecursionError or a silent
infinity.
"""

from __future__ import annotations

import json
import math
import random
import re
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
# Go's decoder refuses nesting beyond 10,000; CPython's recursive decoder and encoder fail
# near 1,000 (a RecursionError), so the agent refuses beyond 512, with Go's text.
MAX_DEPTH = 512
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")

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


def meta_headers(index: int) -> dict[str, str]:
    """The blocking-query headers Consul's `setMeta` writes, also on a 404."""
    return {
        "X-Consul-Index": str(max(index, 1)),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }


def empty(status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    """A response without a body (Consul's bare `WriteHeader`)."""
    return web.Response(status=status, headers=headers)


def filtered_header(request: web.Request, filtered: bool) -> dict[str, str]:
    """`X-Consul-Results-Filtered-By-ACLs`, sent only to a request that presented a token."""
    return {"X-Consul-Results-Filtered-By-ACLs": "true"} if secret(request) and filtered else {}


def parse_uint(raw: str) -> int:
    """Go's `strconv.ParseUint(raw, 10, 64)`.

    Raises:
        StateError: Go's error text, which Consul answers with a 500.
    """
    if not raw or not raw.isascii() or not raw.isdigit():
        raise StateError(f'strconv.ParseUint: parsing "{raw}": invalid syntax')
    value = int(raw)
    if value >= 1 << 64:
        raise StateError(f'strconv.ParseUint: parsing "{raw}": value out of range')
    return value


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


def cas(request: web.Request) -> int | None:
    """`?cas=`: None when absent or empty; else Go's ParseUint of it.

    Raises:
        StateError: Consul passes ParseUint's error through unwrapped, a 500 with Go's text.
    """
    raw = request.query.get("cas", "")
    if raw == "":
        return None
    if not raw.isascii() or not raw.isdigit():
        raise StateError(f'strconv.ParseUint: parsing "{raw}": invalid syntax')
    value = int(raw)
    if value >= 1 << 64:
        raise StateError(f'strconv.ParseUint: parsing "{raw}": value out of range')
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


def check_depth(text: str) -> None:
    """Refuse `text` if its arrays and objects nest deeper than `MAX_DEPTH`.

    Raises:
        BadRequest: Go's "exceeded max depth" text, naming the bracket that went too deep.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # it cannot nest deeper than it has openers: the common case costs two counts
    depth = 0
    # Brackets inside strings are data; strings are blanked first (the regex is linear).
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise BadRequest(
                f"Request decode failed: invalid character '{match.group()}' exceeded max depth"
            )


def _float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise BadRequest(
            f"Request decode failed: json: cannot unmarshal number {literal} "
            "into Go value of type float64"
        )
    return value


def _int(literal: str) -> int:
    # Go reads a number of unknown type as a float64, and one beyond its range is an error.
    # Checked first, so int() never meets a literal past CPython's 4,300-digit limit.
    _float(literal)
    return int(literal)


def _constant(name: str) -> Any:
    # NaN and Infinity are Python's extensions, not JSON.
    first = name.lstrip("-")[0]
    raise BadRequest(
        f"Request decode failed: invalid character '{first}' looking for beginning of value"
    )


def load_json(raw: bytes) -> Any:
    """One JSON text, parsed as Go's decoder accepts it (see Rule 3).

    Raises:
        BadRequest: "Request decode failed: ..." for invalid UTF-8, a syntax error, nesting
            deeper than `MAX_DEPTH`, a number outside float64, or NaN/Infinity.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"Request decode failed: invalid UTF-8 at byte {exc.start}") from exc
    check_depth(text)
    try:
        return json.loads(text, parse_float=_float, parse_int=_int, parse_constant=_constant)
    except RecursionError as exc:  # a backstop: check_depth refuses these first
        raise BadRequest("Request decode failed: exceeded max depth") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from exc


async def body(request: web.Request, schema: decode.Schema | None = None) -> dict[str, Any]:
    """The JSON object body, decoded with `schema`'s field names (empty allowed without).

    With a schema, as Go's decoder into a struct: an empty body is "EOF", `null` leaves the
    struct empty, and another top-level type names the struct.

    Raises:
        BadRequest: the body is not a JSON object (see `load_json`) or does not fit `schema`.
    """
    raw = await request.read()
    if not raw.strip():
        if schema is None:
            return {}
        raise BadRequest("Request decode failed: EOF")
    data = load_json(raw)
    if data is None and schema is not None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest(
            f"Request decode failed: json: cannot unmarshal {decode._json_type(data)} into Go "
            f"value of type structs.{schema.name if schema else 'object'}"
        )
    try:
        return decode.decode(data, schema) if schema is not None else data
    except decode.DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from exc
