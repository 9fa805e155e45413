"""Routes of intentions (`/v1/connect/intentions/*`) and config entries (`/v1/config/*`).

Rule 1: routes only; a handler reads the request, calls the table that owns the data, and
renders its answer (see `wire`).
"""

from __future__ import annotations

from aiohttp import web

from proxy.devagent import decode, schemas
from proxy.devagent.http import wire
from proxy.devagent.state import BadRequest


async def intentions_collection(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    authz = wire.authz(request)
    if request.method == "POST":
        body = await wire.body(request, schemas.INTENTION)
        return wire.answer(request, {"ID": state.intentions.create(body, authz)})
    watch = state.intentions.watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    return wire.answer(request, state.intentions.readable(authz), index=watch.current())


def _exact_names(request: web.Request) -> tuple[str, str]:
    source = request.query.get("source", "")
    destination = request.query.get("destination", "")
    if not source:
        raise BadRequest("required query parameter 'source' not set")
    if not destination:
        raise BadRequest("required query parameter 'destination' not set")
    return source, destination


async def intentions_exact(request: web.Request) -> web.StreamResponse:
    intentions = wire.state_of(request).intentions
    authz = wire.authz(request)
    source, destination = _exact_names(request)
    if request.method == "PUT":
        body = await wire.body(request, schemas.INTENTION)
        intentions.create(body, authz, exact=(source, destination))
        return wire.answer(request, True)
    if request.method == "DELETE":
        intentions.delete(source, destination, authz)
        return wire.answer(request, True)
    ixn = intentions.exact(source, destination, authz)
    return wire.answer(request, ixn.to_api(), index=intentions.index())


async def intentions_match(request: web.Request) -> web.StreamResponse:
    intentions = wire.state_of(request).intentions
    authz = wire.authz(request)
    by = request.query.get("by", "")
    if by not in ("source", "destination"):
        raise BadRequest("required query parameter 'by' must be 'source' or 'destination'")
    names = request.query.getall("name", [])
    if not names:
        raise BadRequest("required query parameter 'name' not set")
    state = wire.state_of(request)
    watch = intentions.watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    return wire.answer(request, intentions.match(by, names, authz), index=watch.current())


async def intentions_check(request: web.Request) -> web.StreamResponse:
    intentions = wire.state_of(request).intentions
    authz = wire.authz(request)
    source, destination = _exact_names(request)
    return wire.answer(request, {"Allowed": intentions.check(source, destination, authz)})


async def intention_item(request: web.Request) -> web.StreamResponse:
    intentions = wire.state_of(request).intentions
    authz = wire.authz(request)
    intention_id = request.match_info["id"]
    ixn = intentions.find(intention_id)
    if request.method == "GET":
        authz.require("intention", ixn.destination, "read")
        return wire.answer(request, ixn.to_api(), index=intentions.index())
    if request.method == "PUT":
        body = await wire.body(request, schemas.INTENTION)
        intentions.update(intention_id, body, authz)
        return wire.text(200, "")
    intentions.delete(ixn.source, ixn.destination, authz)
    return wire.answer(request, True)


async def config_put(request: web.Request) -> web.StreamResponse:
    raw = await wire.body(request)
    kind = str(raw.get("Kind") or raw.get("kind"))
    entry = (
        decode.decode(raw, schemas.CONFIG_ENTRY)
        if kind == "service-intentions"
        else decode.decode(raw, schemas.EXPORTED_SERVICES)
        if kind == "exported-services"
        else {
            **raw,
            "Kind": raw.get("Kind") or raw.get("kind"),
            "Name": raw.get("Name") or raw.get("name"),
        }
    )
    entry.pop("kind", None)
    entry.pop("name", None)
    written = wire.state_of(request).config_entries.put(
        entry, wire.authz(request), cas=wire.cas(request)
    )
    return wire.answer(request, written)


async def config_kind(request: web.Request) -> web.StreamResponse:
    entries = wire.state_of(request).config_entries
    kind = request.match_info["kind"]
    return wire.answer(request, entries.of_kind(kind), index=entries.kind_index(kind))


async def config_item(request: web.Request) -> web.StreamResponse:
    entries = wire.state_of(request).config_entries
    kind, name = request.match_info["kind"], request.match_info["name"]
    if request.method == "DELETE":
        cas = wire.cas(request)
        deleted = entries.delete(kind, name, wire.authz(request), cas=cas)
        # Consul answers the outcome only to a CAS delete; a plain one gets an empty object.
        return wire.answer(request, deleted if cas is not None else {})
    return wire.answer(request, entries.get(kind, name), index=entries.kind_index(kind))
