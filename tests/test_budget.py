"""Connection budgets and descriptor exhaustion on the listeners (`listeners/serve.py`).

Real sockets on 127.0.0.1; the descriptor limit is lowered only in a child process
(`tests/budget_child.py`), never in pytest's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from listeners.limits import default_handshake_limit, default_max_connections
from proxy.config import ConfigError, load_agent_service
from proxy.devagent import DevAgent
from proxy.observe import ProxyMetrics
from tests.conftest import wait_until
from tests.proxyfix import client_ctx, db_sidecar, echo_app


@pytest.mark.parametrize(
    ("limit", "cap", "handshakes"),
    [(128, 16, 4), (256, 48, 12), (1024, 240, 60), (65536, 16368, 1024), (1 << 20, 262128, 1024)],
)
def test_defaults_derive_from_the_descriptor_limit(limit: int, cap: int, handshakes: int) -> None:
    assert default_max_connections(limit) == cap
    assert default_handshake_limit(cap) == handshakes


@pytest.mark.parametrize(
    ("value", "want"), [(None, None), (100, 100), (100.0, 100), ("250", 250), (" 7 ", 7)]
)
def test_max_inbound_connections_from_proxy_config(value: object, want: int | None) -> None:
    config = {} if value is None else {"max_inbound_connections": value}
    cfg = load_agent_service(_service(config))
    assert cfg.public_listener is not None
    assert cfg.public_listener.max_inbound_connections == want


@pytest.mark.parametrize("value", [0, -1, 1.5, "many", True, [], {}])
def test_bad_max_inbound_connections_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match="max_inbound_connections must be a positive whole"):
        load_agent_service(_service({"max_inbound_connections": value}))


def _service(config: dict[str, object]) -> dict[str, object]:
    return {
        "Kind": "connect-proxy",
        "ID": "db-sidecar-proxy",
        "Port": 21000,
        "Proxy": {"DestinationServiceName": "db", "LocalServicePort": 8080, "Config": config},
    }


async def _silent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed_at_once(port: int) -> bool:
    """Connect and wait for the server to close without our sending a byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(5):
            try:
                return await reader.read(1) == b""
            except ConnectionResetError:
                return True
    finally:
        writer.close()


async def _echo(port: int, agent: DevAgent, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx(agent, "web"), server_hostname=None
    )
    try:
        writer.write(payload)
        return await reader.readexactly(len(payload))
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _connections(
    port: int, n: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(n):
            opened.append(await _silent(port))
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


def _refused(metrics: ProxyMetrics, reason: str) -> float:
    line = (
        'connect_proxy_refused_connections_total{direction="inbound",'
        f'listener="public_listener",reason="{reason}"}}'
    )
    for text in metrics.exposition().decode().splitlines():
        if text.startswith(line):
            return float(text.rsplit(" ", 1)[1])
    return 0.0


async def test_cap_closes_the_next_connection_at_once(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, max_inbound_connections=4) as db:
        public = db.public
        assert public is not None
        assert (public.max_connections, public.handshake_limit) == (4, 1)
        ctx = client_ctx(agent, "web")
        held = []
        try:
            for i in range(4):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", public.port, ssl=ctx, server_hostname=None
                )
                held.append(writer)
                writer.write(b"%d" % i)
                assert await reader.readexactly(1) == b"%d" % i
            assert public.open == 4
            assert await _closed_at_once(public.port)
            assert await _closed_at_once(public.port)
            assert public.over_connection_limit == 2
            assert public.accepted.value == 4
            assert _refused(metrics, "over_connection_limit") == 2.0
        finally:
            for writer in held:
                writer.close()
        # Once they are closed, there is room again.
        await wait_until(lambda: public.open == 0)
        assert await _echo(public.port, agent, b"again") == b"again"


async def test_silent_connections_give_their_place_in_a_full_handshake_budget(
    agent: DevAgent,
) -> None:
    metrics = ProxyMetrics()
    async with (
        echo_app() as app,
        db_sidecar(agent, app, metrics, max_inbound_connections=40) as db,
    ):
        public = db.public
        assert public is not None and public.handshake_limit == 10
        # An authorized connection opened before the flood...
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", public.port, ssl=client_ctx(agent, "web"), server_hostname=None
        )
        try:
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            async with _connections(public.port, 10) as silent:
                await wait_until(lambda: public.handshaking == 10)
                # ...a new authorized client gets in: the oldest silent connection is closed
                # to make room for it...
                assert await _echo(public.port, agent, b"new client") == b"new client"
                assert await silent[0][0].read(1) == b""
                await wait_until(lambda: public.handshaking == 9)
                # ...and so does every newer silent one, the oldest giving way each time.
                for _ in range(5):
                    silent.append(await _silent(public.port))
                await wait_until(lambda: public.evicted_silent == 5)
                assert public.handshaking == 10
                for evicted in silent[1:5]:
                    assert await evicted[0].read(1) == b""
                await wait_until(lambda: _refused(metrics, "over_handshake_limit") == 5.0)
                assert public.over_handshake_limit == 0  # nobody was refused at accept
                # The authorized connection is never touched.
                writer.write(b"during")
                assert await reader.readexactly(6) == b"during"
            await wait_until(lambda: public.handshaking == 0)
            assert public.over_connection_limit == 0
        finally:
            writer.close()


async def test_a_budget_full_of_talking_handshakes_refuses_the_newcomer(agent: DevAgent) -> None:
    """Clients that sent part of a ClientHello are not evicted: the newcomer is refused."""
    metrics = ProxyMetrics()
    async with (
        echo_app() as app,
        db_sidecar(agent, app, metrics, max_inbound_connections=8) as db,
    ):
        public = db.public
        assert public is not None and public.handshake_limit == 2
        async with _connections(public.port, 2) as talking:
            for _, w in talking:
                w.write(b"\x16\x03\x01")  # the start of a TLS record, and no more
                await w.drain()
            await wait_until(lambda: public.handshaking == 2)
            assert await _closed_at_once(public.port)
            assert public.over_handshake_limit == 1
            assert public.evicted_silent == 0
            assert _refused(metrics, "over_handshake_limit") == 1.0


async def test_a_silent_connection_of_a_lighter_address_gives_way_too(agent: DevAgent) -> None:
    """The busiest address has only talking handshakes: the silent one of another address
    is evicted for the newcomer instead of the newcomer being refused."""
    metrics = ProxyMetrics()
    async with (
        echo_app() as app,
        db_sidecar(agent, app, metrics, max_inbound_connections=12) as db,
    ):
        public = db.public
        assert public is not None and public.handshake_limit == 3
        async with _connections(public.port, 2) as talking:
            for _, w in talking:
                w.write(b"\x16\x03\x01")  # from 127.0.0.1: two, each with a byte sent
                await w.drain()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", public.port, local_addr=("127.0.0.2", 0)
            )
            try:
                await wait_until(lambda: public.handshaking == 3)
                assert await _echo(public.port, agent, b"newcomer") == b"newcomer"
                assert await reader.read(1) == b""  # the silent one from 127.0.0.2 gave way
                assert public.evicted_silent == 1 and public.over_handshake_limit == 0
            finally:
                writer.close()


@contextlib.contextmanager
def _child(limit: int, cap: str) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """The child listener, its port, and (filled once it has exited) its log lines."""
    log: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "tests.budget_child", str(limit), cap],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        assert child.stderr is not None
        try:
            yield child, int(child.stdout.readline()), log
        finally:
            child.stdin.close()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            log.extend(child.stderr.read().splitlines())


def _when(child: subprocess.Popen[str], name: str, value: int) -> dict[str, int]:
    """The child's counters once its `name` equals `value` (or after its 10 s deadline)."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(f"{name} {value}\n")
    child.stdin.flush()
    status: dict[str, int] = json.loads(child.stdout.readline())
    return status


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(5)
    return sock


def _echoes(sock: socket.socket) -> bool:
    sock.sendall(b"x")
    try:
        return sock.recv(1) == b"x"
    except ConnectionResetError:
        return False


def test_default_cap_from_a_low_descriptor_limit_refuses_exactly_the_excess() -> None:
    with _child(128, "default") as (child, port, _):
        socks = [_connect(port) for _ in range(20)]
        try:
            _when(child, "over_connection_limit", 4)
            # A slot is taken at accept, the connection counted as accepted when its
            # handler starts a moment later: wait for both.
            status = _when(child, "accepted", 16)
            assert status["max_connections"] == 16
            assert (status["open"], status["accepted"], status["over_connection_limit"]) == (
                16,
                16,
                4,
            )
            assert [_echoes(s) for s in socks].count(True) == 16
            assert status["accept_pauses"] == 0
        finally:
            for s in socks:
                s.close()
        assert _when(child, "open", 0)["open"] == 0
        with contextlib.closing(_connect(port)) as again:
            assert _echoes(again)


def test_descriptor_exhaustion_pauses_accepting_then_resumes() -> None:
    # A cap above the limit: accept() itself runs out of descriptors.
    with _child(64, "1000") as (child, port, log):
        socks = [_connect(port) for _ in range(80)]
        try:
            full = _when(child, "accept_pauses", 3)  # paused, retried, still full
            assert full["accept_pauses"] >= 3
            held = full["open"]
            assert 20 < held < 64
            assert full["accepted"] == held
            # Free the descriptors: the 80 - held waiting in the backlog are accepted now.
            for s in socks[:60]:
                s.close()
            status = _when(child, "accepted", 80)
            assert status["accepted"] == 80
            assert _when(child, "open", 20)["open"] == 20
            assert all(_echoes(s) for s in socks[60:])
            more = [_connect(port) for _ in range(5)]
            assert all(_echoes(s) for s in more)
            for s in more:
                s.close()
            assert _when(child, "accepted", 85)["over_connection_limit"] == 0
        finally:
            for s in socks:
                s.close()
    assert len([x for x in log if "paused accepting" in x]) == 1
    assert len([x for x in log if "accepting again" in x]) == 1
