"""Routes of the ACL system: `/v1/acl/token/self`, `/v1/acl/token`, `/v1/acl/policy`.

Rule 1: routes only; a handler reads the request, calls the table that owns the data, and
renders its answer (see `wire`).
Rule 2: with ACLs off every ACL route answers 401 before it reads a body or a token.
"""

from __future__ import annotations

from aiohttp import web

from proxy.devagent import schemas
from proxy.devagent.http import wire


async def acl_token_self(request: web.Request) -> web.StreamResponse:
    acl = wire.state_of(request).acl
    acl.require_enabled()
    return wire.answer(request, acl.token_self(wire.secret(request)))


async def acl_token_create(request: web.Request) -> web.StreamResponse:
    acl = wire.state_of(request).acl
    acl.require_enabled()
    body = await wire.body(request, schemas.ACL_TOKEN)
    return wire.answer(request, acl.create_token(body, wire.authz(request)))


async def acl_policy_create(request: web.Request) -> web.StreamResponse:
    acl = wire.state_of(request).acl
    acl.require_enabled()
    body = await wire.body(request, schemas.ACL_POLICY)
    return wire.answer(request, acl.create_policy(body, wire.authz(request)))
