"""`connect-proxy exec` as a real process against the dev agent (remote exec enabled): output,
exit codes, filters, heartbeats, big outputs, several nodes (a second node's keys written
through the KV API as Consul's agent writes them), ACLs, bad input, signals; after every run
the `_rexec/<session>` prefix is empty and the session gone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from dataclasses import replace

import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent
from proxy.rexec.command import ExecOptions, job_spec, targeted
from tests.conftest import Run, finish, wait_until

pytestmark = pytest.mark.one_loop  # the subject is a child process

NODE = "exec-node"
DEADLINE = 20.0
MGMT = "root-token"
# The quiet period of runs where this agent must acknowledge: the ack has to reach the CLI
# within it, and on a loaded 2-core CI machine 200 ms once was not enough.
ACK_WAIT = "1s"


@pytest.fixture
def agent_config() -> AgentConfig:
    return AgentConfig(node_name=NODE, disable_remote_exec=False)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CONNECT_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def spawn(
    addr: str, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "exec",
        "-http-addr",
        addr,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**_env(), **(env or {})},
    )


async def run_cli(addr: str, *args: str, stdin: bytes = b"") -> Run:
    return await finish(await spawn(addr, *args), stdin)


def assert_clean(agent: DevAgent) -> None:
    """Nothing left behind: no `_rexec` keys, no session."""
    assert not [k for k in agent.state.kv.entries if k.startswith("_rexec")]
    assert agent.state.sessions.records == {}


async def job_session(agent: DevAgent, timeout: float = 5.0) -> str:
    """The running CLI's session, read from its job key's lock holder."""
    kv = agent.state.kv.entries
    await wait_until(lambda: any(k.endswith("/job") for k in kv), timeout)
    return next(e.session for k, e in kv.items() if k.endswith("/job"))


async def test_command_output_summary_and_clean_up(agent: DevAgent) -> None:
    run = await run_cli(agent.http_addr, "-wait", ACK_WAIT, "echo hello; echo world >&2")
    assert run.code == 0, run.err
    assert run.out.splitlines() == [
        f"    {NODE}: hello",
        f"    {NODE}: world",
        f"    {NODE}:",
        f"==> {NODE}: finished with exit code 0",
        "1 / 1 node(s) completed / acknowledged",
    ]
    assert run.err == ""
    assert_clean(agent)


async def test_non_zero_exit_gives_2_and_verbose_progress(agent: DevAgent) -> None:
    run = await run_cli(agent.http_addr, "-wait", ACK_WAIT, "-verbose", "sh", "-c", "'exit 3'")
    assert run.code == 2
    lines = run.out.splitlines()
    assert lines[0].startswith("Created remote execution session: ")
    assert lines[1] == "Uploaded remote execution spec"
    assert lines[2].startswith("Fired remote execution event: ")
    assert f"==> {NODE}: acknowledged" in lines
    assert f"==> {NODE}: finished with exit code 3" in lines
    assert "1 / 1 node(s) completed / acknowledged" in lines
    assert lines[-1].startswith("Completed in ") and lines[-1].endswith(" seconds")
    assert_clean(agent)


async def test_shell_false_runs_argv_and_stdin_runs_a_script(agent: DevAgent) -> None:
    run = await run_cli(agent.http_addr, "-wait", ACK_WAIT, "-shell=false", "echo", "$HOME;", "x")
    assert run.code == 0, run.err
    assert f"    {NODE}: $HOME; x" in run.out.splitlines()
    script = b"#!/bin/sh\necho from-script\nexit 4\n"
    run = await run_cli(agent.http_addr, "-wait", ACK_WAIT, "-", stdin=script)
    assert run.code == 2
    assert f"    {NODE}: from-script" in run.out.splitlines()
    assert f"==> {NODE}: finished with exit code 4" in run.out.splitlines()
    assert_clean(agent)


@pytest.mark.parametrize(
    "filters",
    [["-node", "^other$"], ["-service", "nothing"], ["-service", "web", "-tag", "green"]],
)
async def test_filters_that_match_nothing(
    agent: DevAgent, client: httpx.AsyncClient, filters: list[str]
) -> None:
    r = await client.put(
        "/v1/agent/service/register", json={"ID": "web-1", "Name": "web", "Tags": ["blue"]}
    )
    assert r.status_code == 200
    run = await run_cli(agent.http_addr, "-wait", "200ms", *filters, "touch", "never")
    assert (run.code, run.out) == (0, "0 / 0 node(s) completed / acknowledged\n")
    assert agent.remote_exec.jobs_started == 0
    run = await run_cli(
        agent.http_addr, "-wait", ACK_WAIT, "-service", "web-1", "-tag", "bl", "true"
    )
    assert run.code == 0 and "1 / 1 node(s)" in run.out  # the matching case runs
    assert_clean(agent)


async def test_heartbeats_keep_a_silent_command_alive(agent: DevAgent) -> None:
    # Silent for 3 s with -wait 1s (2 s once acknowledged): heartbeats every second keep the
    # CLI waiting.
    run = await run_cli(agent.http_addr, "-wait", ACK_WAIT, "-verbose", "sleep 3; echo late")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines.count(f"==> {NODE}: heartbeat received") >= 2
    assert f"    {NODE}: late" in lines
    assert "1 / 1 node(s) completed / acknowledged" in lines
    assert_clean(agent)


async def test_big_output_streams_in_4k_chunks(agent: DevAgent) -> None:
    size = 2 * 1024 * 1024
    proc = await spawn(agent.http_addr, "-wait", ACK_WAIT, f"head -c {size} /dev/zero | tr '\\0' x")
    # While it runs, the node's keys are 4 KiB chunks (never the whole output at once).
    kv = agent.state.kv.entries
    await wait_until(lambda: sum("/out/" in k for k in kv) >= 4, DEADLINE)
    assert max(len(e.value or b"") for k, e in kv.items() if "/out/" in k) <= 4096
    run = await finish(proc)
    assert run.code == 0, run.err
    payload = [
        line[len(f"    {NODE}: ") :] for line in run.out.splitlines() if line.startswith("  ")
    ]
    assert all(set(p) <= {"x"} and len(p) <= 4096 for p in payload)
    assert sum(len(p) for p in payload) == size
    assert len(payload) >= size // 4096
    assert_clean(agent)


async def test_a_disabled_agent_runs_nothing() -> None:
    agent = DevAgent(AgentConfig(node_name="off"), http_port=0)
    async with agent:
        run = await run_cli(agent.http_addr, "-wait", "200ms", "touch", "never")
        assert (run.code, run.out) == (0, "0 / 0 node(s) completed / acknowledged\n")
        assert agent.remote_exec.jobs_started == 0
        assert_clean(agent)


async def test_acl_denial_has_consuls_message() -> None:
    config = AgentConfig(
        node_name=NODE,
        disable_remote_exec=False,
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management=MGMT,
    )
    agent = DevAgent(config, http_port=0)
    async with agent, httpx.AsyncClient(base_url=agent.url, headers={"X-Consul-Token": MGMT}) as c:
        rules = (
            'agent_prefix "" { policy = "read" } session_prefix "" { policy = "write" } '
            'event_prefix "_rexec" { policy = "write" } key_prefix "_rexec" { policy = "read" }'
        )
        r = await c.put("/v1/acl/policy", json={"Name": "exec", "Rules": rules})
        assert r.status_code == 200, r.text
        r = await c.put("/v1/acl/token", json={"SecretID": "cli", "Policies": [{"Name": "exec"}]})
        assert r.status_code == 200, r.text
        anonymous = await run_cli(agent.http_addr, "-wait", "200ms", "echo", "x")
        assert anonymous.code == 1  # no token: denied at the first call
        assert anonymous.err.startswith(
            "Error querying Consul agent: Unexpected response code: 403 (Permission denied"
        )
        env_run = await spawn(
            agent.http_addr, "-wait", "200ms", "echo", env={"CONSUL_HTTP_TOKEN": "cli"}
        )
        run = await finish(env_run)
        assert run.code == 1
        assert run.err.startswith(
            "Failed to create job file: Unexpected response code: 403 (Permission denied: "
            "token with AccessorID '"
        )
        assert "lacks permission 'key:write' on \"_rexec/" in run.err
        assert "cli" not in run.err.replace("'key:write'", "")  # the token is never shown
        assert_clean(agent)


async def test_several_nodes_interleaved_and_one_that_never_exits(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    proc = await spawn(agent.http_addr, "-wait", ACK_WAIT, "echo own")
    session = await job_session(agent)

    async def write(key: str, value: bytes = b"") -> None:
        # As Consul's agent: a KV lock operation with the CLI's session.
        r = await client.put(f"/v1/kv/_rexec/{session}/{key}?acquire={session}", content=value)
        assert r.json() is True

    await wait_until(lambda: f"_rexec/{session}/{NODE}/ack" in agent.state.kv.entries)
    await write("node-b/ack")
    await write("node-c/ack")
    await write("node-b/out/00000", b"b-first\n")
    await write("node-c/out/00000", b"c-only\n")
    await write("node-b/out/00001")  # a heartbeat
    await write("node-b/out/00002", b"b-second\n")
    await write("node-b/exit", b"0")
    await write("node-d/stray")  # not a result key
    run = await finish(proc)
    lines = run.out.splitlines()
    assert run.code == 2  # node-c acknowledged and never exited
    assert "3 / 4 node(s) completed / acknowledged" not in lines
    assert "2 / 3 node(s) completed / acknowledged" in lines
    assert f"    {NODE}: own" in lines
    assert "    node-c: c-only" in lines
    b_lines = [line for line in lines if "node-b" in line]
    assert b_lines == [
        "    node-b: b-first",
        "    node-b:",
        "    node-b: b-second",
        "    node-b:",
        "==> node-b: finished with exit code 0",
    ]
    assert "Unknown key 'node-d/stray', ignoring." in run.err
    assert_clean(agent)


async def test_bad_exit_value_is_reported_and_the_node_stays_unfinished(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    proc = await spawn(agent.http_addr, "-wait", "300ms", "-node", "^nobody$", "true")
    session = await job_session(agent)
    for key, value in (("node-x/ack", b""), ("node-x/exit", b"abc")):
        r = await client.put(f"/v1/kv/_rexec/{session}/{key}?acquire={session}", content=value)
        assert r.json() is True
    run = await finish(proc)
    assert run.code == 2
    assert (
        "Failed to parse exit code 'abc': strconv.ParseInt: parsing \"abc\": invalid syntax"
        in run.err
    )
    assert "0 / 1 node(s) completed / acknowledged" in run.out
    assert_clean(agent)


async def test_session_expired_mid_run(agent: DevAgent) -> None:
    proc = await spawn(agent.http_addr, "-wait", ACK_WAIT, "-verbose", "sleep 3; echo late")
    session = await job_session(agent)
    assert proc.stdout is not None
    seen: list[bytes] = []
    async with asyncio.timeout(DEADLINE):  # the CLI has seen the ack before it goes
        while not seen or b"acknowledged" not in seen[-1]:
            seen.append(await proc.stdout.readline())
            assert seen[-1], b"".join(seen)
    assert agent.state.sessions.invalidate(session)  # as its TTL timer would
    run = await finish(proc)
    assert run.code == 2
    assert "0 / 1 node(s) completed / acknowledged" in run.out
    assert "late" not in run.out
    assert_clean(agent)


async def test_job_key_vanishing_before_the_event(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    proc = await spawn(agent.http_addr, "-wait", "200ms", "-wait-repl", "1s", "touch", "never")
    session = await job_session(agent)
    r = await client.delete(f"/v1/kv/_rexec/{session}/job")
    assert r.json() is True
    run = await finish(proc)
    assert (run.code, run.out) == (0, "0 / 0 node(s) completed / acknowledged\n")
    assert agent.remote_exec.jobs_started == 1  # received, then gave up: no job spec
    assert_clean(agent)


async def test_sigint_cleans_up_and_exits_1(agent: DevAgent) -> None:
    proc = await spawn(agent.http_addr, "-wait", "2s", "echo started; sleep 30")
    session = await job_session(agent)
    await wait_until(lambda: f"_rexec/{session}/{NODE}/out/00000" in agent.state.kv.entries)
    proc.send_signal(signal.SIGINT)
    run = await finish(proc)
    assert run.code == 1
    assert_clean(agent)


async def test_foreign_datacenter_needs_a_server_there(agent: DevAgent) -> None:
    run = await run_cli(agent.http_addr, "-datacenter", "dc2", "-verbose", "echo")
    assert run.code == 1
    assert run.out == "Remote exec in foreign datacenter, using Session TTL\n"
    assert run.err == (
        "Failed to create session: Failed to find Consul server in remote datacenter: "
        "Unexpected response code: 500 (No path to datacenter)\n"
    )
    run = await run_cli(agent.http_addr, "-datacenter", "dc1", "-wait", ACK_WAIT, "echo", "ok")
    assert run.code == 0 and f"    {NODE}: ok" in run.out
    assert_clean(agent)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "message", "with_help"),
    [
        ([], "Must specify a command to execute", True),
        (["-tag", "x", "echo"], "Cannot provide tag filter without service filter.", False),
        (
            ["-node", "(", "echo"],
            "Failed to compile node filter regexp: error parsing regexp: ",
            False,
        ),
        (["-service", "[", "echo"], "Failed to compile service filter regexp: ", False),
        (["-service", "a", "-tag", "*", "echo"], "Failed to compile tag filter regexp: ", False),
        (["-shell=false", "-"], "Cannot configure -shell=false when reading from stdin", False),
        (["-wait", "soon", "echo"], 'invalid value "soon" for flag -wait: parse error', True),
        (["-bogus", "echo"], "flag provided but not defined: -bogus", True),
    ],
)
async def test_bad_input_has_consuls_message_and_exit_1(
    args: list[str], message: str, with_help: bool
) -> None:
    run = await run_cli(f"127.0.0.1:{_closed_port()}", *args)
    assert run.code == 1
    assert run.err.startswith(message)
    assert ("Usage: connect-proxy exec" in run.err) is with_help
    assert run.out == ""


async def test_agent_down() -> None:
    port = _closed_port()
    run = await run_cli(f"127.0.0.1:{port}", "echo")
    assert run.code == 1
    assert run.err == (
        f'Error querying Consul agent: Get "http://127.0.0.1:{port}/v1/agent/self": '
        f"dial tcp 127.0.0.1:{port}: connect: connection refused\n"
    )


async def test_help() -> None:
    run = await run_cli("127.0.0.1:1", "-h")
    assert run.code == 0
    assert run.out.startswith("Usage: connect-proxy exec [options] [-|command...]")
    for flag in ("-node", "-service", "-tag", "-prefix", "-shell", "-wait", "-wait-repl"):
        assert f"  {flag}" in run.out
    assert "HTTP API Options" in run.out and "Command Options" in run.out


def test_job_spec_is_gos_json_and_targeted_lines() -> None:
    base = ExecOptions(
        node="",
        service="",
        tag="",
        prefix="_rexec",
        shell=True,
        wait=2.0,
        wait_repl=0.2,
        verbose=False,
        command="uptime",
        args=(),
        script=b"",
        http=None,  # type: ignore[arg-type]
    )
    assert job_spec(base) == b'{"Command":"uptime","Wait":2000000000}'
    assert json.loads(job_spec(replace(base, command="", args=("ls", "-l")))) == {
        "Args": ["ls", "-l"],
        "Wait": 2000000000,
    }
    assert job_spec(replace(base, command="", script=b"echo\n")) == (
        b'{"Script":"ZWNobwo=","Wait":2000000000}'
    )
    assert targeted("n1", "a\nb\n", arrow=False) == "    n1: a\n    n1: b\n    n1:"
    assert targeted("n1", "done", arrow=True) == "==> n1: done"


async def test_session_is_renewed_while_the_job_runs(
    agent: DevAgent, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the 5 s interval is lowered here), over real HTTP to the dev agent.
    from proxy.rexec import command

    monkeypatch.setattr(command, "RENEW_INTERVAL", 0.1)
    renewals: list[str] = []
    agent.state.sessions.listeners.append(lambda sid, ttl: renewals.append(sid) if ttl else None)
    options = command.parse_exec_args(
        ["-http-addr", agent.http_addr, "-wait", ACK_WAIT, "-wait-repl", "0s", "sleep 0.6"],
        {},
        lambda: b"",
    )
    assert await command.run_exec(options) == 0
    assert len(renewals) >= 3  # the create, then renewals every 0.1 s while it ran
    assert len(set(renewals)) == 1
    assert "1 / 1 node(s) completed / acknowledged" in capsys.readouterr().out
    assert_clean(agent)
