"""The dev agent's aiohttp application: the one route table, Consul's 405s, error rendering.

Rule 1: every route of the agent is a row of `ROUTES`; the route modules hold only handlers.
Rule 2: nothing a client sends can crash the server: every handler failure becomes a status
code with a plain-text body, as Consul's, and an unexpected one is logged (never a token).
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.devagent import decode
from proxy.devagent.acl import ACLNotFound, PermissionDenied, PolicyError
from proxy.devagent.cakeys import CAError
from proxy.devagent.http import (
    acl,
    agent,
    catalog,
    connect,
    intentions,
    kv,
    peering,
    session,
    wire,
)
from proxy.devagent.http.wire import Handler, Settings
from proxy.devagent.state import State, StateError

log = logging.getLogger("devagent.http")

_GET, _PUT, _POST = ("GET",), ("PUT",), ("POST",)

ROUTES: list[tuple[tuple[str, ...], str, Handler]] = [
    # Fixed paths first: they must win over the `{id}` patterns beside them.
    (_GET, "/v1/agent/self", agent.agent_self),
    (_GET, "/v1/agent/services", agent.agent_services),
    (_PUT, "/v1/agent/service/register", agent.agent_register),
    (_PUT, "/v1/agent/service/deregister/{id}", agent.agent_deregister),
    (_GET, "/v1/agent/service/{id}", agent.agent_service),
    (_GET, "/v1/agent/checks", agent.agent_checks),
    (_PUT, "/v1/agent/check/register", agent.agent_check_register),
    (_PUT, "/v1/agent/check/deregister/{id}", agent.agent_check_deregister),
    (_PUT, "/v1/agent/check/update/{id}", agent.agent_check_update),
    (_PUT, "/v1/agent/check/{op:pass|warn|fail}/{id}", agent.agent_check_ttl),
    (_GET, "/v1/agent/connect/ca/roots", connect.agent_roots),
    (_GET, "/v1/agent/connect/ca/leaf/{service}", connect.agent_leaf),
    (_POST, "/v1/agent/connect/authorize", connect.agent_authorize),
    (_GET, "/v1/agent/connect/proxy/{id}", connect.agent_managed_proxy),
    (_GET, "/v1/connect/ca/roots", connect.catalog_roots),
    (("GET", "PUT"), "/v1/connect/ca/configuration", connect.ca_configuration),
    (_GET, "/v1/health/connect/{service}", catalog.health_connect),
    (_GET, "/v1/health/service/{service}", catalog.health_service),
    (_GET, "/v1/catalog/services", catalog.catalog_services),
    (_GET, "/v1/catalog/service/{service}", catalog.catalog_service),
    (_GET, "/v1/catalog/connect/{service}", catalog.catalog_connect),
    (("GET", "POST"), "/v1/query", catalog.query_collection),
    (_GET, "/v1/query/{id}/execute", catalog.query_execute),
    (("GET", "PUT", "DELETE"), "/v1/query/{id}", catalog.query_item),
    (("GET", "POST"), "/v1/connect/intentions", intentions.intentions_collection),
    (("GET", "PUT", "DELETE"), "/v1/connect/intentions/exact", intentions.intentions_exact),
    (_GET, "/v1/connect/intentions/match", intentions.intentions_match),
    (_GET, "/v1/connect/intentions/check", intentions.intentions_check),
    (("GET", "PUT", "DELETE"), "/v1/connect/intentions/{id}", intentions.intention_item),
    (_PUT, "/v1/config", intentions.config_put),
    (_GET, "/v1/config/{kind}", intentions.config_kind),
    (("GET", "DELETE"), "/v1/config/{kind}/{name}", intentions.config_item),
    (_GET, "/v1/status/leader", agent.status_leader),
    (_GET, "/v1/status/peers", agent.status_peers),
    (_GET, "/v1/acl/token/self", acl.acl_token_self),
    (_PUT, "/v1/acl/token", acl.acl_token_create),
    (_PUT, "/v1/acl/policy", acl.acl_policy_create),
    (("GET", "PUT", "DELETE"), "/v1/kv/{key:.*}", kv.kv_item),
    (_PUT, "/v1/session/create", session.session_create),
    (_PUT, "/v1/session/destroy/{id:.*}", session.session_destroy),
    (_PUT, "/v1/session/renew/{id:.*}", session.session_renew),
    (_GET, "/v1/session/info/{id:.*}", session.session_info),
    (_GET, "/v1/session/node/{node:.*}", session.session_node),
    (_GET, "/v1/session/list", session.session_list),
    (_PUT, "/v1/event/fire/{name:.*}", session.event_fire),
    (_GET, "/v1/event/list", session.event_list),
    (_POST, "/v1/peering/token", peering.peering_token),
    (_POST, "/v1/peering/establish", peering.peering_establish),
    (_GET, "/v1/peerings", peering.peering_list),
    (("GET", "DELETE"), "/v1/peering/{name}", peering.peering_item),
    (_GET, "/v1/internal/connect-proxy/peering/trust-bundle/{peer}", peering.trust_bundle),
    (_GET, "/v1/internal/connect-proxy/peering/trust-bundles", peering.service_trust_bundles),
]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PermissionDenied as exc:
        return wire.text(403, str(exc))
    except ACLNotFound as exc:
        return wire.text(403, str(exc))
    except StateError as exc:
        return wire.text(exc.status, str(exc))
    except decode.DecodeError as exc:
        return wire.text(400, f"Request decode failed: {exc}")
    except (PolicyError, CAError) as exc:
        return wire.text(400, str(exc))
    except web.HTTPNotFound:
        return wire.text(404, "404 page not found")
    except web.HTTPRequestEntityTooLarge:
        return wire.text(413, f"Request body too large: the limit is {wire.MAX_BODY} bytes")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return wire.text(500, "internal error")


# Consul registers `/v1/query/` with no methods and its handler checks them: its 405 lists
# the methods without OPTIONS (`agent/prepared_query_endpoint.go`).
_HANDLER_CHECKS_METHODS = frozenset({"/v1/query/{id}/execute", "/v1/query/{id}"})


def _route(app: web.Application, methods: tuple[str, ...], path: str, handler: Handler) -> None:
    """Serve `path` for every method, with Consul's OPTIONS answer and 405 for the others.

    As Consul's `wrap` (`agent/http.go`): OPTIONS answers 200 with `Allow: OPTIONS,<methods>`
    and an empty body; any other method not in `methods` is a 405 "method X not allowed"
    with the same `Allow`. Registering all methods keeps a fixed path such as
    `/v1/agent/service/register` from falling through to a `{id}` pattern when the method is
    wrong.
    """
    with_options = ",".join(("OPTIONS", *methods))
    on_405 = ",".join(methods) if path in _HANDLER_CHECKS_METHODS else with_options

    async def dispatch(request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": with_options})
        if request.method not in methods:
            return wire.text(405, f"method {request.method} not allowed", {"Allow": on_405})
        return await handler(request)

    app.router.add_route("*", path, dispatch)


def create_app(
    state: State,
    settings: Settings | None = None,
    peering_runtime: peering.PeeringRuntime | None = None,
) -> web.Application:
    """The aiohttp application serving `state` over Consul's HTTP API.

    Args:
        state: the tables the routes read and write.
        settings: what the routes know of the agent besides its state (defaults if None).
        peering_runtime: the agent's peering listener and streams (None: no peering port,
            so tokens cannot be generated nor peerings established).
    """
    app = web.Application(middlewares=[_errors], client_max_size=wire.MAX_BODY)
    app[wire.STATE_KEY] = state
    app[wire.SETTINGS_KEY] = settings or Settings()
    if peering_runtime is not None:
        app[peering.RUNTIME_KEY] = peering_runtime
    for methods, path, handler in ROUTES:
        _route(app, methods, path, handler)
    return app
