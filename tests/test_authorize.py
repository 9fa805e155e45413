"""proxy.authorize: the authorize call, fail-closed denials.

The agent is a real HTTP server on 127.0.0.1 (aiohttp) that records every request and
answers as each test says (`tests.test_agent.recording_agents`); certificates are real, from
the dev agent's CA (`tests.proxyfix.custom_leaf`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from listeners.events import Refusal
from proxy.authorize import AgentAuthorizer
from proxy.devagent import DevAgent
from proxy.identity import Decision
from tests.proxyfix import custom_leaf
from tests.test_agent import (
    TOKEN,
    Handler,
    MakeClient,
    Recorder,
    json_reply,
    recording_agents,
    refused,
    text_reply,
    timed_out,
)


def _der(cert_pem: str) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem.encode()).public_bytes(Encoding.DER)


def _web_uri(agent: DevAgent, service: str = "web") -> str:
    return f"spiffe://{agent.state.ca.trust_domain}/ns/default/dc/dc1/svc/{service}"


_allow = json_reply(
    200, {"Authorized": True, "Reason": "Matched L4 intention: default/web => default/db"}
)


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    async with recording_agents() as make:
        yield make


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
    authorizer = AgentAuthorizer(await make_client(recorder, token=TOKEN), "db")

    decision = await authorizer.authorize(_der(cert_pem))

    assert decision == Decision(True, "Matched L4 intention: default/web => default/db", "", uri)
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
    await AgentAuthorizer(await make_client(recorder, token=TOKEN), "db").authorize(_der(cert_pem))
    (request,) = recorder.requests
    assert request.headers["X-Consul-Token"] == TOKEN
    assert TOKEN not in request.path + request.query_string
    assert TOKEN not in request.content.decode()


async def test_authorize_sends_no_token_header_without_a_token(
    agent: DevAgent, make_client: MakeClient
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=9, uri=_web_uri(agent))
    recorder = Recorder(_allow)
    await AgentAuthorizer(await make_client(recorder), "db").authorize(_der(cert_pem))
    (request,) = recorder.requests
    assert "X-Consul-Token" not in request.headers


async def test_authorize_reserializes_the_uri_it_parsed(
    agent: DevAgent, make_client: MakeClient
) -> None:
    # Consul sends the parsed URI re-serialised (newServerSideVerifier, connect/tls.go): the trust domain
    # host is lowercased.
    td = agent.state.ca.trust_domain
    cert_pem, _ = custom_leaf(
        agent, serial=3, uri=f"spiffe://{td.upper()}/ns/default/dc/dc1/svc/web"
    )
    recorder = Recorder(_allow)
    await AgentAuthorizer(await make_client(recorder), "db").authorize(_der(cert_pem))
    assert json.loads(recorder.requests[0].content)["ClientCertURI"] == _web_uri(agent)


# -- the agent's answer -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("respond", "decision"),
    [
        pytest.param(
            json_reply(200, {"Authorized": True, "Reason": "Default behavior configured by ACLs"}),
            Decision(True, "Default behavior configured by ACLs"),
            id="allowed",
        ),
        pytest.param(
            json_reply(200, {"Authorized": True}),
            Decision(True, ""),
            id="allowed-without-reason",
        ),
        pytest.param(
            json_reply(200, {"Authorized": False, "Reason": "Matched L4 intention: web => db"}),
            Decision(False, "connect: authz denied: Matched L4 intention: web => db"),
            id="denied",
        ),
    ],
)
async def test_authorize_answer_becomes_a_decision(
    agent: DevAgent, make_client: MakeClient, respond: Handler, decision: Decision
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=7, uri=_web_uri(agent))
    authorizer = AgentAuthorizer(await make_client(respond), "db")
    got = await authorizer.authorize(_der(cert_pem))
    assert (got.allowed, got.reason, got.peer_uri) == (
        decision.allowed,
        decision.reason,
        _web_uri(agent),
    )
    assert got.refusal == ("" if decision.allowed else Refusal.DENIED)


@pytest.mark.parametrize(
    ("respond", "detail"),
    [
        pytest.param(
            text_reply(403, "Permission denied\n"),
            "Unexpected response code: 403 (Permission denied)",
            id="403",
        ),
        pytest.param(
            text_reply(500, "failed getting intention match: boom"),
            "Unexpected response code: 500 (failed getting intention match: boom)",
            id="500",
        ),
        pytest.param(refused, "error talking to the agent: ConnectionRefusedError", id="refused"),
        pytest.param(timed_out, "error talking to the agent: timed out after 0.3s", id="timeout"),
        pytest.param(text_reply(200, "{not json"), "invalid JSON", id="invalid-json"),
        pytest.param(text_reply(200, ""), "unexpected answer", id="empty-body"),
        pytest.param(json_reply(200, {"Reason": "x"}), "unexpected answer", id="no-authorized"),
        pytest.param(
            json_reply(200, {"Authorized": "true"}), "unexpected answer", id="string-bool"
        ),
        pytest.param(json_reply(200, [True]), "unexpected answer", id="not-an-object"),
    ],
)
async def test_authorize_fails_closed_when_the_call_fails(
    agent: DevAgent, make_client: MakeClient, respond: Handler, detail: str
) -> None:
    cert_pem, _ = custom_leaf(agent, serial=7, uri=_web_uri(agent))
    authorizer = AgentAuthorizer(await make_client(respond, token=TOKEN), "db")

    decision = await authorizer.authorize(_der(cert_pem))

    assert decision.allowed is False
    assert decision.reason.startswith("connect: authz call failed")
    assert decision.refusal == Refusal.AUTHORIZE_FAILED
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
    authorizer = AgentAuthorizer(await make_client(recorder), "db")
    got = await authorizer.authorize(_der(cert_pem))
    assert (got.allowed, got.reason, got.refusal) == (False, reason, Refusal.NOT_SPIFFE)
    assert got.peer_uri == (uri or "")
    assert recorder.requests == []


@pytest.mark.parametrize("peer", [None, b""])
async def test_no_peer_certificate_is_denied(make_client: MakeClient, peer: bytes | None) -> None:
    recorder = Recorder(_allow)
    decision = await AgentAuthorizer(await make_client(recorder), "db").authorize(peer)
    assert decision.allowed is False
    assert decision.reason == "connect: no client certificate"
    assert decision.refusal == Refusal.NO_CLIENT_CERTIFICATE
    assert recorder.requests == []


async def test_bytes_that_are_not_a_certificate_are_denied(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(_allow)
    decision = await AgentAuthorizer(await make_client(recorder), "db").authorize(b"\x30\x03junk")
    assert decision.allowed is False
    assert decision.reason.startswith("connect: invalid leaf certificate")
    assert decision.refusal == Refusal.NOT_SPIFFE
    assert recorder.requests == []
