"""Shared fixtures: an in-process dev agent on 127.0.0.1:0, an HTTP client for it, the
dev agent's CA on its own, and the TLS engine of the proxies and stores a test builds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

import tests.proxyfix
from proxy.config import TLS_ENGINES, load_tls_engine
from proxy.demo import ReservedPorts
from proxy.devagent import AgentConfig, DevAgent
from proxy.devagent.ca import CertificateAuthority
from tests.certs import CLUSTER

if TYPE_CHECKING:
    from tests.peerfix import Cluster


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on plain asyncio and, where installed, on uvloop.

    CONNECT_PROXY_TEST_LOOPS=asyncio (or =uvloop) narrows it to one loop. Tests marked
    `one_loop` run on the commands' own loop only (uvloop where installed): their subject is
    a child process, or the dev agent, a separate program that runs on that loop, or a path
    whose loop coverage the scenario tests already give (the peering tests keep both TLS
    engines instead).
    """
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        loops["uvloop"] = uvloop.new_event_loop
        if item.get_closest_marker("one_loop") is not None:
            return {"uvloop": uvloop.new_event_loop}
    wanted = os.environ.get("CONNECT_PROXY_TEST_LOOPS")
    if wanted:
        loops = {k: v for k, v in loops.items() if k in wanted.split(",")} or loops
    return loops


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "one_loop: run on the commands' own loop only (uvloop where installed): the "
        "subject is a child process or the dev agent, or both loops are covered elsewhere",
    )
    config.addinivalue_line(
        "markers",
        "tls_engines(*names): run once per TLS engine named (none named: every engine)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `tls_engines` run once per engine; the others on the default engine.

    The default is the product's, or CONNECT_PROXY_TLS_ENGINE when it is set (so the whole
    suite can run on either engine).
    """
    marker = metafunc.definition.get_closest_marker("tls_engines")
    if marker is not None and "tls_engine" in metafunc.fixturenames:
        metafunc.parametrize("tls_engine", marker.args or TLS_ENGINES, indirect=True)


@pytest.fixture(autouse=True)
def tls_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The TLS engine of this test: of the proxies `tests.proxyfix` starts, and of the
    stores and contexts that tests build with it."""
    engine: str = getattr(request, "param", None) or load_tls_engine(os.environ)
    monkeypatch.setattr(tests.proxyfix, "TLS_ENGINE", engine)
    return engine


async def wait_until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    """Await `predicate` becoming true, re-checking on each loop turn, under a deadline.

    For state the test cannot subscribe to (another task's progress); never a fixed sleep.
    """
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


@dataclass
class Run:
    """How a command run as a child process ended: exit code, stdout, stderr."""

    code: int
    out: str
    err: str


async def finish(
    proc: asyncio.subprocess.Process, stdin: bytes = b"", timeout: float = 20.0
) -> Run:
    """Feed `stdin` (when the process has a stdin pipe; it is closed after), read the output
    to its end and reap the process, under a deadline; a process still running at the
    deadline is killed (and the test fails on the timeout)."""
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin if proc.stdin is not None else None)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    """The dev agent's CA without an agent (no event loop needed), cluster ID `CLUSTER`.

    Shared: tests only read it and sign leaves with it; one that rotates or reconfigures a
    CA makes its own.
    """
    return CertificateAuthority(CLUSTER)


@pytest.fixture
def agent_config() -> AgentConfig:
    # Sidecar checks probe the sidecars every 0.3 s. A probe that lands in the same loop step as
    # a listener close trips a CPython accept race (see Listener.stop_accepting) whose
    # ResourceWarning would fail an unrelated test; a slower probe makes that rare.
    return AgentConfig(node_name="test-node", sidecar_check_interval=0.3)


@pytest.fixture
async def agent(agent_config: AgentConfig) -> AsyncIterator[DevAgent]:
    dev = DevAgent(agent_config)
    await dev.start("127.0.0.1", 0)
    try:
        yield dev
    finally:
        await dev.close()


@pytest.fixture
async def client(agent: DevAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agent.url, timeout=10.0) as c:
        yield c


async def register(client: httpx.AsyncClient, body: dict[str, Any], token: str = "") -> None:
    headers = {"X-Consul-Token": token} if token else {}
    r = await client.put("/v1/agent/service/register", json=body, headers=headers)
    assert r.status_code == 200, r.text


@pytest.fixture
async def clusters() -> AsyncIterator[tuple[Cluster, Cluster]]:
    """Two dev agents, dc1 and dc2, peered (`tests.peerfix.two_clusters`)."""
    from tests.peerfix import two_clusters  # it imports this module

    async with two_clusters() as pair:
        yield pair


@pytest.fixture
def ports() -> Iterator[ReservedPorts]:
    """Ports a test names before anything listens on them (flags, registrations), held
    (bound, not listening) until the test ends, so no other program takes them meanwhile."""
    held = ReservedPorts()
    yield held
    held.release()
