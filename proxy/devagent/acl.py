"""ACL tokens, policies and the permission checks of the dev agent.

Enough of Consul's ACL system to test how a proxy behaves with and without the rights it
needs: management tokens, service and node identities, policies whose rules are written in
Consul's rule language (HCL or JSON), exact and prefix rules, the `default_policy`, and the
403 texts Consul sends.

Rule 1: pure. Token resolution and checks are plain functions of the data held here.
Rule 2: a secret never appears in an error text; errors name the AccessorID, as Consul does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.devagent.decode import load_hcl

Level = Literal["deny", "read", "list", "write"]
_RANK = {"deny": 0, "read": 1, "list": 2, "write": 3}
RESOURCES = ("service", "node", "agent", "query", "key", "session", "event")
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"


class ACLNotFound(Exception):
    """The token presented is not known to the agent."""

    def __str__(self) -> str:
        return "ACL not found"


class PermissionDenied(Exception):
    """A known token lacks a permission. The text follows Consul's acl.PermissionDeniedError."""

    def __init__(self, accessor: str, resource: str, level: str, name: str | None) -> None:
        super().__init__(accessor, resource, level, name)
        self.accessor = accessor
        self.resource = resource
        self.level = level
        self.name = name

    def __str__(self) -> str:
        text = (
            f"Permission denied: token with AccessorID '{self.accessor}' lacks permission "
            f"'{self.resource}:{self.level}'"
        )
        if self.name is not None:
            text += f' on "{self.name}"'
        return text


class PolicyError(ValueError):
    """Rules that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class _Rule:
    level: Level
    intentions: Level | None = None


@dataclass(slots=True)
class Rules:
    """Exact and prefix rules per resource, as compiled from one or more policies."""

    exact: dict[str, dict[str, _Rule]] = field(default_factory=dict)
    prefix: dict[str, dict[str, _Rule]] = field(default_factory=dict)
    # Top-level single-word rules: `operator = "read"`, `acl = "write"`, `mesh = "write"`.
    plain: dict[str, Level] = field(default_factory=dict)

    def add(self, resource: str, name: str, rule: _Rule, *, prefix: bool) -> None:
        table = (self.prefix if prefix else self.exact).setdefault(resource, {})
        current = table.get(name)
        # When several policies grant the same rule, Consul merges them: deny wins, otherwise
        # the stronger level.
        if (
            current is None
            or rule.level == "deny"
            or (current.level != "deny" and _RANK[rule.level] > _RANK[current.level])
        ):
            table[name] = rule

    def lookup(self, resource: str, name: str) -> _Rule | None:
        exact = self.exact.get(resource, {}).get(name)
        if exact is not None:
            return exact
        best: tuple[int, _Rule] | None = None
        for pfx, rule in self.prefix.get(resource, {}).items():
            if name.startswith(pfx) and (best is None or len(pfx) > best[0]):
                best = (len(pfx), rule)
        return best[1] if best else None

    def merge(self, other: Rules) -> None:
        for resource, table in other.exact.items():
            for name, rule in table.items():
                self.add(resource, name, rule, prefix=False)
        for resource, table in other.prefix.items():
            for name, rule in table.items():
                self.add(resource, name, rule, prefix=True)
        for key, level in other.plain.items():
            self.plain[key] = level


def _level(value: object, where: str) -> Level:
    if value not in _RANK:
        raise PolicyError(f'Invalid {where} policy: "{value}"')
    return value  # type: ignore[return-value]


def _blocks(value: Any) -> Iterable[tuple[str, Mapping[str, Any]]]:
    # JSON rules: {"service": {"web": {"policy": "write"}}}. python-hcl2 gives a list of
    # one-key dicts for repeated labelled blocks: {"service": [{"web": {...}}, ...]}.
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, Mapping):
            raise PolicyError(f"rule block must be an object, got {item!r}")
        for name, body in item.items():
            if isinstance(body, list) and len(body) == 1:
                body = body[0]
            if not isinstance(body, Mapping):
                raise PolicyError(f"rule for {name!r} must be an object")
            yield str(name).strip('"'), body


def parse_rules(text: str) -> Rules:
    """Compile a policy's `Rules` (Consul's HCL rule language, or its JSON form).

    Raises:
        PolicyError: the rules do not parse or name an unknown policy level.
    """
    text = text.strip()
    if not text:
        return Rules()
    data: Any
    try:
        data = json.loads(text)
    except RecursionError as exc:
        # Rules arrive in a request body: nesting deep enough to exhaust the stack is a
        # refused policy (400), not a crash.
        raise PolicyError("Failed to parse ACL rules: nested too deeply") from exc
    except json.JSONDecodeError:
        try:
            data = load_hcl(text)
        except ValueError as exc:
            raise PolicyError(f"Failed to parse ACL rules: {exc}") from exc
    if not isinstance(data, Mapping):
        raise PolicyError("ACL rules must be an object")
    rules = Rules()
    for key, value in data.items():
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            rules.plain[key] = _level(value, key)
            continue
        prefix = key.endswith("_prefix")
        resource = key.removesuffix("_prefix")
        if resource not in RESOURCES:
            continue  # keyring, peering, partition, ...: nothing the dev agent checks
        for name, body in _blocks(value):
            policy = body.get("policy")
            if isinstance(policy, list):
                policy = policy[0]
            intentions = body.get("intentions")
            if isinstance(intentions, list):
                intentions = intentions[0]
            rules.add(
                resource,
                name,
                _Rule(
                    _level(policy, resource),
                    _level(intentions, "intentions") if intentions is not None else None,
                ),
                prefix=prefix,
            )
    return rules


@dataclass(slots=True)
class Policy:
    id: str
    name: str
    description: str
    rules_text: str
    rules: Rules
    create_index: int
    modify_index: int

    def to_api(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Description": self.description,
            "Rules": self.rules_text,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(slots=True)
class Token:
    accessor_id: str
    secret_id: str
    description: str = ""
    management: bool = False
    policy_ids: list[str] = field(default_factory=list)
    service_identities: list[str] = field(default_factory=list)
    node_identities: list[str] = field(default_factory=list)
    create_index: int = 0
    modify_index: int = 0

    def to_api(self, policies: Mapping[str, Policy]) -> dict[str, Any]:
        links = (
            [{"ID": MANAGEMENT_POLICY_ID, "Name": "global-management"}] if self.management else []
        )
        links += [
            {"ID": pid, "Name": policies[pid].name} for pid in self.policy_ids if pid in policies
        ]
        out: dict[str, Any] = {
            "AccessorID": self.accessor_id,
            "SecretID": self.secret_id,
            "Description": self.description,
            "Policies": links or None,
            "Local": False,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.service_identities:
            out["ServiceIdentities"] = [{"ServiceName": n} for n in self.service_identities]
        if self.node_identities:
            out["NodeIdentities"] = [{"NodeName": n} for n in self.node_identities]
        return out


class Authorizer:
    """What one token may do. With ACLs disabled every check passes."""

    def __init__(
        self,
        *,
        enabled: bool,
        default_allow: bool,
        accessor: str = ANONYMOUS_ACCESSOR,
        management: bool = False,
        rules: Rules | None = None,
    ) -> None:
        self.enabled = enabled
        self.default_allow = default_allow
        self.accessor = accessor
        self.management = management
        self.rules = rules or Rules()

    def allowed(self, resource: str, name: str, level: Level) -> bool:
        if not self.enabled or self.management:
            return True
        if resource == "intention":
            rule = self.rules.lookup("service", name)
            if rule is not None:
                granted = rule.intentions
                if granted is None:
                    # A service rule of read or write grants intention read (Consul's default).
                    granted = "read" if rule.level != "deny" else "deny"
                return granted != "deny" and _RANK[granted] >= _RANK[level]
        else:
            rule = self.rules.lookup(resource, name)
            if rule is not None:
                return rule.level != "deny" and _RANK[rule.level] >= _RANK[level]
        if resource == "peering" and resource not in self.rules.plain:
            # Consul's PeeringRead/PeeringWrite fall back to the operator rule.
            resource = "operator"
        if resource in self.rules.plain:
            granted_plain = self.rules.plain[resource]
            return granted_plain != "deny" and _RANK[granted_plain] >= _RANK[level]
        return self.default_allow

    def allowed_prefix(self, resource: str, prefix: str, level: Level) -> bool:
        """`level` on `prefix` and on every name under it, as Consul's `KeyWritePrefix`.

        A rule on any name under `prefix` (exact or prefix) that grants less than `level`
        refuses; otherwise the rule that applies to `prefix` itself decides, then the
        default.
        """
        if not self.enabled or self.management:
            return True
        for table in (self.rules.exact.get(resource, {}), self.rules.prefix.get(resource, {})):
            for name, rule in table.items():
                if name.startswith(prefix) and (
                    rule.level == "deny" or _RANK[rule.level] < _RANK[level]
                ):
                    return False
        return self.allowed(resource, prefix, level)

    def require(self, resource: str, name: str, level: Level) -> None:
        """Raise PermissionDenied unless the token has `level` on `resource` `name`."""
        if not self.allowed(resource, name, level):
            shown = None if resource in ("operator", "acl", "mesh", "peering") else name
            raise PermissionDenied(self.accessor, resource, level, shown)

    @property
    def intention_default_allow(self) -> bool:
        """Allow a connection no intention matches? ("Default behavior configured by ACLs").

        The ACL default policy decides, for every token: no policy, not even the management
        token's global-management, sets a default for intentions (Consul's policy authorizer
        answers `Default` to `IntentionDefaultAllow`, so the chain falls through to the
        `acl.default_policy` root authorizer; `agent/consul/acl.go`, `acl/policy_authorizer.go`).
        """
        return (not self.enabled) or self.default_allow


class ACLStore:
    """Tokens and policies, plus the agent's ACL settings."""

    def __init__(
        self,
        *,
        enabled: bool = False,
        default_policy: str = "allow",
        initial_management: str = "",
        default_token: str = "",
        agent_token: str = "",
    ) -> None:
        if default_policy not in ("allow", "deny"):
            raise PolicyError(
                f'acl.default_policy must be "allow" or "deny", got "{default_policy}"'
            )
        self.enabled = enabled
        self.default_allow = default_policy == "allow"
        self.default_token = default_token
        self.tokens: dict[str, Token] = {}  # by SecretID
        self.policies: dict[str, Policy] = {}
        if initial_management:
            self.tokens[initial_management] = Token(
                accessor_id=str(uuid.uuid4()),
                secret_id=initial_management,
                description="Initial Management Token",
                management=True,
            )
        if agent_token and agent_token not in self.tokens:
            self.tokens[agent_token] = Token(
                accessor_id=str(uuid.uuid4()),
                secret_id=agent_token,
                description="Agent Token",
                node_identities=[],
            )

    def add_policy(self, name: str, rules_text: str, description: str, index: int) -> Policy:
        if any(p.name == name for p in self.policies.values()):
            raise PolicyError(f'Invalid Policy: A Policy with Name "{name}" already exists')
        policy = Policy(
            str(uuid.uuid4()), name, description, rules_text, parse_rules(rules_text), index, index
        )
        self.policies[policy.id] = policy
        return policy

    def policy_by_link(self, link: Mapping[str, str]) -> Policy:
        if link.get("ID") in self.policies:
            return self.policies[link["ID"]]
        for policy in self.policies.values():
            if policy.name == link.get("Name"):
                return policy
        raise PolicyError(f"cannot find policy {link.get('ID') or link.get('Name')!r}")

    def add_token(self, token: Token) -> Token:
        self.tokens[token.secret_id] = token
        return token

    def resolve(self, secret: str | None) -> Authorizer:
        """The authorizer for a request's token.

        Raises:
            ACLNotFound: ACLs are enabled and the token is unknown.
        """
        if not self.enabled:
            return Authorizer(enabled=False, default_allow=True)
        secret = secret or self.default_token
        if not secret:
            return Authorizer(enabled=True, default_allow=self.default_allow)
        token = self.tokens.get(secret)
        if token is None:
            raise ACLNotFound
        rules = Rules()
        for pid in token.policy_ids:
            if pid in self.policies:
                rules.merge(self.policies[pid].rules)
        for svc in token.service_identities:
            # A service identity: write on the service and its sidecar, read on the catalog.
            rules.add("service", svc, _Rule("write"), prefix=False)
            rules.add("service", f"{svc}-sidecar-proxy", _Rule("write"), prefix=False)
            rules.add("service", "", _Rule("read"), prefix=True)
            rules.add("node", "", _Rule("read"), prefix=True)
        for node in token.node_identities:
            rules.add("node", node, _Rule("write"), prefix=False)
            rules.add("service", "", _Rule("read"), prefix=True)
        return Authorizer(
            enabled=True,
            default_allow=self.default_allow,
            accessor=token.accessor_id,
            management=token.management,
            rules=rules,
        )

    def token_for_secret(self, secret: str | None) -> Token | None:
        return self.tokens.get(secret or self.default_token or "")
