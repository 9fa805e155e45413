"""Recovery after an agent outage, end to end (issue 12 item 3).

A proxy serves on a dev agent; the agent goes away (its port refusing, or a stand-in on it
answering 500) until both certificate watches back off to their longest delay; then a new
dev agent, with a new CA, starts on the same port. The proxy must serve the new roots and
leaf within 2 s of the new agent answering, and each watch logs one line when the outage
begins and one when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from aiohttp import web

from proxy.config import ProxyConfig, PublicListenerConfig
from proxy.demo import ReservedPorts
from proxy.devagent import DevAgent
from proxy.sources import AgentConfigSource
from proxy.supervisor import Proxy
from proxy.watch import BACKOFF_JITTER, BACKOFF_MAX
from tests.conftest import register
from tests.proxyfix import agent_client, client_ctx, echo_app, running_proxy, tls_exchange

WATCHES = ("connect_roots", "connect_leaf")
RECOVERY_BUDGET = 2.0  # issue 12: current again within 2 s of the agent answering
# The tests' base (0.05 s) doubles past this after five failures: the watch is at its hold.
AT_THE_HOLD = BACKOFF_MAX / (1 + BACKOFF_JITTER) * (1 - BACKOFF_JITTER)
RETRY = re.compile(r"Watch still failing type=(\S+) .* retry=(\d+\.\d)s")


class Records(logging.Handler):
    """Keeps every record of a logger; `until(predicate)` wakes on the record that makes it
    true, so the test waits on what the proxy reports rather than for a time."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.frozen = False  # set once the outage under test is over: later records are not its
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.frozen:
            return
        self.records.append(record)
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    async def until(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        entry = (predicate, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._waiters.remove(entry)

    def lines(self, start: str, level: int | None = None) -> list[str]:
        return [
            r.getMessage()
            for r in self.records
            if r.getMessage().startswith(start) and (level is None or r.levelno == level)
        ]


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("proxy")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _both_at_the_hold(records: Records) -> bool:
    held = set()
    for line in records.lines("Watch still failing", logging.DEBUG):
        match = RETRY.match(line)
        if match is not None and float(match[2]) >= round(AT_THE_HOLD, 1):
            held.add(match[1])
    return held >= set(WATCHES)  # the peer-trust watch of the public listener may fail too


@contextlib.asynccontextmanager
async def answering_500(port: int) -> AsyncIterator[None]:
    """A stand-in on the agent's port answering every request 500, as a broken agent."""

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="agent is broken")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", broken)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        yield
    finally:
        await runner.cleanup()


def _serves_ca_of(proxy: Proxy, agent: DevAgent) -> bool:
    """The proxy's material is the agent's roots and the leaf it issued for `db`."""
    material, issued = proxy.tls.material, agent.state.connect_ca.leaves.get("db")
    if material is None or issued is None:
        return False
    roots = {root.id for root in agent.state.ca.roots}
    return set(material.root_ids) == roots and material.leaf.serial == issued.leaf.serial


@pytest.mark.parametrize("outage", ["refused", "answering 500"])
async def test_a_new_agent_with_a_new_ca_is_served_within_two_seconds(
    outage: str, records: Records, ports: ReservedPorts
) -> None:
    agent_port = ports.take()
    first = DevAgent(node_name="n")
    await first.start("127.0.0.1", agent_port)
    async with echo_app() as app, contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(first.close)  # idempotent: closed at once if all goes well
        config = ProxyConfig(
            service="db",
            public_listener=PublicListenerConfig(
                bind_address="127.0.0.1", local_service_port=app.port
            ),
        )
        proxy = await stack.enter_async_context(running_proxy(first, config))
        assert proxy.public is not None
        port = proxy.public.port
        assert await tls_exchange(port, client_ctx(first, "web"), b"before") == b"before"

        async with asyncio.timeout(15):
            await first.close()
            async with contextlib.AsyncExitStack() as broken:
                if outage == "answering 500":
                    await broken.enter_async_context(answering_500(agent_port))
                # Both watches fail until each waits its longest: the worst time to come back.
                await records.until(lambda: _both_at_the_hold(records))

            second = DevAgent(node_name="n")
            await second.start("127.0.0.1", agent_port)
            try:
                answering = asyncio.get_running_loop().time()
                rotations = proxy.tls.rotations.value
                while not _serves_ca_of(proxy, second):
                    rotations += 1
                    await proxy.tls.rotations.reached(rotations)
                took = asyncio.get_running_loop().time() - answering
                # Clients with the new CA's leaves are served; the old CA is gone.
                payload = b"after the outage"
                assert await tls_exchange(port, client_ctx(second, "web"), payload) == payload
                # The leaf may have come by the one fetch that refused roots trigger, before
                # the leaf watch's own retry: let every watch log its recovery.
                await records.until(
                    lambda: all(records.lines(f"Watch recovered type={n} ") for n in WATCHES)
                )
                # Closing `second` starts another outage, which is not the one under test.
                records.frozen = True
            finally:
                await second.close()
        assert took < RECOVERY_BUDGET, f"served the new CA {took:.2f} s after the agent answered"

    assert all(
        r.levelno == logging.DEBUG
        for r in records.records
        if r.getMessage().startswith("Watch still failing")
    )
    for name in WATCHES:
        # One line when the outage began, one when it ended; the retries only at debug.
        (errored,) = records.lines(f"Watch errored type={name} ")
        assert re.fullmatch(rf"Watch errored type={name} error=.+ retry=0\.[01]s", errored)
        (recovered,) = records.lines(f"Watch recovered type={name} ")
        match = re.fullmatch(rf"Watch recovered type={name} down=\d+\.\ds retries=(\d+)", recovered)
        assert match is not None, recovered
        failing = records.lines(f"Watch still failing type={name} ")
        assert int(match[1]) == len(failing) + 1
        if outage == "answering 500":
            assert any("Unexpected response code: 500 (agent is broken)" in f for f in failing)


async def test_a_registration_gone_for_a_while_is_waited_for_not_taken_for_an_old_agent(
    agent: DevAgent, records: Records
) -> None:
    def sidecar(port: int) -> dict[str, object]:
        return {
            "Kind": "connect-proxy",
            "ID": "db-sidecar-proxy",
            "Name": "db-sidecar-proxy",
            "Port": port,
            "Address": "127.0.0.1",
            "Proxy": {"DestinationServiceName": "db", "LocalServicePort": 9000},
        }

    async with httpx.AsyncClient(base_url=agent.url) as http:
        await register(http, sidecar(21000))
        client = agent_client(agent)
        source = AgentConfigSource(client, "db-sidecar-proxy", backoff_base=0.05)
        configs = source.configs()
        try:
            async with asyncio.timeout(10):
                first = await anext(configs)
                assert first.public_listener is not None
                assert first.public_listener.bind_port == 21000
                # Deregistered (an agent restarted without it, say): a 404 after an answer.
                r = await http.put("/v1/agent/service/deregister/db-sidecar-proxy")
                assert r.status_code == 200
                # The source only reads the agent while its consumer waits for a config.
                waiting = asyncio.ensure_future(anext(configs))
                await records.until(lambda: bool(records.lines("Watch still failing")))
                await register(http, sidecar(21001))
                second = await waiting
        finally:
            await configs.aclose()  # type: ignore[attr-defined]
            await client.aclose()
    assert second.public_listener is not None
    assert second.public_listener.bind_port == 21001
    assert source.legacy is False
    assert not records.lines("the agent has no service")
    (errored,) = records.lines("Watch errored type=agent_service ")
    assert "Unexpected response code: 404" in errored
    assert len(records.lines("Watch recovered type=agent_service ")) == 1
