"""The JSON shapes of the dev agent's records, as Consul's HTTP API renders them.

One node, so the agent-local view (`/v1/agent/...`) and the catalog (`/v1/catalog/...`,
`/v1/health/...`) are two renderings of the same service and check records, as they are on
a real single-node `consul agent -dev` once anti-entropy has run.

Rule 1: pure functions of the records they are given; no lookups, no ACL checks, no indexes
taken. The tables decide what to render; this module only shapes it.
Rule 2: a rendering is serialised at once: it may share lists and dicts with the records,
so nothing may change what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from proxy.addr import join_host_port
from proxy.devagent.ca import CertificateAuthority
from proxy.devagent.state.blocking import content_hash
from proxy.devagent.state.records import PASSING, Node

_INDEXES = ("CreateIndex", "ModifyIndex")


def without_indexes(record: Mapping[str, Any]) -> dict[str, Any]:
    """An agent-endpoint rendering: the agent's own view carries no Raft indexes."""
    return {k: v for k, v in record.items() if k not in _INDEXES}


def agent_service(svc: Mapping[str, Any], datacenter: str, *, with_hash: bool) -> dict[str, Any]:
    """The `AgentService` object (`/v1/agent/services`, `/v1/agent/service/:id`)."""
    out = without_indexes(svc)
    out["Datacenter"] = datacenter
    if with_hash:
        out["ContentHash"] = content_hash(
            {k: v for k, v in out.items() if k not in ("Datacenter", "Namespace", "Partition")}
        )
    return out


def node(n: Node) -> dict[str, Any]:
    return {
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": {
            "lan": n.address,
            "lan_ipv4": n.address,
            "wan": n.address,
            "wan_ipv4": n.address,
        },
        "Meta": {"consul-network-segment": ""},
        "CreateIndex": n.create_index,
        "ModifyIndex": n.create_index,
    }


def serf_check(n: Node) -> dict[str, Any]:
    return {
        "Node": n.name,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": PASSING,
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": n.create_index,
        "ModifyIndex": n.create_index,
    }


def service_entry(
    n: Node, svc: Mapping[str, Any], checks: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """A `/v1/health/...` entry: the node, the service, the serf, node and service checks.

    Args:
        checks: every check record; the node's own and `svc`'s are picked from them.
    """
    records = list(checks)
    node_checks = [c for c in records if not c["ServiceID"]]
    own = [c for c in records if c["ServiceID"] == svc["ID"]]
    return {"Node": node(n), "Service": dict(svc), "Checks": [serf_check(n), *node_checks, *own]}


def catalog_entry(n: Node, svc: Mapping[str, Any]) -> dict[str, Any]:
    """A `/v1/catalog/service/:name` entry (Consul's flat `ServiceNode`)."""
    rendered = node(n)
    return {
        "ID": rendered["ID"],
        "Node": rendered["Node"],
        "Address": rendered["Address"],
        "Datacenter": rendered["Datacenter"],
        "TaggedAddresses": rendered["TaggedAddresses"],
        "NodeMeta": rendered["Meta"],
        "ServiceKind": svc.get("Kind", ""),
        "ServiceID": svc["ID"],
        "ServiceName": svc["Service"],
        "ServiceTags": svc["Tags"],
        "ServiceAddress": svc["Address"],
        "ServiceTaggedAddresses": svc.get("TaggedAddresses"),
        "ServiceWeights": svc["Weights"],
        "ServiceMeta": svc["Meta"],
        "ServicePort": svc["Port"],
        "ServiceSocketPath": svc.get("SocketPath", ""),
        "ServiceEnableTagOverride": svc["EnableTagOverride"],
        "ServiceProxy": svc.get("Proxy", {"MeshGateway": {}, "Expose": {}}),
        "ServiceConnect": svc.get("Connect", {}),
        "CreateIndex": svc["CreateIndex"],
        "ModifyIndex": svc["ModifyIndex"],
    }


def managed_proxy(
    svc: Mapping[str, Any], target: Mapping[str, Any], bind_address: str
) -> dict[str, Any]:
    """`GET /v1/agent/connect/proxy/:id` of Consul 1.2-1.5 (its `agent/agent_endpoint.go`).

    Args:
        svc: the connect-proxy service record.
        target: the record of the service it proxies (its `DestinationServiceID`).
        bind_address: the agent's bind address, the default `bind_address` of the proxy.
    """
    proxy = svc["Proxy"]
    config: dict[str, Any] = dict(proxy.get("Config") or {})
    upstreams = [
        {
            "DestinationType": u.get("DestinationType") or "service",
            "DestinationNamespace": u.get("DestinationNamespace") or "",
            "DestinationName": u["DestinationName"],
            "Datacenter": u.get("Datacenter") or "",
            "LocalBindAddress": u.get("LocalBindAddress") or "",
            "LocalBindPort": u.get("LocalBindPort") or 0,
            "Config": u.get("Config"),
        }
        for u in proxy.get("Upstreams") or []
    ]
    hashed = {"config": config, "upstreams": upstreams, "target": target["ID"]}
    out_hash = content_hash(hashed)
    # Defaults are filled after hashing, as Consul did: they are not part of the hash.
    config.setdefault("bind_port", svc["Port"])
    config.setdefault("bind_address", svc["Address"] or bind_address)
    local_addr = proxy.get("LocalServiceAddress") or "127.0.0.1"
    local_port = proxy.get("LocalServicePort") or target["Port"]
    config.setdefault("local_service_address", join_host_port(local_addr, local_port))
    return {
        "ProxyServiceID": svc["ID"],
        "TargetServiceID": target["ID"],
        "TargetServiceName": target["Service"],
        "ContentHash": out_hash,
        "ExecMode": "daemon",
        "Command": None,
        "Config": config,
        "Upstreams": upstreams,
    }


def roots(ca: CertificateAuthority) -> dict[str, Any]:
    """`/v1/agent/connect/ca/roots` and `/v1/connect/ca/roots` (Consul's `IndexedCARoots`)."""
    return {
        "ActiveRootID": ca.active_root.id,
        "TrustDomain": ca.trust_domain,
        "Roots": [r.to_api(ca.cluster_id) for r in ca.roots],
    }


def _hours_or_seconds(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds:g}s"


def ca_configuration(ca: CertificateAuthority, modify_index: int) -> dict[str, Any]:
    """`GET /v1/connect/ca/configuration` of the built-in `consul` provider."""
    rendered = ca.active_root.to_api(ca.cluster_id)
    return {
        "Provider": "consul",
        "Config": {
            "LeafCertTTL": _hours_or_seconds(ca.leaf_ttl),
            "PrivateKeyType": rendered["PrivateKeyType"],
            "PrivateKeyBits": rendered["PrivateKeyBits"],
            "IntermediateCertTTL": f"{ca.intermediate_ttl / 3600:g}h",
            "RootCertTTL": f"{ca.root_ttl / 3600:g}h",
            "RotationPeriod": "2160h",
        },
        "State": None,
        "ForceWithoutCrossSigning": False,
        "CreateIndex": 1,
        "ModifyIndex": modify_index,
    }
