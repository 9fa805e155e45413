"""Routes of sessions (`/v1/session/*`) and user events (`/v1/event/*`).

Sessions follow Consul's `agent/session_endpoint.go`: create answers `{"ID": ...}`,
destroy `true`, renew `[session]` (404 "Session id '...' not found" for an unknown one);
info, node and list answer arrays (empty, never null) with the blocking-query headers.
Events follow `agent/event_endpoint.go`: fire answers the event; list answers the ring and
blocks while its index (Consul's xor of the last event ID's halves) equals `?index=`.

Rule 1: routes only; a handler reads the request, calls the table that owns the data, and
renders its answer (see `wire`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy.devagent import schemas
from proxy.devagent.acl import Authorizer
from proxy.devagent.http import wire
from proxy.devagent.state import BadRequest
from proxy.devagent.state.events import Events
from proxy.devagent.state.sessions import Sessions
from proxy.goflags import parse_duration

SessionRead = Callable[[Sessions, Authorizer], tuple[list[dict[str, Any]], bool]]


def _required(request: web.Request, name: str, missing: str) -> str:
    value = request.match_info.get(name, "")
    if not value:
        raise BadRequest(missing)
    return value


async def session_create(request: web.Request) -> web.StreamResponse:
    wire.check_dc(request)
    # As Consul, a body is read only when the request announces one.
    body = await wire.body(request, schemas.SESSION) if request.content_length else None
    session_id = wire.state_of(request).sessions.create(body, wire.authz(request))
    return wire.answer(request, {"ID": session_id})


async def session_destroy(request: web.Request) -> web.StreamResponse:
    wire.check_dc(request)
    session_id = _required(request, "id", "Missing session")
    wire.state_of(request).sessions.destroy(session_id, wire.authz(request))
    return wire.answer(request, True)


async def session_renew(request: web.Request) -> web.StreamResponse:
    wire.check_dc(request)
    session_id = _required(request, "id", "Missing session")
    renewed = wire.state_of(request).sessions.renew(session_id, wire.authz(request))
    if renewed is None:
        return wire.text(404, f"Session id '{session_id}' not found")
    return wire.answer(request, renewed)


async def session_info(request: web.Request) -> web.StreamResponse:
    session_id = _required(request, "id", "Missing session")
    return await _session_read(request, lambda s, a: s.info(session_id, a))


async def session_node(request: web.Request) -> web.StreamResponse:
    node = _required(request, "node", "Missing node name")
    return await _session_read(request, lambda s, a: s.node_sessions(node, a))


async def session_list(request: web.Request) -> web.StreamResponse:
    return await _session_read(request, lambda s, a: s.all_sessions(a))


async def _session_read(request: web.Request, read: SessionRead) -> web.StreamResponse:
    state = wire.state_of(request)
    wire.check_dc(request)
    wire.consistency(request)
    authz = wire.authz(request)
    watch = state.sessions.watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    sessions, filtered = read(state.sessions, authz)
    return wire.answer(
        request, sessions, index=watch.current(), headers=wire.filtered_header(request, filtered)
    )


async def event_fire(request: web.Request) -> web.StreamResponse:
    wire.check_dc(request)
    name = _required(request, "name", "Missing name")
    query = request.query
    payload = await request.read() if request.content_length else None
    event = wire.state_of(request).events.fire(
        name,
        payload,
        wire.authz(request),
        node_filter=query.get("node", ""),
        service_filter=query.get("service", ""),
        tag_filter=query.get("tag", ""),
    )
    return wire.answer(request, event.to_api())


def _event_wait(request: web.Request) -> float:
    # The agent-local event list has no jitter: `?wait` capped at the maximum, which is
    # also the default once `?index` is given.
    raw = request.query.get("wait", "")
    if not raw:
        return wire.MAX_WAIT
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise BadRequest("Invalid wait time") from exc
    return min(value, wire.MAX_WAIT) if value > 0 else wire.MAX_WAIT


async def event_list(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    min_index = wire.index(request)
    timeout = _event_wait(request)
    authz = wire.authz(request)
    name = request.query.get("name", "")

    def current() -> int:
        return Events.index_of(state.events.recent(name, authz)[0])

    if min_index > 0 and current() == min_index:
        await state.notifier.wait_until(("events",), lambda: current() != min_index, timeout)
    events, filtered = state.events.recent(name, authz)
    headers = {"X-Consul-Index": str(Events.index_of(events))}
    headers.update(wire.filtered_header(request, filtered))
    return wire.answer(request, [e.to_api() for e in events], headers=headers)
