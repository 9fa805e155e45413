"""End to end (issue 12 item 1): a leaf signed by our CA but naming another trust domain.

The certificate chains to our root, so the TLS handshake succeeds; the dev agent's
authorize answers `Authorized: false` ("Identity from an external trust domain"), and the
real db sidecar refuses the connection with no change of its own: no byte reaches the app,
and the refusal is counted as `denied_by_intention`.
"""

from __future__ import annotations

import asyncio
import ssl

from listeners.events import Refusal
from proxy.devagent import DevAgent
from proxy.observe import ProxyMetrics
from proxy.supervisor import Proxy
from tests.certs import load_chain
from tests.proxyfix import client_ctx, custom_leaf, db_sidecar, echo_app, tls_exchange

LABELS = {"direction": "inbound", "listener": "public_listener"}
REFUSED = "connect_proxy_refused_connections_total"
BYTES = "connect_proxy_bytes_total"


def leaf_ctx(agent: DevAgent, uri: str) -> ssl.SSLContext:
    """An mTLS client context with a leaf for `uri`, signed by the agent's active root."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(r.cert_pem for r in agent.state.ca.roots))
    cert_pem, key_pem = custom_leaf(agent, serial=4711, uri=uri)
    load_chain(ctx, cert_pem, key_pem)
    return ctx


async def idle(proxy: Proxy) -> None:
    assert proxy.public is not None
    async with asyncio.timeout(5):
        await proxy.public.until_idle()


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float:
    metrics.flush()
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_leaf_from_another_trust_domain_is_refused_end_to_end(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    other = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        port = db.public.port
        # No intention: with ACLs off a web identity of OUR trust domain is allowed...
        assert await tls_exchange(port, client_ctx(agent, "web"), b"ours") == b"ours"
        await idle(db)
        assert app.connections == 1
        # ...and the same service name from another trust domain is not.
        assert await tls_exchange(port, leaf_ctx(agent, other), b"theirs") == b""
        await idle(db)
        assert app.connections == 1
        refusals = list(metrics.recent_refusals)
    assert sample(metrics, REFUSED, reason=Refusal.DENIED, **LABELS) == 1
    assert len(refusals) == 1
    assert refusals[0].refusal is Refusal.DENIED
    assert refusals[0].detail == (
        "connect: authz denied: Identity from an external trust domain: "
        "11111111-2222-3333-4444-555555555555.consul"
    )
    # Only the allowed exchange's 4 bytes each way crossed the public listener.
    assert sample(metrics, BYTES, toward="destination", **LABELS) == 4
    assert sample(metrics, BYTES, toward="source", **LABELS) == 4


async def test_leaf_from_our_trust_domain_in_upper_case_is_allowed(agent: DevAgent) -> None:
    metrics = ProxyMetrics()
    ours = f"spiffe://{agent.state.ca.trust_domain.upper()}/ns/default/dc/dc1/svc/web"
    async with echo_app() as app, db_sidecar(agent, app, metrics) as db:
        assert db.public is not None
        assert await tls_exchange(db.public.port, leaf_ctx(agent, ours), b"hello") == b"hello"
        await idle(db)
        assert app.connections == 1
    assert sample(metrics, REFUSED, reason=Refusal.DENIED, **LABELS) == 0
