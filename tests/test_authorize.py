"""proxy.authorize and proxy.agent: the authorize call, fail-closed denials, request shapes.

The agent is a real HTTP server on 127.0.0.1 (aiohttp) that records every request and
answers as each test says; certificates are real, from the dev agent's CA
(`tests.proxyfix.custom_leaf`).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from multidict import CIMultiDict, MultiDict

from proxy.agent import AgentClient
from proxy.authorize import Authorizer
from proxy.devagent import DevAgent
from proxy.errors import AgentResponseError, AgentUnavailable
from proxy.httpflags import HTTPOptions
from proxy.identity import Decision
from tests.proxyfix import custom_leaf

TOKEN = "5e1f0c2a-secret-token"


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query_string: str
    params: MultiDict[str]
    headers: CIMultiDict[str]
    content: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer (a timeout)


Handler = Callable[[Seen], Reply]


def _der(cert_pem: str) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(Encoding.DER)


def _web_uri(agent: DevAgent, service: str = "web") -> str:
    return f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/{service}"


class Recorder:
    """A handler that records requests and answers with `respond`."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[Seen] = []

    def __call__(self, request: Seen) -> Reply:
        self.requests.append(request)
        return self.respond(request)


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: Reply(status, json.dumps(body).encode(), headers or {})


def _text(status: int, text: str) -> Handler:
    return lambda request: Reply(status, text.encode())


_allow = _json(
    200, {"Authorized": True, "Reason": "Matched L4 intention: default/web => default/db"}
)


async def _serve(handler: Handler, release: asyncio.Event) -> tuple[web.AppRunner, int]:
    async def any_request(request: web.Request) -> web.StreamResponse:
        seen = Seen(
            request.method,
            request.path,
            request.query_string,
            MultiDict(request.query),
            CIMultiDict(request.headers),
            await request.read(),
        )
        reply = handler(seen)
        if reply.hang:
            await release.wait()  # set when the test ends
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]


MakeClient = Callable[..., Awaitable[AgentClient]]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """`await make(handler, **kwargs)`: an AgentClient and a recording server of its own.

    `token` and `datacenter` go into the client's HTTPOptions, the rest to AgentClient.
    """
    clients: list[AgentClient] = []
    runners: list[web.AppRunner] = []
    release = asyncio.Event()

    async def make(handler: Handler, **kwargs: Any) -> AgentClient:
        if handler is _refused:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]  # closed again: nothing listens there
        else:
            runner, port = await _serve(handler, release)
            runners.append(runner)
        if handler is _timed_out:
            kwargs["timeout"] = 0.3
        opts = {k: kwargs.pop(k) for k in ("token", "datacenter") if k in kwargs}
        client = AgentClient(HTTPOptions(address=f"127.0.0.1:{port}", **opts), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()
    release.set()
    for runner in runners:
        await runner.cleanup()


# -- the authorize request ----------------------------------------------------------------

TWENTY_BYTES = bytes([0x7F, *range(1, 20)])  # 159 bits: the largest serial X.509 allows


@pytest.mark.parametrize(
    ("serial", "encoded"),
    [
        (1, "01"),
        (0x0E, "0e"),
        (128, "80"),
        (255, "ff"),
        (256, "01:00"),
        (0x0102030405, "01:02:03:04:05"),
        (int.from_bytes(TWENTY_BYTES, "big"), ":".join(f"{b:02x}" for b in TWENTY_BYTES)),
    ],
)
async def test_authorize_posts_target_uri_and_colon_hex_serial(
    agent: DevAgent, make_client: MakeClient, serial: int, encoded: str
) -> None:
    uri = _web_uri(agent)
    cert_pem, _ = custom_leaf(agent, serial=serial, uri=uri)
    recorder = Recorder(_allow)
    authorizer = Authorizer(await make_client(recorder, token=TOKEN), "db")

    decision = await authorizer.authorize(_der(cert_pem))

    assert decision == Decision(True, "Matched L4 intention: default/web => default/db")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.path == "/v1/agent/connect/authorize"
    assert request.query_string == ""
    assert request.headers["Content-Type"] == "application/json"
    assert request.content.endswith(b"}\n")  # encoded like Go's json.Encoder
    assert json.loads(request.content) == {
        "Target": "db",
        "ClientCertURI": uri,
        "ClientCertSerial": encoded,
    }


async def test_authorize_sends_the_token_only_as_a_header(
    agent: DevAgent, make_client: MakeClient
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=9, uri=_web_uri(agent))
    recorder = Recorder(_allow)
    await Authorizer(await make_client(recorder, token=TOKEN), "db").authorize(_der(cert_pem))
    (request,) = recorder.requests
    assert request.headers["X-Consul-Token"] == TOKEN
    assert TOKEN not in request.path + request.query_string
    assert TOKEN not in request.content.decode()


async def test_authorize_sends_no_token_header_without_a_token(
    agent: DevAgent, make_client: MakeClient
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=9, uri=_web_uri(agent))
    recorder = Recorder(_allow)
    await Authorizer(await make_client(recorder), "db").authorize(_der(cert_pem))
    (request,) = recorder.requests
    assert "X-Consul-Token" not in request.headers


async def test_authorize_reserializes_the_uri_it_parsed(
    agent: DevAgent, make_client: MakeClient
) -> None:
    # Consul sends the parsed URI re-serialised (consul-spec.md 3.2 step 4): the trust domain
    # host is lowercased.
    td = agent.state.ca.trust_domain
    cert_pem, _ = custom_leaf(
        agent, serial=3, uri=f"spiffe://{td.upper()}/ns/default/dc/dc1/svc/web"
    )
    recorder = Recorder(_allow)
    await Authorizer(await make_client(recorder), "db").authorize(_der(cert_pem))
    assert json.loads(recorder.requests[0].content)["ClientCertURI"] == _web_uri(agent)


# -- the agent's answer -------------------------------------------------------------------


def _refused(request: Seen) -> Reply:
    raise AssertionError("make_client points this client at a port nobody listens on")


def _timed_out(request: Seen) -> Reply:
    return Reply(hang=True)


@pytest.mark.parametrize(
    ("respond", "decision"),
    [
        pytest.param(
            _json(200, {"Authorized": True, "Reason": "Default behavior configured by ACLs"}),
            Decision(True, "Default behavior configured by ACLs"),
            id="allowed",
        ),
        pytest.param(
            _json(200, {"Authorized": True}),
            Decision(True, ""),
            id="allowed-without-reason",
        ),
        pytest.param(
            _json(200, {"Authorized": False, "Reason": "Matched L4 intention: web => db"}),
            Decision(False, "connect: authz denied: Matched L4 intention: web => db"),
            id="denied",
        ),
    ],
)
async def test_authorize_answer_becomes_a_decision(
    agent: DevAgent, make_client: MakeClient, respond: Handler, decision: Decision
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=7, uri=_web_uri(agent))
    authorizer = Authorizer(await make_client(respond), "db")
    assert await authorizer.authorize(_der(cert_pem)) == decision


@pytest.mark.parametrize(
    ("respond", "detail"),
    [
        pytest.param(
            _text(403, "Permission denied\n"),
            "Unexpected response code: 403 (Permission denied)",
            id="403",
        ),
        pytest.param(
            _text(500, "failed getting intention match: boom"),
            "Unexpected response code: 500 (failed getting intention match: boom)",
            id="500",
        ),
        pytest.param(_refused, "error talking to the agent: ConnectionRefusedError", id="refused"),
        pytest.param(_timed_out, "error talking to the agent: timed out after 0.3s", id="timeout"),
        pytest.param(_text(200, "{not json"), "invalid JSON", id="invalid-json"),
        pytest.param(_text(200, ""), "unexpected answer", id="empty-body"),
        pytest.param(_json(200, {"Reason": "x"}), "unexpected answer", id="no-authorized"),
        pytest.param(_json(200, {"Authorized": "true"}), "unexpected answer", id="string-bool"),
        pytest.param(_json(200, [True]), "unexpected answer", id="not-an-object"),
    ],
)
async def test_authorize_fails_closed_when_the_call_fails(
    agent: DevAgent, make_client: MakeClient, respond: Handler, detail: str
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=7, uri=_web_uri(agent))
    authorizer = Authorizer(await make_client(respond, token=TOKEN), "db")

    decision = await authorizer.authorize(_der(cert_pem))

    assert decision.allowed is False
    assert decision.reason.startswith("connect: authz call failed")
    assert detail in decision.reason
    assert TOKEN not in decision.reason


@pytest.mark.parametrize(
    ("uri", "cn", "reason"),
    [
        pytest.param(None, "web", "connect: invalid leaf certificate", id="no-uri-san"),
        pytest.param(
            "spiffe://x.consul/agent/server/dc/dc1",
            None,
            "connect: invalid leaf certificate URI",
            id="server-id",
        ),
        pytest.param(
            "spiffe://x.consul/agent/client/dc/dc1/id/node1",
            None,
            "connect: invalid leaf certificate URI",
            id="agent-id",
        ),
        pytest.param(
            "spiffe://x.consul", None, "connect: invalid leaf certificate URI", id="signing-id"
        ),
        pytest.param(
            "https://web.example/ns/default/dc/dc1/svc/web",
            None,
            "connect: invalid leaf certificate URI",
            id="not-spiffe",
        ),
    ],
)
async def test_peer_without_a_service_identity_is_denied_without_asking_the_agent(
    agent: DevAgent,
    make_client: MakeClient,
    uri: str | None,
    cn: str | None,
    reason: str,
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=11, uri=uri, cn=cn)
    recorder = Recorder(_allow)
    authorizer = Authorizer(await make_client(recorder), "db")
    assert await authorizer.authorize(_der(cert_pem)) == Decision(False, reason)
    assert recorder.requests == []


@pytest.mark.parametrize("peer", [None, b""])
async def test_no_peer_certificate_is_denied(make_client: MakeClient, peer: bytes | None) -> None:
    recorder = Recorder(_allow)
    decision = await Authorizer(await make_client(recorder), "db").authorize(peer)
    assert decision.allowed is False
    assert decision.reason == "connect: no client certificate"
    assert recorder.requests == []


async def test_bytes_that_are_not_a_certificate_are_denied(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(_allow)
    decision = await Authorizer(await make_client(recorder), "db").authorize(b"\x30\x03junk")
    assert decision.allowed is False
    assert decision.reason.startswith("connect: invalid leaf certificate")
    assert recorder.requests == []


# -- AgentClient request shapes -----------------------------------------------------------


_ok = _json(200, {}, {"X-Consul-Index": "42"})


async def test_roots_without_index_does_not_block(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(_ok)
    answer = await (await make_client(recorder)).roots()
    (request,) = recorder.requests
    assert request.path == "/v1/agent/connect/ca/roots"
    assert "index" not in request.params and "wait" not in request.params
    assert answer.index == 42


@pytest.mark.parametrize(
    ("wait", "param"),
    [(300.0, "300000ms"), (2.5, "2500ms"), (0.0004, "1ms"), (1.2345, "1234ms")],
)
async def test_roots_with_index_blocks_with_integer_milliseconds(
    make_client: MakeClient, wait: float, param: str
) -> None:
    recorder = Recorder(_ok)
    await (await make_client(recorder, wait=wait)).roots(index=5)
    (request,) = recorder.requests
    assert request.params["index"] == "5"
    assert request.params["wait"] == param
    assert re.fullmatch(r"[1-9][0-9]*ms", request.params["wait"])


async def test_leaf_with_index_blocks(make_client: MakeClient) -> None:
    recorder = Recorder(_ok)
    await (await make_client(recorder, token=TOKEN)).leaf("web", index=9)
    (request,) = recorder.requests
    assert request.path == "/v1/agent/connect/ca/leaf/web"
    assert dict(request.params) == {"index": "9", "wait": "300000ms"}
    assert request.headers["X-Consul-Token"] == TOKEN
    assert TOKEN not in request.query_string


async def test_health_connect_asks_for_passing_stale_in_the_datacenter(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(_json(200, []))
    await (await make_client(recorder)).health_connect("db", datacenter="dc2")
    (request,) = recorder.requests
    assert request.method == "GET"
    assert request.path == "/v1/health/connect/db"
    params = request.params
    assert "passing" in params and params["passing"] in ("", "1", "true")
    assert "stale" in params and params["stale"] == ""
    assert params["dc"] == "dc2"
    assert "index" not in params


async def test_health_connect_falls_back_to_the_client_datacenter(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(_json(200, []))
    await (await make_client(recorder, datacenter="dc3")).health_connect("db")
    await (await make_client(recorder)).health_connect("db")
    assert recorder.requests[0].params["dc"] == "dc3"
    assert "dc" not in recorder.requests[1].params


async def test_query_execute_asks_for_connect_endpoints_stale(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(_json(200, {"Nodes": []}))
    await (await make_client(recorder)).query_execute("db-query", datacenter="dc2")
    (request,) = recorder.requests
    assert request.path == "/v1/query/db-query/execute"
    params = request.params
    assert params["connect"] == "true"
    assert "stale" in params and params["stale"] == ""
    assert params["dc"] == "dc2"


async def test_non_200_raises_with_consuls_text(make_client: MakeClient) -> None:
    client = await make_client(_text(403, "Permission denied: token lacks 'service:write'\n"))
    with pytest.raises(AgentResponseError) as info:
        await client.roots()
    assert str(info.value) == (
        "Unexpected response code: 403 (Permission denied: token lacks 'service:write')"
    )
    assert info.value.status == 403


async def test_transport_failure_raises_agent_unavailable(
    make_client: MakeClient,
) -> None:
    with pytest.raises(AgentUnavailable, match="error talking to the agent: ConnectError"):
        await (await make_client(_refused, token=TOKEN)).roots()
