"""The fault suite's rig: a real dev agent process, two real sidecar processes, an echo app,
an HTTP fault relay between a proxy and the agent, and clients that measure.

`tests/test_faults.py` runs each fault once at a small size and asserts on the figures;
`bench/soak.py` runs the same scenarios (`tests/faultscenarios.py`) longer and prints the
README's fault table. Nothing here mocks a socket or TLS: every byte crosses loopback.

Rule 1: the agent is `python -m proxy dev-agent` with a config file naming its CA key and
cluster ID, so a restart on the same port brings back the same CA (and a new key brings a
new one), and so the rig can sign the bad certificates a hostile client would present.
Rule 2: a proxy process's stdout and stderr are read all the time into `Process.lines` (a
full pipe would stall its logging, and the token check reads every line).
Rule 3: every wait is on an event or a condition under a deadline; no loop is unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import ssl
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h11
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import ReservedPorts
from proxy.devagent.cakeys import generate_key, key_id
from tests.certs import issue_leaf, load_chain
from tests.proxyfix import EchoApp

T = TypeVar("T")
SECRET = "f4u1t-t0ken-7c2e9d"  # the proxies' ACL token: it must appear in no output line
READY = "Proxy loaded config and ready to serve"
HANDSHAKE_TIMEOUT_MS = 1000
FOREIGN_INDEX = 10_000_000  # the relay's index for its foreign leaf: above any real one  # the db sidecar's, so silent clients are closed within the test


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


# -- processes ----------------------------------------------------------------------------


class Process:
    """A child `python -m proxy ...` whose output lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.lines: list[str] = []
        self._grew = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read(proc.stdout)),
            asyncio.ensure_future(self._read(proc.stderr)),
        ]

    @classmethod
    async def start(
        cls,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        preexec_fn: Callable[[], object] | None = None,
    ) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=cwd,
            preexec_fn=preexec_fn,
        )
        return cls(proc, name)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace"))
            self._grew.set()
        self._grew.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 20.0) -> str:
        """The first line from index `after` on that contains `pattern` (a regex)."""
        rx = re.compile(pattern)
        seen = after
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = max(seen, len(self.lines))
                if self.proc.returncode is not None and all(r.done() for r in self._readers):
                    raise AssertionError(
                        f"{self.name} exited ({self.proc.returncode}) before {pattern!r}:\n"
                        + self.output[-4000:]
                    )
                self._grew.clear()
                await self._grew.wait()

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def exit_code(self, timeout: float = 20.0) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a stopped process dies only once woken
            self.proc.kill()
        await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


class AgentProcess:
    """`connect-proxy dev-agent` on a fixed port, restartable with the same or a new CA."""

    def __init__(self, config_dir: Path, port: int, services: list[dict[str, Any]]) -> None:
        self.config_dir = config_dir
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.url = f"http://{self.addr}"
        self.services = services
        self.process: Process | None = None
        self.new_ca()

    def new_ca(self) -> None:
        """A new CA key and cluster ID for the next start (a different trust domain)."""
        self.ca_key = generate_key()
        self.cluster_id = str(uuid.uuid4())

    @property
    def trust_domain(self) -> str:
        return f"{self.cluster_id[:8]}.consul"

    async def start(self) -> None:
        config = {
            "node_name": "fault-node",
            "connect": {
                "ca_config": {
                    "private_key": _pem_key(self.ca_key),  # type: ignore[arg-type]
                    "cluster_id": self.cluster_id,
                }
            },
            "services": self.services,
        }
        path = self.config_dir / "agent.json"
        path.write_text(json.dumps(config))
        self.process = await Process.start(
            "agent",
            "dev-agent",
            "-http-addr",
            self.addr,
            "-config-file",
            str(path),
            "-sidecar-check-interval",
            "0.3s",
        )
        await self.process.wait_for("Consul dev agent running")

    async def kill(self) -> None:
        if self.process is not None:
            await self.process.kill()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.signal(signal.SIGCONT)

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            r = await c.get(path)
            r.raise_for_status()
            return r.json()

    async def put(self, path: str, body: object) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            r = await c.put(path, json=body)
            assert r.status_code == 200, r.text
            return r.json()

    async def roots(self) -> list[str]:
        return [r["RootCert"] for r in (await self.get("/v1/agent/connect/ca/roots"))["Roots"]]

    async def leaf(self, service: str) -> tuple[str, str, str]:
        """(cert PEM, key PEM, colon-hex serial) of the agent's leaf for `service`."""
        leaf = await self.get(f"/v1/agent/connect/ca/leaf/{service}")
        return leaf["CertPEM"], leaf["PrivateKeyPEM"], leaf["SerialNumber"]

    async def rotate_ca(self) -> None:
        """Rotate to a new root key the way an operator does (PUT the CA configuration)."""
        key = generate_key()
        await self.put(
            "/v1/connect/ca/configuration",
            {"Provider": "consul", "Config": {"PrivateKey": _pem_key(key)}},  # type: ignore[arg-type]
        )
        self.ca_key = key


class ProxyProcess:
    """`connect-proxy -sidecar-for <service>` with an admin endpoint, token in the environment."""

    def __init__(self, process: Process, admin: str) -> None:
        self.process = process
        self.admin = admin

    @classmethod
    async def start(
        cls,
        service: str,
        agent_addr: str,
        admin_port: int,
        home: Path,
        *extra: str,
        preexec_fn: Callable[[], object] | None = None,
    ) -> ProxyProcess:
        home.mkdir(parents=True, exist_ok=True)
        process = await Process.start(
            service,
            "-sidecar-for",
            service,
            "-http-addr",
            agent_addr,
            "-admin-bind",
            f"127.0.0.1:{admin_port}",
            "-log-level",
            "TRACE",
            *extra,
            # The token only through the environment: never in argv (`ps` shows argv).
            env={"CONSUL_HTTP_TOKEN": SECRET, "HOME": str(home), "TMPDIR": str(home)},
            cwd=home,
            preexec_fn=preexec_fn,
        )
        await process.wait_for(READY)
        return cls(process, f"127.0.0.1:{admin_port}")

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.get(f"http://{self.admin}/metrics")
        r.raise_for_status()
        out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    async def refused(self) -> dict[str, float]:
        """Refused connections so far, by reason."""
        found: dict[str, float] = {}
        for (name, labels), value in (await self.metrics()).items():
            if name == "connect_proxy_refused_connections_total":
                reason = dict(labels)["reason"]
                found[reason] = found.get(reason, 0) + value
        return found

    async def certs(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.get(f"http://{self.admin}/certs")
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result


# -- the fault relay ----------------------------------------------------------------------


class Relay:
    """An HTTP/1.1 server in front of the agent that forwards requests or misbehaves.

    Modes: "pass" forwards; "hang" reads the request and never answers; "500" answers
    `500 Internal Server Error`; "garbage" answers 200 with a body that is not JSON;
    "foreign-leaf" forwards everything but answers leaf requests with `foreign_leaf`.
    A mode change drops every open connection, as an agent going bad drops its blocking
    queries, so the proxy's next request meets the new mode. With `only` set, the mode
    applies to requests whose target starts with it; the others are forwarded.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.only = ""
        self.foreign_leaf: dict[str, Any] | None = None
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = asyncio.Event()
        self._client = httpx.AsyncClient(base_url=f"http://{upstream}", timeout=None)
        self.addr = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.addr = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.set_mode("pass")
        self._closing.set()  # ends the waits of the handlers (a forwarded blocking query)
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._client.aclose()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        handler.add_done_callback(self._handlers.discard)
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._next_request(conn, reader)
                if request is None:
                    return
                self.requests += 1
                status, headers, content = await self._answer(request, body)
                headers = [*headers, ("content-length", str(len(content)))]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=content)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError, httpx.HTTPError):
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _unless_closing(self, waiting: Awaitable[T]) -> T:
        """`waiting`'s result, or ConnectionAbortedError (which ends the handler) once the
        relay closes: a handler ends by itself rather than being cancelled."""
        task = asyncio.ensure_future(waiting)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ConnectionAbortedError("the relay closed")
        return task.result()

    @staticmethod
    async def _next_request(
        conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _answer(
        self, request: h11.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        target = request.target.decode()
        mode = self.mode if target.startswith(self.only) else "pass"
        if mode == "hang":
            await self._unless_closing(asyncio.Event().wait())  # until dropped or closed
        if mode == "500":
            return 500, [("content-type", "text/plain")], b"rpc error: internal failure"
        if mode == "garbage":
            return 200, [("content-type", "application/json")], b'{"Roots": [{"oops"'
        if (
            mode == "foreign-leaf"
            and self.foreign_leaf is not None
            and target.startswith("/v1/agent/connect/ca/leaf/")
        ):
            if f"index={FOREIGN_INDEX}" in target:
                await self._unless_closing(asyncio.Event().wait())  # nothing new: held
            index = str(FOREIGN_INDEX)
            leaf = {**self.foreign_leaf, "ModifyIndex": FOREIGN_INDEX}
            return (
                200,
                [("content-type", "application/json"), ("x-consul-index", index)],
                json.dumps(leaf).encode(),
            )
        headers = [
            (k.decode(), v.decode())
            for k, v in request.headers
            if k.lower() not in (b"host", b"content-length", b"connection")
        ]
        response = await self._unless_closing(
            self._client.request(request.method.decode(), target, headers=headers, content=body)
        )
        kept = [
            (k, v)
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection")
        ]
        return response.status_code, kept, response.content


# -- certificates a hostile client presents -----------------------------------------------


def sign_leaf(
    issuer_pem: str,
    issuer_key: Any,
    *,
    uri: str | None,
    days: tuple[float, float] = (-1 / 24, 1),
) -> tuple[str, str]:
    """A client leaf signed by (`issuer_pem`, `issuer_key`), valid over `days` from now."""
    issuer = x509.load_pem_x509_certificate(issuer_pem.encode())
    return issue_leaf(issuer, issuer_key, uri=uri, days=days)


def self_signed_root(common_name: str) -> tuple[str, Any]:
    """A CA root of our own making (a foreign CA or a lookalike of the agent's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier(key_id(key.public_key())), False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key


def client_context(roots: Iterable[str], chain: tuple[str, str] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(roots))
    if chain is not None:
        load_chain(ctx, *chain)
    return ctx


# -- clients that measure -----------------------------------------------------------------


async def echo(
    port: int, ctx: ssl.SSLContext | None, payload: bytes, timeout: float = 10.0
) -> bytes:
    """One connection: send `payload`, read as many bytes back; b'' if refused or cut."""
    received = b""
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname=None
            )
            try:
                writer.write(payload)
                await writer.drain()
                received = await reader.readexactly(len(payload))
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                    async with asyncio.timeout(1):
                        await writer.wait_closed()
    return received


async def closed_after(port: int, send: bytes, timeout: float) -> tuple[bool, float, bytes]:
    """Connect, send `send` (raw), wait for the proxy to close: (closed, seconds, bytes read)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        if send:
            writer.write(send)
            await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                got += chunk
        return True, time.monotonic() - started, got
    except ConnectionResetError:
        return True, time.monotonic() - started, got
    except TimeoutError:
        return False, time.monotonic() - started, got
    finally:
        writer.close()


@dataclass
class Held:
    """An established connection through the proxy, echoing on demand."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0
    ok: int = 0

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext | None) -> Held:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=None
        )
        held = cls(reader, writer)
        if not await held.ping():
            held.close()
            raise AssertionError("a fresh connection must echo")
        return held

    async def ping(self, size: int = 1024) -> bool:
        payload = os.urandom(size)
        self.sent += 1
        try:
            self.writer.write(payload)
            async with asyncio.timeout(5):
                good = await self.reader.readexactly(size) == payload
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            return False
        self.ok += good
        return good

    def close(self) -> None:
        self.writer.close()


def p50_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000, 1) if samples else float("nan")


async def first_success(
    attempt: Callable[[], Any], deadline: float, step: float = 0.05
) -> float | None:
    """Seconds until `attempt()` first returns true, trying every `step`; None by `deadline`."""
    started = time.monotonic()
    end = started + deadline
    while time.monotonic() < end:
        if await attempt():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


# -- the rig ------------------------------------------------------------------------------


@dataclass
class Rig:
    """db's app and sidecar, web's sidecar with db as upstream, the agent (and a relay)."""

    base: Path
    ports: ReservedPorts
    agent: AgentProcess
    app: EchoApp
    db_port: int
    upstream_port: int
    relay: Relay | None = None
    db: ProxyProcess | None = None
    web: ProxyProcess | None = None
    started: float = field(default_factory=time.time)  # wall clock: files newer are scanned

    async def web_context(self) -> ssl.SSLContext:
        """A client context with web's leaf from the agent and the agent's current roots."""
        cert, key, _ = await self.agent.leaf("web")
        return client_context(await self.agent.roots(), (cert, key))

    async def served_serial(self) -> str:
        """The serial of the leaf the db sidecar serves right now (from a real handshake)."""
        der = await asyncio.to_thread(_server_certificate, self.db_port)
        serial = x509.load_der_x509_certificate(der).serial_number
        text = f"{serial:x}"
        text = text if len(text) % 2 == 0 else "0" + text
        return ":".join(text[i : i + 2] for i in range(0, len(text), 2))

    @property
    def db_proxy(self) -> ProxyProcess:
        assert self.db is not None
        return self.db

    def outputs(self) -> str:
        procs = [p for p in (self.db, self.web) if p is not None]
        return "".join(p.process.output for p in procs)


def _server_certificate(port: int) -> bytes:
    """The server's leaf (DER) from a handshake without a client certificate.

    Blocking, in a thread of its own: the proxy answers with an alert, and an asyncio client
    that never reads it leaves the error in OpenSSL's per-thread queue, where CPython 3.11
    raises it on the next read of *another* connection of the same thread (seen here: the
    held connections of `_outage` failed with this alert).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def services(
    app_port: int, ports: tuple[int, int, int], db_config: dict[str, Any]
) -> list[dict[str, Any]]:
    """db (the app's port) with its sidecar, web with a sidecar whose upstream is db."""
    db_port, web_port, upstream_port = ports
    local = {"address": "127.0.0.1"}  # the public listeners bind the service address
    db_proxy = {"config": db_config}
    web_proxy = {
        "upstreams": [
            {
                "destination_name": "db",
                "local_bind_address": "127.0.0.1",
                "local_bind_port": upstream_port,
            }
        ],
    }
    return [
        {
            "name": "db",
            "port": app_port,
            "connect": {"sidecar_service": {**local, "port": db_port, "proxy": db_proxy}},
        },
        {
            "name": "web",
            "port": 1,
            "connect": {"sidecar_service": {**local, "port": web_port, "proxy": web_proxy}},
        },
    ]


@contextlib.asynccontextmanager
async def rig(
    base: Path,
    *,
    relay: bool = False,
    web: bool = True,
    db_config: dict[str, Any] | None = None,
    db_preexec: Callable[[], object] | None = None,
) -> AsyncIterator[Rig]:
    """Start the agent, the app, db's sidecar (through the relay if asked) and web's."""
    ports = ReservedPorts()
    app = EchoApp()
    await app.start()
    db_port, web_port, upstream_port = ports.take(), ports.take(), ports.take()
    agent_port = ports.take()
    config = {"handshake_timeout_ms": HANDSHAKE_TIMEOUT_MS, **(db_config or {})}
    agent_dir = base / "agent"
    agent_dir.mkdir(parents=True, exist_ok=True)
    agent = AgentProcess(
        agent_dir, agent_port, services(app.port, (db_port, web_port, upstream_port), config)
    )
    r = Rig(base, ports, agent, app, db_port, upstream_port)
    try:
        # The ports stay held (bound, never listening) while the rig runs: the agent and the
        # sidecars bind them with SO_REUSEADDR, and a restarted agent gets its port back.
        await agent.start()
        addr = agent.addr
        if relay:
            r.relay = Relay(agent.addr)
            await r.relay.start()
            addr = r.relay.addr
        r.db = await ProxyProcess.start(
            "db", addr, ports.take(), base / "db-home", preexec_fn=db_preexec
        )
        if web:
            r.web = await ProxyProcess.start("web", agent.addr, ports.take(), base / "web-home")
        yield r
    finally:
        for proxy in (r.web, r.db):
            if proxy is not None:
                await proxy.process.kill()
        if r.relay is not None:
            await r.relay.close()
        await agent.kill()
        await app.close()
        ports.release()
