"""proxy.authorize and proxy.agent: the authorize call, fail-closed denials, request shapes.

The agent client runs over `httpx.MockTransport`; certificates are real, from the dev
agent's CA (`tests.proxyfix.custom_leaf`).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.agent import AgentClient
from proxy.authorize import Authorizer
from proxy.devagent import DevAgent
from proxy.errors import AgentResponseError, AgentUnavailable
from proxy.identity import Decision
from tests.proxyfix import custom_leaf

TOKEN = "5e1f0c2a-secret-token"
Handler = Callable[[httpx.Request], httpx.Response]


def _der(cert_pem: str) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(Encoding.DER)


def _web_uri(agent: DevAgent, service: str = "web") -> str:
    return f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/{service}"


class Recorder:
    """A MockTransport handler that records requests and answers with `respond`."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)


def _allow(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, json={"Authorized": True, "Reason": "Matched L4 intention: default/web => default/db"}
    )


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., AgentClient]]:
    clients: list[AgentClient] = []

    def make(handler: Handler, **kwargs: object) -> AgentClient:
        client = AgentClient(
            httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://agent"),
            **kwargs,  # type: ignore[arg-type]
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


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
    agent: DevAgent, make_client: Callable[..., AgentClient], serial: int, encoded: str
) -> None:
    uri = _web_uri(agent)
    cert_pem, _ = custom_leaf(agent, serial=serial, uri=uri)
    recorder = Recorder(_allow)
    authorizer = Authorizer(make_client(recorder, token=TOKEN), "db")

    decision = await authorizer.authorize(_der(cert_pem))

    assert decision == Decision(True, "Matched L4 intention: default/web => default/db")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert request.url.path == "/v1/agent/connect/authorize"
    assert request.url.query == b""
    assert request.headers["Content-Type"] == "application/json"
    assert request.content.endswith(b"}\n")  # encoded like Go's json.Encoder
    assert json.loads(request.content) == {
        "Target": "db",
        "ClientCertURI": uri,
        "ClientCertSerial": encoded,
    }


async def test_authorize_sends_the_token_only_as_a_header(
    agent: DevAgent, make_client: Callable[..., AgentClient]
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=9, uri=_web_uri(agent))
    recorder = Recorder(_allow)
    await Authorizer(make_client(recorder, token=TOKEN), "db").authorize(_der(cert_pem))
    (request,) = recorder.requests
    assert request.headers["X-Consul-Token"] == TOKEN
    assert TOKEN not in str(request.url)
    assert TOKEN not in request.content.decode()


async def test_authorize_sends_no_token_header_without_a_token(
    agent: DevAgent, make_client: Callable[..., AgentClient]
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=9, uri=_web_uri(agent))
    recorder = Recorder(_allow)
    await Authorizer(make_client(recorder), "db").authorize(_der(cert_pem))
    (request,) = recorder.requests
    assert "X-Consul-Token" not in request.headers


async def test_authorize_reserializes_the_uri_it_parsed(
    agent: DevAgent, make_client: Callable[..., AgentClient]
) -> None:
    # Consul sends the parsed URI re-serialised (consul-spec.md 3.2 step 4): the trust domain
    # host is lowercased.
    td = agent.state.ca.trust_domain
    cert_pem, _ = custom_leaf(
        agent, serial=3, uri=f"spiffe://{td.upper()}/ns/default/dc/dc1/svc/web"
    )
    recorder = Recorder(_allow)
    await Authorizer(make_client(recorder), "db").authorize(_der(cert_pem))
    assert json.loads(recorder.requests[0].content)["ClientCertURI"] == _web_uri(agent)


# -- the agent's answer -------------------------------------------------------------------


def _json(status: int, body: object) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def _text(status: int, text: str) -> Handler:
    return lambda request: httpx.Response(status, text=text)


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def _timed_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


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
    agent: DevAgent, make_client: Callable[..., AgentClient], respond: Handler, decision: Decision
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=7, uri=_web_uri(agent))
    authorizer = Authorizer(make_client(respond), "db")
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
        pytest.param(_refused, "error talking to the agent: ConnectError", id="refused"),
        pytest.param(_timed_out, "error talking to the agent: ReadTimeout", id="timeout"),
        pytest.param(_text(200, "{not json"), "invalid JSON", id="invalid-json"),
        pytest.param(_text(200, ""), "unexpected answer", id="empty-body"),
        pytest.param(_json(200, {"Reason": "x"}), "unexpected answer", id="no-authorized"),
        pytest.param(_json(200, {"Authorized": "true"}), "unexpected answer", id="string-bool"),
        pytest.param(_json(200, [True]), "unexpected answer", id="not-an-object"),
    ],
)
async def test_authorize_fails_closed_when_the_call_fails(
    agent: DevAgent, make_client: Callable[..., AgentClient], respond: Handler, detail: str
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=7, uri=_web_uri(agent))
    authorizer = Authorizer(make_client(respond, token=TOKEN), "db")

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
    make_client: Callable[..., AgentClient],
    uri: str | None,
    cn: str | None,
    reason: str,
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=11, uri=uri, cn=cn)
    recorder = Recorder(_allow)
    authorizer = Authorizer(make_client(recorder), "db")
    assert await authorizer.authorize(_der(cert_pem)) == Decision(False, reason)
    assert recorder.requests == []


@pytest.mark.parametrize("peer", [None, b""])
async def test_no_peer_certificate_is_denied(
    make_client: Callable[..., AgentClient], peer: bytes | None
) -> None:
    recorder = Recorder(_allow)
    decision = await Authorizer(make_client(recorder), "db").authorize(peer)
    assert decision.allowed is False
    assert decision.reason == "connect: no client certificate"
    assert recorder.requests == []


async def test_bytes_that_are_not_a_certificate_are_denied(
    make_client: Callable[..., AgentClient],
) -> None:
    recorder = Recorder(_allow)
    decision = await Authorizer(make_client(recorder), "db").authorize(b"\x30\x03junk")
    assert decision.allowed is False
    assert decision.reason.startswith("connect: invalid leaf certificate")
    assert recorder.requests == []


# -- AgentClient request shapes -----------------------------------------------------------


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={}, headers={"X-Consul-Index": "42"})


async def test_roots_without_index_does_not_block(
    make_client: Callable[..., AgentClient],
) -> None:
    recorder = Recorder(_ok)
    answer = await make_client(recorder).roots()
    (request,) = recorder.requests
    assert request.url.path == "/v1/agent/connect/ca/roots"
    assert "index" not in request.url.params and "wait" not in request.url.params
    assert answer.index == 42


@pytest.mark.parametrize(
    ("wait", "param"),
    [(300.0, "300000ms"), (2.5, "2500ms"), (0.0004, "1ms"), (1.2345, "1234ms")],
)
async def test_roots_with_index_blocks_with_integer_milliseconds(
    make_client: Callable[..., AgentClient], wait: float, param: str
) -> None:
    recorder = Recorder(_ok)
    await make_client(recorder, wait=wait).roots(index=5)
    (request,) = recorder.requests
    assert request.url.params["index"] == "5"
    assert request.url.params["wait"] == param
    assert re.fullmatch(r"[1-9][0-9]*ms", request.url.params["wait"])


async def test_leaf_with_index_blocks(make_client: Callable[..., AgentClient]) -> None:
    recorder = Recorder(_ok)
    await make_client(recorder, token=TOKEN).leaf("web", index=9)
    (request,) = recorder.requests
    assert request.url.path == "/v1/agent/connect/ca/leaf/web"
    assert dict(request.url.params) == {"index": "9", "wait": "300000ms"}
    assert request.headers["X-Consul-Token"] == TOKEN
    assert TOKEN not in str(request.url)


async def test_health_connect_asks_for_passing_stale_in_the_datacenter(
    make_client: Callable[..., AgentClient],
) -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json=[]))
    await make_client(recorder).health_connect("db", datacenter="dc2")
    (request,) = recorder.requests
    assert request.method == "GET"
    assert request.url.path == "/v1/health/connect/db"
    params = request.url.params
    assert "passing" in params and params["passing"] in ("", "1", "true")
    assert "stale" in params and params["stale"] == ""
    assert params["dc"] == "dc2"
    assert "index" not in params


async def test_health_connect_falls_back_to_the_client_datacenter(
    make_client: Callable[..., AgentClient],
) -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json=[]))
    await make_client(recorder, datacenter="dc3").health_connect("db")
    await make_client(recorder).health_connect("db")
    assert recorder.requests[0].url.params["dc"] == "dc3"
    assert "dc" not in recorder.requests[1].url.params


async def test_query_execute_asks_for_connect_endpoints_stale(
    make_client: Callable[..., AgentClient],
) -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json={"Nodes": []}))
    await make_client(recorder).query_execute("db-query", datacenter="dc2")
    (request,) = recorder.requests
    assert request.url.path == "/v1/query/db-query/execute"
    params = request.url.params
    assert params["connect"] == "true"
    assert "stale" in params and params["stale"] == ""
    assert params["dc"] == "dc2"


async def test_non_200_raises_with_consuls_text(make_client: Callable[..., AgentClient]) -> None:
    client = make_client(_text(403, "Permission denied: token lacks 'service:write'\n"))
    with pytest.raises(AgentResponseError) as info:
        await client.roots()
    assert str(info.value) == (
        "Unexpected response code: 403 (Permission denied: token lacks 'service:write')"
    )
    assert info.value.status == 403


async def test_transport_failure_raises_agent_unavailable(
    make_client: Callable[..., AgentClient],
) -> None:
    with pytest.raises(AgentUnavailable, match="error talking to the agent: ConnectError"):
        await make_client(_refused, token=TOKEN).roots()
