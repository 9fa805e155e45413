"""The ACL table: tokens and policies made through the API, and token resolution.

The rules engine and the records are `devagent/acl.py`'s (pure); this table gives new
tokens and policies their indexes and answers the ACL endpoints.

Rule 1: creating a token or a policy needs acl:write; the ACL endpoints answer 401
`ACL support disabled` when ACLs are off.
Rule 2: a secret never appears in an error text (the ACL module's rule, kept here).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from proxy.devagent.acl import ACLNotFound, ACLStore, Authorizer, Token
from proxy.devagent.state.blocking import Index
from proxy.devagent.state.records import BadRequest, StateError


class ACLTokens:
    """Tokens by SecretID and policies by ID (held in an `ACLStore`)."""

    def __init__(self, index: Index, store: ACLStore) -> None:
        self._index = index
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def resolve(self, secret: str | None) -> Authorizer:
        """The authorizer for a request's token.

        Raises:
            ACLNotFound: ACLs are enabled and the token is unknown.
        """
        return self.store.resolve(secret)

    def require_enabled(self) -> None:
        """The ACL endpoints check this first, before they read a body or a token."""
        if not self.store.enabled:
            raise StateError("ACL support disabled", status=401)

    def token_self(self, secret: str) -> dict[str, Any]:
        """`GET /v1/acl/token/self`: the token the request presents.

        Raises:
            ACLNotFound: the token is unknown.
        """
        self.store.resolve(secret)  # raises ACLNotFound
        token = self.store.token_for_secret(secret)
        if token is None:
            raise ACLNotFound
        return token.to_api(self.store.policies)

    def create_policy(self, body: Mapping[str, Any], authz: Authorizer) -> dict[str, Any]:
        """`PUT /v1/acl/policy`."""
        authz.require("acl", "", "write")
        if not body.get("Name"):
            raise BadRequest("Invalid Policy: no Name is set")
        policy = self.store.add_policy(
            body["Name"], body.get("Rules") or "", body.get("Description") or "", self._index.next
        )
        self._index.bump(("acl",))
        return policy.to_api()

    def create_token(self, body: Mapping[str, Any], authz: Authorizer) -> dict[str, Any]:
        """`PUT /v1/acl/token`."""
        authz.require("acl", "", "write")
        policies = [self.store.policy_by_link(link).id for link in body.get("Policies") or []]
        token = Token(
            accessor_id=body.get("AccessorID") or str(uuid.uuid4()),
            secret_id=body.get("SecretID") or str(uuid.uuid4()),
            description=body.get("Description") or "",
            policy_ids=policies,
            service_identities=[s["ServiceName"] for s in body.get("ServiceIdentities") or []],
            node_identities=[n["NodeName"] for n in body.get("NodeIdentities") or []],
            create_index=self._index.next,
            modify_index=self._index.next,
        )
        self.store.add_token(token)
        self._index.bump(("acl",))
        return token.to_api(self.store.policies)
