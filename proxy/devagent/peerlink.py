"""The dev agent's peering port: the secret exchange and the peering stream between agents.

Consul's servers speak gRPC here (`PeerStreamService`). A dev agent peers only with
another dev agent, over its own documented channel: newline-delimited JSON objects over
TLS on the agent's peering port (`ports.grpc_tls`).

- **Exchange** (dialer -> acceptor, one request): TLS that trusts only the token's CA and
  checks the token's `ServerName` (the acceptor presents a certificate for
  `server.<dc>.peering.<trust domain>` signed by its Connect CA). The dialer sends
  `{"Op":"exchange","PeerID","EstablishmentSecret","Remote","TrustDomain","CA"}`; the
  answer is `{"StreamSecret":...}` or `{"Error":{"Code":"PermissionDenied","Message":...}}`.
  Attempts as Consul's: 2 s each, every ~150 ms, 3 s overall.
- **Stream** (long-lived, mutual TLS): the dialer presents its own server certificate,
  which the acceptor verifies against the CA the dialer sent in the exchange (and its later
  bundles), and opens with `{"Op":"open","PeerID","StreamSecretID"}`. Then each side sends
  `{"Op":"bundle","TrustDomain","RootPEMs","ExportedPartition"}` (its current roots),
  `{"Op":"services","Services":{name:{"Service":[...],"Connect":[...]}}}` (a full snapshot
  of what the `exported-services` entry exports to that peer, health entries as its own
  health endpoint renders them, `Connect.PeerMeta` on the connect ones) whenever either
  changes, `{"Op":"heartbeat"}` every `heartbeat` seconds, and `{"Op":"terminated"}` when
  its side of the peering is deleted. The dialer reconnects after a lost stream.

Rule 1: state changes go through `state.peerings`; this module owns sockets and tasks only.
Rule 2: every read has a deadline or ends with the connection; every task is tracked and
cancelled by `close()`; a line longer than `MAX_LINE` or one that is not a JSON object
ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
from collections.abc import Mapping
from typing import Any

from proxy.addr import split_host_port
from proxy.devagent import peerwire
from proxy.devagent.acl import Authorizer
from proxy.devagent.peertoken import PeeringToken
from proxy.devagent.state import State, StateError
from proxy.devagent.state.peering_records import DELETING, TERMINATED, Peering, PeeringDenied

log = logging.getLogger("devagent.peering")

ATTEMPT_TIMEOUT = 2.0
ESTABLISH_TIMEOUT = 3.0
RETRY_WAIT = 0.15
FIRST_LINE_TIMEOUT = 5.0
HEARTBEAT = 15.0
RECONNECT_MIN, RECONNECT_MAX = 0.2, 5.0
_WATCHED = ("services", "checks", "config:exported-services", "roots", "ca-config", "peerings")


class _ExchangeDenied(Exception):
    pass


class PeerLink:
    """The agent's peering listener, its establish calls and its streams."""

    def __init__(self, state: State, *, host: str, port: int, heartbeat: float = HEARTBEAT) -> None:
        self._state = state
        self.host = host
        self.port = port
        self.heartbeat = heartbeat
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._streams: dict[str, asyncio.StreamWriter] = {}
        # Per acceptor peering name: the dialer's CA PEMs and trust domain (its client cert).
        self._client_cas: dict[str, tuple[str, list[str]]] = {}
        self._closed = False
        self._cert_key: tuple[str, str] | None = None
        self._cert_root = ""
        self._ctx_cache: tuple[tuple[str, tuple[str, ...]], ssl.SSLContext] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        base = self._server_context()
        # The context of each connection is picked at its ClientHello: the current
        # certificate (re-signed after a rotation) and the peers' CAs known by then.
        base.verify_mode = ssl.CERT_OPTIONAL
        base.sni_callback = self._pick_context
        self._server = await asyncio.start_server(
            self._accept,
            self.host,
            self.port,
            limit=peerwire.MAX_LINE,
            ssl=base,
            ssl_handshake_timeout=FIRST_LINE_TIMEOUT,
        )
        sockname = self._server.sockets[0].getsockname()
        self.port = int(sockname[1])
        log.info("dev agent peering port (our NDJSON over mTLS) on %s:%d", self.host, self.port)

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._streams.values()):
            writer.close()
        tasks = [*self._tasks, *self._dialers.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def server_addresses(self) -> list[str]:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return [f"{host}:{self.port}"]

    # -- TLS material --------------------------------------------------------------------

    def _own_cert(self) -> tuple[str, str]:
        """Our peering certificate, re-signed when the active root changes."""
        ca = self._state.ca
        if self._cert_key is None or self._cert_root != ca.active_root.id:
            self._cert_key = peerwire.sign_server(
                ca, self._state.peerings.own_server_name(), datacenter=self._state.datacenter
            )
            self._cert_root = ca.active_root.id
        return self._cert_key

    def _pick_context(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, base: ssl.SSLContext
    ) -> None:
        sslobj.context = self._server_context()

    def _server_context(self) -> ssl.SSLContext:
        cas = [pem for _, pems in self._client_cas.values() for pem in pems]
        key = (self._state.ca.active_root.id, tuple(cas))
        if self._ctx_cache is not None and self._ctx_cache[0] == key:
            return self._ctx_cache[1]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        peerwire.load_chain(ctx, *self._own_cert())
        if cas:
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.load_verify_locations(cadata="".join(cas))
        self._ctx_cache = (key, ctx)
        return ctx

    def _client_context(self, ca_pems: list[str], *, with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata="".join(ca_pems))
        if with_cert:
            peerwire.load_chain(ctx, *self._own_cert())
        return ctx

    # -- establish (the dialer) ------------------------------------------------------------

    async def establish(self, peering: Peering, token: PeeringToken) -> None:
        """Exchange the token's secret for a stream secret, then keep a stream open.

        Raises:
            PeeringDenied: the acceptor refused the secret (a used or replaced token).
            StateError: no attempt reached the acceptor within the overall 3 s.
        """
        try:
            secret = await self._exchange(token)
        except _ExchangeDenied as exc:
            self._state.peerings.abandon(peering.name, peering.id)
            raise PeeringDenied(f"a new peering token must be generated: {exc}") from None
        except StateError:
            self._state.peerings.abandon(peering.name, peering.id)
            raise
        self._state.peerings.established(peering.name, secret)
        old = self._dialers.pop(peering.name, None)
        if old is not None:
            old.cancel()
        self._dialers[peering.name] = asyncio.get_running_loop().create_task(
            self._dial_loop(peering.name), name=f"peering dial {peering.name}"
        )

    async def _exchange(self, token: PeeringToken) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ESTABLISH_TIMEOUT
        addresses = token.addresses()
        errors: list[str] = []
        request = {
            "Op": "exchange",
            "PeerID": token.peer_id,
            "EstablishmentSecret": token.establishment_secret,
            "Remote": {"Partition": "default", "Datacenter": self._state.datacenter},
            "TrustDomain": self._state.ca.trust_domain,
            "CA": [r.cert_pem for r in self._state.ca.roots],
        }
        ctx = self._client_context(list(token.ca), with_cert=False)
        attempt = 0
        # Bounded by the overall deadline: each pass takes at least RETRY_WAIT.
        while loop.time() < deadline:
            addr = addresses[attempt % len(addresses)]
            failed = f'failed to exchange peering secret through address "{addr}": '
            attempt += 1
            budget = min(ATTEMPT_TIMEOUT, deadline - loop.time())
            try:
                answer = await asyncio.wait_for(
                    self._exchange_once(addr, token.server_name, ctx, request), budget
                )
            except TimeoutError:
                errors.append(failed + "context deadline exceeded")
            except (OSError, ssl.SSLError, ValueError, ConnectionError) as exc:
                reason = peerwire.reason(exc)
                errors.append(
                    f'failed to exchange peering secret through address "{addr}": {reason}'
                )
            else:
                error = answer.get("Error")
                if isinstance(error, dict):
                    if error.get("Code") == "PermissionDenied":
                        raise _ExchangeDenied(str(error.get("Message") or ""))
                    errors.append(failed + str(error.get("Message")))
                elif isinstance(answer.get("StreamSecret"), str) and answer["StreamSecret"]:
                    return str(answer["StreamSecret"])
            wait = RETRY_WAIT * random.uniform(0.75, 1.25)
            if loop.time() + wait >= deadline:
                break
            await asyncio.sleep(wait)
        count = len(errors)
        listed = "".join(f"\t* {e}\n" for e in errors)
        raise StateError(f"{count} error{'s' if count != 1 else ''} occurred:\n{listed}\n")

    async def _exchange_once(
        self, addr: str, server_name: str, ctx: ssl.SSLContext, request: Mapping[str, Any]
    ) -> dict[str, Any]:
        host, port = split_host_port(addr, "peering server address")
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname=server_name, limit=peerwire.MAX_LINE
        )
        try:
            writer.write(peerwire.line(request))
            await writer.drain()
            return await peerwire.read_message(reader, None)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dial_loop(self, name: str) -> None:
        """Keep the dialer's stream open until the peering goes away or the agent closes."""
        backoff = RECONNECT_MIN
        # Bounded by the peering's life: it ends when the peering is deleted or terminated.
        while not self._closed:
            peering = self._state.peerings.peerings.get(name.lower())
            if peering is None or not peering.dialer or peering.state in (DELETING, TERMINATED):
                return
            try:
                ran = await self._dial_once(peering)
                if ran:
                    backoff = RECONNECT_MIN
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("peering %s: stream to the peer failed: %s", name, peerwire.reason(exc))
            self._state.peerings.stream_lost(name)
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _dial_once(self, peering: Peering) -> bool:
        bundle = self._state.peerings.bundles.get(peering.name)
        cas = [*peering.peer_ca_pems, *(bundle.root_pems if bundle else [])]
        ctx = self._client_context(cas, with_cert=True)
        addresses = [*peering.manual_server_addresses, *peering.peer_server_addresses]
        last: Exception | None = None
        for addr in addresses:
            host, port = split_host_port(addr, "peering server address")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host,
                        port,
                        ssl=ctx,
                        server_hostname=peering.peer_server_name,
                        limit=peerwire.MAX_LINE,
                    ),
                    ATTEMPT_TIMEOUT,
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                last = exc
                continue
            writer.write(
                peerwire.line(
                    {
                        "Op": "open",
                        "PeerID": peering.peer_id,
                        "StreamSecretID": peering.stream_secret,
                    }
                )
            )
            await self._session(peering.name, reader, writer)
            return True
        if last is not None:
            raise last
        return False

    # -- the acceptor --------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            first = await peerwire.read_message(reader, FIRST_LINE_TIMEOUT)
            op = first.get("Op")
            if op == "exchange":
                await self._answer_exchange(first, writer)
            elif op == "open":
                name = self._check_open(first, writer)
                if name is not None:
                    await self._session(name, reader, writer)
        except (OSError, ssl.SSLError, ValueError, TimeoutError, ConnectionError) as exc:
            log.debug("peering connection ended: %s", peerwire.reason(exc))
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _answer_exchange(self, msg: Mapping[str, Any], writer: asyncio.StreamWriter) -> None:
        remote = msg.get("Remote") if isinstance(msg.get("Remote"), dict) else {}
        try:
            secret = self._state.peerings.exchange_secret(
                str(msg.get("PeerID") or ""),
                str(msg.get("EstablishmentSecret") or ""),
                remote or {},
            )
        except PeeringDenied as exc:
            writer.write(
                peerwire.line({"Error": {"Code": "PermissionDenied", "Message": str(exc)}})
            )
        else:
            peering = self._state.peerings.by_id(str(msg.get("PeerID")))
            cas = msg.get("CA")
            if peering is not None and isinstance(cas, list):
                pems = [c for c in cas if isinstance(c, str) and peerwire.parses(c)]
                self._client_cas[peering.name] = (str(msg.get("TrustDomain") or "").lower(), pems)
            writer.write(peerwire.line({"StreamSecret": secret}))
        await writer.drain()

    def _check_open(self, msg: Mapping[str, Any], writer: asyncio.StreamWriter) -> str | None:
        try:
            peering = self._state.peerings.open_stream(
                str(msg.get("PeerID") or ""), str(msg.get("StreamSecretID") or "")
            )
        except PeeringDenied as exc:
            writer.write(
                peerwire.line({"Error": {"Code": "PermissionDenied", "Message": str(exc)}})
            )
            return None
        expected = self._client_cas.get(peering.name, ("", []))[0]
        got = peerwire.uri_trust_domain(writer.get_extra_info("peercert"))
        if not got or got != expected:
            writer.write(
                peerwire.line(
                    {
                        "Error": {
                            "Code": "PermissionDenied",
                            "Message": "the stream's client certificate is not the peer's",
                        }
                    }
                )
            )
            return None
        return peering.name

    # -- the stream (both sides) ---------------------------------------------------------

    async def _session(
        self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        old = self._streams.get(name)
        if old is not None:
            old.close()
        self._streams[name] = writer
        self._state.peerings.stream_up(name)
        sender = asyncio.get_running_loop().create_task(self._send_loop(name, writer))
        try:
            await self._receive_loop(name, reader)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            if self._streams.get(name) is writer:
                del self._streams[name]
            writer.close()

    def _snapshot(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        state = self._state
        everyone = Authorizer(enabled=False, default_allow=True)
        names = state.peerings.exported_to(name, state.config_entries.entries)
        state.peerings.set_exported(name, names)
        td = state.ca.trust_domain
        services: dict[str, Any] = {}
        for svc in names:
            plain = state.catalog.health_entries(svc, everyone, connect=False, passing=False)
            conn = state.catalog.health_entries(svc, everyone, connect=True, passing=False)
            conn = json.loads(json.dumps(conn))
            for entry in conn:
                service = entry["Service"]
                service["Connect"] = {
                    **(service.get("Connect") or {}),
                    "PeerMeta": {
                        "SNI": [f"{svc}.default.default.{name}.external.{td}"],
                        "SpiffeID": [f"spiffe://{td}/ns/default/dc/{state.datacenter}/svc/{svc}"],
                        "Protocol": "tcp",
                    },
                }
            services[svc] = {"Service": plain, "Connect": conn}
        bundle = {
            "Op": "bundle",
            "TrustDomain": td,
            "RootPEMs": [r.cert_pem for r in state.ca.roots],
            "ExportedPartition": "default",
        }
        return {"Op": "services", "Services": services}, bundle

    async def _send_loop(self, name: str, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        notifier = self._state.notifier
        sent: list[dict[str, Any]] = [{}, {}]
        next_beat = loop.time() + self.heartbeat
        # Bounded by the stream: the session cancels this task when the stream ends.
        while True:
            fut = notifier.watch(_WATCHED)
            try:
                for n, message in enumerate(self._snapshot(name)):
                    if message != sent[n]:
                        writer.write(peerwire.line(message))
                        sent[n] = message
                        self._state.peerings.stream_activity(name, sent=True)
                if loop.time() >= next_beat:
                    writer.write(peerwire.line({"Op": "heartbeat"}))
                    self._state.peerings.stream_activity(name, sent=True)
                    next_beat = loop.time() + self.heartbeat
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                        await fut
            finally:
                notifier.unwatch(fut, _WATCHED)

    async def _receive_loop(self, name: str, reader: asyncio.StreamReader) -> None:
        peerings = self._state.peerings
        # Bounded by the stream: EOF, a bad line or three missed heartbeats end it.
        while True:
            msg = await peerwire.read_message(reader, self.heartbeat * 3)
            op = msg.get("Op")
            peerings.stream_activity(name, heartbeat=op == "heartbeat")
            if op == "services" and isinstance(msg.get("Services"), dict):
                services = {str(k): v for k, v in msg["Services"].items() if isinstance(v, dict)}
                peerings.received_services(name, services)
            elif op == "bundle":
                roots = [
                    r
                    for r in msg.get("RootPEMs") or []
                    if isinstance(r, str) and peerwire.parses(r)
                ]
                td = str(msg.get("TrustDomain") or "")
                if td and roots:
                    peerings.received_bundle(name, td, roots, str(msg.get("ExportedPartition")))
                    if name in self._client_cas:
                        self._client_cas[name] = (td.lower(), roots)
            elif op == "terminated":
                peerings.terminated(name)
                return
            elif isinstance(msg.get("Error"), dict):
                raise ConnectionError(str(msg["Error"].get("Message")))

    # -- deletion ------------------------------------------------------------------------

    async def deleted(self, name: str) -> None:
        """Our side was deleted: tell the peer, stop the stream, then drop the record."""
        dialer = self._dialers.pop(name, None)
        writer = self._streams.pop(name, None)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.write(peerwire.line({"Op": "terminated"}))
                await asyncio.wait_for(writer.drain(), ATTEMPT_TIMEOUT)
            writer.close()
        if dialer is not None:
            dialer.cancel()
        self._client_cas.pop(name, None)
        self._state.peerings.finish_delete(name)
