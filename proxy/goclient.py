"""What the HTTP clients of our Consul commands (`exec`, `peering`) share with Consul's Go
`api` package: one agent reached as `HTTPOptions` say, the token only in `X-Consul-Token`,
`dc=` on every request when `-datacenter` is set, and the Go client's error texts
(`Unexpected response code: 403 (Permission denied)`, or the `*url.Error` text of a request
that got no answer, such as `Get "http://127.0.0.1:1/v1/agent/self": dial tcp
127.0.0.1:1: connect: connection refused`).

Rule 1: the token travels only in the header, never in a URL or an error text.
"""

from __future__ import annotations

import errno
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx

from proxy.agent import make_http_client
from proxy.httpflags import HTTPOptions

REQUEST_TIMEOUT = 30.0


class APIError(Exception):
    """A failed call, worded as Consul's Go client words it."""


def _go_method(method: str) -> str:
    return method[:1] + method[1:].lower()


def transport_text(method: str, url: str, exc: httpx.TransportError) -> str:
    """Go's `*url.Error` text for a request that never got an answer."""
    errnos: list[int] = []
    cause: BaseException | None = exc
    for _ in range(16):  # the chain httpx -> httpcore -> anyio -> the socket's error
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            errnos.append(cause.errno)
        cause = cause.__cause__ or cause.__context__
    parsed = urllib.parse.urlsplit(url)
    host = parsed.netloc
    if errno.ECONNREFUSED in errnos:
        reason = f"dial tcp {host}: connect: connection refused"
    elif isinstance(exc, httpx.TimeoutException):
        reason = "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
    else:
        reason = str(exc) or type(exc).__name__
    return f'{_go_method(method)} "{url}": {reason}'


class GoAPIClient:
    """One agent for a command; `error` is the exception its failures raise."""

    error: type[APIError] = APIError

    def __init__(self, options: HTTPOptions) -> None:
        self._client = make_http_client(options)
        self._headers = {"X-Consul-Token": options.token} if options.token else {}
        self._dc = options.datacenter

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        content_type: str = "",
        timeout: float = REQUEST_TIMEOUT,
    ) -> httpx.Response:
        query = dict(params or {})
        if self._dc:
            query["dc"] = self._dc
        query = dict(sorted(query.items()))  # Go's url.Values.Encode sorts by key
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        request = self._client.build_request(
            method, path, params=query, content=content, headers=headers, timeout=timeout
        )
        try:
            return await self._client.send(request)
        except httpx.TransportError as exc:
            raise self.error(transport_text(method, str(request.url), exc)) from None

    def _require_ok(self, response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            body = response.content.decode("utf-8", "replace")
            raise self.error(f"Unexpected response code: {response.status_code} ({body})")
        return response

    def _json(self, response: httpx.Response) -> Any:
        try:
            return json.loads(response.content)
        except ValueError as exc:
            raise self.error(f"Failed to read response: {exc}") from None
