"""The peering table's records: states, `Peering`, `Bundle`, and how an import is marked.

Rule 1: pure values; `to_api` renders Consul's `api.Peering` and our trust bundle JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.devagent.state.records import StateError

PENDING, ESTABLISHING, ACTIVE, FAILING = "PENDING", "ESTABLISHING", "ACTIVE", "FAILING"
DELETING, TERMINATED = "DELETING", "TERMINATED"
EXPORTED_KIND = "exported-services"


class PeeringDenied(StateError):
    """A secret or stream the acceptor refuses (gRPC PermissionDenied)."""

    status = 403


@dataclass(slots=True)
class Bundle:
    """A peer's trust bundle as Consul stores it (`pbpeering.PeeringTrustBundle`)."""

    trust_domain: str
    peer_name: str
    root_pems: list[str]
    exported_partition: str
    create_index: int
    modify_index: int

    def to_api(self) -> dict[str, Any]:
        return {
            "TrustDomain": self.trust_domain,
            "PeerName": self.peer_name,
            "Partition": "default",
            "RootPEMs": list(self.root_pems),
            "ExportedPartition": self.exported_partition,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass(slots=True)
class Peering:
    id: str
    name: str
    meta: dict[str, str]
    state: str
    dialer: bool
    create_index: int
    modify_index: int
    peer_id: str = ""
    peer_ca_pems: list[str] = field(default_factory=list)
    peer_server_name: str = ""
    peer_server_addresses: list[str] = field(default_factory=list)
    manual_server_addresses: list[str] = field(default_factory=list)
    remote_partition: str = ""
    remote_datacenter: str = ""
    deleted_at: str = ""
    establishment_secret: str = ""
    stream_secret: str = ""
    # service name -> {"Service": [health entries], "Connect": [health entries]}
    imported: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    exported: list[str] = field(default_factory=list)
    last_heartbeat: str | None = None
    last_receive: str | None = None
    last_send: str | None = None

    def to_api(self) -> dict[str, Any]:
        """`api.Peering` (omitempty fields left out when empty)."""
        out: dict[str, Any] = {"ID": self.id, "Name": self.name, "Partition": "default"}
        if self.deleted_at:
            out["DeletedAt"] = self.deleted_at
        if self.meta:
            out["Meta"] = dict(self.meta)
        out["State"] = self.state
        if self.peer_id:
            out["PeerID"] = self.peer_id
        if self.peer_ca_pems:
            out["PeerCAPems"] = list(self.peer_ca_pems)
        if self.peer_server_name:
            out["PeerServerName"] = self.peer_server_name
        if self.peer_server_addresses:
            out["PeerServerAddresses"] = list(self.peer_server_addresses)
        out["StreamStatus"] = {
            "ImportedServices": sorted(self.imported) or None,
            "ExportedServices": sorted(self.exported) or None,
            "LastHeartbeat": self.last_heartbeat,
            "LastReceive": self.last_receive,
            "LastSend": self.last_send,
        }
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        out["Remote"] = {"Partition": self.remote_partition, "Datacenter": self.remote_datacenter}
        return out


def imported(entry: Mapping[str, Any], peer_name: str) -> dict[str, Any]:
    """A peer's health entry as we serve it: `PeerName` on its node, service and checks."""
    out = dict(entry)
    out["Node"] = {**(entry.get("Node") or {}), "PeerName": peer_name}
    out["Service"] = {**(entry.get("Service") or {}), "PeerName": peer_name}
    out["Checks"] = [{**c, "PeerName": peer_name} for c in entry.get("Checks") or []]
    return out
