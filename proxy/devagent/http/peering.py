"""Routes of cluster peering: `/v1/peering/*`, `/v1/peerings`, and the dev agent's bundle read.

Consul's `agent/peering_endpoint.go`: token and establish take a JSON body ("The peering
arguments must be provided in the body", "Body decoding failed: ..."), read answers the
peering or 404 `Peering not found for "<name>"`, list an array, delete 200 with no body.
The peer's trust bundle is served by Consul only over gRPC (`TrustBundleRead`); the dev
agent adds `GET /v1/internal/connect-proxy/peering/trust-bundle/<peer>` (ours, not
Consul's; blocking on `?index=`; needs service:write on any service, as Consul's read) so a
proxy can watch it over HTTP.

Rule 1: routes only. What happens on the wire between two agents (the secret exchange, the
stream) is the agent's `PeeringRuntime` (`devagent/peerlink.py`), reached through the app.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from proxy.devagent.acl import Authorizer, PermissionDenied
from proxy.devagent.http import wire
from proxy.devagent.peertoken import PeeringToken
from proxy.devagent.state import BadRequest, StateError
from proxy.devagent.state.peering_records import Peering

_TOKEN_FIELDS = ("PeerName", "Partition", "Meta", "ServerExternalAddresses")
_ESTABLISH_FIELDS = ("PeerName", "PeeringToken", "Partition", "Meta")


class PeeringRuntime(Protocol):
    """The agent's peering side that the routes need (`peerlink.PeerLink`)."""

    def server_addresses(self) -> list[str]: ...

    async def establish(self, peering: Peering, token: PeeringToken) -> None: ...

    async def deleted(self, name: str) -> None: ...


class _NoRuntime:
    def server_addresses(self) -> list[str]:
        return []

    async def establish(self, peering: Peering, token: PeeringToken) -> None:
        raise StateError("TLS for gRPC must be enabled to establish peerings")

    async def deleted(self, name: str) -> None:
        return None


RUNTIME_KEY: web.AppKey[PeeringRuntime] = web.AppKey("peering", PeeringRuntime)


def runtime_of(request: web.Request) -> PeeringRuntime:
    return request.app.get(RUNTIME_KEY) or _NoRuntime()


async def _body(request: web.Request, fields: tuple[str, ...]) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("The peering arguments must be provided in the body")
    try:
        data = wire.load_json(raw)
    except BadRequest as exc:
        raise BadRequest(
            "Body decoding failed: " + str(exc).removeprefix("Request decode failed: ")
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("Body decoding failed: json: cannot unmarshal into a request object")
    by_lower = {f.lower(): f for f in fields}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = by_lower.get(str(key).lower().replace("_", ""))
        if name is not None:
            out[name] = value
    for key in ("PeerName", "PeeringToken", "Partition"):
        if key in out and not isinstance(out[key], str | type(None)):
            raise BadRequest(f"Body decoding failed: json: cannot unmarshal into field {key}")
    meta = out.get("Meta")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise BadRequest("Body decoding failed: json: cannot unmarshal into field Meta")
    addrs = out.get("ServerExternalAddresses")
    if addrs is not None and (
        not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs)
    ):
        raise BadRequest(
            "Body decoding failed: json: cannot unmarshal into field ServerExternalAddresses"
        )
    return out


async def peering_token(request: web.Request) -> web.StreamResponse:
    body = await _body(request, _TOKEN_FIELDS)
    state = wire.state_of(request)
    token = state.peerings.generate_token(
        body,
        wire.authz(request),
        server_addresses=runtime_of(request).server_addresses(),
        partition=request.query.get("partition", ""),
    )
    return wire.answer(request, {"PeeringToken": token})


async def peering_establish(request: web.Request) -> web.StreamResponse:
    body = await _body(request, _ESTABLISH_FIELDS)
    state = wire.state_of(request)
    peering, token = state.peerings.prepare_establish(
        body, wire.authz(request), partition=request.query.get("partition", "")
    )
    await runtime_of(request).establish(peering, token)
    return wire.answer(request, {})


async def peering_item(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    name = request.match_info["name"]
    partition = request.query.get("partition", "")
    authz = wire.authz(request)
    if request.method == "DELETE":
        if state.peerings.mark_deleting(name, authz, partition=partition) is not None:
            await runtime_of(request).deleted(name)
        return wire.answer(request, {})
    watch = state.peerings.watch(name)
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    return wire.answer(
        request, state.peerings.read(name, authz, partition=partition), index=watch.current()
    )


async def peering_list(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    authz = wire.authz(request)
    watch = state.peerings.watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    partition = request.query.get("partition", "")
    return wire.answer(
        request, state.peerings.list_all(authz, partition=partition), index=watch.current()
    )


def _any_service_write(authz: Authorizer) -> bool:
    if not authz.enabled or authz.management or authz.default_allow:
        return True
    rules = [
        *authz.rules.exact.get("service", {}).values(),
        *authz.rules.prefix.get("service", {}).values(),
    ]
    return any(r.level == "write" for r in rules)


async def service_trust_bundles(request: web.Request) -> web.StreamResponse:
    """Ours: the bundles of the peers `?service=` is exported to, blocking (Consul's gRPC
    `TrustBundleListByService`, which needs service:write on that service)."""
    state = wire.state_of(request)
    service = request.query.get("service", "")
    if not service:
        raise BadRequest("Missing service name: ?service=<name> is required")
    authz = wire.authz(request)
    authz.require("service", service, "write")
    watch = state.peerings.service_bundles_watch()
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    bundles = state.peerings.bundles_for_service(service, state.config_entries.entries)
    return wire.answer(request, [b.to_api() for b in bundles], index=watch.current())


async def trust_bundle(request: web.Request) -> web.StreamResponse:
    """Ours: a peer's trust bundle (`pbpeering.PeeringTrustBundle` as JSON), blocking."""
    state = wire.state_of(request)
    peer = request.match_info["peer"]
    authz = wire.authz(request)
    # Consul's TrustBundleRead needs service:write on any service.
    if not _any_service_write(authz):
        raise PermissionDenied(authz.accessor, "service", "write", None)
    watch = state.peerings.bundle_watch(peer)
    await state.block_on_index(watch, wire.index(request), wire.wait(request, wire.DEFAULT_WAIT))
    bundle = state.peerings.bundle(peer)
    return wire.answer(request, bundle.to_api(), index=watch.current())
