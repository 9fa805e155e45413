"""The agent calls `connect-proxy exec` makes, with the error texts of Consul's Go client.

`exec` is a plain HTTP client of any Consul agent (it must work against a real cluster), so
this is Consul's `api` package as far as `command/exec` uses it: `Agent().Self()`,
`Health().Service(name, "", passing)`, `Session().Create/CreateNoChecks/Renew/Destroy`,
`KV().Acquire/Keys/Get/DeleteTree`, `Event().Fire`. Every request carries `dc=` when
`-datacenter` is set (the client config's datacenter) and the token in `X-Consul-Token`.

Errors are `ExecAPIError` with the Go client's words: `Unexpected response code: 403
(Permission denied)` for a refused request, `Get "http://127.0.0.1:1/v1/agent/self": dial
tcp 127.0.0.1:1: connect: connection refused` for an agent that is down.

Rule 1: the token travels only in the header, never in a URL or an error text.
Rule 2: a value is read whole only per key (KV values are at most 512 KiB; `exec`'s
chunks 4 KiB); nothing here accumulates across calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from proxy.goclient import APIError, GoAPIClient

# Our margin over a blocking query's wait (the agent adds up to wait/16 of jitter).
BLOCKING_MARGIN = 15.0


class ExecAPIError(APIError):
    """A failed call of `exec`."""


class ExecClient(GoAPIClient):
    """One agent, as `HTTPOptions` describe it (see the module docstring)."""

    error = ExecAPIError

    # -- agent and health ----------------------------------------------------------------

    async def agent_self(self) -> dict[str, Any]:
        answer = self._json(self._require_ok(await self._call("GET", "/v1/agent/self")))
        if not isinstance(answer, dict):
            raise ExecAPIError("Failed to read response: not an object")
        return answer

    async def passing_nodes(self, service: str) -> list[str]:
        """`GET /v1/health/service/:service?passing=1`: the node names, in answer order."""
        response = self._require_ok(
            await self._call("GET", f"/v1/health/service/{service}", params={"passing": "1"})
        )
        entries = self._json(response)
        if not isinstance(entries, list):
            raise ExecAPIError("Failed to read response: not a list")
        return [str((e.get("Node") or {}).get("Node", "")) for e in entries if isinstance(e, dict)]

    # -- sessions ------------------------------------------------------------------------

    async def session_create(self, body: Mapping[str, Any]) -> str:
        content = (json.dumps(body, sort_keys=True) + "\n").encode()
        response = self._require_ok(await self._call("PUT", "/v1/session/create", content=content))
        answer = self._json(response)
        return str(answer.get("ID", "")) if isinstance(answer, dict) else ""

    async def session_renew(self, session: str) -> None:
        """Renew; an unknown session is no error (the Go client answers nil, nil)."""
        response = await self._call("PUT", f"/v1/session/renew/{session}")
        if response.status_code not in (200, 404):
            raise ExecAPIError(f"Unexpected response code: {response.status_code}")

    async def session_destroy(self, session: str) -> None:
        self._require_ok(await self._call("PUT", f"/v1/session/destroy/{session}"))

    # -- KV ------------------------------------------------------------------------------

    @staticmethod
    def _kv_path(key: str) -> str:
        return "/v1/kv/" + urllib.parse.quote(key, safe="/")

    async def kv_acquire(self, key: str, value: bytes, session: str) -> bool:
        response = self._require_ok(
            await self._call("PUT", self._kv_path(key), params={"acquire": session}, content=value)
        )
        return self._json(response) is True

    async def kv_keys(self, prefix: str, index: int, wait: float) -> tuple[list[str], int]:
        """A blocking `?keys` list: the keys (none on a 404) and the answer's index."""
        params = {"keys": "", "wait": f"{max(1, int(wait * 1000))}ms"}
        if index:
            params["index"] = str(index)
        response = await self._call(
            "GET",
            self._kv_path(prefix),
            params=params,
            timeout=wait + wait / 16 + BLOCKING_MARGIN,
        )
        if response.status_code != 404:
            self._require_ok(response)
        try:
            last = int(response.headers.get("X-Consul-Index", "0"))
        except ValueError:
            raise ExecAPIError("Failed to parse X-Consul-Index") from None
        if response.status_code == 404:
            return [], last
        keys = self._json(response)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ExecAPIError("Failed to read response: not a list of keys")
        return keys, last

    async def kv_get(self, key: str) -> bytes | None:
        """The value of `key` (empty for none), or None when there is no such key."""
        response = await self._call("GET", self._kv_path(key))
        if response.status_code == 404:
            return None
        entries = self._json(self._require_ok(response))
        if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
            return None
        raw = entries[0].get("Value")
        if not raw:
            return b""
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, TypeError) as exc:
            raise ExecAPIError(f"Failed to read response: {exc}") from None

    async def kv_delete_tree(self, prefix: str) -> None:
        self._require_ok(await self._call("DELETE", self._kv_path(prefix), params={"recurse": ""}))

    # -- events --------------------------------------------------------------------------

    async def event_fire(
        self, name: str, payload: bytes, *, node: str = "", service: str = "", tag: str = ""
    ) -> str:
        params = {k: v for k, v in (("node", node), ("service", service), ("tag", tag)) if v}
        response = self._require_ok(
            await self._call(
                "PUT",
                f"/v1/event/fire/{name}",
                params=params,
                content=payload,
                content_type="application/octet-stream",
            )
        )
        answer = self._json(response)
        return str(answer.get("ID", "")) if isinstance(answer, dict) else ""
