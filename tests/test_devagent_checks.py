"""Health checks of the dev agent, driven through its real HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import trustme
from aiohttp import web

from proxy.devagent import DevAgent
from tests.conftest import register, wait_until

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

UNKNOWN_CHECK = 'Unknown check ID "{}". Ensure that the check ID is passed, not the check name.'


# -- helpers -------------------------------------------------------------------------------


async def agent_checks(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.get("/v1/agent/checks")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def check_of(client: httpx.AsyncClient, check_id: str) -> dict[str, Any]:
    checks = await agent_checks(client)
    assert check_id in checks, sorted(checks)
    return checks[check_id]


async def wait_for_check(
    client: httpx.AsyncClient,
    check_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Poll /v1/agent/checks (not blocking there, as in Consul) until `predicate` holds."""
    found: dict[str, Any] = {}

    async def ready() -> bool:
        checks = await agent_checks(client)
        found.clear()
        found.update(checks.get(check_id) or {})
        return bool(found) and predicate(found)

    await wait_until(ready, timeout)
    return found


async def watch_health(
    client: httpx.AsyncClient,
    path: str,
    predicate: Callable[[list[dict[str, Any]]], bool],
    *,
    passing: bool = False,
    timeout: float = 8.0,
) -> list[dict[str, Any]]:
    """Blocking queries on a /v1/health endpoint until the entries satisfy `predicate`."""
    index = 0
    async with asyncio.timeout(timeout):
        while True:
            params: dict[str, str] = {"passing": ""} if passing else {}
            if index:
                params.update(index=str(index), wait="2s")
            r = await client.get(path, params=params)
            assert r.status_code == 200, r.text
            entries: list[dict[str, Any]] = r.json()
            if predicate(entries):
                return entries
            index = int(r.headers["X-Consul-Index"])


async def health(client: httpx.AsyncClient, path: str, *, passing: bool = False) -> list[Any]:
    r = await client.get(path, params={"passing": ""} if passing else {})
    assert r.status_code == 200, r.text
    return list(r.json())


def check_statuses(entry: dict[str, Any]) -> dict[str, str]:
    return {c["CheckID"]: c["Status"] for c in entry["Checks"]}


@pytest.fixture
def bound_port() -> Iterator[socket.socket]:
    """A TCP socket bound to 127.0.0.1:0 and not listening: connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class StatusServer:
    """A small aiohttp server: /status/<code> answers with that code; it records requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _status(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": await request.text(),
            }
        )
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"answer {code}")

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/status/200")

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_route("*", "/status/{code}", self._status)
        app.router.add_get("/redirect", self._redirect)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def status_server() -> AsyncIterator[StatusServer]:
    server = StatusServer()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


WEB_WITH_TTL: dict[str, Any] = {
    "Name": "web",
    "Port": 8080,
    "Check": {"CheckID": "web-ttl", "Name": "web heartbeat", "TTL": "30s"},
}


# -- TTL checks ----------------------------------------------------------------------------


async def test_ttl_check_starts_critical(client: httpx.AsyncClient) -> None:
    await register(client, WEB_WITH_TTL)

    check = await check_of(client, "web-ttl")

    assert check["Status"] == "critical"
    assert check["Type"] == "ttl"
    assert check["ServiceID"] == "web"
    assert check["ServiceName"] == "web"
    assert check["Name"] == "web heartbeat"
    assert check["Node"] == "test-node"
    assert await health(client, "/v1/health/service/web", passing=True) == []
    assert len(await health(client, "/v1/health/service/web")) == 1


async def test_ttl_check_pass_with_note_makes_it_passing(client: httpx.AsyncClient) -> None:
    await register(client, WEB_WITH_TTL)

    r = await client.put("/v1/agent/check/pass/web-ttl", params={"note": "hi"})

    assert r.status_code == 200, r.text
    check = await check_of(client, "web-ttl")
    assert check["Status"] == "passing"
    assert check["Output"] == "hi"
    entries = await health(client, "/v1/health/service/web", passing=True)
    assert [e["Service"]["ID"] for e in entries] == ["web"]
    assert check_statuses(entries[0])["web-ttl"] == "passing"


async def test_ttl_check_warn_and_fail_drop_it_from_passing(client: httpx.AsyncClient) -> None:
    await register(client, WEB_WITH_TTL)
    assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200
    assert len(await health(client, "/v1/health/service/web", passing=True)) == 1

    r = await client.put("/v1/agent/check/warn/web-ttl", params={"note": "slow"})
    assert r.status_code == 200, r.text
    check = await check_of(client, "web-ttl")
    assert (check["Status"], check["Output"]) == ("warning", "slow")
    assert await health(client, "/v1/health/service/web", passing=True) == []

    r = await client.put("/v1/agent/check/fail/web-ttl", params={"note": "down"})
    assert r.status_code == 200, r.text
    check = await check_of(client, "web-ttl")
    assert (check["Status"], check["Output"]) == ("critical", "down")
    assert await health(client, "/v1/health/service/web", passing=True) == []


async def test_ttl_check_update_endpoint_sets_status_and_output(
    client: httpx.AsyncClient,
) -> None:
    await register(client, WEB_WITH_TTL)

    r = await client.put(
        "/v1/agent/check/update/web-ttl", json={"Status": "warning", "Output": "half"}
    )

    assert r.status_code == 200, r.text
    check = await check_of(client, "web-ttl")
    assert (check["Status"], check["Output"]) == ("warning", "half")
    r = await client.put("/v1/agent/check/update/web-ttl", json={"Status": "bogus"})
    assert r.status_code == 400, r.text


async def test_ttl_check_status_change_wakes_a_blocking_health_query(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await register(client, WEB_WITH_TTL)
    r = await client.get("/v1/health/service/web")
    index = int(r.headers["X-Consul-Index"])

    query = asyncio.create_task(
        client.get("/v1/health/service/web", params={"index": index, "wait": "5s"})
    )
    async with asyncio.timeout(5):
        await agent.state.notifier.parked.reached(1)
    assert not query.done()
    resp = await client.put("/v1/agent/check/pass/web-ttl")
    assert resp.status_code == 200, resp.text
    r = await query

    assert int(r.headers["X-Consul-Index"]) > index
    assert check_statuses(r.json()[0])["web-ttl"] == "passing"


async def test_ttl_check_expires_to_critical(client: httpx.AsyncClient) -> None:
    await register(
        client,
        {"Name": "web", "Check": {"CheckID": "web-ttl", "TTL": "300ms", "Status": "passing"}},
    )
    # Only the expiry writes "TTL expired", so seeing it proves the check went back.
    assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200

    entries = await watch_health(
        client,
        "/v1/health/service/web",
        lambda es: bool(es) and check_statuses(es[0])["web-ttl"] == "critical",
    )

    check = next(c for c in entries[0]["Checks"] if c["CheckID"] == "web-ttl")
    assert check["Output"] == "TTL expired"
    assert await health(client, "/v1/health/service/web", passing=True) == []


async def test_ttl_check_expiry_keeps_the_last_output(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "web", "Check": {"CheckID": "web-ttl", "TTL": "300ms"}})
    assert (await client.put("/v1/agent/check/pass/web-ttl?note=all+good")).status_code == 200

    entries = await watch_health(
        client,
        "/v1/health/service/web",
        lambda es: bool(es) and check_statuses(es[0])["web-ttl"] == "critical",
    )

    check = next(c for c in entries[0]["Checks"] if c["CheckID"] == "web-ttl")
    assert check["Output"] == "TTL expired (last output before timeout follows): all good"


async def test_ttl_check_pass_after_expiry_rearms_the_ttl(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "web", "Check": {"CheckID": "web-ttl", "TTL": "500ms"}})

    def expired(es: list[dict[str, Any]]) -> bool:
        check = next(c for c in es[0]["Checks"] if c["CheckID"] == "web-ttl")
        return bool(check["Status"] == "critical" and check["Output"] == "TTL expired")

    await watch_health(client, "/v1/health/service/web", expired)
    assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200
    check = await check_of(client, "web-ttl")
    assert (check["Status"], check["Output"]) == ("passing", "")

    await watch_health(client, "/v1/health/service/web", expired)


@pytest.mark.parametrize("op", ["pass", "warn", "fail"])
async def test_ttl_update_of_unknown_check_is_404(client: httpx.AsyncClient, op: str) -> None:
    r = await client.put(f"/v1/agent/check/{op}/x")

    assert r.status_code == 404
    assert r.text == UNKNOWN_CHECK.format("x")


@pytest.mark.parametrize("op", ["pass", "warn", "fail"])
async def test_ttl_update_of_a_non_ttl_check_is_500(
    client: httpx.AsyncClient, bound_port: socket.socket, op: str
) -> None:
    port = bound_port.getsockname()[1]
    r = await client.put(
        "/v1/agent/check/register",
        json={"CheckID": "tcp", "Name": "tcp", "TCP": f"127.0.0.1:{port}", "Interval": "10s"},
    )
    assert r.status_code == 200, r.text

    r = await client.put(f"/v1/agent/check/{op}/tcp")

    assert r.status_code == 500
    assert "does not have associated TTL" in r.text
    assert r.text == 'CheckID "tcp" does not have associated TTL'


# -- sidecar checks ------------------------------------------------------------------------


def web_with_sidecar(sidecar_port: int) -> dict[str, Any]:
    return {
        **WEB_WITH_TTL,
        "Connect": {"SidecarService": {"Port": sidecar_port}},
    }


async def test_sidecar_gets_listening_and_aliasing_checks(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    await register(client, web_with_sidecar(port))

    checks = await agent_checks(client)

    sidecar_checks = {cid: c for cid, c in checks.items() if c["ServiceID"] == "web-sidecar-proxy"}
    assert len(sidecar_checks) == 2
    by_name = {c["Name"]: c for c in sidecar_checks.values()}
    assert set(by_name) == {"Connect Sidecar Listening", "Connect Sidecar Aliasing web"}
    listening = by_name["Connect Sidecar Listening"]
    assert listening["Type"] == "tcp"
    assert listening["Definition"]["TCP"] == f"127.0.0.1:{port}"
    assert listening["ServiceName"] == "web-sidecar-proxy"
    assert by_name["Connect Sidecar Aliasing web"]["Type"] == "alias"
    assert set(sidecar_checks) == {
        "service:web-sidecar-proxy:1",
        "service:web-sidecar-proxy:2",
    }


async def test_sidecar_tcp_check_is_critical_while_nothing_listens(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    await register(client, web_with_sidecar(port))
    assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200

    listening = await wait_for_check(
        client, "service:web-sidecar-proxy:1", lambda c: c["Output"] != ""
    )

    assert listening["Status"] == "critical"
    assert listening["Output"].startswith(f"dial tcp 127.0.0.1:{port}: ")
    alias = await check_of(client, "service:web-sidecar-proxy:2")
    assert alias["Status"] == "passing"
    assert await health(client, "/v1/health/connect/web", passing=True) == []
    assert len(await health(client, "/v1/health/connect/web")) == 1


async def test_tcp_check_output_for_a_refused_connection_matches_consul(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    r = await client.put(
        "/v1/agent/check/register",
        json={"Name": "tcp", "TCP": f"127.0.0.1:{port}", "Interval": "10s"},
    )
    assert r.status_code == 200, r.text

    check = await wait_for_check(client, "tcp", lambda c: c["Output"] != "")

    assert check["Status"] == "critical"
    assert check["Output"] == f"dial tcp 127.0.0.1:{port}: connect: connection refused"


async def test_sidecar_is_passing_once_its_port_listens_and_parent_passes(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    port = bound_port.getsockname()[1]
    await register(client, web_with_sidecar(port))
    await wait_for_check(client, "service:web-sidecar-proxy:1", lambda c: c["Output"] != "")
    assert await health(client, "/v1/health/connect/web", passing=True) == []

    server = await asyncio.start_server(_discard, sock=bound_port)
    try:
        # The port now accepts; the parent's TTL check is still critical, so the alias is too.
        entries = await watch_health(
            client,
            "/v1/health/connect/web",
            lambda es: check_statuses(es[0])["service:web-sidecar-proxy:1"] == "passing",
        )
        assert check_statuses(entries[0])["service:web-sidecar-proxy:2"] == "critical"
        assert await health(client, "/v1/health/connect/web", passing=True) == []

        assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200

        entries = await watch_health(
            client, "/v1/health/connect/web", lambda es: len(es) == 1, passing=True
        )
        service = entries[0]["Service"]
        assert service["ID"] == "web-sidecar-proxy"
        assert service["Port"] == port
        assert service["Proxy"]["DestinationServiceName"] == "web"
        listening = next(
            c for c in entries[0]["Checks"] if c["CheckID"] == "service:web-sidecar-proxy:1"
        )
        assert listening["Output"] == f"TCP connect 127.0.0.1:{port}: Success"
    finally:
        server.close()
        await server.wait_closed()


async def test_sidecar_drops_out_of_passing_when_its_listener_goes_away(
    client: httpx.AsyncClient,
) -> None:
    server = await asyncio.start_server(_discard, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await register(client, web_with_sidecar(port))
        assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200
        await watch_health(client, "/v1/health/connect/web", lambda es: len(es) == 1, passing=True)
    finally:
        server.close()
        await server.wait_closed()

    entries = await watch_health(
        client,
        "/v1/health/connect/web",
        lambda es: check_statuses(es[0])["service:web-sidecar-proxy:1"] == "critical",
    )
    assert entries[0]["Service"]["ID"] == "web-sidecar-proxy"
    assert await health(client, "/v1/health/connect/web", passing=True) == []


# -- alias checks --------------------------------------------------------------------------


async def test_alias_check_mirrors_the_parents_worst_status(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    body = {
        "Name": "web",
        "Port": 8080,
        "Checks": [
            {"CheckID": "web-a", "TTL": "30s"},
            {"CheckID": "web-b", "TTL": "30s"},
        ],
        "Connect": {"SidecarService": {"Port": bound_port.getsockname()[1]}},
    }
    await register(client, body)
    alias_id = "service:web-sidecar-proxy:2"

    async def alias_is(status: str) -> dict[str, Any]:
        return await wait_for_check(client, alias_id, lambda c: c["Status"] == status)

    await alias_is("critical")

    for cid in ("web-a", "web-b"):
        assert (await client.put(f"/v1/agent/check/pass/{cid}")).status_code == 200
    assert (await alias_is("passing"))["Output"] == "All checks passing."

    assert (await client.put("/v1/agent/check/warn/web-a")).status_code == 200
    await alias_is("warning")

    assert (await client.put("/v1/agent/check/fail/web-b")).status_code == 200
    await alias_is("critical")

    assert (await client.put("/v1/agent/check/pass/web-b")).status_code == 200
    await alias_is("warning")

    assert (await client.put("/v1/agent/check/pass/web-a")).status_code == 200
    await alias_is("passing")


async def test_alias_check_of_a_service_without_checks_is_passing(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    body = {
        "Name": "web",
        "Port": 8080,
        "Connect": {"SidecarService": {"Port": bound_port.getsockname()[1]}},
    }
    await register(client, body)

    alias = await wait_for_check(
        client, "service:web-sidecar-proxy:2", lambda c: c["Status"] == "passing"
    )

    assert alias["Output"] == "No checks found."


async def test_alias_check_also_mirrors_node_checks(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    await register(client, web_with_sidecar(bound_port.getsockname()[1]))
    assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200
    await wait_for_check(client, "service:web-sidecar-proxy:2", lambda c: c["Status"] == "passing")

    r = await client.put(
        "/v1/agent/check/register", json={"CheckID": "disk", "Name": "disk", "TTL": "30s"}
    )
    assert r.status_code == 200, r.text

    await wait_for_check(
        client, "service:web-sidecar-proxy:2", lambda c: c["Status"] == "critical", timeout=0.5
    )


# -- HTTP and TCP checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [(200, "passing"), (204, "passing"), (429, "warning"), (500, "critical"), (404, "critical")],
)
async def test_http_check_status_follows_the_response_code(
    client: httpx.AsyncClient, status_server: StatusServer, code: int, status: str
) -> None:
    url = f"{status_server.url}/status/{code}"
    await register(
        client,
        {
            "Name": "web",
            "Port": 8080,
            "Check": {"CheckID": "web-http", "HTTP": url, "Interval": "10s"},
        },
    )

    check = await wait_for_check(client, "web-http", lambda c: c["Output"] != "")

    assert check["Status"] == status
    assert check["Type"] == "http"
    assert check["Definition"]["HTTP"] == url
    assert check["Output"].startswith(f"HTTP GET {url}: {code} ")
    assert status_server.requests[0]["method"] == "GET"


async def test_http_check_sends_method_header_and_body(
    client: httpx.AsyncClient, status_server: StatusServer
) -> None:
    url = f"{status_server.url}/status/200"
    r = await client.put(
        "/v1/agent/check/register",
        json={
            "CheckID": "post",
            "Name": "post check",
            "HTTP": url,
            "Method": "POST",
            "Header": {"X-Probe": ["yes"]},
            "Body": "ping",
            "Interval": "10s",
        },
    )
    assert r.status_code == 200, r.text

    check = await wait_for_check(client, "post", lambda c: c["Output"] != "")

    assert check["Status"] == "passing"
    assert check["Output"] == f"HTTP POST {url}: 200 OK Output: answer 200"
    request = status_server.requests[0]
    assert request["method"] == "POST"
    assert request["headers"]["X-Probe"] == "yes"
    assert request["body"] == "ping"


async def test_http_check_to_a_closed_port_is_critical(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    url = f"http://127.0.0.1:{bound_port.getsockname()[1]}/health"
    r = await client.put(
        "/v1/agent/check/register", json={"Name": "dead", "HTTP": url, "Interval": "10s"}
    )
    assert r.status_code == 200, r.text

    check = await wait_for_check(client, "dead", lambda c: c["Output"] != "")

    assert check["Status"] == "critical"
    assert url in check["Output"]


async def test_http_check_follows_redirects_by_default(
    client: httpx.AsyncClient, status_server: StatusServer
) -> None:
    url = f"{status_server.url}/redirect"
    r = await client.put(
        "/v1/agent/check/register", json={"Name": "redir", "HTTP": url, "Interval": "10s"}
    )
    assert r.status_code == 200, r.text

    check = await wait_for_check(client, "redir", lambda c: c["Output"] != "")

    assert check["Status"] == "passing"


async def test_http_check_with_disable_redirects_sees_the_redirect(
    client: httpx.AsyncClient, status_server: StatusServer
) -> None:
    url = f"{status_server.url}/redirect"
    r = await client.put(
        "/v1/agent/check/register",
        json={"Name": "redir", "HTTP": url, "Interval": "10s", "DisableRedirects": True},
    )
    assert r.status_code == 200, r.text

    check = await wait_for_check(client, "redir", lambda c: c["Output"] != "")

    assert check["Status"] == "critical"
    assert status_server.requests == []


@pytest.fixture
def untrusted_tls() -> ssl.SSLContext:
    """A server context whose certificate chains to a CA no one trusts."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def test_https_check_with_tls_skip_verify_passes(
    client: httpx.AsyncClient, untrusted_tls: ssl.SSLContext
) -> None:
    server = StatusServer()
    await server.start(untrusted_tls)
    try:
        url = f"{server.url}/status/200"
        r = await client.put(
            "/v1/agent/check/register",
            json={"Name": "tls", "HTTP": url, "Interval": "10s", "TLSSkipVerify": True},
        )
        assert r.status_code == 200, r.text

        check = await wait_for_check(client, "tls", lambda c: c["Output"] != "")

        assert check["Status"] == "passing"
    finally:
        await server.close()


async def test_https_check_against_an_untrusted_certificate_is_critical(
    client: httpx.AsyncClient, untrusted_tls: ssl.SSLContext
) -> None:
    server = StatusServer()
    await server.start(untrusted_tls)
    try:
        url = f"{server.url}/status/200"
        r = await client.put(
            "/v1/agent/check/register", json={"Name": "tls", "HTTP": url, "Interval": "10s"}
        )
        assert r.status_code == 200, r.text

        check = await wait_for_check(client, "tls", lambda c: c["Output"] != "")

        assert check["Status"] == "critical"
    finally:
        await server.close()


async def test_tcp_check_against_a_listening_port_passes(client: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(_discard, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await client.put(
            "/v1/agent/check/register",
            json={"Name": "tcp", "TCP": f"127.0.0.1:{port}", "Interval": "10s"},
        )
        assert r.status_code == 200, r.text

        check = await wait_for_check(client, "tcp", lambda c: c["Output"] != "")

        assert check["Status"] == "passing"
        assert check["Output"] == f"TCP connect 127.0.0.1:{port}: Success"
    finally:
        server.close()
        await server.wait_closed()


# -- refused check types -------------------------------------------------------------------


@pytest.mark.parametrize(
    "check",
    [
        {"Args": ["true"], "Interval": "10s"},
        {"args": ["true"], "interval": "10s"},
        {"ScriptArgs": ["/bin/true"], "Interval": "10s"},
        {"Shell": "/bin/sh", "Args": ["true"], "Interval": "10s"},
    ],
)
async def test_script_checks_are_refused(client: httpx.AsyncClient, check: dict[str, Any]) -> None:
    r = await client.put(
        "/v1/agent/service/register", json={"Name": "web", "Port": 8080, "Check": check}
    )

    assert r.status_code == 400
    assert "enable_script_checks" in r.text
    assert (await client.get("/v1/agent/service/web")).status_code == 404

    r = await client.put("/v1/agent/check/register", json={"Name": "script", **check})
    assert r.status_code == 400
    assert "enable_script_checks" in r.text
    assert "script" not in await agent_checks(client)


@pytest.mark.parametrize(
    ("check", "label"),
    [
        ({"GRPC": "127.0.0.1:9000", "Interval": "10s"}, "gRPC"),
        ({"H2PING": "127.0.0.1:9000", "Interval": "10s"}, "H2PING"),
        ({"UDP": "127.0.0.1:9000", "Interval": "10s"}, "UDP"),
    ],
)
async def test_unsupported_check_types_are_refused(
    client: httpx.AsyncClient, check: dict[str, Any], label: str
) -> None:
    r = await client.put("/v1/agent/check/register", json={"Name": "other", **check})

    assert r.status_code == 400
    assert label in r.text
    assert "other" not in await agent_checks(client)

    r = await client.put(
        "/v1/agent/service/register", json={"Name": "web", "Port": 8080, "Check": check}
    )
    assert r.status_code == 400
    assert label in r.text


async def test_check_without_ttl_interval_or_alias_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/agent/check/register", json={"Name": "nothing"})

    assert r.status_code == 400
    assert "TTL must be > 0" in r.text


# -- node checks ---------------------------------------------------------------------------


async def test_node_check_register_and_deregister(client: httpx.AsyncClient) -> None:
    await register(client, WEB_WITH_TTL)
    assert (await client.put("/v1/agent/check/pass/web-ttl")).status_code == 200
    assert len(await health(client, "/v1/health/service/web", passing=True)) == 1

    r = await client.put(
        "/v1/agent/check/register",
        json={"CheckID": "disk", "Name": "disk space", "TTL": "30s", "Notes": "df"},
    )
    assert r.status_code == 200, r.text

    check = await check_of(client, "disk")
    assert check["Name"] == "disk space"
    assert check["Notes"] == "df"
    assert check["ServiceID"] == ""
    assert check["ServiceName"] == ""
    assert check["Status"] == "critical"
    # A critical node check takes every service on the node out of ?passing.
    entries = await health(client, "/v1/health/service/web")
    assert check_statuses(entries[0])["disk"] == "critical"
    assert await health(client, "/v1/health/service/web", passing=True) == []

    r = await client.put("/v1/agent/check/deregister/disk")
    assert r.status_code == 200, r.text

    assert "disk" not in await agent_checks(client)
    assert len(await health(client, "/v1/health/service/web", passing=True)) == 1
    r = await client.put("/v1/agent/check/deregister/disk")
    assert r.status_code == 404
    assert r.text == UNKNOWN_CHECK.format("disk")


async def test_node_check_id_defaults_to_its_name(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/agent/check/register", json={"Name": "mem", "TTL": "30s"})
    assert r.status_code == 200, r.text

    assert (await check_of(client, "mem"))["Name"] == "mem"
    assert (await client.put("/v1/agent/check/pass/mem")).status_code == 200
    assert (await check_of(client, "mem"))["Status"] == "passing"


async def test_reregistering_a_node_check_keeps_its_status(client: httpx.AsyncClient) -> None:
    body = {"CheckID": "mem", "Name": "mem", "TTL": "30s"}
    assert (await client.put("/v1/agent/check/register", json=body)).status_code == 200
    assert (await client.put("/v1/agent/check/pass/mem?note=fine")).status_code == 200

    assert (await client.put("/v1/agent/check/register", json=body)).status_code == 200

    check = await check_of(client, "mem")
    assert (check["Status"], check["Output"]) == ("passing", "fine")


async def test_reregistering_a_service_keeps_its_ttl_check_status(
    client: httpx.AsyncClient,
) -> None:
    await register(client, WEB_WITH_TTL)
    assert (await client.put("/v1/agent/check/pass/web-ttl?note=fine")).status_code == 200

    await register(client, WEB_WITH_TTL)

    check = await check_of(client, "web-ttl")
    assert (check["Status"], check["Output"]) == ("passing", "fine")


async def test_check_register_on_a_service(client: httpx.AsyncClient) -> None:
    await register(client, {"Name": "web", "Port": 8080})

    r = await client.put(
        "/v1/agent/check/register",
        json={"CheckID": "web-extra", "Name": "extra", "TTL": "30s", "ServiceID": "web"},
    )
    assert r.status_code == 200, r.text

    check = await check_of(client, "web-extra")
    assert (check["ServiceID"], check["ServiceName"]) == ("web", "web")
    r = await client.put(
        "/v1/agent/check/register",
        json={"Name": "orphan", "TTL": "30s", "ServiceID": "nope"},
    )
    assert r.status_code == 404
    assert r.text == 'ServiceID "nope" does not exist'


async def test_check_register_without_name_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/agent/check/register", json={"TTL": "30s"})

    assert r.status_code == 400
    assert r.text == "Missing check name"


async def test_deregistering_a_service_removes_its_checks(
    client: httpx.AsyncClient, bound_port: socket.socket
) -> None:
    await register(client, web_with_sidecar(bound_port.getsockname()[1]))
    assert {"web-ttl", "service:web-sidecar-proxy:1"} <= set(await agent_checks(client))

    r = await client.put("/v1/agent/service/deregister/web")
    assert r.status_code == 200, r.text

    assert await agent_checks(client) == {}


# -- forcing a status ----------------------------------------------------------------------


async def test_set_check_status_forces_a_status(agent: DevAgent, client: httpx.AsyncClient) -> None:
    await register(client, WEB_WITH_TTL)

    agent.set_check_status("web-ttl", "warning", "forced")

    check = await check_of(client, "web-ttl")
    assert (check["Status"], check["Output"]) == ("warning", "forced")
    agent.set_check_status("web-ttl", "passing")
    assert len(await health(client, "/v1/health/service/web", passing=True)) == 1


async def test_set_check_status_wakes_blocking_queries(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    await register(client, WEB_WITH_TTL)
    r = await client.get("/v1/health/service/web")
    index = int(r.headers["X-Consul-Index"])

    query = asyncio.create_task(
        client.get("/v1/health/service/web", params={"index": index, "wait": "5s"})
    )
    async with asyncio.timeout(5):
        await agent.state.notifier.parked.reached(1)
    agent.set_check_status("web-ttl", "passing", "ok")
    r = await query

    assert int(r.headers["X-Consul-Index"]) > index
    assert check_statuses(r.json()[0])["web-ttl"] == "passing"


async def test_set_check_status_of_unknown_check_raises_key_error(agent: DevAgent) -> None:
    with pytest.raises(KeyError):
        agent.set_check_status("nope", "passing")
