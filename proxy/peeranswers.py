"""The agent's answers about peers: imported instances and peers' trust bundles.

Owns how `/v1/health/connect/<svc>?peer=<name>` entries become endpoints (address from the
entry, identity from `Service.Connect.PeerMeta`: every `SpiffeID`, the first `SNI`), and how
the dev agent's trust-bundle answers (`GET /v1/internal/connect-proxy/peering/trust-bundle/
<peer>`, and `.../trust-bundles?service=<svc>`: the peers a service is exported to) become
`TrustBundle`s. Consul serves bundles only over gRPC; see the README's peering section.

Rule 1: pure: no I/O, no awaits, no logging (as `proxy.answers`).
Rule 2: a hostile body raises `AgentResponseError`; an imported entry that is not a usable
peered endpoint (no `PeerMeta`, no SPIFFE ID or SNI, no address or port) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.answers import Answer, Endpoints
from proxy.errors import AgentResponseError
from proxy.identity import Endpoint, PeerTarget


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """A peer's trust bundle (`pbpeering.PeeringTrustBundle`): its roots and trust domain."""

    peer: str  # our local name of the peer
    trust_domain: str
    root_pems: tuple[str, ...]
    index: int = 0


def _texts(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(v for v in value if v)


def peered_endpoints(peer: str, entries: Iterable[Any]) -> list[Endpoint]:
    """(host, port, `PeerTarget`) for each imported Connect entry that carries `PeerMeta`."""
    out: list[Endpoint] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        svc = entry.get("Service")
        node = entry.get("Node")
        if not isinstance(svc, Mapping) or not isinstance(node, Mapping):
            continue
        connect = svc.get("Connect")
        meta = connect.get("PeerMeta") if isinstance(connect, Mapping) else None
        if not isinstance(meta, Mapping):
            continue
        ids, snis = _texts(meta.get("SpiffeID")), _texts(meta.get("SNI"))
        if not ids or not snis:
            continue
        address, node_address = svc.get("Address") or "", node.get("Address") or ""
        host = address or node_address
        port = svc.get("Port")
        if not isinstance(host, str) or not host or type(port) is not int or port <= 0:
            continue
        out.append((host, port, PeerTarget(peer=peer, spiffe_ids=ids, sni=snis[0])))
    return out


def peered_health_endpoints(path: str, peer: str, answer: Answer) -> Endpoints:
    """A `/v1/health/connect/:service?peer=` list as Endpoints with `PeerTarget`s.

    Raises:
        AgentResponseError: a body that is not a list.
    """
    if not isinstance(answer.body, list):
        raise AgentResponseError(f"unexpected answer from {path}: the body is not a list")
    return Endpoints(tuple(peered_endpoints(peer, answer.body)), answer.index)


def _bundle(path: str, body: Any) -> TrustBundle:
    if not isinstance(body, Mapping):
        raise AgentResponseError(f"unexpected answer from {path}: a bundle is not an object")
    peer, domain = body.get("PeerName"), body.get("TrustDomain")
    roots = _texts(body.get("RootPEMs"))
    if not isinstance(peer, str) or not isinstance(domain, str) or roots is None:
        raise AgentResponseError(
            f"unexpected answer from {path}: PeerName, TrustDomain and RootPEMs must be "
            "strings and a list of strings"
        )
    return TrustBundle(peer=peer, trust_domain=domain, root_pems=roots)


def trust_bundle_from(path: str, answer: Answer) -> TrustBundle:
    """One peer's bundle, with the blocking index.

    Raises:
        AgentResponseError: not a bundle.
    """
    bundle = _bundle(path, answer.body)
    return TrustBundle(bundle.peer, bundle.trust_domain, bundle.root_pems, answer.index)


def trust_bundles_from(path: str, answer: Answer) -> tuple[tuple[TrustBundle, ...], int]:
    """The bundles of the peers a service is exported to, sorted by peer name, and the index.

    Raises:
        AgentResponseError: not a list of bundles.
    """
    if not isinstance(answer.body, list):
        raise AgentResponseError(f"unexpected answer from {path}: the body is not a list")
    bundles = sorted((_bundle(path, b) for b in answer.body), key=lambda b: b.peer)
    return tuple(bundles), answer.index
