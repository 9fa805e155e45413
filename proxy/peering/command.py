"""`connect-proxy peering <subcommand>`: Consul's `consul peering` commands.

`generate-token` (`-name`, `-meta k=v` repeatable, `-server-external-addresses`
repeatable, `-format pretty|json`), `establish` (`-name`, `-peering-token`, `-meta`),
`read` (`-name`, `-format`), `list` (`-format`), `delete` (`-name`); each with Consul's HTTP
flags and `-partition`. Messages, output and exit codes (0, or 1 on any error) follow
`command/peering/*`: `Info`/`Output` to stdout, `Error` to stderr.

Rule 1: an HTTP client only (see `client`); it works against a real Consul unchanged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

from proxy import console
from proxy.errors import ConfigError
from proxy.goflags import FlagError, FlagSet, HelpRequested
from proxy.httpflags import add_http_flags, load_http_options
from proxy.peering.client import PeeringAPIError, PeeringClient

FORMATS = ("pretty", "json")

PEERING_HELP = """\
Usage: connect-proxy peering <subcommand> [options] [args]

  This command has subcommands for managing cluster peering connections, as
  `consul peering` does. They talk to an agent's HTTP API (a real Consul agent
  or the dev agent).

  Generate a peering token:

      $ connect-proxy peering generate-token -name west-dc

  Establish a peering connection:

      $ connect-proxy peering establish -name east-dc -peering-token <token>

Subcommands:
    delete            Delete a peering connection
    establish         Establish a peering connection
    generate-token    Generate a peering token
    list              List peering connections
    read              Read a peering connection
"""

SYNOPSES = {
    "generate-token": (
        "connect-proxy peering generate-token [options] -name <peer name>",
        "Generate a peering token. The name provided will be used locally by\n"
        "  this cluster to refer to the peering connection. Re-generating a token\n"
        "  for a given name will not interrupt any active connection, but will\n"
        "  invalidate any unused token for that name.",
    ),
    "establish": (
        "connect-proxy peering establish [options] -name <peer name> -peering-token <token>",
        "Establish a peering connection. The name provided will be used locally by\n"
        "  this cluster to refer to the peering connection. The peering token can\n"
        "  only be used once to establish the connection.",
    ),
    "read": (
        "connect-proxy peering read [options] -name <peer name>",
        "Read a peering connection with the provided name. If one is not found,\n"
        "  the command will exit with a non-zero code.",
    ),
    "list": ("connect-proxy peering list [options]", "List all peering connections."),
    "delete": (
        "connect-proxy peering delete [options] -name <peer name>",
        "Delete a peering connection. The agent deletes all data imported from the\n"
        "  peer in the background; until then the peering reads as DELETING.",
    ),
}


def _meta_flag(fs: FlagSet, meta: dict[str, str]) -> None:
    def add(value: str) -> None:
        if "=" not in value:
            raise ValueError(f'Missing "=" value in argument: {value}')
        key, _, val = value.partition("=")
        meta[key] = val

    fs.repeated(
        "meta",
        "Metadata to associate with the peering, formatted as key=value. This flag "
        "may be specified multiple times to set multiple metadata fields.",
        add,
    )


def _flags(sub: str, meta: dict[str, str], addresses: list[str]) -> FlagSet:
    fs = FlagSet()
    if sub != "list":
        fs.string("name", "", "(Required) The local name assigned to the peer cluster.")
    if sub in ("generate-token", "establish"):
        _meta_flag(fs, meta)
    if sub == "generate-token":
        fs.repeated(
            "server-external-addresses",
            "A list of addresses to put into the generated token, formatted as a "
            "comma-separated list (each occurrence is one address, as Consul's). Addresses "
            "are <host or IP>:port.",
            addresses.append,
        )
    if sub == "establish":
        fs.string("peering-token", "", "(Required) The peering token from the accepting cluster.")
    if sub in ("generate-token", "read", "list"):
        fs.string("format", "pretty", "Output format {pretty|json} (default: pretty)")
    add_http_flags(fs)
    fs.string("partition", "", "Specifies the admin partition to query (Enterprise).")
    return fs


def help_text(sub: str) -> str:
    usage, text = SYNOPSES[sub]
    return f"Usage: {usage}\n\n  {text}\n\nOptions\n\n" + _flags(sub, {}, []).usage()


class UsageError(Exception):
    pass


def go_time(value: Any) -> str:
    """`%v` of a `*time.Time` decoded from RFC 3339: `<nil>` or Go's `Time.String()`."""
    if not value:
        return "<nil>"
    try:
        when = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    frac = f"{when.microsecond:06d}".rstrip("0")
    offset = when.utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    zone = "UTC" if minutes == 0 else ""
    text = when.strftime("%Y-%m-%d %H:%M:%S") + (f".{frac}" if frac else "")
    text += f" {sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    return text + (f" {zone}" if zone else "")


def api_peering(p: Mapping[str, Any]) -> dict[str, Any]:
    """`api.Peering` as Go's `json.Marshal` writes it: field order and omitempty."""
    out: dict[str, Any] = {"ID": p.get("ID", ""), "Name": p.get("Name", "")}
    for key in ("Partition", "DeletedAt", "Meta"):
        if p.get(key):
            out[key] = p[key]
    out["State"] = p.get("State", "")
    for key in ("PeerID", "PeerCAPems", "PeerServerName", "PeerServerAddresses"):
        if p.get(key):
            out[key] = p[key]
    status = p.get("StreamStatus") or {}
    out["StreamStatus"] = {
        k: status.get(k)
        for k in (
            "ImportedServices",
            "ExportedServices",
            "LastHeartbeat",
            "LastReceive",
            "LastSend",
        )
    }
    out["CreateIndex"] = p.get("CreateIndex", 0)
    out["ModifyIndex"] = p.get("ModifyIndex", 0)
    remote = p.get("Remote") or {}
    out["Remote"] = {
        "Partition": remote.get("Partition", ""),
        "Datacenter": remote.get("Datacenter", ""),
    }
    if remote.get("Locality"):
        out["Remote"]["Locality"] = remote["Locality"]
    return out


def _go_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def format_peering(p: Mapping[str, Any]) -> str:
    """The `pretty` output of `read`, line for line as Consul's `formatPeering`."""
    lines = [f"Name:         {p.get('Name', '')}\n", f"ID:           {p.get('ID', '')}\n"]
    if p.get("Partition"):
        lines.append(f"Partition:    {p['Partition']}\n")
    if p.get("DeletedAt"):
        lines.append(f"DeletedAt:    {p['DeletedAt']}\n")
    lines.append(f"State:        {p.get('State', '')}\n")
    if p.get("Meta"):
        lines.append("Meta:\n")
        lines += [f"    {k}={v}\n" for k, v in sorted(p["Meta"].items())]
    lines.append("\n")
    lines.append(f"Peer ID:               {p.get('PeerID', '')}\n")
    lines.append(f"Peer Server Name:      {p.get('PeerServerName', '')}\n")
    lines.append(f"Peer CA Pems:          {len(p.get('PeerCAPems') or [])}\n")
    if p.get("PeerServerAddresses"):
        lines.append("Peer Server Addresses:\n")
        # Consul writes each address without a newline; the next line's "\n" ends them.
        lines += [f"    {a}" for a in p["PeerServerAddresses"]]
    status = p.get("StreamStatus") or {}
    lines.append("\n")
    lines.append(f"Imported Services: {len(status.get('ImportedServices') or [])}\n")
    lines.append(f"Exported Services: {len(status.get('ExportedServices') or [])}\n")
    lines.append("\n")
    lines.append(f"Last Heartbeat:    {go_time(status.get('LastHeartbeat'))}\n")
    lines.append(f"Last Send:         {go_time(status.get('LastSend'))}\n")
    lines.append(f"Last Receive:      {go_time(status.get('LastReceive'))}\n")
    lines.append("\n")
    lines.append(f"Create Index: {p.get('CreateIndex', 0)}\n")
    lines.append(f"Modify Index: {p.get('ModifyIndex', 0)}\n")
    return "".join(lines)


def columnize(rows: Sequence[Sequence[str]]) -> str:
    """ryanuber/columnize with its defaults (two spaces of glue, the last column unpadded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [f"{cell:<{widths[i]}}  " for i, cell in enumerate(row[:-1])]
        out.append("".join(cells) + row[-1])
    return "\n".join(out)


def format_list(peerings: Sequence[Mapping[str, Any]]) -> str:
    rows = [["Name", "State", "Imported Svcs", "Exported Svcs", "Meta"]]
    for p in peerings:
        status = p.get("StreamStatus") or {}
        meta = ",".join(f"{k}={v}" for k, v in sorted((p.get("Meta") or {}).items()))
        rows.append(
            [
                str(p.get("Name", "")),
                str(p.get("State", "")),
                str(len(status.get("ImportedServices") or [])),
                str(len(status.get("ExportedServices") or [])),
                meta,
            ]
        )
    return columnize(rows)


async def _run(
    sub: str,
    values: Mapping[str, Any],
    client: PeeringClient,
    meta: dict[str, str],
    addresses: list[str],
) -> int:
    name = str(values.get("name") or "")
    fmt = str(values.get("format") or "pretty")
    try:
        if sub == "generate-token":
            try:
                answer = await client.generate_token(name, meta, addresses)
            except PeeringAPIError as exc:
                console.say(f"Error generating peering token for {name}: {exc}", error=True)
                return 1
            if fmt == "json":
                console.say(_go_json({"PeeringToken": answer.get("PeeringToken", "")}))
            else:
                console.say(str(answer.get("PeeringToken", "")))
            return 0
        if sub == "establish":
            try:
                await client.establish(name, str(values.get("peering-token") or ""), meta)
            except PeeringAPIError as exc:
                console.say(f"Error establishing peering for {name}: {exc}", error=True)
                return 1
            console.say(f"Successfully established peering connection with {name}")
            return 0
        if sub == "read":
            try:
                peering = await client.read(name)
            except PeeringAPIError as exc:
                console.say(f"Error reading peering: {exc}", error=True)
                return 1
            if peering is None:
                console.say(f"No peering with name {name} found.", error=True)
                return 1
            if fmt == "json":
                console.say(_go_json(api_peering(peering)))
            else:
                console.say(format_peering(peering))
            return 0
        if sub == "list":
            try:
                peerings = await client.list()
            except PeeringAPIError as exc:
                console.say(f"Error listing peerings: {exc}", error=True)
                return 1
            peerings.sort(key=lambda p: str(p.get("Name", "")))
            if fmt == "json":
                console.say(_go_json([api_peering(p) for p in peerings]))
            elif not peerings:
                console.say("There are no peering connections.")
            else:
                console.say(format_list(peerings))
            return 0
        try:
            await client.delete(name)
        except PeeringAPIError as exc:
            console.say(f"Error deleting peering for {name}: {exc}", error=True)
            return 1
        console.say(f"Successfully submitted peering connection, {name}, for deletion")
        return 0
    finally:
        await client.aclose()


def peering_main(args: Sequence[str], env: Mapping[str, str]) -> int:
    """`connect-proxy peering <subcommand> [options]`."""
    if not args or args[0] in ("-h", "-help", "--help") or args[0] not in SYNOPSES:
        console.say(PEERING_HELP, error=True)
        return 0 if args and args[0] in ("-h", "-help", "--help") else 1
    sub, rest = args[0], args[1:]
    meta: dict[str, str] = {}
    addresses: list[str] = []
    try:
        values, extra = _flags(sub, meta, addresses).parse(rest)
    except HelpRequested:
        console.say(help_text(sub))
        return 0
    except FlagError as exc:
        console.say(f"{exc}\n{help_text(sub)}", error=True)
        return 1
    if extra:
        console.say(f"Too many arguments (expected 0, got {len(extra)})", error=True)
        return 1
    if sub != "list" and not values.get("name"):
        console.say("Missing the required -name flag", error=True)
        return 1
    if sub == "establish" and not values.get("peering-token"):
        console.say("Missing the required -peering-token flag", error=True)
        return 1
    if str(values.get("format") or "pretty") not in FORMATS:
        console.say("Invalid format, valid formats are {pretty|json}", error=True)
        return 1
    try:
        options = load_http_options(values, env)
        client = PeeringClient(options, str(values.get("partition") or ""))
    except ConfigError as exc:
        what = "connecting" if sub in ("delete", "establish", "list") else "connect"
        console.say(f"Error {what} to Consul agent: {exc}", error=True)
        return 1
    return asyncio.run(_run(sub, values, client, meta, addresses))
