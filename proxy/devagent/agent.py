"""`DevAgent`: the embedded agent as a running thing on the current event loop.

Owns the HTTP server, the peering port (`peerlink`, when `ports.grpc_tls` is set), the
health-check runners (TTL expiry, TCP and HTTP probes), the leaf
renewal timers, the session TTL timers (a session is invalidated TTL x 2 after its
create or last renew, as Consul's servers do), and the remote-exec side (`remote_exec`).
Every task it starts is tracked and cancelled by `close()`.

Rule 1: state changes go through `State`; this module only schedules and reports.
Rule 2: probes only ever dial the addresses written in the checks the user registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
from dataclasses import replace
from typing import Any

import httpx
from aiohttp import web

from proxy.addr import join_host_port, split_host_port
from proxy.devagent.acl import ACLStore, Authorizer
from proxy.devagent.ca import CertificateAuthority
from proxy.devagent.config import AgentConfig
from proxy.devagent.http import Settings, create_app
from proxy.devagent.peerlink import PeerLink
from proxy.devagent.remote_exec import RemoteExec
from proxy.devagent.state import CRITICAL, PASSING, WARNING, LeafEntry, State
from proxy.devagent.state.registration import CheckSpec
from proxy.devagent.state.sessions import TTL_MULTIPLIER

log = logging.getLogger("devagent")

# Leaves are renewed at a random point between 60 % and 90 % of their lifetime, as Consul's
# agent does, so a fleet of proxies does not rotate all at once.
RENEW_MIN, RENEW_MAX = 0.6, 0.9
OUTPUT_MAX = 4096


class DevAgent:
    """An in-process Consul-compatible agent.

    Use as `async with DevAgent(config) as agent:` or call `start()` / `close()`. After start,
    `agent.http_addr` is `host:port` of the HTTP API and `agent.url` its base URL.
    """

    def __init__(self, config: AgentConfig | None = None, **overrides: Any) -> None:
        config = config or AgentConfig()
        if overrides:
            config = replace(config, **overrides)
        self.config = config
        ca = CertificateAuthority(
            config.cluster_id,
            key_type=config.private_key_type,  # type: ignore[arg-type]
            key_bits=config.private_key_bits,
            private_key_pem=config.private_key_pem,
            leaf_ttl=config.leaf_cert_ttl,
            use_intermediate=config.use_intermediate,
        )
        acl = ACLStore(
            enabled=config.acl_enabled,
            default_policy=config.acl_default_policy,
            initial_management=config.acl_initial_management,
            default_token=config.acl_default_token,
            agent_token=config.acl_agent_token,
        )
        self.state = State(
            ca=ca,
            acl=acl,
            datacenter=config.datacenter,
            node_name=config.node_name,
            node_id=config.node_id,
            default_intention_policy=config.default_intention_policy,
            sidecar_port_range=(config.sidecar_min_port, config.sidecar_max_port),
            sidecar_check_interval=config.sidecar_check_interval,
            session_ttl_min=config.session_ttl_min,
        )
        # The agent's own token for its remote-exec writes (empty: the default token).
        self.remote_exec = RemoteExec(
            self.state, enabled=not config.disable_remote_exec, token=config.acl_agent_token
        )
        self.bind_address = "127.0.0.1"
        self.state.peerings.enabled = config.peering_enabled
        self.peering: PeerLink | None = None
        if config.peering_enabled and config.grpc_tls_port >= 0:
            self.peering = PeerLink(
                self.state,
                host=config.http_host,
                port=config.grpc_tls_port,
                heartbeat=config.peering_heartbeat,
            )
        self.http_host = config.http_host
        self.http_port = config.http_port
        self._runner: web.AppRunner | None = None
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self._leaf_timers: dict[str, asyncio.TimerHandle] = {}
        self._session_timers: dict[str, asyncio.TimerHandle] = {}
        self._http_clients: dict[bool, httpx.AsyncClient] = {}
        self._started = False
        self._closed = False
        self.state.checks.listeners.append(self._checks_changed)
        self.state.connect_ca.listeners.append(self._leaf_issued)
        self.state.sessions.listeners.append(self._session_ttl)

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def http_addr(self) -> str:
        return join_host_port(self.http_host, self.http_port)

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Load the configured services and intentions, then serve HTTP.

        Args:
            host, port: override the configured HTTP address (port 0 picks a free port).

        Raises:
            OSError: the address cannot be bound.
            StateError: a service or config entry from the configuration is invalid.
        """
        if self._started:
            raise RuntimeError("DevAgent.start() called twice")
        self._started = True
        management = Authorizer(enabled=False, default_allow=True)
        for entry in self.config.config_entries:
            self.state.config_entries.put(entry, management)
        for service in self.config.services:
            self.state.catalog.register_service(service, management)
        # HTTP checks verify TLS unless the check says TLSSkipVerify, as Consul does.
        self._http_clients = {
            False: httpx.AsyncClient(verify=True),
            True: httpx.AsyncClient(verify=False),
        }
        app = create_app(
            self.state,
            Settings(
                grpc_port=self.config.grpc_port,
                emulate_consul_1_2=self.config.emulate_consul_1_2,
                bind_address=self.bind_address,
            ),
            self.peering,
        )
        # Access logs are off: request lines can carry ?token= and must never be logged.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.http_host if host is None else host,
            self.http_port if port is None else port,
            reuse_address=True,
        )
        try:
            await site.start()
            if self.peering is not None:
                await self.peering.start()
        except BaseException:
            await self.close()
            raise
        sockname = self._runner.addresses[0]
        self.http_host, self.http_port = str(sockname[0]), int(sockname[1])
        self.remote_exec.start()
        log.info("dev agent serving the HTTP API on %s", self.url)

    async def close(self) -> None:
        """Stop serving, release blocked queries, stop probes and timers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.remote_exec.close()
        if self.peering is not None:
            await self.peering.close()
        self.state.notifier.close()
        self.state.events.close()
        timers = [self._ttl_timers, self._leaf_timers, self._session_timers]
        for table in timers:
            for handle in table.values():
                handle.cancel()
            table.clear()
        probes = list(self._probes.values())
        self._probes.clear()
        for task in probes:
            task.cancel()
        for task in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        for client in self._http_clients.values():
            await client.aclose()

    async def __aenter__(self) -> DevAgent:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- conveniences for tests and the demo ---------------------------------------------

    def rotate_ca(self, **kwargs: Any) -> None:
        """Rotate the CA now: new root, cross-signed by the old, every cached leaf re-issued."""
        self.state.connect_ca.rotate(**kwargs)

    def set_check_status(self, check_id: str, status: str, output: str = "") -> None:
        """Force a check's status (any check type) until its runner next reports."""
        if check_id not in self.state.checks.records:
            raise KeyError(check_id)
        self.state.checks.update_check(check_id, status, output)

    # -- health checks -------------------------------------------------------------------

    def _checks_changed(self, added: set[str], removed: set[str]) -> None:
        if self._closed:
            return
        for cid in removed | added:
            handle = self._ttl_timers.pop(cid, None)
            if handle is not None:
                handle.cancel()
            task = self._probes.pop(cid, None)
            if task is not None:
                task.cancel()
        if not self._started:
            return
        loop = asyncio.get_running_loop()
        for cid in added:
            spec = self.state.checks.specs.get(cid)
            if spec is None:
                continue
            if spec.kind == "ttl":
                self._ttl_timers[cid] = loop.call_later(spec.ttl, self._ttl_expired, cid)
            elif spec.kind in ("tcp", "http"):
                self._probes[cid] = loop.create_task(self._probe_loop(cid), name=f"check {cid}")

    def _ttl_expired(self, check_id: str) -> None:
        self._ttl_timers.pop(check_id, None)
        check = self.state.checks.records.get(check_id)
        last = check["Output"] if check else ""
        output = (
            f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"
        )
        self.state.checks.update_check(check_id, CRITICAL, output)

    async def _probe_loop(self, check_id: str) -> None:
        # Consul staggers the first run randomly within the interval; the dev agent runs it at
        # once so a freshly started proxy shows up as healthy without a wait.
        specs = self.state.checks.specs
        spec = specs[check_id]
        while not self._closed and specs.get(check_id) is spec:
            try:
                if spec.kind == "tcp":
                    status, output = await self._probe_tcp(spec.target, spec.timeout)
                else:
                    status, output = await self._probe_http(spec)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a probe must never kill its loop
                status, output = CRITICAL, f"check failed: {exc}"
            if specs.get(check_id) is not spec:
                return
            self.state.checks.update_check(check_id, status, output)
            await asyncio.sleep(spec.interval)

    @staticmethod
    async def _probe_tcp(target: str, timeout: float) -> tuple[str, str]:
        host, port = split_host_port(target, "TCP check")
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                reason = "i/o timeout"
            elif exc.errno:
                reason = os.strerror(exc.errno).lower()  # "connection refused", as Go prints
            else:
                reason = str(exc)
            return CRITICAL, f"dial tcp {target}: connect: {reason}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return PASSING, f"TCP connect {target}: Success"

    async def _probe_http(self, spec: CheckSpec) -> tuple[str, str]:
        client = self._http_clients[spec.tls_skip_verify]
        headers = {k: (v[0] if isinstance(v, list) else str(v)) for k, v in spec.header.items()}
        try:
            response = await client.request(
                spec.method,
                spec.target,
                headers=headers,
                content=spec.body or None,
                timeout=spec.timeout,
                follow_redirects=not spec.disable_redirects,
            )
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            return CRITICAL, f"{spec.method} {spec.target}: {exc}"
        body = response.text[:OUTPUT_MAX]
        output = (
            f"HTTP {spec.method} {spec.target}: {response.status_code} "
            f"{response.reason_phrase} Output: {body}"
        )
        if 200 <= response.status_code < 300:
            return PASSING, output
        if response.status_code == 429:
            return WARNING, output
        return CRITICAL, output

    # -- session TTLs --------------------------------------------------------------------

    def _session_ttl(self, session_id: str, ttl: float | None) -> None:
        old = self._session_timers.pop(session_id, None)
        if old is not None:
            old.cancel()
        if ttl is None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._session_timers[session_id] = loop.call_later(
            ttl * TTL_MULTIPLIER, self._session_expired, session_id
        )

    def _session_expired(self, session_id: str) -> None:
        self._session_timers.pop(session_id, None)
        if self.state.sessions.invalidate(session_id):
            log.info("session %s expired: its TTL passed twice without a renew", session_id)

    # -- leaf renewal --------------------------------------------------------------------

    def _leaf_issued(self, service: str, entry: LeafEntry) -> None:
        old = self._leaf_timers.pop(service, None)
        if old is not None:
            old.cancel()
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        leaf = entry.leaf
        lifetime = (leaf.valid_before - leaf.valid_after).total_seconds()
        renew_at = leaf.valid_after.timestamp() + lifetime * random.uniform(RENEW_MIN, RENEW_MAX)
        delay = max(0.0, renew_at - time.time())
        self._leaf_timers[service] = loop.call_later(delay, self._renew_leaf, service)

    def _renew_leaf(self, service: str) -> None:
        self._leaf_timers.pop(service, None)
        if not self._closed and service in self.state.connect_ca.leaves:
            log.info("renewing leaf certificate for service %s", service)
            self.state.connect_ca.issue_leaf(service)
