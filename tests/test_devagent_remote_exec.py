"""The dev agent's side of remote exec: `_rexec` events -> ack, output chunks, heartbeats and
the exit code in KV, driven over the HTTP API exactly as `consul exec` drives an agent."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from proxy.devagent import AgentConfig, DevAgent
from proxy.devagent.config import load_files
from proxy.devagent.remote_exec import OUTPUT_SIZE, decode_job
from tests.conftest import wait_until

pytestmark = pytest.mark.one_loop  # the dev agent, or a child process: one loop is enough

MGMT = "root-token"


@pytest.fixture
def agent_config() -> AgentConfig:
    return AgentConfig(node_name="rexec-node", disable_remote_exec=False)


async def start_job(
    client: httpx.AsyncClient,
    job: dict[str, Any],
    *,
    prefix: str = "_rexec",
    params: dict[str, str] | None = None,
    token: str = "",
) -> str:
    """What `exec` does before it waits: a session, the job acquired, the event fired."""
    headers = {"X-Consul-Token": token} if token else {}
    r = await client.put(
        "/v1/session/create",
        json={"Name": "Remote Exec", "Behavior": "delete", "TTL": "15s"},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    session = r.json()["ID"]
    r = await client.put(
        f"/v1/kv/{prefix}/{session}/job",
        params={"acquire": session},
        content=json.dumps(job),
        headers=headers,
    )
    assert r.json() is True
    r = await client.put(
        "/v1/event/fire/_rexec",
        params=params or {},
        content=json.dumps({"Prefix": prefix, "Session": session}),
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    return session


async def results(agent: DevAgent, base: str, timeout: float = 5.0) -> dict[str, bytes]:
    """The node's keys under `base` once its exit key is written (key suffix -> value)."""
    kv = agent.state.kv.entries
    await wait_until(lambda: f"{base}/exit" in kv, timeout)
    return {k[len(base) + 1 :]: v.value or b"" for k, v in kv.items() if k.startswith(base + "/")}


def outputs(found: dict[str, bytes]) -> list[bytes]:
    return [v for k, v in sorted(found.items()) if k.startswith("out/")]


async def test_command_runs_through_the_shell_and_writes_ack_output_exit(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    session = await start_job(client, {"Command": "echo hello; echo oops >&2", "Wait": 10**9})
    found = await results(agent, f"_rexec/{session}/rexec-node")
    assert found["ack"] == b""
    assert found["exit"] == b"0"
    assert b"".join(outputs(found)) == b"hello\noops\n"
    assert re.fullmatch(r"out/0000[0-9a-f]", min(k for k in found if k.startswith("out/")))
    # Every key is locked by the client's session, so destroying it deletes them all.
    for key in found:
        entry = agent.state.kv.entries[f"_rexec/{session}/rexec-node/{key}"]
        assert entry.session == session
    r = await client.put(f"/v1/session/destroy/{session}")
    assert r.json() is True
    assert not [k for k in agent.state.kv.entries if k.startswith(f"_rexec/{session}")]


async def test_exit_code_args_without_shell_and_signal(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    s1 = await start_job(client, {"Command": "exit 3", "Wait": 10**9})
    # Args run without a shell: the `;` and `$HOME` reach echo as they are.
    s2 = await start_job(client, {"Args": ["echo", "a;", "$HOME"], "Wait": 10**9})
    s3 = await start_job(client, {"Command": "kill -9 $$", "Wait": 10**9})
    s4 = await start_job(client, {"Args": ["/nonexistent/program"], "Wait": 10**9})
    assert (await results(agent, f"_rexec/{s1}/rexec-node"))["exit"] == b"3"
    found = await results(agent, f"_rexec/{s2}/rexec-node")
    assert (found["exit"], b"".join(outputs(found))) == (b"0", b"a; $HOME\n")
    assert (await results(agent, f"_rexec/{s3}/rexec-node"))["exit"] == b"-1"
    found = await results(agent, f"_rexec/{s4}/rexec-node")
    assert (found["exit"], outputs(found)) == (b"255", [])


async def test_script_runs_from_a_private_file_removed_afterwards(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    script = b'echo "$0"; stat -c %a "$0"; stat -c %a "$(dirname "$0")"\n'
    job = {"Script": base64.b64encode(script).decode(), "Wait": 10**9}
    session = await start_job(client, job)
    found = await results(agent, f"_rexec/{session}/rexec-node")
    path, mode, dir_mode = b"".join(outputs(found)).decode().split()
    assert found["exit"] == b"0"
    assert (mode, dir_mode) == ("750", "700")
    assert os.path.basename(os.path.dirname(path)).startswith("rexec")
    assert not os.path.exists(os.path.dirname(path))


async def test_output_is_chunked_at_4k_and_heartbeats_fill_silence(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    # 10,000 bytes at once, then silence past Wait (heartbeats), then a last line.
    command = "head -c 10000 /dev/zero | tr '\\0' x; sleep 0.7; echo end"
    session = await start_job(client, {"Command": command, "Wait": 150 * 10**6})
    found = await results(agent, f"_rexec/{session}/rexec-node")
    chunks = outputs(found)
    data = [c for c in chunks if c]
    assert all(len(c) <= OUTPUT_SIZE for c in chunks)
    assert b"".join(data) == b"x" * 10000 + b"end\n"
    assert [len(c) for c in data[:2]] == [OUTPUT_SIZE, OUTPUT_SIZE]
    assert b"" in chunks  # at least one heartbeat during the sleep
    # Numbering counts heartbeats too: one key per write, 5 hex digits, no gaps.
    keys = sorted(k for k in found if k.startswith("out/"))
    assert keys == [f"out/{n:05x}" for n in range(len(keys))]


async def test_filters_select_the_agent_by_node_service_and_tag(
    agent: DevAgent, client: httpx.AsyncClient
) -> None:
    r = await client.put(
        "/v1/agent/service/register", json={"ID": "web-1", "Name": "web", "Tags": ["blue"]}
    )
    assert r.status_code == 200
    miss = [
        {"node": "^other$"},
        {"service": "^db"},
        {"service": "web", "tag": "green"},
        {"node": "["},  # a bad regex: Consul's agent drops the event (the fire refuses it)
    ]
    hit = await start_job(client, {"Command": "true", "Wait": 10**9}, params={"service": "web-1"})
    sessions = []
    for params in miss:
        try:
            sessions.append(await start_job(client, {"Command": "true"}, params=params))
        except AssertionError:
            assert params == {"node": "["}
    await results(agent, f"_rexec/{hit}/rexec-node")
    assert agent.remote_exec.jobs_started == 1
    for session in sessions:
        assert f"_rexec/{session}/rexec-node/ack" not in agent.state.kv.entries


async def test_events_are_not_listed_and_a_disabled_agent_runs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = DevAgent(AgentConfig(node_name="off"), http_port=0)
    async with agent, httpx.AsyncClient(base_url=agent.url) as client:
        with caplog.at_level(logging.INFO, logger="devagent.remote_exec"):
            session = await start_job(client, {"Command": "touch /nonexistent-dir/x"})
            await wait_until(lambda: "disabled" in caplog.text)
        r = await client.get("/v1/event/list")
        assert r.json() == []
    lines = [r.getMessage() for r in caplog.records if r.name == "devagent.remote_exec"]
    assert lines == ["ignoring remote exec event, disabled."]
    assert agent.remote_exec.jobs_started == 0
    assert f"_rexec/{session}/off/ack" not in agent.state.kv.entries


async def test_config_key_in_json_and_hcl(tmp_path: Any) -> None:
    (tmp_path / "a.json").write_text('{"disable_remote_exec": false}')
    (tmp_path / "b.hcl").write_text("disable_remote_exec = true\n")
    assert AgentConfig().disable_remote_exec is True
    assert load_files([tmp_path / "a.json"]).disable_remote_exec is False
    assert load_files([tmp_path / "a.json", tmp_path / "b.hcl"]).disable_remote_exec is True
    (tmp_path / "c.json").write_text('{"disable_remote_exec": "no"}')
    with pytest.raises(Exception, match="disable_remote_exec must be a bool"):
        load_files([tmp_path / "c.json"])


@pytest.fixture
async def acl_agent() -> AsyncIterator[tuple[DevAgent, httpx.AsyncClient]]:
    config = AgentConfig(
        node_name="acl-node",
        disable_remote_exec=False,
        acl_enabled=True,
        acl_default_policy="deny",
        acl_initial_management=MGMT,
        acl_agent_token="agent-secret",
    )
    agent = DevAgent(config, http_port=0)
    async with agent, httpx.AsyncClient(base_url=agent.url, headers={"X-Consul-Token": MGMT}) as c:
        yield agent, c


async def make_token(client: httpx.AsyncClient, secret: str, rules: str) -> None:
    r = await client.put("/v1/acl/policy", json={"Name": secret, "Rules": rules})
    assert r.status_code == 200, r.text
    r = await client.put("/v1/acl/token", json={"SecretID": secret, "Policies": [{"Name": secret}]})
    assert r.status_code == 200, r.text


async def test_agent_token_needs_key_write_on_the_prefix(
    acl_agent: tuple[DevAgent, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    agent, client = acl_agent
    await make_token(client, "agent-secret", 'key_prefix "_rexec" { policy = "read" }')
    with caplog.at_level(logging.ERROR, logger="devagent.remote_exec"):
        session = await start_job(client, {"Command": "echo no", "Wait": 10**9})
        await wait_until(lambda: "failed to ack remote exec job" in caplog.text)
    assert "lacks permission 'key:write'" in caplog.text
    assert not [k for k in agent.state.kv.entries if "/acl-node/" in k]
    # The dev agent has no policy update endpoint: a second token with write becomes the
    # agent's token.
    await make_token(client, "agent-write", 'key_prefix "_rexec" { policy = "write" }')
    agent.remote_exec._token = "agent-write"
    session = await start_job(client, {"Command": "echo yes", "Wait": 10**9})
    found = await results(agent, f"_rexec/{session}/acl-node")
    assert b"".join(outputs(found)) == b"yes\n"


async def test_writes_stop_when_the_session_goes_and_exit_is_lost(
    agent: DevAgent, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The process keeps printing after the session is destroyed: the next write fails,
    # streaming stops with 255, which cannot be written either; the process is reaped.
    command = "echo first; while :; do echo more; sleep 0.05; done"
    with caplog.at_level(logging.ERROR, logger="devagent.remote_exec"):
        session = await start_job(client, {"Command": command, "Wait": 10**9})
        base = f"_rexec/{session}/rexec-node"
        await wait_until(lambda: f"{base}/out/00000" in agent.state.kv.entries)
        r = await client.put(f"/v1/session/destroy/{session}")
        assert r.json() is True
        await wait_until(lambda: "failed to write exit code" in caplog.text)
    assert "failed to write output for remote exec job" in caplog.text
    assert not [k for k in agent.state.kv.entries if k.startswith(f"_rexec/{session}")]
    # The looping process still runs (as in Consul); closing the agent kills and reaps it.
    assert agent.remote_exec._outputs


def _pipes() -> set[str]:
    """The pipes and Unix socket pairs this process holds open (asyncio makes a child's
    stdout a pipe, uvloop a socket pair): `pipe:[inode]`, `socket:[inode]`."""
    with open("/proc/net/unix") as f:
        unix = {f"socket:[{line.split()[6]}]" for line in list(f)[1:]}
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if target.startswith("pipe:") or target in unix:
            found.add(target)
    return found


async def test_close_shuts_the_pipe_of_a_process_that_left_the_group(
    agent: DevAgent, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The job's shell exits at once; a child that made its own session holds the output pipe,
    # out of reach of the group kill. close() must still end with the pipe closed: a pipe
    # transport left open makes the loop's own close fail (EBUSY on uvloop) in teardown.
    before = _pipes()
    child = "import os, time; os.setsid(); print(os.getpid(), flush=True); time.sleep(60)"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(child)} &"
    session = await start_job(client, {"Command": command, "Wait": 10**9})
    base = f"_rexec/{session}/rexec-node"
    await wait_until(lambda: f"{base}/out/00000" in agent.state.kv.entries)
    pid = int(agent.state.kv.entries[f"{base}/out/00000"].value or b"")
    try:
        assert _pipes() - before  # the job's output pipe, open while the child lives
        with caplog.at_level(logging.WARNING, logger="devagent.remote_exec"):
            await agent.remote_exec.close(grace=0.2)
        assert "holds its output pipe; closing the pipe" in caplog.text
        await wait_until(lambda: not _pipes() - before)
    finally:
        os.kill(pid, signal.SIGKILL)  # started by this test (through the job)


def test_job_spec_decoding_refuses_wrong_types() -> None:
    assert decode_job(b'{"Command":"uptime","Wait":2000000000}').wait == 2.0
    assert decode_job(b'{"command":"x"}').command == "x"  # Go's case-insensitive fields
    for bad in (b"[]", b'{"Args":"ls"}', b'{"Script":"***"}', b'{"Wait":"2s"}', b"{"):
        with pytest.raises(ValueError):
            decode_job(bad)
