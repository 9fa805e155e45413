"""HTTP routes of the dev agent: Consul's paths, parameters, headers and status codes.

Owns: request parsing (token, blocking parameters, bodies) and response rendering (JSON with
`X-Consul-*` headers; plain-text errors). Every decision is delegated to `State`.

Rule 1: no business logic here; a handler reads the request, calls the state, renders.
Rule 2: error bodies are plain text, like Consul's; nothing a client sends can crash the
server (every handler failure becomes a status code) and no token value is ever logged.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy.devagent import decode
from proxy.devagent.acl import ACLNotFound, Authorizer, PermissionDenied, PolicyError
from proxy.devagent.ca import CAError
from proxy.devagent.state import (
    CRITICAL,
    PASSING,
    WARNING,
    BadRequest,
    NotFound,
    StateError,
)
from proxy.goflags import parse_duration

if TYPE_CHECKING:
    from proxy.devagent.agent import DevAgent

log = logging.getLogger("devagent.http")

MAX_BODY = 1 << 20
DEFAULT_WAIT = 300.0  # RPC-backed endpoints (catalog, health, queries)
CACHE_WAIT = 600.0  # agent-cache-backed endpoints (roots, leaf) when no wait is given
HASH_WAIT = 300.0  # hash-blocking agent endpoints
MAX_WAIT = 600.0
VERSION = "1.18.0"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AGENT_KEY: web.AppKey[DevAgent] = web.AppKey("agent")


def _text(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain", headers=headers)


def _json(
    request: web.Request,
    data: Any,
    *,
    index: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
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


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PermissionDenied as exc:
        return _text(403, str(exc))
    except ACLNotFound as exc:
        return _text(403, str(exc))
    except StateError as exc:
        return _text(exc.status, str(exc))
    except decode.DecodeError as exc:
        return _text(400, f"Request decode failed: {exc}")
    except (PolicyError, CAError) as exc:
        return _text(400, str(exc))
    except web.HTTPNotFound:
        return _text(404, "404 page not found")
    except web.HTTPRequestEntityTooLarge:
        return _text(413, f"Request body too large: the limit is {MAX_BODY} bytes")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return _text(500, "internal error")


# -- request helpers ---------------------------------------------------------------------


def _agent(request: web.Request) -> DevAgent:
    return request.app[AGENT_KEY]


def _secret(request: web.Request) -> str:
    # Consul's order: ?token=, then X-Consul-Token, then Authorization: Bearer.
    if request.query.get("token"):
        return request.query["token"]
    if request.headers.get("X-Consul-Token"):
        return request.headers["X-Consul-Token"]
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ""


def _authz(request: web.Request) -> Authorizer:
    return _agent(request).state.acl.resolve(_secret(request))


def _check_dc(request: web.Request) -> None:
    dc = request.query.get("dc")
    if dc and dc != _agent(request).state.datacenter:
        raise StateError("No path to datacenter")


def _consistency(request: web.Request) -> None:
    if "stale" in request.query and "consistent" in request.query:
        raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")


def _wait(request: web.Request, default: float) -> float:
    raw = request.query.get("wait")
    wait = default
    if raw is not None and raw != "":
        try:
            wait = parse_duration(raw)
        except ValueError as exc:
            raise BadRequest("Invalid wait time") from exc
        if wait <= 0:
            wait = default
    wait = min(wait, MAX_WAIT)
    # Random jitter up to wait/16 spreads the wake-ups of many watchers (agent/consul/rpc.go).
    return wait + random.uniform(0, wait / 16)


def _index(request: web.Request) -> int:
    raw = request.query.get("index")
    if raw is None or raw == "":
        return 0
    if not raw.isdigit():
        raise BadRequest("Invalid index")
    value = int(raw)
    if value >= 1 << 64:
        raise BadRequest("Invalid index")
    return value


def _flag(request: web.Request, name: str) -> bool:
    if name not in request.query:
        return False
    raw = request.query[name].lower()
    if raw in ("", "1", "t", "true"):
        return True
    if raw in ("0", "f", "false"):
        return False
    raise BadRequest(f"Invalid value for ?{name}")


async def _body(request: web.Request, schema: decode.Schema | None = None) -> dict[str, Any]:
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


# -- agent -------------------------------------------------------------------------------


async def agent_self(request: web.Request) -> web.StreamResponse:
    agent = _agent(request)
    state = agent.state
    _authz(request).require("agent", state.node_name, "read")
    grpc = agent.config.grpc_port
    return _json(
        request,
        {
            "Config": {
                "Datacenter": state.datacenter,
                "PrimaryDatacenter": state.datacenter,
                "NodeName": state.node_name,
                "NodeID": state.node_id,
                "Revision": "devagent",
                "Server": True,
                "Version": VERSION,
                "BuildDate": "2024-01-01T00:00:00Z",
            },
            "DebugConfig": {
                "Datacenter": state.datacenter,
                "NodeName": state.node_name,
                "GRPCPort": grpc,
                "HTTPPort": agent.http_port,
                "ConnectEnabled": True,
                "ACLsEnabled": state.acl.enabled,
            },
            "Coord": None,
            "Member": {
                "Name": state.node_name,
                "Addr": state.node_address,
                "Port": 8301,
                "Tags": {"dc": state.datacenter, "role": "consul", "build": VERSION},
                "Status": 1,
            },
            "Stats": {},
            "Meta": {"consul-network-segment": ""},
            "xDS": {
                "SupportedProxies": {"envoy": ["1.28.0", "1.27.2", "1.26.6", "1.25.11"]},
                "Port": grpc,
                "Ports": {"Plaintext": grpc, "TLS": -1},
            },
        },
    )


async def agent_services(request: web.Request) -> web.StreamResponse:
    authz = _authz(request)
    state = _agent(request).state
    services = state.agent_services(authz)
    headers = {}
    if _secret(request) and len(services) < len(state.services):
        headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
    return _json(request, services, headers=headers)


async def agent_service(request: web.Request) -> web.StreamResponse:
    if _agent(request).config.emulate_consul_1_2:
        return _text(404, "404 page not found")
    state = _agent(request).state
    service_id = request.match_info["id"]
    authz = _authz(request)
    svc = state.agent_service(service_id)  # 404 before the ACL check, as Consul
    authz.require("service", svc["Service"], "read")
    last = request.query.get("hash", "")
    if last:
        await state.block_on_hash(
            ("services",),
            last,
            _wait(request, HASH_WAIT),
            lambda: state.agent_service_hash(service_id),
        )
        svc = state.agent_service(service_id)
    return _json(request, svc, headers={"X-Consul-ContentHash": str(svc["ContentHash"])})


async def agent_register(request: web.Request) -> web.StreamResponse:
    body = await _body(request, decode.SERVICE)
    replace = _flag(request, "replace-existing-checks")
    _agent(request).state.register_service(body, _authz(request), replace_existing_checks=replace)
    return _text(200, "")


async def agent_deregister(request: web.Request) -> web.StreamResponse:
    _agent(request).state.deregister_service(request.match_info["id"], _authz(request))
    return _text(200, "")


async def agent_checks(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    authz = _authz(request)
    out = {}
    for cid, check in state.checks.items():
        name = check["ServiceName"]
        if (name and authz.allowed("service", name, "read")) or (
            not name and authz.allowed("node", state.node_name, "read")
        ):
            out[cid] = {k: v for k, v in check.items() if k not in ("CreateIndex", "ModifyIndex")}
    return _json(request, out)


async def agent_check_register(request: web.Request) -> web.StreamResponse:
    body = await _body(request, decode.CHECK)
    _agent(request).state.register_check(body, _authz(request))
    return _text(200, "")


async def agent_check_deregister(request: web.Request) -> web.StreamResponse:
    _agent(request).state.deregister_check(request.match_info["id"], _authz(request))
    return _text(200, "")


_TTL_STATUS = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}


async def agent_check_ttl(request: web.Request) -> web.StreamResponse:
    status = _TTL_STATUS[request.match_info["op"]]
    note = request.query.get("note", "")
    _agent(request).state.ttl_update(request.match_info["id"], status, note, _authz(request))
    return _text(200, "")


async def agent_check_update(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    status = body.get("Status") or body.get("status") or ""
    if status not in (PASSING, WARNING, CRITICAL):
        raise BadRequest(f'Invalid check status: "{status}"')
    output = body.get("Output") or body.get("output") or ""
    if not isinstance(output, str):
        raise BadRequest("Request decode failed: Output must be a string")
    _agent(request).state.ttl_update(request.match_info["id"], status, output, _authz(request))
    return _text(200, "")


# -- connect: CA, leaf, authorize, legacy proxy config -----------------------------------


async def agent_roots(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    min_index = _index(request)
    wait = _wait(request, CACHE_WAIT)
    hit = min_index == 0
    await state.block_on_index(("roots",), min_index, wait, state.roots_index)
    return _json(
        request,
        state.roots(),
        index=state.roots_index(),
        headers={"X-Cache": "HIT" if hit else "MISS"},
    )


async def catalog_roots(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    await state.block_on_index(
        ("roots",), _index(request), _wait(request, DEFAULT_WAIT), state.roots_index
    )
    return _json(request, state.roots(), index=state.roots_index())


async def agent_leaf(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    service = request.match_info["service"]
    authz = _authz(request)
    min_index = _index(request)
    entry = state.leaf(service, authz)
    if min_index:
        await state.block_on_index(
            (f"leaf:{service}", "roots"),
            min_index,
            _wait(request, CACHE_WAIT),
            lambda: state.leaves[service].modify_index if service in state.leaves else 0,
        )
        entry = state.leaf(service, authz)
    return _json(request, entry.to_api(), index=entry.modify_index, headers={"X-Cache": "MISS"})


async def agent_authorize(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        data = json.loads(raw) if raw.strip() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Request decode failed: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("Request decode failed: the body must be a JSON object")
    try:
        body = decode.decode(data, decode.AUTHORIZE)
    except decode.DecodeError as exc:
        raise BadRequest(f"Request decode failed: {exc}") from exc
    state = _agent(request).state
    allowed, reason = state.authorize(
        body.get("Target") or "", body.get("ClientCertURI") or "", _authz(request)
    )
    return _json(request, {"Authorized": allowed, "Reason": reason}, headers={"X-Cache": "HIT"})


async def agent_managed_proxy(request: web.Request) -> web.StreamResponse:
    agent = _agent(request)
    state = agent.state
    proxy_id = request.match_info["id"]
    authz = _authz(request)
    config = state.managed_proxy_config(proxy_id, authz, agent.bind_address)
    last = request.query.get("hash", "")
    if last:
        await state.block_on_hash(
            ("services",),
            last,
            _wait(request, HASH_WAIT),
            lambda: state.managed_proxy_hash(proxy_id, agent.bind_address),
        )
        config = state.managed_proxy_config(proxy_id, authz, agent.bind_address)
    return _json(request, config, headers={"X-Consul-ContentHash": str(config["ContentHash"])})


async def ca_configuration(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    if request.method == "GET":
        _authz(request).require("operator", "", "read")
        return _json(request, state.ca_configuration())
    _authz(request).require("operator", "", "write")
    body = await _body(request, decode.CA_CONFIG)
    provider = body.get("Provider") or "consul"
    if provider != "consul":
        raise BadRequest(
            f'the dev agent only runs the built-in "consul" CA provider, not "{provider}"'
        )
    cfg = {k.replace("_", "").lower(): v for k, v in (body.get("Config") or {}).items()}
    if "leafcertttl" in cfg:
        try:
            ttl = parse_duration(str(cfg["leafcertttl"]))
        except ValueError as exc:
            raise BadRequest(f"Invalid LeafCertTTL: {exc}") from exc
        if ttl <= 0:
            raise BadRequest("LeafCertTTL must be positive")
        state.ca.leaf_ttl = ttl
    current = state.ca_configuration()["Config"]
    key_type = cfg.get("privatekeytype") or current["PrivateKeyType"]
    bits = int(cfg.get("privatekeybits") or current["PrivateKeyBits"])
    pem = cfg.get("privatekey") or None
    if (
        pem
        or key_type != current["PrivateKeyType"]
        or bits != current["PrivateKeyBits"]
        or cfg.get("rotate")
    ):
        state.rotate_ca(key_type=key_type, key_bits=bits, private_key_pem=pem)
    return _json(request, True)


# -- catalog and health ------------------------------------------------------------------


async def _health(request: web.Request, connect: bool) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    _consistency(request)
    name = request.match_info["service"]
    passing = _flag(request, "passing")
    tags = request.query.getall("tag", [])
    authz = _authz(request)
    await state.block_on_index(
        (state.health_topic(name, connect=connect),),
        _index(request),
        _wait(request, DEFAULT_WAIT),
        lambda: state.health_index(name, connect=connect),
    )
    entries = state.health_entries(name, authz, connect=connect, passing=passing, tags=tags)
    return _json(request, entries, index=state.health_index(name, connect=connect))


async def health_connect(request: web.Request) -> web.StreamResponse:
    return await _health(request, connect=True)


async def health_service(request: web.Request) -> web.StreamResponse:
    return await _health(request, connect=False)


async def _catalog(request: web.Request, connect: bool) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    _consistency(request)
    name = request.match_info["service"]
    authz = _authz(request)
    tags = request.query.getall("tag", [])
    await state.block_on_index(
        (state.health_topic(name, connect=connect),),
        _index(request),
        _wait(request, DEFAULT_WAIT),
        lambda: state.health_index(name, connect=connect),
    )
    out = []
    if authz.allowed("service", name, "read"):
        out = [
            state.catalog_entry(s)
            for s in state.services_named(name, connect=connect)
            if all(t in s["Tags"] for t in tags)
        ]
    return _json(request, out, index=state.health_index(name, connect=connect))


async def catalog_service(request: web.Request) -> web.StreamResponse:
    return await _catalog(request, connect=False)


async def catalog_connect(request: web.Request) -> web.StreamResponse:
    return await _catalog(request, connect=True)


async def catalog_services(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    authz = _authz(request)
    await state.block_on_index(
        ("services",),
        _index(request),
        _wait(request, DEFAULT_WAIT),
        lambda: state.index_of("services"),
    )
    out: dict[str, list[str]] = {"consul": []}
    for svc in state.services.values():
        if authz.allowed("service", svc["Service"], "read"):
            tags = out.setdefault(svc["Service"], [])
            tags.extend(t for t in svc["Tags"] if t not in tags)
    return _json(request, out, index=state.index_of("services"))


# -- prepared queries --------------------------------------------------------------------


async def query_collection(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    if request.method == "POST":
        body = await _body(request, decode.PREPARED_QUERY)
        return _json(request, {"ID": state.put_query(body, _authz(request))})
    authz = _authz(request)
    queries = [q for q in state.queries.values() if authz.allowed("query", q["Name"], "read")]
    return _json(request, queries, index=state.index_of("queries"))


async def query_item(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    query_id = request.match_info["id"]
    authz = _authz(request)
    if request.method == "GET":
        q = state.find_query(query_id)
        authz.require("query", q["Name"], "read")
        return _json(request, [q], index=state.index_of("queries"))
    if request.method == "PUT":
        body = await _body(request, decode.PREPARED_QUERY)
        state.put_query(body, authz, query_id=query_id)
        return _text(200, "")
    state.delete_query(query_id, authz)
    return _text(200, "")


async def query_execute(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    _check_dc(request)
    _consistency(request)
    connect = _flag(request, "connect")
    result = state.execute_query(request.match_info["id"], _authz(request), connect=connect)
    return _json(request, result, index=state.index_of("services", "checks", "queries"))


# -- intentions and config entries -------------------------------------------------------


async def intentions_collection(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    authz = _authz(request)
    if request.method == "POST":
        body = await _body(request, decode.INTENTION)
        return _json(request, {"ID": state.create_intention(body, authz)})
    await state.block_on_index(
        ("intentions",),
        _index(request),
        _wait(request, DEFAULT_WAIT),
        lambda: state.index_of("intentions", fallback="services"),
    )
    out = [
        i.to_api() for i in state.intentions() if authz.allowed("intention", i.destination, "read")
    ]
    return _json(request, out, index=state.index_of("intentions", fallback="services"))


def _exact_names(request: web.Request) -> tuple[str, str]:
    source = request.query.get("source", "")
    destination = request.query.get("destination", "")
    if not source:
        raise BadRequest("required query parameter 'source' not set")
    if not destination:
        raise BadRequest("required query parameter 'destination' not set")
    return source, destination


async def intentions_exact(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    authz = _authz(request)
    source, destination = _exact_names(request)
    if request.method == "PUT":
        body = await _body(request, decode.INTENTION)
        state.create_intention(body, authz, exact=(source, destination))
        return _json(request, True)
    if request.method == "DELETE":
        state.delete_intention(source, destination, authz)
        return _json(request, True)
    authz.require("intention", destination, "read")
    for ixn in state.intentions():
        if ixn.source == source and ixn.destination == destination:
            return _json(request, ixn.to_api(), index=state.index_of("intentions"))
    raise NotFound("Intention not found")


async def intentions_match(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    authz = _authz(request)
    by = request.query.get("by", "")
    if by not in ("source", "destination"):
        raise BadRequest("required query parameter 'by' must be 'source' or 'destination'")
    names = request.query.getall("name", [])
    if not names:
        raise BadRequest("required query parameter 'name' not set")
    out = {}
    for name in names:
        if by == "destination":
            matches = state.matching_intentions(name)
        else:
            matches = [i for i in state.intentions() if i.source in (name, "*")]
        out[name] = [
            i.to_api() for i in matches if authz.allowed("intention", i.destination, "read")
        ]
    return _json(request, out, index=state.index_of("intentions", fallback="services"))


async def intentions_check(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    authz = _authz(request)
    source, destination = _exact_names(request)
    authz.require("intention", destination, "read")
    allowed, _ = state.intention_decision(source, destination, authz)
    return _json(request, {"Allowed": allowed})


async def intention_item(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    authz = _authz(request)
    intention_id = request.match_info["id"]
    ixn = state.find_intention(intention_id)
    if request.method == "GET":
        authz.require("intention", ixn.destination, "read")
        return _json(request, ixn.to_api(), index=state.index_of("intentions"))
    if request.method == "PUT":
        body = await _body(request, decode.INTENTION)
        state.update_intention(intention_id, body, authz)
        return _text(200, "")
    state.delete_intention(ixn.source, ixn.destination, authz)
    return _json(request, True)


async def config_put(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    raw = await _body(request)
    entry = (
        decode.decode(raw, decode.CONFIG_ENTRY)
        if str(raw.get("Kind") or raw.get("kind")) == "service-intentions"
        else {
            **raw,
            "Kind": raw.get("Kind") or raw.get("kind"),
            "Name": raw.get("Name") or raw.get("name"),
        }
    )
    entry.pop("kind", None)
    entry.pop("name", None)
    state.put_config_entry(entry, _authz(request))
    return _json(request, True)


async def config_kind(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    kind = request.match_info["kind"]
    entries = [state.config_entry(k, n) for (k, n) in sorted(state.config_entries) if k == kind]
    return _json(request, entries, index=state.index_of(f"config:{kind}", fallback="services"))


async def config_item(request: web.Request) -> web.StreamResponse:
    state = _agent(request).state
    kind, name = request.match_info["kind"], request.match_info["name"]
    if request.method == "DELETE":
        state.delete_config_entry(kind, name, _authz(request))
        return _json(request, True)
    return _json(
        request,
        state.config_entry(kind, name),
        index=state.index_of(f"config:{kind}", fallback="services"),
    )


# -- status and ACL ----------------------------------------------------------------------


async def status_leader(request: web.Request) -> web.StreamResponse:
    return _json(request, f"{_agent(request).state.node_address}:8300")


async def status_peers(request: web.Request) -> web.StreamResponse:
    return _json(request, [f"{_agent(request).state.node_address}:8300"])


def _acl_enabled(request: web.Request) -> None:
    if not _agent(request).state.acl.enabled:
        raise StateError("ACL support disabled", status=401)


async def acl_token_self(request: web.Request) -> web.StreamResponse:
    _acl_enabled(request)
    acl = _agent(request).state.acl
    acl.resolve(_secret(request))  # raises ACLNotFound
    token = acl.token_for_secret(_secret(request))
    if token is None:
        raise ACLNotFound
    return _json(request, token.to_api(acl.policies))


async def acl_token_create(request: web.Request) -> web.StreamResponse:
    _acl_enabled(request)
    body = await _body(request, decode.ACL_TOKEN)
    return _json(request, _agent(request).state.create_token(body, _authz(request)))


async def acl_policy_create(request: web.Request) -> web.StreamResponse:
    _acl_enabled(request)
    body = await _body(request, decode.ACL_POLICY)
    return _json(request, _agent(request).state.create_policy(body, _authz(request)))


def _route(app: web.Application, methods: tuple[str, ...], path: str, handler: Handler) -> None:
    """Serve `path` for every method, answering Consul's 405 for the ones not in `methods`.

    Registering all methods keeps a fixed path such as `/v1/agent/service/register` from
    falling through to a `{id}` pattern when the method is wrong.
    """
    allowed = ", ".join(methods)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        if request.method not in methods:
            return _text(405, f"method {request.method} not allowed", {"Allow": allowed})
        return await handler(request)

    app.router.add_route("*", path, dispatch)


def create_app(agent: DevAgent) -> web.Application:
    """The aiohttp application serving `agent`'s HTTP API."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[AGENT_KEY] = agent
    get, put, post = ("GET",), ("PUT",), ("POST",)
    routes: list[tuple[tuple[str, ...], str, Handler]] = [
        # Fixed paths first: they must win over the `{id}` patterns beside them.
        (get, "/v1/agent/self", agent_self),
        (get, "/v1/agent/services", agent_services),
        (put, "/v1/agent/service/register", agent_register),
        (put, "/v1/agent/service/deregister/{id}", agent_deregister),
        (get, "/v1/agent/service/{id}", agent_service),
        (get, "/v1/agent/checks", agent_checks),
        (put, "/v1/agent/check/register", agent_check_register),
        (put, "/v1/agent/check/deregister/{id}", agent_check_deregister),
        (put, "/v1/agent/check/update/{id}", agent_check_update),
        (put, "/v1/agent/check/{op:pass|warn|fail}/{id}", agent_check_ttl),
        (get, "/v1/agent/connect/ca/roots", agent_roots),
        (get, "/v1/agent/connect/ca/leaf/{service}", agent_leaf),
        (post, "/v1/agent/connect/authorize", agent_authorize),
        (get, "/v1/agent/connect/proxy/{id}", agent_managed_proxy),
        (get, "/v1/connect/ca/roots", catalog_roots),
        (("GET", "PUT"), "/v1/connect/ca/configuration", ca_configuration),
        (get, "/v1/health/connect/{service}", health_connect),
        (get, "/v1/health/service/{service}", health_service),
        (get, "/v1/catalog/services", catalog_services),
        (get, "/v1/catalog/service/{service}", catalog_service),
        (get, "/v1/catalog/connect/{service}", catalog_connect),
        (("GET", "POST"), "/v1/query", query_collection),
        (get, "/v1/query/{id}/execute", query_execute),
        (("GET", "PUT", "DELETE"), "/v1/query/{id}", query_item),
        (("GET", "POST"), "/v1/connect/intentions", intentions_collection),
        (("GET", "PUT", "DELETE"), "/v1/connect/intentions/exact", intentions_exact),
        (get, "/v1/connect/intentions/match", intentions_match),
        (get, "/v1/connect/intentions/check", intentions_check),
        (("GET", "PUT", "DELETE"), "/v1/connect/intentions/{id}", intention_item),
        (put, "/v1/config", config_put),
        (get, "/v1/config/{kind}", config_kind),
        (("GET", "DELETE"), "/v1/config/{kind}/{name}", config_item),
        (get, "/v1/status/leader", status_leader),
        (get, "/v1/status/peers", status_peers),
        (get, "/v1/acl/token/self", acl_token_self),
        (put, "/v1/acl/token", acl_token_create),
        (put, "/v1/acl/policy", acl_policy_create),
    ]
    for methods, path, handler in routes:
        _route(app, methods, path, handler)
    return app
