"""Routes of the KV store: `GET|PUT|DELETE /v1/kv/:key` (Consul's `agent/kvs_endpoint.go`).

GET answers `[entry]` (`?recurse`: every entry under the prefix; `?keys`: key names, cut at
`?separator`; `?raw`: the bare value), blocking on `?index=`; a miss is a 404 with the
index headers and no body. PUT answers `true`/`false` (`?cas`, `?acquire`, `?release`,
`?flags`); DELETE answers `true`/`false` (`?recurse`, `?cas`). A leading `/` of the key is
dropped, as Consul's path cleaning does.

Rule 1: routes only; a handler reads the request, calls the KV table, and renders its
answer (see `wire`).
Rule 2: a value is read in bounded chunks and refused with Consul's 413 past 512 KiB, so a
client cannot make the agent buffer more than that.
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from proxy.devagent.http import wire
from proxy.devagent.state import BadRequest
from proxy.devagent.state.kv import MAX_VALUE_SIZE

_RAW_HEADERS = {
    "Content-Type": "text/plain",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox",
}


def _key(request: web.Request) -> str:
    return request.match_info["key"].lstrip("/")


def _conflicting(request: web.Request, *names: str) -> web.Response | None:
    """Consul's 400 for two flags that do not compose (`cas` with `acquire`, ...)."""
    if sum(name in request.query for name in names) < 2:
        return None
    encoded = urlencode(sorted(request.query.items(), key=lambda kv: kv[0]))
    return wire.text(400, f"Conflicting flags: {encoded}")


def _too_large(size: int) -> web.Response:
    return wire.text(
        413,
        f"Request body({size} bytes) too large, max size: {MAX_VALUE_SIZE} bytes. See "
        "https://www.consul.io/docs/agent/config/config-files#kv_max_value_size.",
    )


async def _read_value(request: web.Request) -> bytes | web.Response:
    """The request body, or the 413 answer once it passes `MAX_VALUE_SIZE`."""
    length = request.content_length
    if length is not None and length > MAX_VALUE_SIZE:
        return _too_large(length)
    chunks: list[bytes] = []
    size = 0
    # Bounded: each pass consumes a chunk and the total is capped.
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > MAX_VALUE_SIZE:
            return _too_large(size)
        chunks.append(chunk)
    return b"".join(chunks)


async def kv_item(request: web.Request) -> web.StreamResponse:
    wire.check_dc(request)
    if request.method == "GET":
        wire.consistency(request)
        if "keys" in request.query:
            return await _get_keys(request)
        return await _get(request)
    if request.method == "PUT":
        return await _put(request)
    return await _delete(request)


async def _get(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    key = _key(request)
    recurse = "recurse" in request.query
    if not recurse and not key:
        raise BadRequest("Missing key name")
    authz = wire.authz(request)
    min_index, timeout = wire.index(request), wire.wait(request, wire.DEFAULT_WAIT)
    if recurse:
        watch = state.kv.prefix_watch(key)
        await state.block_on_index(watch, min_index, timeout)
        entries = state.kv.list_prefix(key, authz)
        if not entries:
            return wire.empty(404, wire.meta_headers(watch.current()))
        return wire.answer(request, [e.to_api() for e in entries], index=watch.current())
    authz.require("key", key, "read")
    watch = state.kv.key_watch(key)
    await state.block_on_index(watch, min_index, timeout)
    entry = state.kv.get(key, authz)
    index = watch.current()
    if entry is None:
        return wire.empty(404, wire.meta_headers(index))
    if "raw" in request.query:
        return web.Response(
            body=entry.value or b"", headers={**wire.meta_headers(index), **_RAW_HEADERS}
        )
    return wire.answer(request, [entry.to_api()], index=index)


async def _get_keys(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    prefix = _key(request)
    # Consul reads the historic misspelling too; `separator` wins when both are given.
    separator = request.query.get("separator", request.query.get("seperator", ""))
    authz = wire.authz(request)
    watch = state.kv.prefix_watch(prefix)
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    keys = state.kv.keys(prefix, separator, authz)
    if not keys and prefix:
        return wire.empty(404, wire.meta_headers(watch.current()))
    return wire.answer(request, keys, index=watch.current())


async def _put(request: web.Request) -> web.StreamResponse:
    key = _key(request)
    if not key:
        raise BadRequest("Missing key name")
    conflict = _conflicting(request, "cas", "acquire", "release")
    if conflict is not None:
        return conflict
    query = request.query
    flags = wire.parse_uint(query["flags"]) if "flags" in query else 0
    cas = wire.parse_uint(query["cas"]) if "cas" in query else None
    value = await _read_value(request)
    if isinstance(value, web.Response):
        return value
    done = wire.state_of(request).kv.put(
        key,
        value,
        wire.authz(request),
        flags=flags,
        cas=cas,
        acquire=query.get("acquire"),
        release=query.get("release"),
    )
    return wire.answer(request, done)


async def _delete(request: web.Request) -> web.StreamResponse:
    key = _key(request)
    conflict = _conflicting(request, "recurse", "cas")
    if conflict is not None:
        return conflict
    recurse = "recurse" in request.query
    if not recurse and not key:
        raise BadRequest("Missing key name")
    cas = wire.parse_uint(request.query["cas"]) if "cas" in request.query else None
    done = wire.state_of(request).kv.delete(key, wire.authz(request), recurse=recurse, cas=cas)
    return wire.answer(request, done)
