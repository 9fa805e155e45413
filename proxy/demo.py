"""`connect-proxy demo`: a walk-through of Connect on the embedded dev agent.

It starts the dev agent, a small HTTP `db` app, and the sidecars of `db` and `web` (web with
the upstream `db`), each configured from the agent as `connect-proxy -sidecar-for <svc>`
would be. It sends a request through web's upstream to db's public listener and shows what
happened, then turns the intention web => db to deny and shows the refusal. With `-once` it
exits after that (0 if every step behaved as expected); otherwise it allows web => db again
and keeps running with a `curl` line to try, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx

from proxy import console
from proxy.agent import AgentClient
from proxy.devagent import AgentConfig, DevAgent
from proxy.goflags import FlagError, FlagSet, HelpRequested
from proxy.httpflags import HTTPOptions
from proxy.runner import run
from proxy.sources import AgentConfigSource
from proxy.supervisor import Proxy

DEMO_HELP = """\
Usage: connect-proxy demo [-once] [-peering]

  Starts the embedded dev agent, a `db` app, and the sidecars of `db` and `web`,
  sends a request over mutual TLS from web to db, then denies web => db with an
  intention and shows the refusal.

  With -peering: two dev agents (dc1 and dc2) peer; db runs in dc2, exported to
  dc1; web in dc1 reaches it through a peered upstream; then dc2 denies web from
  peer dc1.

Options:
"""


class ReservedPorts:
    """Ports the registrations name before anything listens on them, held until it does.

    Each is bound (SO_REUSEADDR, never listening), so the kernel hands it to nobody else,
    while the sidecars, which bind with SO_REUSEADDR too, can still take it. Closing a
    probe socket and hoping the port stays free would race with every other program.

    The hold is on the wildcard address: a port held on 127.0.0.1 only was still free for
    a socket bound to another address (a client from 127.0.0.2, as the fault suite's
    slowloris connects), and that one then kept a sidecar from binding 0.0.0.0 to it.
    """

    def __init__(self) -> None:
        self._held: list[socket.socket] = []

    def take(self) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        self._held.append(sock)
        return int(sock.getsockname()[1])

    def release(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


class DbApp:
    """A tiny HTTP/1.1 server: every request gets `hello from db` and the connection closes."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = f"hello from db (request {self.requests})\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def say(text: str = "") -> None:
    print(text, flush=True)


async def show_decision(
    api: httpx.AsyncClient, uri: str, label: str = "authorize web => db"
) -> None:
    """What the agent answers db's sidecar for web's identity (the call it makes per connection)."""
    decision = (
        await api.post(
            "/v1/agent/connect/authorize",
            json={"Target": "db", "ClientCertURI": uri, "ClientCertSerial": "01"},
        )
    ).json()
    say(f"    {label}: Authorized={decision['Authorized']} ({decision['Reason']})")


async def blocking_until(
    api: httpx.AsyncClient, path: str, done: Any, *, timeout: float = 20.0
) -> Any:
    """GET `path` with blocking queries until `done(body)` is true, under a deadline."""
    index = "0"
    async with asyncio.timeout(timeout):
        while True:
            sep = "&" if "?" in path else "?"
            r = await api.get(f"{path}{sep}index={index}&wait=2s")
            body = r.json() if r.status_code == 200 else None
            if body is not None and done(body):
                return body
            index = r.headers.get("X-Consul-Index", "0") if r.status_code == 200 else "0"
            if r.status_code != 200:
                await asyncio.sleep(0.05)  # an error answers at once: do not spin


async def get_status(url: str) -> tuple[int, str] | str:
    """GET `url`: (status, body stripped), or the name of the exception that ended it."""
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            response = await c.get(url)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return response.status_code, response.text.strip()


class Sidecars:
    """The demo's sidecars, each run as `connect-proxy -sidecar-for <name>` runs it (its own
    agent client and config source under `proxy.runner.run`) until `close()`."""

    def __init__(self) -> None:
        self.proxies: dict[str, Proxy] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._clients: list[AgentClient] = []
        self._stop = asyncio.Event()

    def start(self, name: str, agent: DevAgent) -> None:
        client = AgentClient(HTTPOptions(address=agent.http_addr))
        self._clients.append(client)
        ready = self._ready[name] = asyncio.Event()

        async def mark_ready(proxy: Proxy) -> None:
            self.proxies[name] = proxy
            ready.set()

        source = AgentConfigSource(client, f"{name}-sidecar-proxy")
        self._tasks.append(
            asyncio.get_running_loop().create_task(
                run(client, source, self._stop, on_ready=mark_ready), name=f"{name} sidecar"
            )
        )

    async def wait_ready(self, timeout: float) -> None:
        """Wait until every sidecar started serves (raises TimeoutError after `timeout`)."""
        async with asyncio.timeout(timeout):
            for ready in self._ready.values():
                await ready.wait()

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.aclose()


async def _walkthrough(once: bool, stop: asyncio.Event) -> int:

    agent = DevAgent(AgentConfig(node_name="demo", sidecar_check_interval=1.0))
    await agent.start("127.0.0.1", 0)
    app = DbApp()
    await app.start()
    api = httpx.AsyncClient(base_url=agent.url, timeout=10)
    sidecars = Sidecars()
    ports = ReservedPorts()
    upstream_port = ports.take()
    try:
        say(f"==> Dev agent running at {agent.url} (trust domain {agent.state.ca.trust_domain})")
        for body in (
            {
                "Name": "db",
                "Port": app.port,
                "Connect": {"SidecarService": {"Port": ports.take(), "Address": "127.0.0.1"}},
            },
            {
                "Name": "web",
                "Port": ports.take(),
                "Connect": {
                    "SidecarService": {
                        "Port": ports.take(),
                        "Address": "127.0.0.1",
                        "Proxy": {
                            "Upstreams": [{"DestinationName": "db", "LocalBindPort": upstream_port}]
                        },
                    }
                },
            },
        ):
            r = await api.put("/v1/agent/service/register", json=body)
            r.raise_for_status()
        say(f"==> Registered db (app on 127.0.0.1:{app.port}) and web, each with a sidecar")

        for name in ("db", "web"):
            sidecars.start(name, agent)
            say(
                f"==> Started the {name} sidecar, as: connect-proxy -sidecar-for {name} "
                f"-http-addr {agent.http_addr}"
            )
        await sidecars.wait_ready(15)
        ports.release()
        db, web = sidecars.proxies["db"], sidecars.proxies["web"]
        assert db.public is not None and db.tls.material and web.tls.material
        say(f"    db  identity: {db.tls.material.leaf.uri}")
        say(f"    web identity: {web.tls.material.leaf.uri}")
        say(
            f"    db public listener: {db.public.address}; "
            f"web upstream db: 127.0.0.1:{upstream_port}"
        )
        # The web sidecar finds db through the agent's health API: wait until db's sidecar
        # check passes (its TCP check runs every second).
        await blocking_until(api, "/v1/health/connect/db?passing", lambda b: len(b) > 0)

        url = f"http://127.0.0.1:{upstream_port}/"
        ok = True
        say()
        say("==> 1. GET " + url + "  (web's upstream -> mTLS -> db's public listener -> db app)")
        started = time.perf_counter()
        got = await get_status(url)
        elapsed = (time.perf_counter() - started) * 1000
        if isinstance(got, tuple):
            say(f"    {got[0]} {got[1]!r} in {elapsed:.1f} ms")
            ok &= got[0] == 200
        else:
            say(f"    failed: {got}")
            ok = False
        uri = web.tls.material.leaf.uri or ""
        await show_decision(api, uri)
        (listener,) = web.upstreams.values()
        await listener.until_idle()
        say(
            f"    bytes through web's upstream: {listener.bytes_out} sent, {listener.bytes_in} "
            f"received; db's sidecar forwarded {db.public.forwarded}, denied {db.public.denied}"
        )

        say()
        say("==> 2. Deny web => db:  PUT /v1/connect/intentions/exact?source=web&destination=db")
        r = await api.put(
            "/v1/connect/intentions/exact?source=web&destination=db", json={"Action": "deny"}
        )
        r.raise_for_status()
        denied_before = db.public.denied
        got = await get_status(url)
        if isinstance(got, tuple):
            say(f"    unexpectedly answered: {got[0]} {got[1]!r}")
            ok = False
        else:
            say(f"    refused: {got} (db's sidecar closed it after authorize)")
        await show_decision(api, uri)
        say(
            f"    db's sidecar denied {db.public.denied - denied_before} connection(s); "
            "the db app saw none of them"
        )
        ok &= db.public.denied > denied_before and app.requests == 1
        say()
        if once:
            say("==> Walk-through complete." if ok else "==> Walk-through FAILED: see above.")
            return 0 if ok else 1
        r = await api.put(
            "/v1/connect/intentions/exact?source=web&destination=db", json={"Action": "allow"}
        )
        r.raise_for_status()
        say("==> web => db is allowed again. Try it:")
        say(f"        curl {url}")
        say(
            f'        curl -X PUT -d \'{{"Action": "deny"}}\' '
            f"'{agent.url}/v1/connect/intentions/exact?source=web&destination=db'"
        )
        say("    Press Ctrl-C to stop.")
        await stop.wait()
        return 0 if ok else 1
    finally:
        ports.release()
        await sidecars.close()
        await api.aclose()
        await app.close()
        await agent.close()


Walkthrough = Callable[[bool, asyncio.Event], Awaitable[int]]


def demo_main(args: Sequence[str], peering: Walkthrough | None = None) -> int:
    """The demo command; `peering` is `proxy.demo_peering.peering_walkthrough` (passed in by
    `proxy.main`, which imports both: that module builds on this one)."""
    fs = FlagSet()
    fs.boolean("once", False, "Exit after the walk-through (0 if every step behaved as expected).")
    fs.boolean("peering", False, "Two peered dev agents: web in dc1 reaches db in dc2.")
    try:
        values, rest = fs.parse(args)
    except HelpRequested:
        print(DEMO_HELP + fs.usage())
        return 0
    except FlagError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if rest:
        print("Should have no non-flag arguments.", file=sys.stderr)
        return 1

    console.setup_logging("WARN", stream=sys.stderr)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        once = values.get("once") is True
        if values.get("peering") is True:
            if peering is None:
                raise RuntimeError("demo -peering needs proxy.demo_peering")
            return await peering(once, stop)
        return await _walkthrough(once, stop)

    console.install_uvloop()
    return asyncio.run(main())
