"""Routes of Connect: CA roots and configuration, leaves, authorize, legacy proxy config.

Rule 1: routes only; a handler reads the request, calls the table that owns the data, and
renders its answer (see `wire`).
"""

from __future__ import annotations

from aiohttp import web

from proxy.devagent import schemas
from proxy.devagent.http import wire


async def agent_roots(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    min_index = wire.index(request)
    timeout = wire.wait(request, wire.CACHE_WAIT)
    hit = min_index == 0
    watch = state.connect_ca.roots_watch()
    await state.block_on_index(watch, min_index, timeout)
    return wire.answer(
        request,
        state.connect_ca.roots(),
        index=watch.current(),
        headers={"X-Cache": "HIT" if hit else "MISS"},
    )


async def catalog_roots(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    wire.check_dc(request)
    watch = state.connect_ca.roots_watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    return wire.answer(request, state.connect_ca.roots(), index=watch.current())


async def agent_leaf(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    service = request.match_info["service"]
    authz = wire.authz(request)
    min_index = wire.index(request)
    entry = state.connect_ca.leaf(service, authz)
    if min_index:
        await state.block_on_index(
            state.connect_ca.leaf_watch(service), min_index, wire.wait(request, wire.CACHE_WAIT)
        )
        entry = state.connect_ca.leaf(service, authz)
    return wire.answer(
        request, entry.to_api(), index=entry.modify_index, headers={"X-Cache": "MISS"}
    )


async def agent_authorize(request: web.Request) -> web.StreamResponse:
    body = await wire.body(request, schemas.AUTHORIZE)
    allowed, reason = wire.state_of(request).intentions.authorize(
        body.get("Target") or "", body.get("ClientCertURI") or "", wire.authz(request)
    )
    return wire.answer(
        request, {"Authorized": allowed, "Reason": reason}, headers={"X-Cache": "HIT"}
    )


async def agent_managed_proxy(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    bind_address = wire.settings_of(request).bind_address
    proxy_id = request.match_info["id"]
    authz = wire.authz(request)
    config = state.catalog.managed_proxy_config(proxy_id, authz, bind_address)
    last = request.query.get("hash", "")
    if last:
        await state.block_on_hash(
            state.catalog.managed_proxy_watch(proxy_id, bind_address),
            last,
            wire.wait(request, wire.HASH_WAIT),
        )
        config = state.catalog.managed_proxy_config(proxy_id, authz, bind_address)
    return wire.answer(
        request, config, headers={"X-Consul-ContentHash": str(config["ContentHash"])}
    )


async def ca_configuration(request: web.Request) -> web.StreamResponse:
    connect_ca = wire.state_of(request).connect_ca
    if request.method == "GET":
        wire.authz(request).require("operator", "", "read")
        return wire.answer(request, connect_ca.configuration())
    wire.authz(request).require("operator", "", "write")
    connect_ca.update_configuration(await wire.body(request, schemas.CA_CONFIG))
    return wire.answer(request, True)
