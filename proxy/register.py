"""`-register`: the proxy keeps its own service registered, with a TTL check it heartbeats.

Rule 1: failures are logged and retried at the next period; they never stop the proxy.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.agent import AgentClient, explain
from proxy.errors import AgentError

log = logging.getLogger("proxy")


class RegisterMonitor:
    """`-register`: keep `<svc>-proxy[-<id>]` registered with a TTL check.

    As Consul's `command/connect/proxy/register.go` does.
    """

    def __init__(
        self,
        agent: AgentClient,
        service: str,
        address: str,
        port: int,
        id_suffix: str = "",
        *,
        reconcile_period: float = 30.0,
        ttl_period: float = 30.0,
        deregister_delay: float = 0.5,
    ) -> None:
        self.agent = agent
        self.service = service
        self.address = address
        self.port = port
        self.service_id = f"{service}-proxy" + (f"-{id_suffix}" if id_suffix else "")
        self.service_name = f"{service}-proxy"
        self.check_id = f"{self.service_id}-ttl"
        self.reconcile_period = reconcile_period
        self.ttl_period = ttl_period
        self.deregister_delay = deregister_delay

    async def register(self) -> None:
        try:
            entries = await self.agent.catalog_service(self.service_name)
        except AgentError:
            entries = []
        for entry in entries:
            if (
                entry.get("ServiceID") == self.service_id
                and entry.get("ServiceAddress") == self.address
                and entry.get("ServicePort") == self.port
            ):
                log.debug("service already registered, not re-registering")
                return
        try:
            await self.agent.register(
                {
                    "Kind": "connect-proxy",
                    "ID": self.service_id,
                    "Name": self.service_name,
                    "Address": self.address,
                    "Port": self.port,
                    "Proxy": {"DestinationServiceName": self.service},
                    "Check": {
                        "CheckID": self.check_id,
                        "Name": "proxy heartbeat",
                        "TTL": f"{self.ttl_period:g}s",
                        "Notes": "Built-in proxy will heartbeat this check.",
                        "Status": "passing",
                    },
                    "Checks": None,
                }
            )
        except AgentError as exc:
            log.warning("Failed to register Consul service error=%s", explain(exc, self.service))
            return
        log.info("registered Consul service service=%s", self.service_id)

    async def heartbeat(self) -> None:
        try:
            await self.agent.pass_ttl(self.check_id)
        except AgentError as exc:
            if "does not have associated" not in str(exc):
                log.warning("heartbeat failed error=%s", explain(exc, self.service))

    async def run(self) -> None:
        """Register now, then heartbeat every TTL/3 and reconcile every period, until cancelled."""
        await self.register()
        loop = asyncio.get_running_loop()
        next_reconcile = loop.time() + self.reconcile_period
        next_beat = loop.time() + self.ttl_period / 3
        while True:
            # Timers are re-armed after each run, so events never pile up.
            await asyncio.sleep(max(0.0, min(next_reconcile, next_beat) - loop.time()))
            now = loop.time()
            if now >= next_beat:
                await self.heartbeat()
                next_beat = loop.time() + self.ttl_period / 3
            if now >= next_reconcile:
                await self.register()
                next_reconcile = loop.time() + self.reconcile_period

    async def deregister(self) -> None:
        """Deregister, with up to 3 attempts."""
        for attempt in range(3):
            try:
                await self.agent.deregister(self.service_id)
                log.info("deregistered Consul service service=%s", self.service_id)
                return
            except AgentError as exc:
                log.warning("service deregister failed error=%s", explain(exc, self.service))
                if attempt < 2:
                    await asyncio.sleep(self.deregister_delay)
