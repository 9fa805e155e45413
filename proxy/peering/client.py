"""The agent calls of `connect-proxy peering`, as Consul's `api.Peerings` makes them.

Works unchanged against a real Consul: `POST /v1/peering/token`, `POST
/v1/peering/establish`, `GET /v1/peering/<name>` (404 is "not found", not an error, as the
Go client's `requireNotFoundOrOK`), `GET /v1/peerings`, `DELETE /v1/peering/<name>`.
`-partition` travels in the body of token and establish and as `?partition=` elsewhere;
`-datacenter` as `?dc=`; the token only in `X-Consul-Token`.

Errors are `PeeringAPIError` with the Go client's words: `Unexpected response code: 400
(<body>)`, or the `*url.Error` text of a request that got no answer.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

import httpx

from proxy.goclient import APIError, GoAPIClient
from proxy.httpflags import HTTPOptions


class PeeringAPIError(APIError):
    """A failed call of `peering`."""


class PeeringClient(GoAPIClient):
    error = PeeringAPIError

    def __init__(self, options: HTTPOptions, partition: str = "") -> None:
        super().__init__(options)
        self.partition = partition

    async def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        # The Go client puts its partition on every request.
        params = {"partition": self.partition} if self.partition else None
        content = None if body is None else json.dumps(body).encode()
        return await self._call(method, path, params=params, content=content)

    def _write_body(self, body: dict[str, Any]) -> dict[str, Any]:
        # Go's omitempty: Partition and Meta only when set.
        if self.partition:
            body["Partition"] = self.partition
        return {k: v for k, v in body.items() if v not in (None, "", {}, [])}

    async def generate_token(
        self, name: str, meta: Mapping[str, str], addresses: list[str]
    ) -> dict[str, Any]:
        body = self._write_body(
            {"PeerName": name, "Meta": dict(meta), "ServerExternalAddresses": list(addresses)}
        )
        body.setdefault("PeerName", name)
        answer = self._json(self._require_ok(await self._send("POST", "/v1/peering/token", body)))
        if not isinstance(answer, dict):
            raise PeeringAPIError("Failed to read response: not an object")
        return answer

    async def establish(self, name: str, token: str, meta: Mapping[str, str]) -> None:
        body = self._write_body({"PeerName": name, "PeeringToken": token, "Meta": dict(meta)})
        body.setdefault("PeerName", name)
        self._require_ok(await self._send("POST", "/v1/peering/establish", body))

    async def read(self, name: str) -> dict[str, Any] | None:
        path = f"/v1/peering/{urllib.parse.quote(name, safe='')}"
        response = await self._send("GET", path)
        if response.status_code == 404:
            return None
        answer = self._json(self._require_ok(response))
        if not isinstance(answer, dict):
            raise PeeringAPIError("Failed to read response: not an object")
        return answer

    async def list(self) -> list[dict[str, Any]]:
        answer = self._json(self._require_ok(await self._send("GET", "/v1/peerings")))
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise PeeringAPIError("Failed to read response: not a list")
        return [p for p in answer if isinstance(p, dict)]

    async def delete(self, name: str) -> None:
        path = f"/v1/peering/{urllib.parse.quote(name, safe='')}"
        self._require_ok(await self._send("DELETE", path))
