"""Routes of the local agent: `/v1/agent/self`, services, checks, and `/v1/status/*`.

Rule 1: routes only; a handler reads the request, calls the table that owns the data, and
renders its answer (see `wire`).
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys

from aiohttp import web

from proxy.addr import join_host_port
from proxy.devagent import schemas
from proxy.devagent.http import wire
from proxy.devagent.state import CRITICAL, PASSING, WARNING, BadRequest

VERSION = "1.18.0"
REVISION = "devagent"
# Go's GOARCH for the machine names Python reports.
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386"}


def _stats(request: web.Request) -> dict[str, dict[str, str]]:
    """`Stats` of `/v1/agent/self`: Consul's sections, every value a string as Consul's.

    `consul` is a server's (`agent/consul/server.go` Stats): the dev agent is the one
    server, its own leader, bootstrapped. `agent` and `build` are `agent/agent.go` Stats;
    `runtime` holds this process's values under Go's names (the Python version where Go
    gives its own, event-loop tasks where Go counts goroutines).
    """
    state = wire.state_of(request)
    specs = state.checks.specs.values()
    machine = platform.machine().lower()
    try:
        procs = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        procs = os.cpu_count() or 1
    return {
        "agent": {
            "check_monitors": "0",  # script checks: the dev agent runs none
            "check_ttls": str(sum(1 for spec in specs if spec.kind == "ttl")),
            "checks": str(len(state.checks.records)),
            "services": str(len(state.catalog.services)),
        },
        "build": {
            "prerelease": "",
            "revision": REVISION[:8],
            "version": VERSION,
            "version_metadata": "",
        },
        "consul": {
            "acl": "enabled" if state.acl.enabled else "disabled",
            "bootstrap": "true",
            "known_datacenters": "1",
            "leader": "true",
            "leader_addr": join_host_port(state.node.address, 8300),
            "server": "true",
        },
        "runtime": {
            "arch": _GOARCH.get(machine, machine),
            "cpu_count": str(os.cpu_count() or 1),
            "goroutines": str(len(asyncio.all_tasks())),
            "max_procs": str(procs),
            "os": sys.platform.rstrip("0123456789"),
            "version": f"python{platform.python_version()}",
        },
    }


async def agent_self(request: web.Request) -> web.StreamResponse:
    state = wire.state_of(request)
    node = state.node
    wire.authz(request).require("agent", node.name, "read")
    grpc = wire.settings_of(request).grpc_port
    return wire.answer(
        request,
        {
            "Config": {
                "Datacenter": node.datacenter,
                "PrimaryDatacenter": node.datacenter,
                "NodeName": node.name,
                "NodeID": node.id,
                "Revision": REVISION,
                "Server": True,
                "Version": VERSION,
                "BuildDate": "2024-01-01T00:00:00Z",
            },
            "DebugConfig": {
                "Datacenter": node.datacenter,
                "NodeName": node.name,
                "GRPCPort": grpc,
                "HTTPPort": wire.local_port(request),
                "ConnectEnabled": True,
                "ACLsEnabled": state.acl.enabled,
            },
            "Coord": None,
            "Member": {
                "Name": node.name,
                "Addr": node.address,
                "Port": 8301,
                "Tags": {"dc": node.datacenter, "role": "consul", "build": VERSION},
                "Status": 1,
            },
            "Stats": _stats(request),
            "Meta": {"consul-network-segment": ""},
            "xDS": {
                "SupportedProxies": {"envoy": ["1.28.0", "1.27.2", "1.26.6", "1.25.11"]},
                "Port": grpc,
                "Ports": {"Plaintext": grpc, "TLS": -1},
            },
        },
    )


async def agent_services(request: web.Request) -> web.StreamResponse:
    authz = wire.authz(request)
    services, filtered = wire.state_of(request).catalog.agent_services(authz)
    headers = {}
    if wire.secret(request) and filtered:
        headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
    return wire.answer(request, services, headers=headers)


async def agent_service(request: web.Request) -> web.StreamResponse:
    if wire.settings_of(request).emulate_consul_1_2:
        return wire.text(404, "404 page not found")
    catalog = wire.state_of(request).catalog
    service_id = request.match_info["id"]
    authz = wire.authz(request)
    svc = catalog.agent_service(service_id)  # 404 before the ACL check, as Consul
    authz.require("service", svc["Service"], "read")
    last = request.query.get("hash", "")
    if last:
        await wire.state_of(request).block_on_hash(
            catalog.agent_service_watch(service_id), last, wire.wait(request, wire.HASH_WAIT)
        )
        svc = catalog.agent_service(service_id)
    return wire.answer(request, svc, headers={"X-Consul-ContentHash": str(svc["ContentHash"])})


async def agent_register(request: web.Request) -> web.StreamResponse:
    body = await wire.body(request, schemas.SERVICE)
    replace = wire.flag(request, "replace-existing-checks")
    wire.state_of(request).catalog.register_service(
        body, wire.authz(request), replace_existing_checks=replace
    )
    return wire.text(200, "")


async def agent_deregister(request: web.Request) -> web.StreamResponse:
    wire.state_of(request).catalog.deregister_service(request.match_info["id"], wire.authz(request))
    return wire.text(200, "")


async def agent_checks(request: web.Request) -> web.StreamResponse:
    authz = wire.authz(request)
    return wire.answer(request, wire.state_of(request).checks.agent_checks(authz))


async def agent_check_register(request: web.Request) -> web.StreamResponse:
    body = await wire.body(request, schemas.CHECK)
    wire.state_of(request).checks.register_check(body, wire.authz(request))
    return wire.text(200, "")


async def agent_check_deregister(request: web.Request) -> web.StreamResponse:
    wire.state_of(request).checks.deregister_check(request.match_info["id"], wire.authz(request))
    return wire.text(200, "")


_TTL_STATUS = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}


async def agent_check_ttl(request: web.Request) -> web.StreamResponse:
    status = _TTL_STATUS[request.match_info["op"]]
    note = request.query.get("note", "")
    wire.state_of(request).checks.ttl_update(
        request.match_info["id"], status, note, wire.authz(request)
    )
    return wire.text(200, "")


async def agent_check_update(request: web.Request) -> web.StreamResponse:
    body = await wire.body(request)
    status = body.get("Status") or body.get("status") or ""
    if status not in (PASSING, WARNING, CRITICAL):
        raise BadRequest(f'Invalid check status: "{status}"')
    output = body.get("Output") or body.get("output") or ""
    if not isinstance(output, str):
        raise BadRequest("Request decode failed: Output must be a string")
    wire.state_of(request).checks.ttl_update(
        request.match_info["id"], status, output, wire.authz(request)
    )
    return wire.text(200, "")


async def status_leader(request: web.Request) -> web.StreamResponse:
    return wire.answer(request, join_host_port(wire.state_of(request).node.address, 8300))


async def status_peers(request: web.Request) -> web.StreamResponse:
    return wire.answer(request, [join_host_port(wire.state_of(request).node.address, 8300)])
