"""proxy.agent and proxy.answers: request shapes, typed results, errors in Consul's words.

The agent is a real HTTP server on 127.0.0.1 (aiohttp) that records every request and
answers as each test says (`recording_agents`, also used by test_authorize.py); the body
readers of proxy.answers are pure and tested by tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from proxy.agent import AgentClient, explain, make_http_client
from proxy.answers import (
    UNEXPECTED,
    AgentService,
    Answer,
    AuthorizeResult,
    Endpoints,
    Leaf,
    ProxyRegistration,
    Roots,
    XDSPorts,
    agent_service_from,
    authorize_result,
    catalog_entries_from,
    endpoints_from_entries,
    health_endpoints,
    json_body,
    leaf_from,
    proxy_registration,
    query_endpoints,
    roots_from,
    services_from,
    xds_ports_from,
)
from proxy.devagent.ca import CertificateAuthority
from proxy.errors import AgentResponseError, AgentUnavailable, ConfigError
from proxy.httpflags import HTTPOptions, load_http_options
from proxy.identity import SpiffeIDService
from tests.certs import load_chain

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


class Recorder:
    """A handler that records requests and answers with `respond`."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[Seen] = []

    def __call__(self, request: Seen) -> Reply:
        self.requests.append(request)
        return self.respond(request)


def json_reply(status: int, body: object, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: Reply(status, json.dumps(body).encode(), headers or {})


def text_reply(status: int, text: str) -> Handler:
    return lambda request: Reply(status, text.encode())


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


def refused(request: Seen) -> Reply:
    raise AssertionError("recording_agents points this client at a port nobody listens on")


def timed_out(request: Seen) -> Reply:
    return Reply(hang=True)


MakeClient = Callable[..., Awaitable[AgentClient]]


@contextlib.asynccontextmanager
async def recording_agents() -> AsyncIterator[MakeClient]:
    """`await make(handler, **kwargs)`: an AgentClient and a recording server of its own.

    `token` and `datacenter` go into the client's HTTPOptions, the rest to AgentClient. The
    handler `refused` gives a port that is bound but not listening (held until the end, so
    nobody else can take it); `timed_out` a server that never answers, and a 0.3 s timeout.
    """
    clients: list[AgentClient] = []
    runners: list[web.AppRunner] = []
    refusing: list[socket.socket] = []
    release = asyncio.Event()

    async def make(handler: Handler, **kwargs: Any) -> AgentClient:
        if handler is refused:
            s = socket.socket()
            refusing.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        else:
            runner, port = await _serve(handler, release)
            runners.append(runner)
        if handler is timed_out:
            kwargs["timeout"] = 0.3
        opts = {k: kwargs.pop(k) for k in ("token", "datacenter") if k in kwargs}
        client = AgentClient(HTTPOptions(address=f"127.0.0.1:{port}", **opts), **kwargs)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()
        release.set()
        for runner in runners:
            await runner.cleanup()
        for s in refusing:
            s.close()


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    async with recording_agents() as make:
        yield make


# -- request shapes ----------------------------------------------------------------------


_ok = json_reply(200, {}, {"X-Consul-Index": "42"})


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
    recorder = Recorder(json_reply(200, []))
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
    recorder = Recorder(json_reply(200, []))
    await (await make_client(recorder, datacenter="dc3")).health_connect("db")
    await (await make_client(recorder)).health_connect("db")
    assert recorder.requests[0].params["dc"] == "dc3"
    assert "dc" not in recorder.requests[1].params


async def test_query_execute_asks_for_connect_endpoints_stale(
    make_client: MakeClient,
) -> None:
    recorder = Recorder(json_reply(200, {"Nodes": []}))
    await (await make_client(recorder)).query_execute("db-query", datacenter="dc2")
    (request,) = recorder.requests
    assert request.path == "/v1/query/db-query/execute"
    params = request.params
    assert params["connect"] == "true"
    assert "stale" in params and params["stale"] == ""
    assert params["dc"] == "dc2"


async def test_non_200_raises_with_consuls_text(make_client: MakeClient) -> None:
    client = await make_client(text_reply(403, "Permission denied: token lacks 'service:write'\n"))
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
        await (await make_client(refused, token=TOKEN)).roots()


# -- typed results over HTTP --------------------------------------------------------------


async def test_roots_are_the_root_pems_in_order_with_the_index(make_client: MakeClient) -> None:
    body = {
        "ActiveRootID": "b",
        "Roots": [{"RootCert": "A\n"}, {"RootCert": "B\n", "Active": True}],
    }
    client = await make_client(json_reply(200, body, {"X-Consul-Index": "7"}))
    assert await client.roots() == Roots(("A\n", "B\n"), 7)


async def test_leaf_is_the_cert_and_key_with_the_index(make_client: MakeClient) -> None:
    body = {"CertPEM": "cert", "PrivateKeyPEM": "key", "Service": "web", "SerialNumber": "0a"}
    client = await make_client(json_reply(200, body, {"X-Consul-Index": "12"}))
    assert await client.leaf("web") == Leaf("cert", "key", 12)


_DB_PROXY = {
    "Node": {"Node": "n1", "Address": "192.0.2.1", "Datacenter": "dc1"},
    "Service": {
        "Kind": "connect-proxy",
        "Service": "db-proxy",
        "Port": 21000,
        "Proxy": {"DestinationServiceName": "db"},
    },
}
_DB = ("192.0.2.1", 21000, SpiffeIDService("", "default", "dc1", "db"))


async def test_health_connect_gives_the_endpoints_and_the_index(make_client: MakeClient) -> None:
    plain = {"Node": _DB_PROXY["Node"], "Service": {"Service": "db", "Port": 5432}}
    client = await make_client(json_reply(200, [_DB_PROXY, plain], {"X-Consul-Index": "3"}))
    assert await client.health_connect("db") == Endpoints((_DB,), 3)


async def test_query_execute_gives_the_endpoints_of_its_nodes(make_client: MakeClient) -> None:
    client = await make_client(json_reply(200, {"Service": "db", "Nodes": [_DB_PROXY]}))
    assert await client.query_execute("db-query") == [_DB]


@pytest.mark.parametrize("call", ["agent_service", "managed_proxy"])
async def test_proxy_service_calls_hash_block_and_give_the_body_and_its_hash(
    make_client: MakeClient, call: str
) -> None:
    body = {"ID": "web-sidecar-proxy", "Kind": "connect-proxy"}
    recorder = Recorder(json_reply(200, body, {"X-Consul-ContentHash": "h2"}))
    client = await make_client(recorder, wait=2.5)
    first = await getattr(client, call)("web-sidecar-proxy")
    second = await getattr(client, call)("web-sidecar-proxy", "h1")
    assert first == second == AgentService(body, "h2")
    assert "hash" not in recorder.requests[0].params
    assert dict(recorder.requests[1].params) == {"hash": "h1", "wait": "2500ms"}
    prefix = "/v1/agent/service/" if call == "agent_service" else "/v1/agent/connect/proxy/"
    assert [r.path for r in recorder.requests] == [prefix + "web-sidecar-proxy"] * 2


async def test_services_and_catalog_entries(make_client: MakeClient) -> None:
    services = {"web": {"ID": "web", "Service": "web"}}
    assert await (await make_client(json_reply(200, services))).services() == services
    entries = [{"ServiceID": "web-proxy", "ServicePort": 1}]
    assert await (await make_client(json_reply(200, entries))).catalog_service("w") == entries


@pytest.mark.parametrize(
    ("body", "result"),
    [
        ({"Authorized": True, "Reason": "ok"}, AuthorizeResult(True, "ok")),
        (
            {"Authorized": False, "Reason": "denied by intention"},
            AuthorizeResult(False, "denied by intention"),
        ),
        ({"Authorized": True}, AuthorizeResult(True, "")),
    ],
)
async def test_authorize_gives_the_agents_decision(
    make_client: MakeClient, body: dict[str, Any], result: AuthorizeResult
) -> None:
    client = await make_client(json_reply(200, body))
    assert await client.authorize("db", "spiffe://x/ns/default/dc/dc1/svc/web", "01") == result


@pytest.mark.parametrize("body", [b"", b"[true]", b'{"Reason": "x"}', b'{"Authorized": "true"}'])
async def test_authorize_answer_without_a_boolean_is_unexpected(
    make_client: MakeClient, body: bytes
) -> None:
    client = await make_client(lambda request: Reply(200, body))
    with pytest.raises(AgentResponseError) as info:
        await client.authorize("db", "spiffe://x/ns/default/dc/dc1/svc/web", "01")
    assert str(info.value) == UNEXPECTED  # the denial reason users read in the log


async def test_a_body_of_the_wrong_shape_names_the_path(make_client: MakeClient) -> None:
    client = await make_client(json_reply(200, {"Roots": {"RootCert": "A"}}))
    with pytest.raises(
        AgentResponseError,
        match=r"^unexpected answer from the agent to /v1/agent/connect/ca/roots: Roots is not",
    ):
        await client.roots()


# -- the body readers (pure) --------------------------------------------------------------


def _answer(body: Any) -> Answer:
    return Answer(body, 5, "h")


@pytest.mark.parametrize(
    ("read", "body", "expected"),
    [
        # Missing and null fields read as Go's zero values.
        pytest.param(roots_from, None, Roots((), 5), id="roots-null"),
        pytest.param(roots_from, {}, Roots((), 5), id="roots-none-yet"),
        pytest.param(roots_from, {"Roots": None}, Roots((), 5), id="roots-null-list"),
        pytest.param(roots_from, {"Roots": [{}]}, Roots(("",), 5), id="root-without-cert"),
        pytest.param(leaf_from, {}, Leaf("", "", 5), id="leaf-empty"),
        pytest.param(
            leaf_from, {"CertPEM": "c", "PrivateKeyPEM": None}, Leaf("c", "", 5), id="leaf-null-key"
        ),
        pytest.param(health_endpoints, None, Endpoints((), 5), id="health-null"),
        pytest.param(health_endpoints, [], Endpoints((), 5), id="health-empty"),
        pytest.param(query_endpoints, {"Nodes": None}, [], id="query-null-nodes"),
        pytest.param(query_endpoints, {}, [], id="query-no-nodes"),
        pytest.param(agent_service_from, None, AgentService({}, "h"), id="service-null"),
        pytest.param(services_from, None, {}, id="services-null"),
        pytest.param(catalog_entries_from, None, [], id="catalog-null"),
    ],
)
def test_readers_take_missing_fields_as_zero_values(
    read: Callable[[str, Answer], Any], body: Any, expected: Any
) -> None:
    assert read("/p", _answer(body)) == expected


@pytest.mark.parametrize(
    ("read", "body", "what"),
    [
        pytest.param(roots_from, [], "the body is not a JSON object", id="roots-list"),
        pytest.param(roots_from, {"Roots": {}}, "Roots is not a JSON array", id="roots-object"),
        pytest.param(
            roots_from, {"Roots": ["pem"]}, "a root is not a JSON object", id="root-string"
        ),
        pytest.param(
            roots_from, {"Roots": [{"RootCert": 5}]}, "RootCert is not a string", id="root-number"
        ),
        pytest.param(leaf_from, "pem", "the body is not a JSON object", id="leaf-string"),
        pytest.param(leaf_from, {"CertPEM": ["c"]}, "CertPEM is not a string", id="leaf-cert-list"),
        pytest.param(
            leaf_from,
            {"CertPEM": "c", "PrivateKeyPEM": 1},
            "PrivateKeyPEM is not a string",
            id="leaf-key-number",
        ),
        pytest.param(
            health_endpoints, {"Nodes": []}, "the body is not a JSON array", id="health-object"
        ),
        pytest.param(query_endpoints, [], "the body is not a JSON object", id="query-list"),
        pytest.param(
            query_endpoints, {"Nodes": {}}, "Nodes is not a JSON array", id="query-nodes-object"
        ),
        pytest.param(agent_service_from, [], "the body is not a JSON object", id="service-list"),
        pytest.param(services_from, [], "the body is not a JSON object", id="services-list"),
        pytest.param(
            services_from, {"web": 1}, "service 'web' is not a JSON object", id="services-entry"
        ),
        pytest.param(catalog_entries_from, {}, "the body is not a JSON array", id="catalog-object"),
        pytest.param(
            catalog_entries_from, [1], "an entry is not a JSON object", id="catalog-entry"
        ),
    ],
)
def test_readers_refuse_a_body_of_another_shape(
    read: Callable[[str, Answer], Any], body: Any, what: str
) -> None:
    with pytest.raises(AgentResponseError) as info:
        read("/v1/x", _answer(body))
    assert str(info.value) == f"unexpected answer from the agent to /v1/x: {what}"


@pytest.mark.parametrize(
    ("status", "content", "text"),
    [
        (403, b"Permission denied\n", "Unexpected response code: 403 (Permission denied)"),
        (200, b"{not json", "the agent answered /v1/agent/connect/authorize with invalid JSON"),
        (200, b"[" * 100_000, "the agent answered /v1/agent/connect/authorize with invalid JSON"),
        (200, b"\xff\xfe", "the agent answered /v1/agent/connect/authorize with invalid JSON"),
    ],
)
def test_authorize_result_errors(status: int, content: bytes, text: str) -> None:
    for _ in range(2):  # a body once refused is refused again: failures are never kept
        with pytest.raises(AgentResponseError) as info:
            authorize_result("/v1/agent/connect/authorize", status, content)
        assert str(info.value).startswith(text)


def test_each_authorize_body_is_decoded_once_and_read_alike() -> None:
    """A body the agent sends again is decoded once; a denial and an allow of other bodies
    are their own answers, and a body without a boolean `Authorized` is refused each time."""
    path = "/v1/agent/connect/authorize"
    allow = b'{"Authorized":true,"Reason":"Matched L4 intention: web => db (allow)"}\n'
    deny = b'{"Authorized":false,"Reason":"Matched L4 intention: web => db (deny)"}\n'
    first = authorize_result(path, 200, allow)
    assert authorize_result(path, 200, bytes(allow)) is first
    assert first == AuthorizeResult(True, "Matched L4 intention: web => db (allow)")
    assert authorize_result(path, 200, deny) == AuthorizeResult(
        False, "Matched L4 intention: web => db (deny)"
    )
    for _ in range(2):
        with pytest.raises(AgentResponseError):
            authorize_result(path, 200, b'{"Authorized":"yes"}')


def test_json_body_of_nothing_is_none() -> None:
    assert json_body("/p", b"") is None


_NODE = {"Node": "n1", "Address": "192.0.2.1", "Datacenter": "dc2"}
_SVC = {
    "Kind": "connect-proxy",
    "Service": "db-proxy",
    "Port": 20000,
    "Proxy": {"DestinationServiceName": "db"},
}


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param("entry", id="string"),
        pytest.param(None, id="null"),
        pytest.param({"Node": _NODE, "Service": "db"}, id="service-string"),
        pytest.param({"Node": [1], "Service": _SVC}, id="node-list"),
        pytest.param({"Node": _NODE, "Service": {**_SVC, "Proxy": "db"}}, id="proxy-string"),
        pytest.param({"Node": _NODE, "Service": {**_SVC, "Connect": 1}}, id="connect-number"),
        pytest.param({"Node": _NODE, "Service": {**_SVC, "Port": True}}, id="port-bool"),
        pytest.param({"Node": _NODE, "Service": {**_SVC, "Port": "20000"}}, id="port-string"),
        pytest.param({"Node": _NODE, "Service": {**_SVC, "Address": 7}}, id="address-number"),
        pytest.param({"Node": {**_NODE, "Datacenter": 2}, "Service": _SVC}, id="dc-number"),
        pytest.param({"Node": _NODE, "Service": {**_SVC, "Namespace": {}}}, id="namespace-object"),
        pytest.param(
            {"Node": _NODE, "Service": {**_SVC, "Proxy": {"DestinationServiceName": 5}}},
            id="destination-number",
        ),
    ],
)
def test_endpoints_skip_entries_with_fields_of_the_wrong_type(entry: Any) -> None:
    good = {"Node": _NODE, "Service": _SVC}
    want = ("192.0.2.1", 20000, SpiffeIDService("", "default", "dc2", "db"))
    assert endpoints_from_entries([entry, good]) == [want]


# -- make_http_client ---------------------------------------------------------------------


async def test_unix_address_talks_http_over_the_socket_with_host_localhost(
    tmp_path: Path,
) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(
            (request.path, request.headers.get("Host"), request.headers.get("X-Consul-Token"))
        )
        if request.path == "/v1/agent/self":
            return web.json_response({"Config": {"NodeName": "unix-node"}})
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/agent/self", record)
    app.router.add_get("/v1/agent/services", record)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "consul.sock"
    site = web.UnixSite(runner, str(sock))
    await site.start()
    try:
        options = load_http_options(
            {}, {"CONSUL_HTTP_ADDR": f"unix://{sock}", "CONSUL_HTTP_TOKEN": "t1"}
        )
        assert options.scheme == "unix" and options.address == str(sock)
        client = make_http_client(options)
        async with client:
            response = await client.get("/v1/agent/self")
        assert response.status_code == 200
        assert response.json() == {"Config": {"NodeName": "unix-node"}}

        agent = AgentClient(options)
        try:
            services = await agent.services()
        finally:
            await agent.aclose()
        assert services == {}
    finally:
        await runner.cleanup()
    assert seen == [
        ("/v1/agent/self", "localhost", None),
        ("/v1/agent/services", "localhost", "t1"),
    ]


async def test_unix_address_to_a_missing_socket_is_agent_unavailable(tmp_path: Path) -> None:
    options = HTTPOptions(scheme="unix", address=str(tmp_path / "absent.sock"))
    agent = AgentClient(options)
    try:
        with pytest.raises(AgentUnavailable):
            await agent.services()
    finally:
        await agent.aclose()


@pytest.mark.parametrize("field", ["ca_file", "client_cert"])
def test_https_with_a_missing_tls_file_is_a_config_error(tmp_path: Path, field: str) -> None:
    missing = str(tmp_path / "missing.pem")
    options = HTTPOptions(scheme="https", address="127.0.0.1:8501")
    if field == "ca_file":
        options = replace(options, ca_file=missing)
    else:
        options = replace(options, client_cert=missing)
    with pytest.raises(ConfigError, match="TLS"):
        make_http_client(options)


def test_https_with_an_unparseable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    options = HTTPOptions(scheme="https", address="127.0.0.1:8501", ca_file=str(garbage))
    with pytest.raises(ConfigError):
        make_http_client(options)


def test_tls_files_are_not_read_for_plain_http(tmp_path: Path) -> None:
    options = HTTPOptions(scheme="http", ca_file=str(tmp_path / "missing.pem"))
    client = make_http_client(options)
    assert isinstance(client, httpx.AsyncClient)
    assert str(client.base_url) == "http://127.0.0.1:8500"


@pytest.mark.parametrize("scheme", ["http", "unix"])
def test_a_client_for_a_plain_agent_loads_no_ca_bundle(tmp_path: Path, scheme: str) -> None:
    # httpx's default context loads certifi's bundle: 1.3 MiB of a sidecar's RSS, unused.
    address = str(tmp_path / "consul.sock") if scheme == "unix" else "127.0.0.1:8500"
    client = make_http_client(HTTPOptions(scheme=scheme, address=address))
    context = client._transport._pool._ssl_context  # type: ignore[attr-defined]  # httpcore's
    assert isinstance(context, ssl.SSLContext)
    assert context.cert_store_stats()["x509_ca"] == 0
    assert context.verify_mode == ssl.CERT_REQUIRED


async def test_a_client_for_a_plain_agent_trusts_no_tls_server(ca: CertificateAuthority) -> None:
    # No request of ours leaves the plain agent's address; one that went to a TLS server
    # anyway would find nothing trusted and fail.
    leaf = ca.sign_leaf("db", datacenter="dc1")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_chain(server_ctx, leaf.cert_pem, leaf.private_key_pem)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            await reader.read(1)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        async with make_http_client(HTTPOptions(scheme="http")) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://127.0.0.1:{port}/v1/agent/self")
    finally:
        server.close()
        await server.wait_closed()


def test_path_prefix_is_part_of_the_base_url() -> None:
    options = load_http_options({}, {"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500/consul"})
    client = make_http_client(options)
    assert str(client.base_url) == "http://127.0.0.1:8500/consul/"


# -- explain ------------------------------------------------------------------------------


def test_explain_acl_not_found_names_the_ways_to_pass_a_token() -> None:
    exc = AgentResponseError("Unexpected response code: 403 (ACL not found)", status=403)
    text = explain(exc, "web")
    assert text.startswith("Unexpected response code: 403 (ACL not found)")
    for hint in ("-token", "-token-file", "CONSUL_HTTP_TOKEN"):
        assert hint in text


def test_explain_permission_denied_names_the_permission_on_the_service() -> None:
    exc = AgentResponseError(
        "Unexpected response code: 403 (Permission denied: token with AccessorID "
        "'0b2a6c9c-1b1e-4c7a-9d3e-3f1f7c2d8e11' lacks permission 'service:write' on \"web\")",
        status=403,
    )
    text = explain(exc, "web")
    assert text.startswith(str(exc))
    assert "service:write on 'web'" in text


def test_explain_permission_denied_without_a_service_still_explains() -> None:
    exc = AgentResponseError("Unexpected response code: 403 (Permission denied)", status=403)
    text = explain(exc)
    assert text.startswith(str(exc)) and "permission" in text


@pytest.mark.parametrize(
    "exc",
    [
        AgentResponseError("Unexpected response code: 500 (boom)", status=500),
        AgentResponseError("Unexpected response code: 404 (unknown service ID: x)", status=404),
        AgentResponseError("the agent answered /x with invalid JSON: oops"),
        AgentUnavailable("error talking to the agent: ConnectError: refused"),
        ValueError("anything else"),
    ],
)
def test_explain_leaves_other_errors_unchanged(exc: Exception) -> None:
    assert explain(exc, "web") == str(exc)


# -- what `connect envoy` reads ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"xDS": {"Ports": {"TLS": 8503, "Plaintext": 8502}}}, XDSPorts(8503, 8502, None)),
        ({"xDS": {"Ports": {"Plaintext": 8502}}}, XDSPorts(0, 8502, None)),
        ({"DebugConfig": {"GRPCPort": -1}}, XDSPorts(0, 0, -1)),
        ({"DebugConfig": {"GRPCPort": 8502}}, XDSPorts(0, 0, 8502)),
        ({"xDS": {"Ports": {"TLS": True, "Plaintext": "8502"}}}, XDSPorts(0, 0, None)),
        ({"xDS": [], "DebugConfig": "x"}, XDSPorts(0, 0, None)),
        (["not", "an", "object"], XDSPorts(0, 0, None)),
        (None, XDSPorts(0, 0, None)),
    ],
)
def test_xds_ports_read_what_the_agent_tells_and_nothing_else(
    body: Any, expected: XDSPorts
) -> None:
    assert xds_ports_from(Answer(body, 0, "")) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "Service": "web-sidecar-proxy",
                "Namespace": "ns",
                "Datacenter": "dc2",
                "Proxy": {"DestinationServiceName": "web", "Config": {"k": 1}},
            },
            ProxyRegistration("web", {"k": 1}, "ns", "default", "dc2"),
        ),
        (
            {"Service": "gw", "Proxy": {"Config": "nope"}},
            ProxyRegistration("gw", {}, "default", "default", ""),
        ),
        (
            {"Service": "web", "Namespace": 5, "Proxy": {}},
            ProxyRegistration("web", {}, "default", "default", ""),
        ),
        ({"Service": "web"}, None),
        ({"Service": "web", "Proxy": None}, None),
        ({"Service": "web", "Proxy": "x"}, None),
    ],
)
def test_proxy_registration_of_a_service(body: Any, expected: ProxyRegistration | None) -> None:
    assert proxy_registration(AgentService(body, "")) == expected
