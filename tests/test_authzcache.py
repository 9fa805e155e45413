"""The authorize decision cache: real mTLS clients through a real db sidecar on the dev agent
with `authorize_cache` on, the intentions changed, the roots rotated and the watch broken
under it; and the cache itself on a real intentions watch with real authorize calls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from listeners.events import Refusal
from proxy.agent import AgentClient
from proxy.authzcache import DecisionCache
from proxy.config import ProxyConfig, PublicListenerConfig
from proxy.devagent import DevAgent
from proxy.errors import ConfigError
from proxy.httpflags import HTTPOptions
from proxy.intentwatch import IntentionsFollower
from proxy.observe import ProxyMetrics
from proxy.proxyargs import parse_proxy_args
from proxy.supervisor import Proxy, ProxySettings
from proxy.tlsstore import TLSStore
from tests.conftest import wait_until
from tests.faultkit import Relay
from tests.proxyfix import (
    client_ctx,
    db_sidecar,
    echo_app,
    register_proxy,
    running_proxy,
    tls_exchange,
)
from tests.test_reauth import LABELS, REFUSED, _closed, _echo, _forwarding, _intention, open_client
from tests.test_reauth import _service as agent_service

LOOKUPS = "connect_proxy_authorize_cache_lookups_total"


def _counts(proxy: Proxy) -> dict[str, int]:
    return proxy.cache_counts.as_dict()


async def _trust_domain(agent: DevAgent) -> str:
    async with httpx.AsyncClient(base_url=agent.url) as c:
        r = await c.get("/v1/agent/connect/ca/roots")
    domain: str = r.json()["TrustDomain"]
    return domain


def _uri(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{service}"


async def _current(follower: IntentionsFollower) -> None:
    await wait_until(lambda: follower.generation() is not None)


async def test_second_connection_of_an_identity_is_a_hit(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, authorize_cache=True) as db:
        assert db.public is not None and db.follower is not None and db.authorize_cache is not None
        await _current(db.follower)
        web = client_ctx(agent, "web")
        assert await tls_exchange(db.public.port, web, b"one") == b"one"
        assert _counts(db)["misses"] == 1 and _counts(db)["hits"] == 0
        assert await tls_exchange(db.public.port, web, b"two") == b"two"
        # Another leaf of the same service is the same identity (the serial is not read).
        assert await tls_exchange(db.public.port, client_ctx(agent, "web"), b"3") == b"3"
        assert _counts(db) | {"entries": 1} == _counts(db)
        assert (_counts(db)["misses"], _counts(db)["hits"]) == (1, 2)
        # Another identity is its own miss.
        assert await tls_exchange(db.public.port, client_ctx(agent, "api"), b"4") == b"4"
        assert (_counts(db)["misses"], _counts(db)["entries"]) == (2, 2)
        assert metrics.registry.get_sample_value(LOOKUPS, {"result": "hit"}) == 2
        assert metrics.registry.get_sample_value(LOOKUPS, {"result": "miss"}) == 2
        status = db.authorize_status()
        assert status["cache"] is True
        assert status["reauthorize"] is True  # implied by the cache
        assert status["intentions_watch"] == {"current": True, "failures": 0}
        assert status["cache_counts"] == _counts(db)


async def test_deny_refuses_the_next_connection_and_closes_the_open_one(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    async with echo_app() as app, db_sidecar(agent, app, metrics, authorize_cache=True) as db:
        assert db.public is not None and db.follower is not None and db.reauthorizer
        follower, reauth = db.follower, db.reauthorizer
        await _current(follower)
        await wait_until(lambda: reauth.passes >= 1)
        web = client_ctx(agent, "web")
        assert await tls_exchange(db.public.port, web, b"cached") == b"cached"
        async with open_client(db.public.port, web) as (reader, writer):
            assert await _echo(reader, writer, b"open") == b"open"
            await _forwarding(db, 1)
            assert _counts(db)["hits"] == 1  # the allow is in the cache
            seen = follower.changes.value
            await _intention(agent, "deny")
            async with asyncio.timeout(5):
                await follower.changes.reached(seen + 1)  # the agent has reported it
            # The very next connection is asked again, and refused: no stale allow.
            assert await tls_exchange(db.public.port, web, b"x") == b""
            async with asyncio.timeout(5):
                assert await _closed(reader)  # and the open one is closed
        await wait_until(lambda: reauth.revoked == 1)
        refused = {"reason": Refusal.DENIED.value, **LABELS}
        assert metrics.registry.get_sample_value(REFUSED, refused) == 1
        revoked = {"reason": Refusal.REVOKED.value, **LABELS}
        await wait_until(lambda: metrics.registry.get_sample_value(REFUSED, revoked) == 1)
        # The denial is a decision: cached too, so the one after is a hit, still refused.
        hits = _counts(db)["hits"]
        assert await tls_exchange(db.public.port, web, b"y") == b""
        assert _counts(db)["hits"] == hits + 1
        assert metrics.registry.get_sample_value(REFUSED, refused) == 2


async def test_roots_rotation_clears(agent: DevAgent) -> None:
    async with echo_app() as app, db_sidecar(agent, app, authorize_cache=True) as db:
        assert db.public is not None and db.follower is not None and db.authorize_cache is not None
        cache = db.authorize_cache
        await _current(db.follower)
        web = client_ctx(agent, "web")
        assert await tls_exchange(db.public.port, web, b"a") == b"a"
        assert len(cache) == 1
        rotations = db.tls.rotations.value
        generation = db.follower.generation()
        agent.state.connect_ca.rotate()
        async with asyncio.timeout(5):
            await db.tls.rotations.reached(rotations + 1)
        # From the moment new material is in, the old decisions are not reused.
        assert db.follower.generation() != generation
        misses = _counts(db)["misses"]
        assert await tls_exchange(db.public.port, web, b"b") == b"b"
        assert _counts(db)["misses"] == misses + 1
        assert _counts(db)["hits"] == 0


@contextlib.asynccontextmanager
async def _sidecar_via(agent: DevAgent, relay: Relay, app_port: int) -> AsyncIterator[Proxy]:
    """A db sidecar whose agent client goes through `relay` (cache on)."""
    config = ProxyConfig(
        service="db",
        public_listener=PublicListenerConfig(
            bind_address="127.0.0.1", bind_port=0, local_service_port=app_port
        ),
    )
    settings = ProxySettings(watch_backoff=0.05, authorize_cache=True)
    proxy = Proxy(AgentClient(HTTPOptions(address=relay.addr)), config, settings)
    await proxy.start()
    try:
        async with asyncio.timeout(5):
            await proxy.wait_ready()
        assert proxy.public is not None
        await register_proxy(agent, "db-sidecar-proxy", proxy.public.port, "db", app_port)
        yield proxy
    finally:
        await proxy.close(drain_timeout=1.0)
        await proxy.agent.aclose()


async def test_broken_watch_falls_back_to_a_call_per_connection_and_heals(
    agent: DevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="proxy.authorize")
    relay = Relay(agent.http_addr)
    await relay.start()
    try:
        async with echo_app() as app, _sidecar_via(agent, relay, app.port) as db:
            assert db.public is not None and db.follower is not None
            follower = db.follower
            await _current(follower)
            web = client_ctx(agent, "web")
            for payload in (b"miss", b"hit"):
                assert await tls_exchange(db.public.port, web, payload) == payload
            assert (_counts(db)["misses"], _counts(db)["hits"]) == (1, 1)
            # The intentions watch answers 500 (authorize itself still works).
            relay.only = "/v1/connect/intentions/match"
            relay.set_mode("500")
            await wait_until(lambda: follower.generation() is None)
            for payload in (b"by", b"call"):
                assert await tls_exchange(db.public.port, web, payload) == payload
            assert _counts(db)["bypasses"] == 2
            assert _counts(db)["hits"] == 1  # nothing from before the outage was reused
            bypassed = [r for r in caplog.records if "cache bypassed" in r.getMessage()]
            assert len(bypassed) == 1  # logged once for the outage
            # A deny during the outage is seen at once: each connection is a call.
            await _intention(agent, "deny")
            assert await tls_exchange(db.public.port, web, b"no") == b""
            await _intention(agent, "allow")
            # Healed: the watch answers again and the cache is used again.
            relay.set_mode("pass")
            await _current(follower)
            misses = _counts(db)["misses"]
            for payload in (b"again", b"cached"):
                assert await tls_exchange(db.public.port, web, payload) == payload
            assert _counts(db)["misses"] == misses + 1
            assert _counts(db)["hits"] == 2
            assert _counts(db)["bypasses"] == 3
            assert any("cache in use again" in r.getMessage() for r in caplog.records)
    finally:
        await relay.close()


@contextlib.asynccontextmanager
async def _follower(agent: DevAgent) -> AsyncIterator[tuple[IntentionsFollower, AgentClient]]:
    client = AgentClient(HTTPOptions(address=agent.http_addr))
    follower = IntentionsFollower(client, "db", TLSStore(), backoff_base=0.05)
    task = asyncio.create_task(follower.run())
    try:
        await _current(follower)
        yield follower, client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


async def test_a_decision_fetched_before_a_change_is_not_stored(agent: DevAgent) -> None:
    async with _follower(agent) as (follower, client):
        cache = DecisionCache(follower)
        uri = _uri(await _trust_domain(agent), "web")

        async def answered_across_a_change() -> object:
            answer = await client.authorize("db", uri, "01")  # before the deny
            seen = follower.changes.value
            await _intention(agent, "deny")
            async with asyncio.timeout(5):
                await follower.changes.reached(seen + 1)  # reported before it is stored
            return answer

        first = await cache.decide(uri, answered_across_a_change)  # type: ignore[arg-type]
        assert first.allowed  # it serves the connection that asked before the change...
        assert uri not in cache  # ...and is not kept
        assert cache.counts.discarded == 1
        second = await cache.decide(uri, lambda: client.authorize("db", uri, "01"))
        assert not second.allowed and "Matched L4 intention" in second.reason
        assert uri in cache and cache.counts.misses == 2


async def test_an_answer_the_watched_intentions_contradict_is_not_stored(agent: DevAgent) -> None:
    await _intention(agent, "deny")  # web -> db denied, before the watch starts
    async with _follower(agent) as (follower, client):
        assert [r.action for r in follower.rules] == ["deny"]
        cache = DecisionCache(follower)
        domain = await _trust_domain(agent)
        web, api = _uri(domain, "web"), _uri(domain, "api")
        # An allow for web, as an agent answering from intentions older than the watch's
        # would give (here: the agent's real answer for api, allowed by default).
        stale = await cache.decide(web, lambda: client.authorize("db", api, "01"))
        assert stale.allowed and web not in cache
        assert cache.counts.disagreed == 1
        # The agent's own answer for web agrees with the rules: kept.
        assert not (await cache.decide(web, lambda: client.authorize("db", web, "01"))).allowed
        assert web in cache
        # No rule for api: the default decides, which the watch does not show: kept.
        assert (await cache.decide(api, lambda: client.authorize("db", api, "01"))).allowed
        assert api in cache
        assert follower.vouches("not a uri", True) is False


async def test_errors_are_not_cached_and_lru_is_bounded(agent: DevAgent) -> None:
    async with _follower(agent) as (follower, client):
        cache = DecisionCache(follower, size=2)
        domain = await _trust_domain(agent)
        web, api, billing = (_uri(domain, s) for s in ("web", "api", "billing"))

        def ask(uri: str, target: str = "db") -> object:
            return cache.decide(uri, lambda: client.authorize(target, uri, "01"))

        # An error (400: no target) is raised and not kept.
        with pytest.raises(Exception, match="Target service must be specified"):
            await ask(web, target="")
        assert web not in cache
        # Concurrent look-ups of one identity share one call.
        await asyncio.gather(*(ask(web) for _ in range(5)))  # type: ignore[arg-type]
        assert (cache.counts.misses, cache.counts.shared) == (2, 4)
        await ask(api)
        await ask(web)  # web is now the most recently used
        await ask(billing)  # evicts api
        assert len(cache) == 2 and cache.counts.entries == 2
        assert web in cache and billing in cache and api not in cache
        misses = cache.counts.misses
        await ask(api)
        assert cache.counts.misses == misses + 1
        with pytest.raises(ValueError, match="at least 1"):
            DecisionCache(follower, size=0)


def test_flag_and_config_key() -> None:
    options = parse_proxy_args(["-service", "db", "-authorize-cache"], {})
    assert options.authorize_cache is True
    assert parse_proxy_args(["-service", "db"], {}).authorize_cache is False
    loaded = agent_service({"authorize_cache": "false"})
    assert loaded.public_listener is not None
    assert loaded.public_listener.authorize_cache is False
    assert agent_service({}).public_listener.authorize_cache is None  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="authorize_cache must be true or false, got 2"):
        agent_service({"authorize_cache": 2})


async def test_config_wins_over_the_flag(agent: DevAgent) -> None:
    for key, cached in ((False, False), (None, True)):
        config = ProxyConfig(
            service="db",
            public_listener=PublicListenerConfig(bind_address="127.0.0.1", authorize_cache=key),
        )
        async with running_proxy(agent, config, authorize_cache=True) as db:
            assert (db.authorize_cache is not None) is cached
            assert (db.reauthorizer is not None) is cached
