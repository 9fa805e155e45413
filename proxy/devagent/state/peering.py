"""The peering table: peerings, their secrets and states, imported services, trust bundles.

As Consul's `agent/consul/state/peering.go` plus the parts of `agent/rpc/peering` that
decide: a token generated here makes (or reuses) an acceptor peering in PENDING with a
fresh one-time establishment secret; establishing makes a dialer peering (ESTABLISHING
until its stream opens). The stream itself is the agent's (`devagent/peerlink.py`); it
reports here: `exchange_secret`, `open_stream`, `stream_lost`, `received_*`, `terminated`.

Topics: `peerings` (any peering), `peering:<name>`, `peer:<name>:svc:<svc>` and
`peer:<name>:connect:<svc>` (imported instances), `bundle:<name>` (a peer's trust bundle).

Rule 1: states are Consul's words (PENDING, ESTABLISHING, ACTIVE, FAILING, DELETING,
TERMINATED); only this table changes them.
Rule 2: deleting a peering drops its imports and bundle, and the peer's trust domain leaves
`ConnectCA.peer_trust_domains` (authorize no longer accepts it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from proxy.devagent.acl import Authorizer
from proxy.devagent.peertoken import (
    PeeringInputError,
    PeeringToken,
    ca_pems,
    decode_token,
    server_name,
    validate_meta,
    validate_name,
)
from proxy.devagent.state.blocking import Index, Watch
from proxy.devagent.state.connect_ca import ConnectCA
from proxy.devagent.state.peering_records import (
    ACTIVE,
    DELETING,
    ESTABLISHING,
    EXPORTED_KIND,
    FAILING,
    PENDING,
    TERMINATED,
    Bundle,
    Peering,
    PeeringDenied,
    imported,
)
from proxy.devagent.state.records import BadRequest, NotFound, StateError, now_rfc3339


def _partition(partition: str) -> None:
    if partition and partition != "default":
        raise BadRequest(
            f'Partitions are a Consul Enterprise feature; the dev agent has only "default", '
            f'not "{partition}"'
        )


def _input(exc: PeeringInputError) -> BadRequest:
    return BadRequest(str(exc))


class Peerings:
    """Peerings by name; see the module docstring."""

    def __init__(self, index: Index, connect_ca: ConnectCA, datacenter: str) -> None:
        self._index = index
        self._ca = connect_ca
        self._datacenter = datacenter
        self.enabled = True
        self.peerings: dict[str, Peering] = {}
        self.bundles: dict[str, Bundle] = {}

    # -- helpers -------------------------------------------------------------------------

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise BadRequest("peering must be enabled to use this endpoint")

    def _touch(self, peering: Peering, *extra: str) -> None:
        peering.modify_index = self._index.bump(("peerings", f"peering:{peering.name}", *extra))

    def own_server_name(self) -> str:
        return server_name(self._datacenter, self._ca.ca.trust_domain)

    def by_id(self, peering_id: str) -> Peering | None:
        return next((p for p in self.peerings.values() if p.id == peering_id), None)

    # -- generate and establish ----------------------------------------------------------

    def generate_token(
        self,
        body: Mapping[str, Any],
        authz: Authorizer,
        *,
        server_addresses: list[str],
        partition: str = "",
    ) -> str:
        """`POST /v1/peering/token`: a token naming this cluster, for peer `PeerName`.

        Raises:
            BadRequest: disabled, a bad name or meta, no peering port.
            PermissionDenied: the token lacks peering:write.
        """
        name = body.get("PeerName") or ""
        if not name:
            raise BadRequest(
                "PeerName is required in the payload when generating a new peering token."
            )
        _partition(body.get("Partition") or partition)
        self._require_enabled()
        try:
            validate_name(name)
            validate_meta(body.get("Meta"))
        except PeeringInputError as exc:
            raise _input(exc) from None
        authz.require("peering", "", "write")
        if not server_addresses:
            raise StateError("TLS for gRPC must be enabled when generating peering tokens")
        peering = self.peerings.get(name.lower())
        secret = str(uuid.uuid4())
        if peering is None:
            index = self._index.next
            peering = Peering(
                id=str(uuid.uuid4()),
                name=name,
                meta=dict(body.get("Meta") or {}),
                state=PENDING,
                dialer=False,
                create_index=index,
                modify_index=index,
            )
            self.peerings[name.lower()] = peering
        elif peering.dialer:
            raise BadRequest(
                f'cannot create peering with name: "{name}"; there is already an established '
                "peering"
            )
        elif peering.state in (DELETING, TERMINATED):
            raise BadRequest(f'cannot create peering with name: "{name}"; it is being deleted')
        peering.establishment_secret = secret
        self._touch(peering)
        token = PeeringToken(
            ca=tuple(ca_pems([r.cert_pem for r in self._ca.ca.roots])),
            manual_server_addresses=tuple(body.get("ServerExternalAddresses") or ()),
            server_addresses=tuple(server_addresses),
            server_name=self.own_server_name(),
            peer_id=peering.id,
            establishment_secret=secret,
            remote_partition="default",
            remote_datacenter=self._datacenter,
        )
        return token.encode()

    def prepare_establish(
        self, body: Mapping[str, Any], authz: Authorizer, *, partition: str = ""
    ) -> tuple[Peering, PeeringToken]:
        """The checks and the write of `POST /v1/peering/establish` before the exchange.

        Returns the dialer peering (not yet ESTABLISHING) and the decoded token.
        """
        name = body.get("PeerName") or ""
        if not name:
            raise BadRequest("PeerName is required in the payload when establishing a peering.")
        if not body.get("PeeringToken"):
            raise BadRequest("PeeringToken is required in the payload when establishing a peering.")
        _partition(body.get("Partition") or partition)
        self._require_enabled()
        try:
            validate_name(name)
            token = decode_token(str(body["PeeringToken"]))
            validate_meta(body.get("Meta"))
        except PeeringInputError as exc:
            raise _input(exc) from None
        authz.require("peering", "", "write")
        if token.server_name == self.own_server_name():
            raise BadRequest(
                f'cannot create a peering within the same cluster "{token.server_name}". Refer '
                "to the `exported-services` documentation if you want to export between "
                "partitions without peering"
            )
        existing = self.peerings.get(name.lower())
        if existing is not None and not existing.dialer:
            raise BadRequest(
                f'cannot create peering with name: "{name}"; there is an existing peering '
                "expecting to be dialed"
            )
        if existing is not None and existing.state in (DELETING,):
            raise BadRequest(f'cannot create peering with name: "{name}"; it is being deleted')
        index = self._index.next
        peering = Peering(
            id=existing.id if existing else str(uuid.uuid4()),
            name=name,
            meta=dict(body.get("Meta") or {}),
            state=existing.state if existing and existing.state != TERMINATED else ESTABLISHING,
            dialer=True,
            create_index=existing.create_index if existing else index,
            modify_index=index,
            peer_id=token.peer_id,
            peer_ca_pems=list(token.ca),
            peer_server_name=token.server_name,
            peer_server_addresses=list(token.server_addresses),
            manual_server_addresses=list(token.manual_server_addresses),
            remote_partition=token.remote_partition,
            remote_datacenter=token.remote_datacenter,
        )
        if existing is not None:
            peering.imported = existing.imported
            peering.stream_secret = existing.stream_secret
        self.peerings[name.lower()] = peering
        self._touch(peering)
        return peering, token

    def established(self, name: str, stream_secret: str) -> None:
        """The exchange succeeded: ESTABLISHING with the stream secret the acceptor gave."""
        peering = self.peerings[name.lower()]
        peering.stream_secret = stream_secret
        peering.state = ESTABLISHING
        self._touch(peering)

    def abandon(self, name: str, peering_id: str) -> None:
        """An establish whose exchange failed leaves no half-made peering behind."""
        peering = self.peerings.get(name.lower())
        if peering is not None and peering.id == peering_id and not peering.stream_secret:
            del self.peerings[name.lower()]
            self._index.bump(("peerings", f"peering:{name}"))

    # -- the acceptor's side of the exchange and the stream -----------------------------

    def exchange_secret(self, peer_id: str, secret: str, remote: Mapping[str, Any]) -> str:
        """Trade a one-time establishment secret for a stream secret (`ExchangeSecret`).

        Raises:
            PeeringDenied: no such peering or the secret is not the current one.
        """
        peering = self.by_id(peer_id)
        if peering is None or peering.dialer or peering.state in (DELETING, TERMINATED):
            raise PeeringDenied("invalid peering establishment secret")
        if not secret or secret != peering.establishment_secret:
            raise PeeringDenied("invalid peering establishment secret")
        peering.establishment_secret = ""
        peering.stream_secret = str(uuid.uuid4())
        peering.remote_datacenter = str(remote.get("Datacenter") or "")
        peering.remote_partition = str(remote.get("Partition") or "default")
        self._touch(peering)
        return peering.stream_secret

    def open_stream(self, peer_id: str, stream_secret: str) -> Peering:
        """An acceptor's peering whose dialer opened its stream with the right secret."""
        peering = self.by_id(peer_id)
        if (
            peering is None
            or peering.dialer
            or peering.state in (DELETING, TERMINATED)
            or not stream_secret
            or stream_secret != peering.stream_secret
        ):
            raise PeeringDenied("invalid peering stream secret")
        return peering

    def stream_up(self, name: str) -> None:
        peering = self.peerings.get(name.lower())
        if peering is not None and peering.state in (PENDING, ESTABLISHING, FAILING):
            peering.state = ACTIVE
            self._touch(peering)

    def stream_lost(self, name: str) -> None:
        peering = self.peerings.get(name.lower())
        if peering is not None and peering.state == ACTIVE:
            peering.state = FAILING
            self._touch(peering)

    def stream_activity(self, name: str, *, sent: bool = False, heartbeat: bool = False) -> None:
        """Stream timestamps; read on demand, so they take no index (as Consul's)."""
        peering = self.peerings.get(name.lower())
        if peering is None:
            return
        now = now_rfc3339()
        if sent:
            peering.last_send = now
        else:
            peering.last_receive = now
        if heartbeat:
            peering.last_heartbeat = now

    # -- what the stream carries ---------------------------------------------------------

    def exported_to(self, peer_name: str, entries: Mapping[tuple[str, str], Any]) -> list[str]:
        """Service names the `exported-services` entry exports to `peer_name`, sorted."""
        entry = entries.get((EXPORTED_KIND, "default")) or {}
        out = set()
        for svc in entry.get("Services") or []:
            for consumer in svc.get("Consumers") or []:
                if (consumer.get("Peer") or consumer.get("PeerName")) == peer_name:
                    out.add(svc["Name"])
        return sorted(out)

    def set_exported(self, name: str, services: list[str]) -> None:
        peering = self.peerings.get(name.lower())
        if peering is not None and peering.exported != services:
            peering.exported = list(services)
            self._touch(peering)

    def received_services(
        self, name: str, services: Mapping[str, Mapping[str, list[dict[str, Any]]]]
    ) -> None:
        """A full snapshot of what the peer exports to us replaces the last one."""
        peering = self.peerings.get(name.lower())
        if peering is None or peering.state in (DELETING, TERMINATED):
            return
        topics = []
        new: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for svc, views in services.items():
            new[svc] = {
                k: [imported(e, name) for e in views.get(k) or []] for k in ("Service", "Connect")
            }
        for svc in set(new) | set(peering.imported):
            old_views = peering.imported.get(svc)
            new_views = new.get(svc)
            if old_views != new_views:
                topics += [f"peer:{name}:svc:{svc}", f"peer:{name}:connect:{svc}"]
        if topics:
            peering.imported = new
            self._touch(peering, *topics)

    def received_bundle(
        self, name: str, trust_domain: str, roots: list[str], partition: str
    ) -> None:
        peering = self.peerings.get(name.lower())
        if peering is None or peering.state in (DELETING, TERMINATED):
            return
        old = self.bundles.get(name)
        if old is not None and old.root_pems == roots and old.trust_domain == trust_domain:
            return
        index = self._index.next
        self.bundles[name] = Bundle(
            trust_domain=trust_domain,
            peer_name=name,
            root_pems=list(roots),
            exported_partition=partition or "default",
            create_index=old.create_index if old else index,
            modify_index=index,
        )
        self._sync_trust_domains()
        self._index.bump(("bundles", f"bundle:{name}"))

    def _sync_trust_domains(self) -> None:
        domains = self._ca.peer_trust_domains
        domains.clear()
        domains.update(b.trust_domain.lower() for b in self.bundles.values())

    def peer_for_trust_domain(self, trust_domain: str) -> str | None:
        """The local name of the peer whose bundle carries `trust_domain` (lower-case)."""
        for name, bundle in self.bundles.items():
            if bundle.trust_domain.lower() == trust_domain.lower():
                return name
        return None

    def _drop_imports(self, peering: Peering) -> list[str]:
        topics = [f"bundle:{peering.name}", "bundles"]
        for svc in peering.imported:
            topics += [f"peer:{peering.name}:svc:{svc}", f"peer:{peering.name}:connect:{svc}"]
        peering.imported = {}
        self.bundles.pop(peering.name, None)
        self._sync_trust_domains()
        return topics

    def terminated(self, name: str) -> None:
        """The peer deleted its side: TERMINATED here, imports and bundle gone."""
        peering = self.peerings.get(name.lower())
        if peering is None or peering.state in (DELETING, TERMINATED):
            return
        topics = self._drop_imports(peering)
        peering.state = TERMINATED
        peering.stream_secret = ""
        self._touch(peering, *topics)

    # -- read, list, delete --------------------------------------------------------------

    def read(self, name: str, authz: Authorizer, *, partition: str = "") -> dict[str, Any]:
        _partition(partition)
        self._require_enabled()
        authz.require("peering", "", "read")
        peering = self.peerings.get(name.lower())
        if peering is None:
            raise NotFound(f'Peering not found for "{name}"')
        return peering.to_api()

    def list_all(self, authz: Authorizer, *, partition: str = "") -> list[dict[str, Any]]:
        _partition(partition)
        self._require_enabled()
        authz.require("peering", "", "read")
        return [self.peerings[k].to_api() for k in sorted(self.peerings)]

    def watch(self, name: str | None = None) -> Watch[int]:
        if name is None:
            return self._index.watch("peerings")
        return self._index.watch(f"peering:{name}", fallback="peerings")

    def mark_deleting(self, name: str, authz: Authorizer, *, partition: str = "") -> Peering | None:
        """`DELETE /v1/peering/<name>`: DELETING now; `finish_delete` removes it.

        Deleting a name that does not exist is not an error (Consul answers 200).
        """
        _partition(partition)
        self._require_enabled()
        authz.require("peering", "", "write")
        peering = self.peerings.get(name.lower())
        if peering is None:
            return None
        if peering.state != DELETING:
            topics = self._drop_imports(peering)
            peering.state = DELETING
            peering.deleted_at = now_rfc3339()
            peering.establishment_secret = ""
            self._touch(peering, *topics)
        return peering

    def finish_delete(self, name: str) -> None:
        peering = self.peerings.get(name.lower())
        if peering is not None and peering.state == DELETING:
            del self.peerings[name.lower()]
            self._index.bump(("peerings", f"peering:{name}"))

    # -- imports for the catalog and health routes ---------------------------------------

    def imported_entries(
        self, peer: str, service: str, authz: Authorizer, *, connect: bool
    ) -> list[dict[str, Any]]:
        peering = self.peerings.get(peer.lower())
        if peering is None or not authz.allowed("service", service, "read"):
            return []
        views = peering.imported.get(service) or {}
        return [dict(e) for e in views.get("Connect" if connect else "Service") or []]

    def imports_watch(self, peer: str, service: str, *, connect: bool) -> Watch[int]:
        kind = "connect" if connect else "svc"
        return self._index.watch(f"peer:{peer}:{kind}:{service}", f"peering:{peer}")

    def bundle(self, peer: str) -> Bundle:
        bundle = self.bundles.get(peer)
        if bundle is None:
            raise NotFound(f'No trust bundle for peer "{peer}"')
        return bundle

    def bundle_watch(self, peer: str) -> Watch[int]:
        return self._index.watch(f"bundle:{peer}", fallback="peerings")

    def bundles_for_service(
        self, service: str, entries: Mapping[tuple[str, str], Any]
    ) -> list[Bundle]:
        """The bundles of the peers `service` is exported to (Consul's
        `TrustBundleListByService`), by peer name; peers without a bundle yet are left out."""
        names = [n for n in sorted(self.bundles) if service in self.exported_to(n, entries)]
        return [self.bundles[n] for n in names]

    def service_bundles_watch(self) -> Watch[int]:
        """Wakes when any bundle or the `exported-services` entry changes."""
        return self._index.watch("bundles", f"config:{EXPORTED_KIND}", fallback="peerings")
