"""Routes of the catalog: `/v1/catalog/*`, `/v1/health/*` and prepared queries `/v1/query/*`.

Rule 1: routes only; a handler reads the request, calls the table that owns the data, and
renders its answer (see `wire`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.devagent import schemas
from proxy.devagent.http import wire


async def _health(request: web.Request, connect: bool) -> web.StreamResponse:
    state = wire.state_of(request)
    wire.check_dc(request)
    wire.consistency(request)
    name = request.match_info["service"]
    passing = wire.flag(request, "passing")
    tags = request.query.getall("tag", [])
    authz = wire.authz(request)
    peer = request.query.get("peer", "")
    if peer:
        watch = state.peerings.imports_watch(peer, name, connect=connect)
    else:
        watch = state.catalog.service_watch(name, connect=connect)
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    if peer:
        entries = [
            e
            for e in state.peerings.imported_entries(peer, name, authz, connect=connect)
            if all(t in (e["Service"].get("Tags") or []) for t in tags)
            and not (passing and any(c["Status"] != "passing" for c in e["Checks"]))
        ]
    else:
        entries = state.catalog.health_entries(
            name, authz, connect=connect, passing=passing, tags=tags
        )
    return wire.answer(request, entries, index=watch.current())


async def health_connect(request: web.Request) -> web.StreamResponse:
    return await _health(request, connect=True)


async def health_service(request: web.Request) -> web.StreamResponse:
    return await _health(request, connect=False)


async def _catalog(request: web.Request, connect: bool) -> web.StreamResponse:
    state = wire.state_of(request)
    wire.check_dc(request)
    wire.consistency(request)
    name = request.match_info["service"]
    authz = wire.authz(request)
    tags = request.query.getall("tag", [])
    peer = request.query.get("peer", "")
    if peer:
        watch = state.peerings.imports_watch(peer, name, connect=connect)
    else:
        watch = state.catalog.service_watch(name, connect=connect)
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    if peer:
        entries = [
            _catalog_of(e)
            for e in state.peerings.imported_entries(peer, name, authz, connect=connect)
            if all(t in (e["Service"].get("Tags") or []) for t in tags)
        ]
    else:
        entries = state.catalog.catalog_entries(name, authz, connect=connect, tags=tags)
    return wire.answer(request, entries, index=watch.current())


def _catalog_of(entry: dict[str, Any]) -> dict[str, Any]:
    """An imported health entry as a flat `/v1/catalog/service` entry (`ServiceNode`)."""
    node, svc = entry["Node"], entry["Service"]
    return {
        "ID": node.get("ID", ""),
        "Node": node.get("Node", ""),
        "Address": node.get("Address", ""),
        "Datacenter": node.get("Datacenter", ""),
        "TaggedAddresses": node.get("TaggedAddresses"),
        "NodeMeta": node.get("Meta"),
        "ServiceKind": svc.get("Kind", ""),
        "ServiceID": svc.get("ID", ""),
        "ServiceName": svc.get("Service", ""),
        "ServiceTags": svc.get("Tags"),
        "ServiceAddress": svc.get("Address", ""),
        "ServiceTaggedAddresses": svc.get("TaggedAddresses"),
        "ServiceWeights": svc.get("Weights"),
        "ServiceMeta": svc.get("Meta"),
        "ServicePort": svc.get("Port", 0),
        "ServiceSocketPath": svc.get("SocketPath", ""),
        "ServiceEnableTagOverride": svc.get("EnableTagOverride", False),
        "ServiceProxy": svc.get("Proxy", {"MeshGateway": {}, "Expose": {}}),
        "ServiceConnect": svc.get("Connect", {}),
        "PeerName": svc.get("PeerName", ""),
        "CreateIndex": svc.get("CreateIndex", 0),
        "ModifyIndex": svc.get("ModifyIndex", 0),
    }


async def catalog_service(request: web.Request) -> web.StreamResponse:
    return await _catalog(request, connect=False)


async def catalog_connect(request: web.Request) -> web.StreamResponse:
    return await _catalog(request, connect=True)


async def catalog_services(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    wire.check_dc(request)
    authz = wire.authz(request)
    watch = state.catalog.services_watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    return wire.answer(request, state.catalog.service_tags(authz), index=watch.current())


async def query_collection(request: web.Request) -> web.StreamResponse:
    queries = wire.state_of(request).queries
    wire.check_dc(request)
    if request.method == "POST":
        body = await wire.body(request, schemas.PREPARED_QUERY)
        return wire.answer(request, {"ID": queries.put(body, wire.authz(request))})
    return wire.answer(request, queries.readable(wire.authz(request)), index=queries.index())


async def query_item(request: web.Request) -> web.StreamResponse:
    queries = wire.state_of(request).queries
    wire.check_dc(request)
    query_id = request.match_info["id"]
    authz = wire.authz(request)
    if request.method == "GET":
        return wire.answer(request, [queries.get(query_id, authz)], index=queries.index())
    if request.method == "PUT":
        body = await wire.body(request, schemas.PREPARED_QUERY)
        queries.put(body, authz, query_id=query_id)
        return wire.text(200, "")
    queries.delete(query_id, authz)
    return wire.text(200, "")


async def query_execute(request: web.Request) -> web.StreamResponse:
    queries = wire.state_of(request).queries
    wire.check_dc(request)
    wire.consistency(request)
    connect = wire.flag(request, "connect")
    result = queries.execute(request.match_info["id"], wire.authz(request), connect=connect)
    return wire.answer(request, result, index=queries.execute_index())
