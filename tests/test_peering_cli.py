"""`connect-proxy peering ...` as a process against two dev agents: Consul's flags,
messages, pretty and json output, and exit codes; plus the pure formatters."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections.abc import AsyncIterator

import pytest

from proxy.devagent import DevAgent
from proxy.peering.command import columnize, format_peering, go_time
from tests.conftest import Run, finish, wait_until
from tests.peerfix import cluster_config

pytestmark = pytest.mark.one_loop  # child processes and the dev agent: one loop is enough

DEADLINE = 30.0


async def cli(addr: str, *args: str) -> Run:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CONNECT_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "peering",
        *args[:1],
        *(["-http-addr", addr] if args else []),
        *args[1:],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    return await finish(proc, timeout=DEADLINE)


@pytest.fixture
async def agents() -> AsyncIterator[tuple[DevAgent, DevAgent]]:
    one, two = DevAgent(cluster_config("dc1")), DevAgent(cluster_config("dc2"))
    await one.start("127.0.0.1", 0)
    await two.start("127.0.0.1", 0)
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def test_the_whole_cycle_through_the_cli(agents: tuple[DevAgent, DevAgent]) -> None:
    dc1, dc2 = agents
    run = await cli(dc1.http_addr, "list")
    assert (run.code, run.out) == (0, "There are no peering connections.\n")
    run = await cli(dc2.http_addr, "generate-token", "-name", "dc1", "-meta", "env=test")
    assert run.code == 0, run.err
    token = run.out.strip()
    decoded = json.loads(base64.b64decode(token))
    assert decoded["Remote"]["Datacenter"] == "dc2"
    run = await cli(dc2.http_addr, "generate-token", "-name", "dc1", "-format", "json")
    assert run.code == 0
    token = json.loads(run.out)["PeeringToken"]
    assert list(json.loads(run.out)) == ["PeeringToken"]
    run = await cli(dc1.http_addr, "establish", "-name", "dc2", "-peering-token", token)
    assert (run.code, run.out) == (0, "Successfully established peering connection with dc2\n")
    # The same token again: the secret was used.
    run = await cli(dc1.http_addr, "establish", "-name", "dc2", "-peering-token", token)
    assert run.code == 1
    assert run.err == (
        "Error establishing peering for dc2: Unexpected response code: 403 (a new peering "
        "token must be generated: invalid peering establishment secret)\n"
    )
    await wait_until(lambda: dc1.state.peerings.peerings["dc2"].state == "ACTIVE")
    await wait_until(lambda: dc2.state.peerings.peerings["dc1"].state == "ACTIVE")
    run = await cli(dc2.http_addr, "read", "-name", "dc1")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == "Name:         dc1"
    assert "State:        ACTIVE" in lines
    assert "Meta:" in lines and "    env=test" in lines
    assert "Imported Services: 0" in lines
    run = await cli(dc2.http_addr, "read", "-name", "dc1", "-format", "json")
    data = json.loads(run.out)
    assert list(data)[:4] == ["ID", "Name", "Partition", "Meta"]
    assert data["State"] == "ACTIVE"
    run = await cli(dc1.http_addr, "list")
    assert run.code == 0
    assert run.out.splitlines()[0].split() == [
        "Name",
        "State",
        "Imported",
        "Svcs",
        "Exported",
        "Svcs",
        "Meta",
    ]
    assert run.out.splitlines()[1].split() == ["dc2", "ACTIVE", "0", "0"]
    run = await cli(dc1.http_addr, "list", "-format", "json")
    assert [p["Name"] for p in json.loads(run.out)] == ["dc2"]
    run = await cli(dc2.http_addr, "delete", "-name", "dc1")
    assert (run.code, run.out) == (
        0,
        "Successfully submitted peering connection, dc1, for deletion\n",
    )
    await wait_until(lambda: dc1.state.peerings.peerings["dc2"].state == "TERMINATED")
    run = await cli(dc2.http_addr, "read", "-name", "dc1")
    assert (run.code, run.err) == (1, "No peering with name dc1 found.\n")


async def test_usage_errors(agents: tuple[DevAgent, DevAgent]) -> None:
    dc1, _ = agents
    addr = dc1.http_addr
    for args, err in [
        (("generate-token",), "Missing the required -name flag\n"),
        (("establish", "-name", "x"), "Missing the required -peering-token flag\n"),
        (
            ("read", "-name", "x", "-format", "yaml"),
            "Invalid format, valid formats are {pretty|json}\n",
        ),
        (("delete",), "Missing the required -name flag\n"),
    ]:
        run = await cli(addr, *args)
        assert (run.code, run.err) == (1, err), args
    run = await cli(addr, "generate-token", "-name", "x", "-meta", "novalue")
    assert run.code == 1
    assert run.err.startswith(
        'invalid value "novalue" for flag -meta: Missing "=" value in argument: novalue\n'
    )
    run = await cli(addr, "establish", "-name", "x", "-peering-token", "not base64!")
    assert run.code == 1
    assert run.err == (
        "Error establishing peering for x: Unexpected response code: 400 (failed to decode "
        "peering token: illegal base64 data at input byte 3)\n"
    )
    run = await cli(addr, "generate-token", "-name", "Bad")
    assert run.code == 1 and run.err.startswith(
        "Error generating peering token for Bad: Unexpected response code: 400 (Bad is not a "
        "valid peer name"
    )
    run = await cli("127.0.0.1:1", "list")
    assert run.code == 1
    assert run.err.startswith('Error listing peerings: Get "http://127.0.0.1:1/v1/peerings')
    assert "connection refused" in run.err
    run = await cli(addr)
    assert run.code == 1 and "Subcommands:" in run.err


def test_pretty_formatters() -> None:
    assert go_time(None) == "<nil>"
    assert go_time("2024-05-01T10:20:30.123400Z") == "2024-05-01 10:20:30.1234 +0000 UTC"
    assert go_time("2024-05-01T10:20:30Z") == "2024-05-01 10:20:30 +0000 UTC"
    assert columnize([["a", "bb", "c"], ["ccc", "d", ""]]) == "a    bb  c\nccc  d   "
    text = format_peering(
        {
            "Name": "p",
            "ID": "i",
            "State": "ACTIVE",
            "PeerServerAddresses": ["1.2.3.4:8503", "5.6.7.8:8503"],
            "StreamStatus": {"ImportedServices": ["a", "b"], "ExportedServices": None},
            "CreateIndex": 3,
            "ModifyIndex": 4,
        }
    )
    assert (
        "Peer Server Addresses:\n    1.2.3.4:8503    5.6.7.8:8503\nImported Services: 2\n" in text
    )
    assert text.endswith("Create Index: 3\nModify Index: 4\n")
