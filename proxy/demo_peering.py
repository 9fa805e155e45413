"""`connect-proxy demo -peering`: a walk-through of a peered upstream across two dev agents.

Two dev agents in this process, dc1 and dc2, with their own cluster IDs (so their own trust
domains), peer through the real flow (dc2 generates a token, dc1 establishes with it over
the peering port). dc2 runs `db` and its sidecar and exports db to dc1; dc1 runs `web`, whose
sidecar has the upstream `db` with `destination_peer` dc2. A request through web's upstream
crosses the trust domains over mutual TLS (web's sidecar trusts dc2's roots from the trust
bundle, sends PeerMeta's SNI and checks PeerMeta's SPIFFE ID; db's sidecar trusts dc1's
roots because db is exported to dc1). Then a `service-intentions` entry in dc2 denies web
from peer dc1, and the next request is refused. `-once` exits after that (0 if every step
behaved); otherwise it keeps running until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from proxy.demo import (
    DbApp,
    ReservedPorts,
    Sidecars,
    blocking_until,
    get_status,
    say,
    show_decision,
)
from proxy.devagent import AgentConfig, DevAgent


def _agent_config(dc: str) -> AgentConfig:
    return AgentConfig(
        node_name=f"demo-{dc}",
        datacenter=dc,
        cluster_id=str(uuid.uuid4()),
        grpc_tls_port=0,
        sidecar_check_interval=1.0,
    )


async def peering_walkthrough(once: bool, stop: asyncio.Event) -> int:
    dc1, dc2 = DevAgent(_agent_config("dc1")), DevAgent(_agent_config("dc2"))
    await dc1.start("127.0.0.1", 0)
    await dc2.start("127.0.0.1", 0)
    app = DbApp()
    await app.start()
    api1 = httpx.AsyncClient(base_url=dc1.url, timeout=10)
    api2 = httpx.AsyncClient(base_url=dc2.url, timeout=10)
    sidecars = Sidecars()
    ports = ReservedPorts()
    upstream_port = ports.take()
    ok = True
    try:
        for dc, agent in (("dc1", dc1), ("dc2", dc2)):
            say(f"==> {dc} dev agent at {agent.url} (trust domain {agent.state.ca.trust_domain})")
        r = await api2.post("/v1/peering/token", json={"PeerName": "dc1"})
        r.raise_for_status()
        token = r.json()["PeeringToken"]
        say(f"==> dc2: peering generate-token -name dc1 -> a token of {len(token)} characters")
        r = await api1.post(
            "/v1/peering/establish", json={"PeerName": "dc2", "PeeringToken": token}
        )
        r.raise_for_status()
        for api, name in ((api1, "dc2"), (api2, "dc1")):
            body = await blocking_until(
                api, f"/v1/peering/{name}", lambda b: b.get("State") == "ACTIVE"
            )
            say(f"    peering {name}: {body['State']}")
        say("==> dc1: peering establish -name dc2: done, both sides ACTIVE")

        r = await api2.put(
            "/v1/agent/service/register",
            json={
                "Name": "db",
                "Port": app.port,
                "Connect": {"SidecarService": {"Port": ports.take(), "Address": "127.0.0.1"}},
            },
        )
        r.raise_for_status()
        entry = {
            "Kind": "exported-services",
            "Name": "default",
            "Services": [{"Name": "db", "Consumers": [{"Peer": "dc1"}]}],
        }
        (await api2.put("/v1/config", json=entry)).raise_for_status()
        say(f"==> dc2: registered db (app on 127.0.0.1:{app.port}) with a sidecar, exported to dc1")
        upstream = {
            "DestinationName": "db",
            "DestinationPeer": "dc2",
            "LocalBindPort": upstream_port,
        }
        r = await api1.put(
            "/v1/agent/service/register",
            json={
                "Name": "web",
                "Port": ports.take(),
                "Connect": {
                    "SidecarService": {
                        "Port": ports.take(),
                        "Address": "127.0.0.1",
                        "Proxy": {"Upstreams": [upstream]},
                    }
                },
            },
        )
        r.raise_for_status()
        say("==> dc1: registered web with a sidecar, upstream db with destination_peer dc2")

        for name, agent in (("db", dc2), ("web", dc1)):
            sidecars.start(name, agent)
            say(f"==> Started the {name} sidecar: connect-proxy -sidecar-for {name}")
        await sidecars.wait_ready(20)
        ports.release()
        db, web = sidecars.proxies["db"], sidecars.proxies["web"]
        assert db.public is not None and db.tls.material and web.tls.material
        say(f"    db  identity: {db.tls.material.leaf.uri}")
        say(f"    web identity: {web.tls.material.leaf.uri}")
        imported = await blocking_until(
            api1, "/v1/health/connect/db?peer=dc2&passing=1", lambda b: len(b) > 0
        )
        meta = imported[0]["Service"]["Connect"]["PeerMeta"]
        say(f"    dc1 sees db from peer dc2: SNI {meta['SNI'][0]}")
        say(f"                               SpiffeID {meta['SpiffeID'][0]}")
        # Both sides' bundles: web's sidecar trusts dc2's roots, db's trusts dc1's.
        async with asyncio.timeout(20):
            await web.peer_trust.until(lambda: web.peer_trust.client_ready("dc2"))
            await db.peer_trust.until(lambda: bool(db.peer_trust.exported))
        bundle = web.peer_trust.peers["dc2"].bundle
        assert bundle is not None
        say(f"    web's sidecar trusts peer dc2's roots (trust domain {bundle.trust_domain})")
        peers = ", ".join(f"{b.peer} ({b.trust_domain})" for b in db.peer_trust.exported)
        say(f"    db's public listener also trusts: {peers}")

        url = f"http://127.0.0.1:{upstream_port}/"
        say()
        say(f"==> 1. GET {url}  (dc1 web's upstream -> mTLS across trust domains -> dc2 db)")
        started = time.perf_counter()
        got = await get_status(url)
        elapsed = (time.perf_counter() - started) * 1000
        say(f"    {got!r} in {elapsed:.1f} ms")
        ok &= isinstance(got, tuple) and got[0] == 200
        uri = web.tls.material.leaf.uri or ""
        await show_decision(api2, uri, "dc2 authorize web (dc1) => db")
        say(f"    db's sidecar forwarded {db.public.forwarded}, denied {db.public.denied}")

        say()
        say("==> 2. dc2 denies web from peer dc1: service-intentions db, Sources web Peer dc1")
        intention = {
            "Kind": "service-intentions",
            "Name": "db",
            "Sources": [{"Name": "web", "Peer": "dc1", "Action": "deny"}],
        }
        (await api2.put("/v1/config", json=intention)).raise_for_status()
        denied_before = db.public.denied
        got = await get_status(url)
        if isinstance(got, tuple):
            say(f"    unexpectedly answered: {got!r}")
            ok = False
        else:
            say(f"    refused: {got} (db's sidecar closed it after authorize)")
        await show_decision(api2, uri, "dc2 authorize web (dc1) => db")
        denied = db.public.denied - denied_before
        say(f"    db's sidecar denied {denied} connection(s); the db app saw none of them")
        ok &= denied > 0 and app.requests == 1
        say()
        if once:
            say("==> Walk-through complete." if ok else "==> Walk-through FAILED: see above.")
            return 0 if ok else 1
        say(f"==> Running. Try: curl {url}   (denied now; delete the intention in dc2 to allow)")
        say("    Press Ctrl-C to stop.")
        await stop.wait()
        return 0 if ok else 1
    finally:
        ports.release()
        await sidecars.close()
        await api1.aclose()
        await api2.aclose()
        await app.close()
        await dc1.close()
        await dc2.close()
