"""`connect-proxy exec`: Consul's `consul exec`, remote execution over KV and a user event.

The flow is Consul's (`command/exec/exec.go`), request for request, so it works against any
Consul agent as well as the dev agent:

1. `GET /v1/agent/self` (with `-datacenter` naming another DC, the job runs there);
2. a session: locally `PUT /v1/session/create` {Name "Remote Exec", Behavior "delete",
   TTL "15s"}; in a foreign DC bound to the first passing `consul` server there, without
   checks; renewed every 5 s until the end;
3. the job spec `{"Command"|"Args"|"Script", "Wait"}` written to `<prefix>/<session>/job`
   with `?acquire=<session>`;
4. a pause of `-wait-repl` (so agents may read it stale), then `PUT /v1/event/fire/_rexec`
   with the filters and `{"Prefix", "Session"}`;
5. a blocking `?keys` loop over `<prefix>/<session>/`: each new `ack`, `out/NNNNN` (empty:
   a heartbeat) and `exit` key is read and shown as it arrives; the job is over when no key
   came for `-wait` (twice that while some node acked and has not exited);
6. clean-up: the session destroyed (so no agent can write more), the prefix deleted, the
   session destroyed again.

Exit codes: 0, 2 when a node exited non-zero or acked without an exit, 1 on any error or on
SIGINT/SIGTERM (after the clean-up).

Rule 1: output is printed per chunk as it arrives; neither the results nor the keys' values
are accumulated (only the names of the keys seen, as Consul's `seen` set).
Rule 2: the token comes from the HTTP flags or `CONSUL_*` variables, travels in a header
and is never printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import posixpath
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from proxy import console
from proxy.errors import ConfigError
from proxy.goflags import Flag, FlagError, FlagSet, HelpRequested, parse_duration
from proxy.httpflags import HTTPOptions, add_http_flags, load_http_options
from proxy.rexec.client import ExecAPIError, ExecClient

EVENT_NAME = "_rexec"
DEFAULT_PREFIX = "_rexec"
JOB_KEY = "job"
SESSION_TTL = "15s"
RENEW_INTERVAL = 5.0
QUEUE_SIZE = 128

EXEC_HELP = """\
Usage: connect-proxy exec [options] [-|command...]

  Runs a command on the Consul nodes that match the filters (node name,
  service ID, service tag; regular expressions), through the KV store and a
  user event, as `consul exec` does. With '-' as the command, a script is
  read from stdin until EOF and run instead. Agents run nothing unless their
  configuration says `disable_remote_exec = false`.

      $ connect-proxy exec -node 'web-.*' uptime
      $ connect-proxy exec -service db -shell=false /usr/bin/df -h
"""


@dataclass(frozen=True, slots=True)
class ExecOptions:
    node: str
    service: str
    tag: str
    prefix: str
    shell: bool
    wait: float
    wait_repl: float
    verbose: bool
    command: str
    args: tuple[str, ...]
    script: bytes
    http: HTTPOptions = field(repr=False)


def _duration_flag(fs: FlagSet, name: str, default: str, usage: str) -> None:
    def check(value: str) -> None:
        try:
            parse_duration(value)
        except ValueError:
            raise ValueError("parse error") from None

    fs.flags[name] = Flag(name, usage, default, on_value=check)


def _command_flags() -> FlagSet:
    fs = FlagSet()
    fs.string("node", "", "Regular expression to filter on node names.")
    fs.string("service", "", "Regular expression to filter on service instances (their IDs).")
    fs.string("tag", "", "Regular expression to filter on service tags; needs -service.")
    fs.string("prefix", DEFAULT_PREFIX, "Prefix in the KV store for the job's data.")
    fs.boolean("shell", True, "Run the command through a shell.")
    _duration_flag(fs, "wait", "2s", "Quiet period after which the job is taken as done.")
    _duration_flag(
        fs, "wait-repl", "200ms", "Pause between uploading the job and firing the event."
    )
    fs.boolean("verbose", False, "Verbose output.")
    return fs


def _flag_set() -> FlagSet:
    fs = _command_flags()
    add_http_flags(fs)
    return fs


def help_text() -> str:
    http = FlagSet()
    add_http_flags(http)
    return f"{EXEC_HELP}\nHTTP API Options\n\n{http.usage()}\n\nCommand Options\n\n" + (
        _command_flags().usage()
    )


class UsageError(Exception):
    """A command line Consul refuses after parsing; `show_help` adds the help text."""

    def __init__(self, message: str, *, show_help: bool = False) -> None:
        super().__init__(message)
        self.show_help = show_help


def parse_exec_args(
    args: Sequence[str], env: Mapping[str, str], stdin: Callable[[], bytes]
) -> ExecOptions:
    """The options of one run, in Consul's order of checks.

    Raises:
        FlagError, HelpRequested: from the flags.
        UsageError: no command, `-shell=false` with stdin, a bad filter.
        ConfigError: the HTTP flags (as Consul's "Error connecting to Consul agent").
    """
    values, rest = _flag_set().parse(args)

    def text(name: str, default: str = "") -> str:
        value = values.get(name, default)
        return value if isinstance(value, str) else default

    shell = values.get("shell", True) is not False
    command = " ".join(rest)
    arguments: tuple[str, ...] = ()
    script = b""
    if command == "-":
        if not shell:
            raise UsageError("Cannot configure -shell=false when reading from stdin")
        command = ""
        try:
            script = stdin()
        except OSError as exc:
            raise UsageError(f"Failed to read stdin: {exc}", show_help=True) from exc
    elif not shell:
        command, arguments = "", tuple(rest)
    if not command and not script and not arguments:
        raise UsageError("Must specify a command to execute", show_help=True)
    node, service, tag = text("node"), text("service"), text("tag")
    for kind, pattern in (("node", node), ("service", service), ("tag", tag)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(
                    f"Failed to compile {kind} filter regexp: error parsing regexp: {exc}"
                ) from None
    if tag and not service:
        raise UsageError("Cannot provide tag filter without service filter.")
    return ExecOptions(
        node=node,
        service=service,
        tag=tag,
        prefix=text("prefix", DEFAULT_PREFIX),
        shell=shell,
        wait=parse_duration(text("wait", "2s")),
        wait_repl=parse_duration(text("wait-repl", "200ms")),
        verbose=values.get("verbose") is True,
        command=command,
        args=arguments,
        script=script,
        http=load_http_options(values, env),
    )


def job_spec(options: ExecOptions) -> bytes:
    """The job's JSON, fields in Go's order, empty ones left out but `Wait` (ns)."""
    spec: dict[str, Any] = {}
    if options.command:
        spec["Command"] = options.command
    if options.args:
        spec["Args"] = list(options.args)
    if options.script:
        spec["Script"] = base64.b64encode(options.script).decode()
    spec["Wait"] = round(options.wait * 1e9)
    return json.dumps(spec, separators=(",", ":")).encode()


def targeted(target: str, message: str, *, arrow: bool) -> str:
    """Consul's `TargetedUI`: every line `==> node: ...` (info) or `    node: ...` (output),
    trailing whitespace of the whole message trimmed."""
    head = "==>" if arrow else "   "
    return "\n".join(f"{head} {target}: {line}" for line in message.split("\n")).rstrip()


def _go_int32(text: str) -> int:
    """strconv.ParseInt(text, 10, 32)."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f'strconv.ParseInt: parsing "{text}": invalid syntax')
    value = int(text)
    if not -(1 << 31) <= value < (1 << 31):
        raise ValueError(f'strconv.ParseInt: parsing "{text}": value out of range')
    return value


# What the results loop hands the wait loop: (kind, node, payload).
Result = tuple[str, str, Any]


class ExecRun:
    """One run of the command against one agent (see the module docstring)."""

    def __init__(self, options: ExecOptions, client: ExecClient, stop: asyncio.Event) -> None:
        self.options = options
        self.client = client
        self.stop = stop
        self.session = ""
        self._renewer: asyncio.Task[None] | None = None
        self.foreign = False
        self.local_dc = ""
        self.local_node = ""

    def info(self, message: str) -> None:
        console.say(message)

    def error(self, message: str) -> None:
        console.say(message, error=True)

    async def run(self) -> int:
        opts = self.options
        try:
            info = await self.client.agent_self()
        except ExecAPIError as exc:
            self.error(f"Error querying Consul agent: {exc}")
            return 1
        config = info.get("Config") if isinstance(info.get("Config"), dict) else {}
        assert isinstance(config, dict)
        local_dc = str(config.get("Datacenter", ""))
        if opts.http.datacenter and opts.http.datacenter != local_dc:
            if opts.verbose:
                self.info("Remote exec in foreign datacenter, using Session TTL")
            self.foreign = True
            self.local_dc, self.local_node = local_dc, str(config.get("NodeName", ""))
        spec = job_spec(opts)
        async with contextlib.AsyncExitStack() as cleanup:
            try:
                self.session = await self._create_session()
            except ExecAPIError as exc:
                self.error(f"Failed to create session: {exc}")
                return 1
            cleanup.push_async_callback(self.destroy_session)
            if opts.verbose:
                self.info(f"Created remote execution session: {self.session}")
            job_key = posixpath.join(self._dir(), JOB_KEY)
            try:
                if not await self.client.kv_acquire(job_key, spec, self.session):
                    raise ExecAPIError(f"failed to acquire key {job_key}")
            except ExecAPIError as exc:
                self.error(f"Failed to create job file: {exc}")
                return 1
            cleanup.push_async_callback(self.destroy_data)
            if opts.verbose:
                self.info("Uploaded remote execution spec")
            if await self._stopped_within(opts.wait_repl):
                return 1
            try:
                event_id = await self.client.event_fire(
                    EVENT_NAME,
                    json.dumps(
                        {"Prefix": opts.prefix, "Session": self.session}, separators=(",", ":")
                    ).encode(),
                    node=opts.node,
                    service=opts.service,
                    tag=opts.tag,
                )
            except ExecAPIError as exc:
                self.error(f"Failed to fire event: {exc}")
                return 1
            if opts.verbose:
                self.info(f"Fired remote execution event: {event_id}")
            return await self.wait_for_job()

    def _dir(self) -> str:
        # Go's path.Join: cleaned, empty parts dropped.
        kept = [p for p in (self.options.prefix, self.session) if p]
        return posixpath.normpath(posixpath.join(*kept))

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self.stop.wait()
        return self.stop.is_set()

    # -- the session ---------------------------------------------------------------------

    async def _create_session(self) -> str:
        body: dict[str, Any]
        if self.foreign:
            try:
                nodes = await self.client.passing_nodes("consul")
            except ExecAPIError as exc:
                raise ExecAPIError(
                    f"Failed to find Consul server in remote datacenter: {exc}"
                ) from None
            if not nodes:
                raise ExecAPIError("Failed to find Consul server in remote datacenter")
            if self.options.verbose:
                self.info(
                    f"Binding session to remote node {nodes[0]}@{self.options.http.datacenter}"
                )
            body = {
                "Name": f"Remote Exec via {self.local_node}@{self.local_dc}",
                "Node": nodes[0],
                "NodeChecks": [],
                "Behavior": "delete",
                "TTL": SESSION_TTL,
            }
        else:
            body = {"Name": "Remote Exec", "Behavior": "delete", "TTL": SESSION_TTL}
        session = await self.client.session_create(body)
        self._renewer = asyncio.get_running_loop().create_task(
            self._renew(session), name="exec session renew"
        )
        return session

    async def _renew(self, session: str) -> None:
        while True:  # ends with the run (cancelled) or at the first failure
            await asyncio.sleep(RENEW_INTERVAL)
            try:
                await self.client.session_renew(session)
            except ExecAPIError as exc:
                self.error(f"Session renew failed: {exc}")
                return

    async def destroy_session(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        with contextlib.suppress(ExecAPIError):
            await self.client.session_destroy(self.session)

    async def destroy_data(self) -> None:
        with contextlib.suppress(ExecAPIError):
            await self.client.kv_delete_tree(self._dir())

    # -- results -------------------------------------------------------------------------

    async def wait_for_job(self) -> int:
        """Show results as they come until quiet; then the summary line and the exit code."""
        start = time.monotonic()
        queue: asyncio.Queue[Result] = asyncio.Queue(QUEUE_SIZE)
        loop = asyncio.get_running_loop()
        streamer = loop.create_task(self._stream_results(queue), name="exec results")
        acks = exits = bad = 0
        try:
            while True:  # each pass takes one result, or ends the run
                interval = self.options.wait * (2 if acks > exits else 1)
                getter = loop.create_task(queue.get())
                stopper = loop.create_task(self.stop.wait())
                done, _ = await asyncio.wait(
                    {getter, stopper}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                getter.cancel()
                stopper.cancel()
                if self.stop.is_set():
                    return 1
                if getter not in done:
                    self.info(f"{exits} / {acks} node(s) completed / acknowledged")
                    if self.options.verbose:
                        self.info(f"Completed in {time.monotonic() - start:0.2f} seconds")
                    if exits < acks:
                        bad += 1
                    break
                kind, node, payload = getter.result()
                if kind == "error":
                    return 1
                if kind == "ack":
                    acks += 1
                    if self.options.verbose:
                        self.info(targeted(node, "acknowledged", arrow=True))
                elif kind == "heartbeat":
                    if self.options.verbose:
                        self.info(targeted(node, "heartbeat received", arrow=True))
                elif kind == "output":
                    self.info(targeted(node, payload, arrow=False))
                elif kind == "exit":
                    exits += 1
                    self.info(targeted(node, f"finished with exit code {payload}", arrow=True))
                    if payload != 0:
                        bad += 1
        finally:
            streamer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await streamer
            # Before the data goes: with the session gone no agent can write again.
            await self.destroy_session()
        return 2 if bad else 0

    async def _stream_results(self, queue: asyncio.Queue[Result]) -> None:
        directory = self._dir() + "/"
        seen: set[str] = set()
        index = 0
        while True:  # one blocking list per pass; ends when cancelled or on an error
            try:
                keys, last = await self.client.kv_keys(directory, index, self.options.wait)
            except ExecAPIError as exc:
                self.error(f"Failed to read results: {exc}")
                await queue.put(("error", "", None))
                return
            if last == index:
                continue
            index = last
            # Within one answer a node's exit goes after its output: an agent that writes
            # its last chunk and its exit code at once would else see them reversed (the
            # list is sorted, and "exit" < "out").
            for full in sorted(keys, key=lambda k: k.endswith("/exit")):
                if full in seen:
                    continue
                seen.add(full)
                await self._classify(queue, full, full.removeprefix(directory))

    async def _classify(self, queue: asyncio.Queue[Result], full: str, key: str) -> None:
        if key == JOB_KEY:
            return
        if key.endswith("/ack"):
            await queue.put(("ack", key.removesuffix("/ack"), None))
            return
        if key.endswith("/exit") or "/out/" in key:
            value = await self._read(full)
            if value is None:
                return
            if key.endswith("/exit"):
                text = value.decode("utf-8", "surrogateescape")
                try:
                    code = _go_int32(text)
                except ValueError as exc:
                    self.error(f"Failed to parse exit code '{text}': {exc}")
                    return
                await queue.put(("exit", key.removesuffix("/exit"), code))
            else:
                node = key[: key.rindex("/out/")]
                if value:
                    await queue.put(("output", node, value.decode("utf-8", "surrogateescape")))
                else:
                    await queue.put(("heartbeat", node, None))
            return
        self.error(f"Unknown key '{key}', ignoring.")

    async def _read(self, key: str) -> bytes | None:
        try:
            value = await self.client.kv_get(key)
        except ExecAPIError as exc:
            self.error(f"Failed to read key '{key}': {exc}")
            return None
        if value is None:
            self.error(f"Failed to read key '{key}': <nil>")
        return value


async def run_exec(options: ExecOptions) -> int:
    """One run with SIGINT/SIGTERM handled: they end it (after the clean-up) with 1."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    client = ExecClient(options.http)
    try:
        return await ExecRun(options, client, stop).run()
    finally:
        await client.aclose()
        for signum in signals:
            loop.remove_signal_handler(signum)


def _read_stdin(stream: BinaryIO) -> Callable[[], bytes]:
    return stream.read


def exec_main(
    args: Sequence[str],
    env: Mapping[str, str],
    run: Callable[[ExecOptions], Awaitable[int]] = run_exec,
) -> int:
    """`connect-proxy exec`."""
    try:
        options = parse_exec_args(args, env, _read_stdin(sys.stdin.buffer))
    except HelpRequested:
        console.say(help_text())
        return 0
    except FlagError as exc:
        console.say(f"{exc}\n{help_text()}", error=True)
        return 1
    except UsageError as exc:
        console.say(str(exc) + (f"\n\n{help_text()}" if exc.show_help else ""), error=True)
        return 1
    except ConfigError as exc:
        console.say(f"Error connecting to Consul agent: {exc}", error=True)
        return 1
    return asyncio.run(_checked(run, options))


async def _checked(run: Callable[[ExecOptions], Awaitable[int]], options: ExecOptions) -> int:
    try:
        return await run(options)
    except ConfigError as exc:  # TLS files for the agent connection
        console.say(f"Error connecting to Consul agent: {exc}", error=True)
        return 1
