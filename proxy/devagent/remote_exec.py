"""The agent side of remote execution (`consul exec`): `_rexec` events -> a command run here.

An `exec` client uploads a job to `<prefix>/<session>/job` (locked by its session) and fires
the user event `_rexec` with the payload `{"Prefix": ..., "Session": ...}`. The events table
delivers the event here only when its node/service/tag filters select this agent. Then, as
Consul's agent does (`agent/remote_exec.go`):

1. unless `disable_remote_exec` is false (Consul's default is true), log "ignoring remote exec
   event, disabled." and do nothing more;
2. read the job (a stale read, then once more as a consistent one; still missing: give up
   without a trace); decode its `Command`, `Args`, `Script` (base64) and `Wait` (ns);
3. write `<prefix>/<session>/<node>/ack`; from here `.../exit` is always written at the end;
4. run it: a `Script` is written to a file (mode 0750, in a private temporary directory,
   removed afterwards) run through the shell; else `Args` as argv without a shell; else
   `Command` through the shell (`$SHELL`, or `/bin/sh`, with `-c`);
5. stream stdout and stderr, through one 4 KiB buffer emitted when full or 500 ms after the
   last read, to `.../out/00000`, `.../out/00001`, ...; when no chunk comes within the job's
   `Wait`, an empty `out` key (a heartbeat) takes the next number;
6. write the exit code: the process's, -1 when a signal ended it, 255 when it could not be
   started or a write failed (streaming then stops; the process runs on, its output
   drained and dropped).

Every key is written with the client's session as the lock (`?acquire=`), so destroying the
session (Behavior `delete`) deletes them and makes later writes fail. Writes and reads go
through the same KV table as HTTP requests, with the agent's own token (`acl.tokens.agent`,
else `acl.tokens.default`), so they need `key:write` on the prefix as in Consul.

Rule 1: memory is bounded: at most `QUEUE_CHUNKS` chunks of 4 KiB wait per job (the pipe
then fills and the process waits), and at most `MAX_JOBS` jobs run at once (further events
are logged and dropped).
Rule 2: `close()` ends every job: process groups are killed and reaped, temp files removed,
and each process's pipe is read to its end (or closed after a grace period, when a process
that left the group holds it), so that no pipe transport outlives the loop: a reaped
process's pipe can still be open, its EOF may come a loop iteration later.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import posixpath
import shutil
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.devagent.acl import ACLNotFound, PermissionDenied
from proxy.devagent.state import State, StateError
from proxy.devagent.state.events import REMOTE_EXEC, UserEvent

log = logging.getLogger("devagent.remote_exec")

OUTPUT_SIZE = 4 * 1024  # Consul's remoteExecOutputSize
OUTPUT_IDLE = 0.5  # Consul's remoteExecOutputDeadline
QUEUE_CHUNKS = 16  # chunks waiting for their KV write (Consul's channel of 16)
MAX_JOBS = 64
# A job's `Wait` below this is raised to it: Consul would write heartbeats in a busy loop.
MIN_HEARTBEAT = 0.05
EXIT_START_FAILED = 255


class WriteFailed(Exception):
    """A KV write of the job's results was refused (ACL, no session, lock lost)."""


@dataclass(frozen=True, slots=True)
class Job:
    """A decoded job spec (Consul's `remoteExecSpec`)."""

    command: str
    args: tuple[str, ...]
    script: bytes
    wait: float


def _field(data: Mapping[str, Any], name: str) -> Any:
    # Go's decoder matches field names case-insensitively.
    for key, value in data.items():
        if key.lower() == name.lower():
            return value
    return None


def decode_event(payload: bytes | None) -> tuple[str, str]:
    """The event payload's `(Prefix, Session)`.

    Raises:
        ValueError: not a JSON object with string fields.
    """
    data = json.loads(payload or b"null")
    if not isinstance(data, dict):
        raise ValueError("payload is not a JSON object")
    prefix, session = _field(data, "Prefix"), _field(data, "Session")
    if not isinstance(prefix, str | None) or not isinstance(session, str | None):
        raise ValueError("Prefix and Session must be strings")
    return prefix or "", session or ""


def decode_job(raw: bytes | None) -> Job:
    """A job spec from its JSON.

    Raises:
        ValueError: not JSON, or a field of the wrong type.
    """
    data = json.loads(raw or b"null")
    if not isinstance(data, dict):
        raise ValueError("job spec is not a JSON object")
    command = _field(data, "Command") or ""
    args = _field(data, "Args") or []
    script = _field(data, "Script") or ""
    wait = _field(data, "Wait") or 0
    if not isinstance(command, str):
        raise ValueError("Command must be a string")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("Args must be a list of strings")
    if not isinstance(script, str):
        raise ValueError("Script must be a base64 string")
    if not isinstance(wait, int) or isinstance(wait, bool):
        raise ValueError("Wait must be an integer of nanoseconds")
    try:
        script_bytes = base64.b64decode(script, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"Script: {exc}") from exc
    return Job(command=command, args=tuple(args), script=script_bytes, wait=wait / 1e9)


def _join(*parts: str) -> str:
    """Go's `path.Join`: empty parts skipped, the result cleaned."""
    kept = [p for p in parts if p]
    return posixpath.normpath(posixpath.join(*kept)) if kept else ""


def exit_code_of(returncode: int) -> int:
    """Consul's `WaitStatus.ExitStatus()`: -1 when a signal ended the process."""
    return returncode if returncode >= 0 else -1


class RemoteExec:
    """Receives this agent's `_rexec` events and runs their jobs (see the module docstring)."""

    def __init__(self, state: State, *, enabled: bool, token: str) -> None:
        self._state = state
        self.enabled = enabled
        self._token = token
        self._listener: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._outputs: set[_Output] = set()
        self.jobs_started = 0

    def start(self) -> None:
        """Subscribe to `_rexec` events now (the events fired before are not seen)."""
        subscription = self._state.events.subscribe(REMOTE_EXEC)
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(subscription), name="remote exec events"
        )

    async def close(self, grace: float = 5.0) -> None:
        """Stop listening, kill the running jobs' process groups, wait for the jobs, and for
        each process until its pipe has closed and it is reaped (at most `grace` seconds)."""
        outputs = list(self._outputs)
        for output in outputs:
            output.drop()  # no pump waits on a queue that nobody reads any more
            _kill_group(output.proc)
        tasks = [t for t in (self._listener, *self._jobs) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for output in outputs:
            await output.finish(timeout=grace)
            self._outputs.discard(output)

    async def _listen(self, subscription: Any) -> None:
        with subscription:
            async for event in subscription:
                self._received(event)

    def _received(self, event: UserEvent) -> None:
        fields = {"event_name": event.name, "event_id": event.id}
        if not self.enabled:
            log.info("ignoring remote exec event, disabled.", extra={"fields": fields})
            return
        if len(self._jobs) >= MAX_JOBS:
            log.warning(
                "ignoring remote exec event: %d jobs are running",
                MAX_JOBS,
                extra={"fields": fields},
            )
            return
        log.debug("received remote exec event", extra={"fields": {"id": event.id}})
        task = asyncio.get_running_loop().create_task(self.handle(event), name="remote exec")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        self.jobs_started += 1

    # -- one job -------------------------------------------------------------------------

    async def handle(self, event: UserEvent) -> None:
        """Run the job `event` names, writing ack, output and exit code."""
        try:
            prefix, session = decode_event(event.payload)
        except ValueError as exc:
            log.error("failed to decode remote exec event: %s", exc)
            return
        job = self._read_job(prefix, session)
        if job is None:
            return
        base = _join(prefix, session, self._state.node.name)
        try:
            self._write(_join(base, "ack"), None, session)
        except WriteFailed as exc:
            log.error("failed to ack remote exec job: %s", exc)
            return
        code = EXIT_START_FAILED
        try:
            code = await self._run(job, base, session)
        finally:
            try:
                self._write(_join(base, "exit"), str(code).encode(), session)
            except WriteFailed as exc:
                log.error("failed to write exit code for remote exec job: %s", exc)

    def _read_job(self, prefix: str, session: str) -> Job | None:
        key = _join(prefix, session, "job")
        try:
            authz = self._state.acl.resolve(self._token)
            # Consul reads stale first, then once consistent; here both read the one store.
            entry = self._state.kv.get(key, authz) or self._state.kv.get(key, authz)
        except (ACLNotFound, PermissionDenied, StateError) as exc:
            log.error("failed to get remote exec job: %s", exc)
            return None
        if entry is None:
            log.debug("remote exec aborted, job spec missing")
            return None
        try:
            return decode_job(entry.value)
        except ValueError as exc:
            log.error("failed to decode remote exec spec: %s", exc)
            return None

    def _write(self, key: str, value: bytes | None, session: str) -> None:
        try:
            authz = self._state.acl.resolve(self._token)
            done = self._state.kv.put(key, value, authz, acquire=session)
        except (ACLNotFound, PermissionDenied, StateError) as exc:
            raise WriteFailed(str(exc)) from exc
        if not done:
            raise WriteFailed("write failed")

    async def _run(self, job: Job, base: str, session: str) -> int:
        """Start the job's process and stream its output; returns the exit code to write."""
        tmpdir = ""
        try:
            if job.script:
                try:
                    tmpdir = tempfile.mkdtemp(prefix="rexec")  # mode 0700: ours alone
                    script = os.path.join(tmpdir, "rexec")
                    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o750)
                    with os.fdopen(fd, "wb") as f:
                        f.write(job.script)
                    os.chmod(script, 0o750)  # whatever the umask
                except OSError as exc:
                    log.debug("failed to make tmp file: %s", exc)
                    return EXIT_START_FAILED
                argv = [_shell(), "-c", script]
            elif job.args:
                argv = list(job.args)
            else:
                argv = [_shell(), "-c", job.command]
            log.info("remote exec %r", argv[-1] if not job.args else list(job.args))
            try:
                output = await _Output.spawn(argv)
            except (OSError, ValueError) as exc:
                log.debug("failed to start remote exec: %s", exc)
                return EXIT_START_FAILED
            return await self._stream(output, job, base, session)
        finally:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)

    async def _stream(self, output: _Output, job: Job, base: str, session: str) -> int:
        self._outputs.add(output)
        heartbeat = max(job.wait, MIN_HEARTBEAT)
        try:
            num = 0
            while True:  # bounded by the process's output: ends at the sentinel
                try:
                    async with asyncio.timeout(heartbeat):
                        chunk = await output.queue.get()
                except TimeoutError:
                    chunk = b""  # a heartbeat: nothing came within the job's Wait
                if chunk is None:
                    break
                try:
                    self._write(_join(base, "out", f"{num:05x}"), chunk, session)
                except WriteFailed as exc:
                    log.error("failed to write output for remote exec job: %s", exc)
                    output.drop()
                    self._reap_later(output)
                    return EXIT_START_FAILED
                num += 1
            # Shielded: a cancelled job must not cancel the pump, which ends at the pipe's EOF
            # (close() kills the group and waits for that).
            await asyncio.shield(output.pump)
            code = exit_code_of(await output.proc.wait())
            self._outputs.discard(output)
            return code
        except asyncio.CancelledError:
            output.drop()
            _kill_group(output.proc)
            raise

    def _reap_later(self, output: _Output) -> None:
        """Let a job whose results can no longer be written run on, its output dropped."""

        async def reap() -> None:
            await asyncio.shield(output.pump)
            await output.proc.wait()
            self._outputs.discard(output)

        task = asyncio.get_running_loop().create_task(reap(), name="remote exec reaper")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)


def _shell() -> str:
    return os.environ.get("SHELL") or "/bin/sh"


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class _Output:
    """A job process's output: a pump task reads the pipe into chunks of at most
    `OUTPUT_SIZE` bytes, queued when full or `OUTPUT_IDLE` after the last read; `None` marks
    the end. Once dropped, chunks are read and thrown away (the process must not block on a
    full pipe)."""

    def __init__(
        self, proc: asyncio.subprocess.Process, transport: asyncio.SubprocessTransport
    ) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self._transport = transport
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._dropping = False
        self.pump = asyncio.get_running_loop().create_task(self._pump(proc.stdout))

    @classmethod
    async def spawn(cls, argv: list[str]) -> _Output:
        """Start `argv` in a new session (its own process group), stderr joined to stdout.

        What `asyncio.create_subprocess_exec` does, keeping the transport: it is the only
        way to close a pipe that a process which left the group still holds.
        """
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.subprocess_exec(
            lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=2**16, loop=loop),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        return cls(asyncio.subprocess.Process(transport, protocol, loop), transport)

    def drop(self) -> None:
        """Throw away the output from now on; a pump blocked on the full queue goes on."""
        self._dropping = True
        while not self.queue.empty():
            self.queue.get_nowait()

    async def finish(self, *, timeout: float) -> None:
        """Wait until the pipe has closed (the pump saw its EOF) and the process is reaped;
        after `timeout`, give up on the pump (a process that left the group holds the pipe)."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.pump)
                await self.proc.wait()
        except TimeoutError:
            log.warning(
                "remote exec: a process left the group of job process %d and holds its "
                "output pipe; closing the pipe",
                self.proc.pid,
            )
            self.pump.cancel()
            self._transport.close()
            await asyncio.wait({self.pump})

    async def _emit(self, chunk: bytes | None) -> None:
        if not self._dropping:
            await self.queue.put(chunk)

    async def _pump(self, stdout: asyncio.StreamReader) -> None:
        buf = bytearray()
        read: asyncio.Future[bytes] | None = None
        try:
            while True:  # bounded by the process's output: ends at EOF
                if read is None:
                    read = asyncio.ensure_future(stdout.read(OUTPUT_SIZE - len(buf)))
                done, _ = await asyncio.wait({read}, timeout=OUTPUT_IDLE if buf else None)
                if not done:
                    await self._emit(bytes(buf))
                    buf.clear()
                    continue
                data, read = read.result(), None
                if not data:
                    break
                buf += data
                if len(buf) >= OUTPUT_SIZE:
                    await self._emit(bytes(buf))
                    buf.clear()
            if buf:
                await self._emit(bytes(buf))
            await self._emit(None)
        finally:
            if read is not None:
                read.cancel()
