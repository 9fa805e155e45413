"""AgentClient: the proxy's calls to the local Consul agent.

Owns: request shapes (paths, parameters, the token header), blocking-query parameters and
timeouts, and the translation of transport failures into `AgentUnavailable`. Each call hands
its response to `proxy.answers`, which reads it into a typed result (or raises
`AgentResponseError` with the text of Consul's Go client): no caller reads the agent's JSON.

Rule 1: the token travels only in the `X-Consul-Token` header, never in a URL, and never
appears in an error text or a log line.
Rule 2: every call travels over a persistent connection: watches and rare calls through one
`httpx.AsyncClient`, the calls made for every proxied connection through the leaner
`proxy.agenthttp.KeepAlivePool` (its reason is there).
"""

from __future__ import annotations

import base64
import functools
import json
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx

from proxy.addr import split_host_port
from proxy.agenthttp import KeepAlivePool, RawResponse
from proxy.answers import (
    AgentService,
    Answer,
    AuthorizeResult,
    Endpoints,
    Instances,
    IntentionMatch,
    Leaf,
    Roots,
    XDSPorts,
    agent_service_from,
    authorize_result,
    catalog_entries_from,
    decode,
    health_endpoints,
    health_instances,
    intention_match,
    leaf_from,
    query_endpoints,
    roots_from,
    services_from,
    xds_ports_from,
)
from proxy.errors import AgentResponseError, AgentUnavailable, ConfigError
from proxy.httpflags import HTTPOptions
from proxy.identity import Endpoint
from proxy.peeranswers import (
    TrustBundle,
    peered_health_endpoints,
    trust_bundle_from,
    trust_bundles_from,
)

# Watches block for this long per request; the agent adds up to wait/16 of jitter.
DEFAULT_WAIT = 300.0
REQUEST_TIMEOUT = 10.0


def _tls_context(options: HTTPOptions) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(
            cafile=options.ca_file or None, capath=options.ca_path or None
        )
        if options.client_cert:
            ctx.load_cert_chain(options.client_cert, options.client_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"Error loading TLS files for the agent connection: {exc}") from exc
    if options.tls_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_http_client(options: HTTPOptions, tls: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for the agent at `options` (TCP, TLS, or a Unix socket).

    `tls`: the context for https, when the caller has built it already.

    Raises:
        ConfigError: TLS files that cannot be loaded.
    """
    transport: httpx.AsyncHTTPTransport | None = None
    if options.scheme == "https":
        verify = tls or _tls_context(options)
    else:
        # No TLS to this agent. Left to itself, httpx would build a context with certifi's
        # bundle loaded anyway: 1.3 MiB of a sidecar's RSS for nothing. This one trusts
        # nothing, so a TLS hop, which no request of ours makes, could only fail.
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if options.scheme == "unix":
        transport = httpx.AsyncHTTPTransport(uds=options.address, verify=verify)
        base_url = f"http://localhost{options.path_prefix}"
    else:
        base_url = f"{options.scheme}://{options.address}{options.path_prefix}"
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        verify=verify,
        auth=options.basic_auth,
        timeout=REQUEST_TIMEOUT,
        trust_env=False,  # the agent is local: no proxies from the environment
    )


def make_keepalive_pool(options: HTTPOptions, tls: ssl.SSLContext | None = None) -> KeepAlivePool:
    """The keep-alive pool for per-connection calls, to the same agent as `make_http_client`.

    `tls`: the context for https, when the caller has built it already.

    Raises:
        ConfigError: TLS files that cannot be loaded.
    """
    if options.scheme == "unix":
        return KeepAlivePool.unix(options.address)
    # Go's client gives a bare host port 80 (443 with TLS): so do we.
    host, port = split_host_port(options.address, "-http-addr", default_port=0)
    tls = (tls or _tls_context(options)) if options.scheme == "https" else None
    port = port or (443 if tls is not None else 80)
    return KeepAlivePool.tcp(
        host,
        port,
        tls=tls,
        server_hostname=options.tls_server_name or host,
        host_header=options.address,
    )


def _wait_param(seconds: float) -> str:
    # The Go client always sends integer milliseconds with a unit.
    return f"{max(1, int(seconds * 1000))}ms"


def _encode(body: Any) -> bytes:
    # Go's json.Encoder ends every document with a newline.
    return (json.dumps(body) + "\n").encode()


@functools.lru_cache(maxsize=1024)
def _authorize_body(target: str, client_cert_uri: str, client_cert_serial: str) -> bytes:
    """The authorize call's body, once per client leaf: a client sends the same leaf on every
    connection until it rotates."""
    return _encode(
        {"Target": target, "ClientCertURI": client_cert_uri, "ClientCertSerial": client_cert_serial}
    )


AUTHORIZE_PATH = "/v1/agent/connect/authorize"


class AgentClient:
    """Calls to the local agent described by `options`, each returning a typed result.

    Two connections kinds, one agent: watches, registration and other rare calls go
    through one `httpx.AsyncClient`; the calls made for every proxied connection
    (authorize, prepared-query discovery) go through a `KeepAlivePool`. Every call raises
    `AgentUnavailable` when the agent cannot be reached and `AgentResponseError` for a
    non-200 answer or a body of the wrong shape (`proxy.answers`).

    Raises:
        ConfigError: TLS files for the agent connection that cannot be loaded.
    """

    def __init__(
        self, options: HTTPOptions, *, wait: float = DEFAULT_WAIT, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        # One context for both: the TLS files are read once.
        tls = _tls_context(options) if options.scheme == "https" else None
        self._client = make_http_client(options, tls)
        self._pool = make_keepalive_pool(options, tls)
        self._prefix = options.path_prefix
        self._headers = {"X-Consul-Token": options.token} if options.token else {}
        self._pool_headers = list(self._headers.items())
        if options.basic_auth is not None:
            user, password = options.basic_auth
            raw = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._pool_headers.append(("Authorization", f"Basic {raw}"))
        # Built once: the authorize call runs for every inbound connection.
        self._authorize_target = self._prefix + AUTHORIZE_PATH
        self._authorize_headers = [*self._pool_headers, ("Content-Type", "application/json")]
        server_name = options.tls_server_name
        self._extensions = {"sni_hostname": server_name} if server_name else {}
        self.datacenter = options.datacenter
        self.wait = wait
        self.timeout = timeout  # for every call that does not block

    @property
    def pool(self) -> KeepAlivePool:
        return self._pool

    async def aclose(self) -> None:
        await self._pool.aclose()
        await self._client.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> Answer:
        content = None if body is None else _encode(body)
        headers = dict(self._headers)
        if content is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await self._client.request(
                method,
                path,
                params=params,
                content=content,
                headers=headers,
                timeout=self.timeout if timeout is None else timeout,
                extensions=self._extensions,
            )
        except httpx.TransportError as exc:
            raise AgentUnavailable(
                f"error talking to the agent: {type(exc).__name__}: {exc}"
            ) from exc
        return decode(path, response.status_code, response.headers, response.content)

    async def _fast(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        content: bytes | None = None,
    ) -> RawResponse:
        """One exchange over the keep-alive pool, for calls made once per proxied connection.

        `target`: the request target, path prefix and query string included.
        """
        try:
            return await self._pool.request(method, target, headers, content, self.timeout)
        except TimeoutError:
            raise AgentUnavailable(
                f"error talking to the agent: timed out after {self.timeout:g}s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise AgentUnavailable(
                f"error talking to the agent: {type(exc).__name__}: {exc}"
            ) from exc

    def _blocking(
        self, index: int, params: dict[str, str] | None = None
    ) -> tuple[dict[str, str], float]:
        params = dict(params or {})
        if index > 0:
            params["index"] = str(index)
            params["wait"] = _wait_param(self.wait)
            # Longer than the wait plus the agent's jitter (wait/16) and a margin.
            return params, self.wait * 17 / 16 + 15
        return params, self.timeout

    def _hash_blocking(self, content_hash: str) -> tuple[dict[str, str], float]:
        if not content_hash:
            return {}, self.timeout
        return {"hash": content_hash, "wait": _wait_param(self.wait)}, self.wait * 17 / 16 + 15

    async def roots(self, index: int = 0) -> Roots:
        """`GET /v1/agent/connect/ca/roots`, blocking when `index` > 0."""
        path = "/v1/agent/connect/ca/roots"
        params, timeout = self._blocking(index)
        return roots_from(path, await self._request("GET", path, params=params, timeout=timeout))

    async def leaf(self, service: str, index: int = 0) -> Leaf:
        """`GET /v1/agent/connect/ca/leaf/:service`, blocking when `index` > 0."""
        path = f"/v1/agent/connect/ca/leaf/{service}"
        params, timeout = self._blocking(index)
        return leaf_from(path, await self._request("GET", path, params=params, timeout=timeout))

    async def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> AuthorizeResult:
        """`POST /v1/agent/connect/authorize`, over the keep-alive pool."""
        content = _authorize_body(target, client_cert_uri, client_cert_serial)
        raw = await self._fast("POST", self._authorize_target, self._authorize_headers, content)
        return authorize_result(AUTHORIZE_PATH, raw.status, raw.body)

    async def intentions_match(self, name: str, index: int = 0) -> IntentionMatch:
        """`GET /v1/connect/intentions/match?by=destination&name=`, blocking when `index` > 0."""
        path = "/v1/connect/intentions/match"
        params, timeout = self._blocking(index, {"by": "destination", "name": name})
        answer = await self._request("GET", path, params=params, timeout=timeout)
        return intention_match(path, name, answer)

    def _discovery_params(self, datacenter: str, peer: str = "") -> dict[str, str]:
        params = {"stale": ""}
        if peer:  # a peer's imports: no datacenter (Consul refuses both)
            params["peer"] = peer
            return params
        dc = datacenter or self.datacenter
        if dc:
            params["dc"] = dc
        return params

    async def health_connect(
        self, service: str, *, datacenter: str = "", index: int = 0, peer: str = ""
    ) -> Endpoints:
        """`GET /v1/health/connect/:service?passing&stale`: healthy Connect endpoints.

        With `peer`, `?peer=<name>`: the instances imported from that peer, each expected to
        show one of its `Connect.PeerMeta` identities (`proxy.peeranswers`).
        """
        path = f"/v1/health/connect/{service}"
        params, timeout = self._blocking(index, self._discovery_params(datacenter, peer))
        params["passing"] = "1"
        answer = await self._request("GET", path, params=params, timeout=timeout)
        if peer:
            return peered_health_endpoints(path, peer, answer)
        return health_endpoints(path, answer)

    async def trust_bundle(self, peer: str, index: int = 0) -> TrustBundle:
        """The dev agent's `GET /v1/internal/connect-proxy/peering/trust-bundle/:peer`
        (Consul serves bundles over gRPC only), blocking when `index` > 0."""
        path = f"/v1/internal/connect-proxy/peering/trust-bundle/{peer}"
        params, timeout = self._blocking(index)
        answer = await self._request("GET", path, params=params, timeout=timeout)
        return trust_bundle_from(path, answer)

    async def service_trust_bundles(
        self, service: str, index: int = 0
    ) -> tuple[tuple[TrustBundle, ...], int]:
        """The dev agent's `GET /v1/internal/connect-proxy/peering/trust-bundles?service=`:
        the bundles of the peers `service` is exported to (Consul's gRPC
        `TrustBundleListByService`), blocking when `index` > 0."""
        path = "/v1/internal/connect-proxy/peering/trust-bundles"
        params, timeout = self._blocking(index, {"service": service})
        answer = await self._request("GET", path, params=params, timeout=timeout)
        return trust_bundles_from(path, answer)

    async def health_instances(
        self, service: str, *, datacenter: str = "", timeout: float | None = None, peer: str = ""
    ) -> Instances:
        """`GET /v1/health/connect/:service?stale`: every instance, with its health.

        For people (the admin status page), not for routing: without `passing`, so unhealthy
        instances are listed too. `timeout`: seconds for this call (default: the client's).
        """
        path = f"/v1/health/connect/{service}"
        params = self._discovery_params(datacenter, peer)
        answer = await self._request("GET", path, params=params, timeout=timeout)
        return health_instances(path, answer)

    async def query_execute(self, query: str, *, datacenter: str = "") -> list[Endpoint]:
        """`GET /v1/query/:name/execute?connect=true&stale`, over the keep-alive pool."""
        path = f"/v1/query/{query}/execute"
        params = self._discovery_params(datacenter)
        params["connect"] = "true"
        target = (
            self._prefix
            + urllib.parse.quote(path, safe="/:@")
            + "?"
            + urllib.parse.urlencode(params)
        )
        raw = await self._fast("GET", target, self._pool_headers)
        return query_endpoints(path, decode(path, raw.status, raw.headers, raw.body))

    async def agent_service(self, service_id: str, content_hash: str = "") -> AgentService:
        """`GET /v1/agent/service/:id`, hash-blocking when `content_hash` is given."""
        path = f"/v1/agent/service/{service_id}"
        params, timeout = self._hash_blocking(content_hash)
        answer = await self._request("GET", path, params=params, timeout=timeout)
        return agent_service_from(path, answer)

    async def managed_proxy(self, proxy_id: str, content_hash: str = "") -> AgentService:
        """`GET /v1/agent/connect/proxy/:id` (Consul 1.2-1.5), hash-blocking."""
        path = f"/v1/agent/connect/proxy/{proxy_id}"
        params, timeout = self._hash_blocking(content_hash)
        answer = await self._request("GET", path, params=params, timeout=timeout)
        return agent_service_from(path, answer)

    async def self(self) -> Answer:
        """`GET /v1/agent/self`."""
        return await self._request("GET", "/v1/agent/self")

    async def xds_ports(self) -> XDSPorts:
        """The agent's gRPC ports for Envoy, from `GET /v1/agent/self`."""
        return xds_ports_from(await self.self())

    async def acl_token_self(self) -> Answer:
        """`GET /v1/acl/token/self`."""
        return await self._request("GET", "/v1/acl/token/self")

    async def services(self) -> dict[str, dict[str, Any]]:
        """`GET /v1/agent/services`: service ID -> service body."""
        path = "/v1/agent/services"
        return services_from(path, await self._request("GET", path))

    async def catalog_service(self, name: str) -> list[dict[str, Any]]:
        """`GET /v1/catalog/service/:name?stale`: the catalog's entries."""
        path = f"/v1/catalog/service/{name}"
        return catalog_entries_from(path, await self._request("GET", path, params={"stale": ""}))

    async def register(self, registration: Any) -> None:
        """`PUT /v1/agent/service/register`."""
        await self._request("PUT", "/v1/agent/service/register", body=registration)

    async def deregister(self, service_id: str) -> None:
        """`PUT /v1/agent/service/deregister/:id`."""
        await self._request("PUT", f"/v1/agent/service/deregister/{service_id}")

    async def pass_ttl(self, check_id: str, note: str = "") -> None:
        """`PUT /v1/agent/check/pass/:id?note=`."""
        await self._request("PUT", f"/v1/agent/check/pass/{check_id}", params={"note": note})


def explain(exc: Exception, service: str = "") -> str:
    """An agent error in words a user can act on; never contains the token."""
    if isinstance(exc, AgentResponseError) and exc.status == 403:
        text = str(exc)
        if "ACL not found" in text:
            return (
                f"{text}: the agent does not know the ACL token given to the proxy; pass a "
                "valid one with -token, -token-file or CONSUL_HTTP_TOKEN"
            )
        if "Permission denied" in text or "lacks permission" in text:
            need = f" (it needs service:write on {service!r})" if service else ""
            return f"{text}: the proxy's ACL token lacks a permission{need}"
        return f"{text}: the agent refused the proxy's ACL token"
    return str(exc)
