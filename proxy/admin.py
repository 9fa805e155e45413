"""The admin endpoint: readiness, certificates, config, open connections, metrics, status page.

Owns `AdminServer`, a small HTTP/1.1 server (h11 over asyncio streams) that reads what
`proxy.runner.run` keeps current in its `RunState` and the `ProxyMetrics` of the
process. Routes (GET, and HEAD with the same headers and no body):

    /             the status page for people (`proxy.admin_page`)
    /ready        200 "ready", else 503 and why not
    /certs        the leaf in use: serial, SPIFFE ID, validity, root IDs (JSON)
    /config       the settings and the current ProxyConfig, secrets redacted (JSON)
    /connections  the open connections of every listener (JSON)
    /metrics      the Prometheus exposition

Rule 1: read only. Nothing here changes the proxy, its listeners or its certificates.
Rule 2: never a secret: no private key is ever read, and any mapping key containing
"token" with a non-empty string value shows "<redacted>", at any depth.
Rule 3: a client cannot hold the server: requests are bounded in size (431/413) and in time
(each must arrive whole within `read_timeout`, and its response be taken as fast), at most
`MAX_CONNECTIONS` are open at once, and bytes that are not HTTP get a 400 and a close. A
failing handler answers 500 and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import h11
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.addr import join_host_port
from proxy.admin_page import render_status, rfc3339
from proxy.admin_view import gather_view, open_connections
from proxy.agent import AgentClient
from proxy.identity import encode_serial
from proxy.observe import ProxyMetrics, access_fields
from proxy.runner import RunState

log = logging.getLogger("proxy.admin")

MAX_REQUEST_HEAD = 16 * 1024  # bytes of request line and headers
MAX_REQUEST_BODY = 16 * 1024  # no route takes a body; a small one is read and ignored
READ_TIMEOUT = 10.0  # seconds a request may take to arrive (an idle keep-alive one too)
MAX_CONNECTIONS = 64  # open at once; more are closed at accept
AGENT_TIMEOUT = 2.0  # seconds the status page waits for the agent's health answers
REDACTED = "<redacted>"

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_ALLOW = "GET, HEAD"
# The page has inline CSS and nothing else: no script may run, nothing may be fetched.
_PAGE_POLICY = "default-src 'none'; style-src 'unsafe-inline'; form-action 'none'"


def redact(value: Any) -> Any:
    """A copy of `value` (mappings, lists, scalars) with every "token" secret replaced.

    A key containing "token" (any case) whose value is a non-empty string becomes
    `REDACTED`; other values are kept, and nested mappings and lists are walked.
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if "token" in str(key).lower() and isinstance(item, str) and item:
                out[str(key)] = REDACTED
            else:
                out[str(key)] = redact(item)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    return value


def _json(value: Any) -> bytes:
    # default=str: a value of another type (a Path, an enum) is shown, never an error.
    return (json.dumps(value, indent=2, sort_keys=False, default=str) + "\n").encode()


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


def _text(status: int, text: str) -> _Response:
    return _Response(status, (text + "\n").encode())


class AdminServer:
    """The admin endpoint of one proxy process, on `host:port` (port 0: any free port).

    Args:
        state: what `run()` keeps current (phase, the proxy serving now).
        metrics: the process's metrics (`/metrics`, recent refusals).
        settings: what `/config` shows besides the proxy's config (flags and options).
        agent: the agent asked for upstream instances on the status page (default: the
            running proxy's own client).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        state: RunState,
        metrics: ProxyMetrics,
        settings: Mapping[str, Any] = {},  # read only: never changed
        agent: AgentClient | None = None,
        read_timeout: float = READ_TIMEOUT,
        agent_timeout: float = AGENT_TIMEOUT,
    ) -> None:
        self.host = host
        self.port = port
        self.state = state
        self.metrics = metrics
        self.settings = settings
        self.agent = agent
        self.read_timeout = read_timeout
        self.agent_timeout = agent_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._routes: dict[str, Callable[[], Awaitable[_Response]]] = {
            "/": self._status_page,
            "/ready": self._ready,
            "/certs": self._certs,
            "/config": self._config,
            "/connections": self._connections,
            "/metrics": self._metrics,
        }

    @property
    def address(self) -> str:
        """`host:port` as bound (the real port once started with port 0)."""
        return join_host_port(self.host, self.port)

    async def start(self) -> None:
        """Bind and serve in the background until `aclose()`.

        Raises:
            OSError: the address cannot be bound (its text names the address).
        """
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin endpoint listening on %s", self.address)

    async def aclose(self) -> None:
        """Stop accepting and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- HTTP ----------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts a task of our own: asyncio's task for a coroutine
        # callback would log an error if aclose() cancelled it (Python 3.11).
        if self._closed or len(self._tasks) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(
            self._serve(reader, writer), name="admin connection"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._conversation(reader, writer)
        except (OSError, TimeoutError, h11.ProtocolError):
            pass  # the client went away, went quiet, or broke HTTP past answering
        finally:
            if self._closed:
                writer.transport.abort()
            else:
                writer.close()  # after what was written is flushed

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
        """The next event, reading as h11 needs more bytes.

        Raises:
            h11.RemoteProtocolError: the bytes are not HTTP/1.1, or too many of them.
        """
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:  # only after a request we have not answered: never here
                raise h11.RemoteProtocolError("unexpected pipelined data", 400)
            conn.receive_data(await reader.read(65536))

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Request | None:
        """One whole request (its body read and dropped), or None when the client closed.

        Raises:
            h11.RemoteProtocolError: not HTTP/1.1, or past a size bound (431, 413).
        """
        event = await self._next_event(conn, reader)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError("expected a request", 400)
        request = event
        # h11 bounds a head that arrives in pieces; one that came whole in a single read is
        # measured here, so the bound holds either way.
        size = len(request.target) + sum(len(k) + len(v) for k, v in request.headers)
        if size > MAX_REQUEST_HEAD:
            raise h11.RemoteProtocolError("request head too large", 431)
        body = 0
        while not isinstance(event := await self._next_event(conn, reader), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_REQUEST_BODY:
                    raise h11.RemoteProtocolError("request body too large", 413)
            elif isinstance(event, h11.ConnectionClosed):
                return None
        return request

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Requests and responses on one connection until either side closes.

        Raises:
            TimeoutError: a request took longer than `read_timeout` to arrive (an idle
                keep-alive connection included), or a response as long to be taken.
        """
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        while True:
            try:
                # One deadline per request, not per read: a client sending a byte now and
                # then cannot hold the connection (test_a_trickling_client_is_dropped...).
                async with asyncio.timeout(self.read_timeout):
                    request = await self._read_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = exc.error_status_hint
                    async with asyncio.timeout(self.read_timeout):
                        await self._send(
                            conn, writer, _text(status, f"bad request: {exc}"), close=True
                        )
                return
            if request is None:
                return
            response = await self._respond(request)
            async with asyncio.timeout(self.read_timeout):
                await self._send(conn, writer, response, head=request.method == b"HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: _Response,
        *,
        head: bool = False,
        close: bool = False,
    ) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        reason = http.HTTPStatus(response.status).phrase.encode()
        events: list[h11.Event] = [
            h11.Response(status_code=response.status, headers=headers, reason=reason)
        ]
        if not head and response.body:
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        writer.write(b"".join(conn.send(event) or b"" for event in events))
        await writer.drain()

    async def _respond(self, request: h11.Request) -> _Response:
        target = request.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        handler = self._routes.get(path)
        if handler is None:
            return _text(404, f"not found: {path}")
        if request.method not in (b"GET", b"HEAD"):
            return _Response(405, b"method not allowed\n", _TEXT, (("Allow", _ALLOW),))
        try:
            return await handler()
        except Exception:
            log.exception("admin endpoint: %s failed", path)
            return _text(500, "internal error")

    # -- routes --------------------------------------------------------------------------

    async def _ready(self) -> _Response:
        why = self.state.not_ready()
        return _text(200, "ready") if not why else _text(503, why)

    async def _certs(self) -> _Response:
        proxy = self.state.proxy
        material = proxy.tls.material if proxy is not None else None
        if proxy is None or material is None:
            return _Response(503, _json({"error": "no certificates yet"}), _JSON)
        return _Response(
            200,
            _json(
                {
                    "service": proxy.config.service,
                    "spiffe_id": material.leaf.uri or "",
                    "serial": encode_serial(material.leaf.serial),
                    "not_before": rfc3339(material.not_before),
                    "not_after": rfc3339(material.not_after),
                    "expires_in_seconds": int(material.not_after - time.time()),
                    "root_ids": list(material.root_ids),
                }
            ),
            _JSON,
        )

    async def _config(self) -> _Response:
        proxy = self.state.proxy
        current: dict[str, Any] | None = None
        if proxy is not None:
            config = proxy.config
            current = {
                "service": config.service,
                "public_listener": (
                    asdict(config.public_listener) if config.public_listener else None
                ),
                "upstreams": [asdict(u) for u in config.upstreams],
                "telemetry": dict(config.telemetry),
                "authorize": proxy.authorize_status(),
            }
        return _Response(200, _json(redact({"settings": self.settings, "proxy": current})), _JSON)

    async def _connections(self) -> _Response:
        rows = []
        for conn in open_connections(self.state.proxy):
            fields = access_fields(conn)
            fields["age_seconds"] = round(conn.age(), 3)
            rows.append(fields)
        return _Response(200, _json(rows), _JSON)

    async def _metrics(self) -> _Response:
        return _Response(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    async def _status_page(self) -> _Response:
        view = await gather_view(
            self.state, self.metrics, agent=self.agent, agent_timeout=self.agent_timeout
        )
        page = render_status(view).encode()
        return _Response(200, page, _HTML, (("Content-Security-Policy", _PAGE_POLICY),))
