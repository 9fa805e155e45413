"""`connect-proxy` as a real process: signals, draining, exit codes, output hygiene."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from proxy.demo import ReservedPorts
from proxy.devagent import DevAgent
from tests.proxyfix import client_ctx, echo_app

pytestmark = pytest.mark.one_loop  # the subject is a child process

SECRET = "s3cret-token-3f9a"


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []

    async def read_until(self, text: str) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"process ended before {text!r}: {''.join(self.out)}"
                self.out.append(line)
                if text in line:
                    return

    async def finish(self) -> tuple[int, str, str]:
        async with asyncio.timeout(20):
            stdout, stderr = await self.proc.communicate()
        return self.proc.returncode or 0, "".join(self.out) + stdout.decode(), stderr.decode()


@contextlib.asynccontextmanager
async def spawn(
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> AsyncIterator[Proc]:
    """`python -m proxy <args>`, with `env` added to the environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=preexec_fn,
    )
    try:
        yield Proc(proc)
    finally:
        if proc.returncode is None:
            # Its -workers children first: killed, the parent cannot pass a signal on, and a
            # child left alive keeps the output pipes open, so wait() would never return.
            with contextlib.suppress(OSError):
                task = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                for child in task.read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(child), signal.SIGKILL)
            proc.kill()
            await proc.wait()


async def test_sigterm_drains_a_transfer_in_flight_then_exits_0(
    agent: DevAgent, ports: ReservedPorts
) -> None:
    async with echo_app() as app:
        port = ports.take()
        args = [
            "-service",
            "db",
            "-listen",
            f"127.0.0.1:{port}",
            "-service-addr",
            f"127.0.0.1:{app.port}",
            "-http-addr",
            agent.http_addr,
            "-token",
            SECRET,
            "-log-level",
            "DEBUG",
        ]
        async with spawn(*args) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            # What start-up made is out of the collector's full passes (proxy.memtrim).
            await p.read_until("start-up objects kept out of the garbage collector's passes")
            ctx = client_ctx(agent, "web")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=None
            )
            chunk = os.urandom(256 * 1024)
            writer.write(chunk)
            assert await reader.readexactly(len(chunk)) == chunk
            p.proc.send_signal(signal.SIGTERM)
            await p.read_until("Caught signal: SIGTERM")
            # New connections are refused at once...
            await p.read_until(
                "listener stopped accepting listener=public_listener active_connections=1"
            )
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            # ...while the transfer in flight goes on to its end.
            digest = hashlib.sha256()
            for _ in range(8):
                writer.write(chunk)
                digest.update(await reader.readexactly(len(chunk)))
            assert digest.hexdigest() == hashlib.sha256(chunk * 8).hexdigest()
            assert p.proc.returncode is None  # still draining
            writer.close()
            code, out, err = await p.finish()
        assert code == 0, err
        assert "==> Consul Connect proxy shutdown" in out
        assert SECRET not in out and SECRET not in err


async def test_second_signal_exits_at_once(agent: DevAgent, ports: ReservedPorts) -> None:
    async with echo_app() as app:
        port = ports.take()
        args = [
            "-service",
            "db",
            "-listen",
            f"127.0.0.1:{port}",
            "-service-addr",
            f"127.0.0.1:{app.port}",
            "-http-addr",
            agent.http_addr,
            "-drain-timeout",
            "60s",
        ]
        async with spawn(*args) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            ctx = client_ctx(agent, "web")
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=None
            )
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            p.proc.send_signal(signal.SIGTERM)
            await p.read_until("Caught signal: SIGTERM")
            p.proc.send_signal(signal.SIGINT)
            code, out, _ = await p.finish()  # within the 20 s bound, not the 60 s drain
            writer.close()
        assert code == 1
        assert "Caught second signal, exiting now" in out


async def test_exit_code_is_nonzero_when_it_cannot_serve(agent: DevAgent) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [
            "-service",
            "db",
            "-listen",
            f"127.0.0.1:{port}",
            "-service-addr",
            "127.0.0.1:1",
            "-http-addr",
            agent.http_addr,
        ]
        async with spawn(*args) as p:
            code, _, err = await p.finish()
    assert code == 1
    assert "Failed running proxy" in err and "in use" in err


async def test_sidecar_lookup_errors_exit_1(agent: DevAgent) -> None:
    async with spawn("-sidecar-for", "nothing", "-http-addr", agent.http_addr) as p:
        code, _, err = await p.finish()
    assert code == 1
    assert "No sidecar proxy registered for nothing" in err


async def test_demo_once_exits_0() -> None:
    async with spawn("demo", "-once") as p:
        code, out, err = await p.finish()
    assert code == 0, out + err
    assert "200 'hello from db (request 1)'" in out
    assert "Authorized=False (Matched L4 intention: default/web => default/db" in out
    assert "Walk-through complete." in out


async def test_demo_peering_once_exits_0() -> None:
    async with spawn("demo", "-peering", "-once") as p:
        code, out, err = await p.finish()
    assert code == 0, out + err
    assert "peering dc2: ACTIVE" in out and "peering dc1: ACTIVE" in out
    assert "(200, 'hello from db (request 1)')" in out
    assert "Authorized=True" in out
    assert "Authorized=False (Matched L4 intention: default/web => default/db" in out
    assert "db's sidecar denied 1 connection(s)" in out
    assert "Walk-through complete." in out


async def test_sigterm_works_after_the_stdout_reader_has_gone(
    agent: DevAgent, ports: ReservedPorts
) -> None:
    """`connect-proxy ... | head` must still stop on SIGTERM once head has exited."""
    async with spawn(
        "-service", "web", "-upstream", f"db:{ports.take()}", "-http-addr", agent.http_addr
    ) as p:
        await p.read_until("Log data will now stream in as it occurs")
        transport = p.proc._transport  # type: ignore[attr-defined]
        transport.get_pipe_transport(1).close()  # the reader of stdout goes away
        p.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            code = await p.proc.wait()
    assert code == 0


async def test_workers_share_the_listener_and_stop_together(
    agent: DevAgent, ports: ReservedPorts
) -> None:
    async with echo_app() as app:
        port = ports.take()
        args = [
            "-service",
            "db",
            "-listen",
            f"127.0.0.1:{port}",
            "-service-addr",
            f"127.0.0.1:{app.port}",
            "-http-addr",
            agent.http_addr,
            "-workers",
            "2",
        ]
        async with spawn(*args) as p:
            # Both processes come up on the same address (SO_REUSEPORT).
            await p.read_until("Proxy loaded config and ready to serve")
            await p.read_until("Proxy loaded config and ready to serve")
            ctx = client_ctx(agent, "web")
            for n in range(20):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=None
                )
                writer.write(b"%d" % n)
                assert await reader.readexactly(len(b"%d" % n)) == b"%d" % n
                writer.close()
            children = Path(f"/proc/{p.proc.pid}/task/{p.proc.pid}/children").read_text().split()
            assert len(children) == 1
            p.proc.send_signal(signal.SIGTERM)
            code, out, _ = await p.finish()
        assert code == 0
        assert out.count("==> Consul Connect proxy shutdown") == 2
        assert not Path(f"/proc/{children[0]}").exists()


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(
    agent: DevAgent, ports: ReservedPorts
) -> None:
    """As Go's runtime does for Consul's proxy: the default connection caps come from it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    async with echo_app() as app:
        args = [
            *("-service", "db", "-listen", f"127.0.0.1:{ports.take()}"),
            *("-service-addr", f"127.0.0.1:{app.port}", "-http-addr", agent.http_addr),
        ]
        lower = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (256, hard))
        async with spawn(*args, preexec_fn=lower) as p:
            await p.read_until("Proxy loaded config and ready to serve")
            assert _soft_nofile(p.proc.pid) == hard
            p.proc.send_signal(signal.SIGTERM)
            code, _, _ = await p.finish()
            assert code == 0
