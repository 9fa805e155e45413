"""The admin endpoint's status page: a view of the running proxy, rendered as HTML.

Owns `StatusView` (plain values gathered by `proxy.admin`) and `render_status`, which turns
one view into a small self-contained page: inline CSS, no script, no external resource.

Rule 1: pure: no I/O, no clock reads (the view carries the time it was taken), no imports
from the project.
Rule 2: every value from outside (service names, SPIFFE IDs, addresses, reasons, error
texts) passes through `html.escape` exactly once, where it is written into the page (`_cell`
for most); markup is only ever literal text of this module. A hostile SPIFFE ID or refusal
reason shows as text, never as markup.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ListenerRow:
    kind: str  # "public" or "upstream"
    name: str  # the upstream's destination, or "public_listener"
    address: str  # host:port configured (the bound port once bound)
    bound: bool
    open_connections: int
    target: str = ""  # the app (public) or the upstream's label


@dataclass(frozen=True, slots=True)
class InstanceRow:
    node: str
    service_id: str
    address: str
    status: str  # passing, warning, critical, maintenance, or "" (unknown)


@dataclass(frozen=True, slots=True)
class UpstreamInstances:
    """What the agent says of one upstream's instances (`error` set when it could not say)."""

    upstream: str
    instances: tuple[InstanceRow, ...] = ()
    error: str = ""
    note: str = ""  # e.g. a prepared query, resolved per connection


@dataclass(frozen=True, slots=True)
class RefusalRow:
    at: float  # POSIX seconds
    direction: str
    listener: str
    source: str
    peer: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything the page shows, taken at `now` (POSIX seconds)."""

    now: float
    service: str = ""
    ready: str = ""  # "" when ready, else why not
    spiffe_id: str = ""
    serial: str = ""
    not_after: float | None = None
    root_ids: tuple[str, ...] = ()
    listeners: tuple[ListenerRow, ...] = ()
    upstreams: tuple[UpstreamInstances, ...] = ()
    refusals: tuple[RefusalRow, ...] = field(default=())


def rfc3339(seconds: float) -> str:
    """POSIX seconds as RFC 3339 UTC to the second (`2024-05-01T12:00:00Z`)."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    """A span for people: `2d 3h`, `3h 4m`, `4m 5s`, `5s`; negative spans read `expired`."""
    if seconds < 0:
        return "expired"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _cell(value: object, cls: str = "", tag: str = "td") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<{tag}{attr}>{html.escape(str(value))}</{tag}>"


def _table(cls: str, headers: Sequence[str], rows: Iterable[str], empty: str) -> str:
    body = "".join(rows)
    if not body:
        return f'<p class="{cls} empty">{html.escape(empty)}</p>'
    head = "".join(_cell(h, tag="th") for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_STATUS_CLASS = {"passing": "ok", "warning": "warn", "critical": "bad", "maintenance": "warn"}

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:72em}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;
border-bottom:1px solid #ddd;font-size:.92em}th{background:#f4f4f4}
td.mono,span.mono{font-family:ui-monospace,monospace;word-break:break-all}
td.time,td.source,td.address{white-space:nowrap;word-break:normal}
.ok{color:#18753c;font-weight:600}.warn{color:#9a6700;font-weight:600}
.bad{color:#b42318;font-weight:600}.empty{color:#666}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}dt{color:#555}
dd{margin:0}
"""


def _identity(view: StatusView) -> str:
    if view.not_after is None:
        expiry = '<dd class="expiry bad">no certificate yet</dd>'
    else:
        left = view.not_after - view.now
        cls = "bad" if left < 3600 else "ok"
        expiry = (
            f'<dd class="expiry {cls}">{html.escape(rfc3339(view.not_after))} '
            f"(in {html.escape(_duration(left))})</dd>"
        )
    state = (
        '<dd class="ready ok">ready</dd>'
        if not view.ready
        else f'<dd class="ready bad">not ready: {html.escape(view.ready)}</dd>'
    )
    roots = ", ".join(view.root_ids) or "none"
    return (
        "<dl>"
        f"<dt>Service</dt>{_cell(view.service, 'service', 'dd')}"
        f"<dt>State</dt>{state}"
        f"<dt>SPIFFE ID</dt>{_cell(view.spiffe_id or 'none yet', 'spiffe mono', 'dd')}"
        f"<dt>Leaf serial</dt>{_cell(view.serial or 'none yet', 'serial mono', 'dd')}"
        f"<dt>Leaf expires</dt>{expiry}"
        f"<dt>Root IDs</dt>{_cell(roots, 'roots mono', 'dd')}"
        "</dl>"
    )


def _listener_rows(view: StatusView) -> list[str]:
    rows = []
    for row in view.listeners:
        bound = (
            '<td class="bound ok">bound</td>'
            if row.bound
            else '<td class="bound bad">not bound</td>'
        )
        rows.append(
            "<tr>"
            + _cell(row.kind, "kind")
            + _cell(row.name, "name")
            + _cell(row.address, "address mono")
            + _cell(row.target, "target mono")
            + bound
            + _cell(row.open_connections, "open")
            + "</tr>"
        )
    return rows


def _instance_rows(view: StatusView) -> list[str]:
    rows = []
    for upstream in view.upstreams:
        if upstream.error or upstream.note or not upstream.instances:
            text = upstream.error or upstream.note or "no instances registered"
            cls = "bad" if upstream.error else "empty"
            rows.append(
                "<tr>"
                + _cell(upstream.upstream, "upstream")
                + f'<td colspan="4" class="{cls}">{html.escape(text)}</td>'
                + "</tr>"
            )
            continue
        for inst in upstream.instances:
            status = inst.status or "unknown"
            rows.append(
                "<tr>"
                + _cell(upstream.upstream, "upstream")
                + _cell(inst.service_id, "instance")
                + _cell(inst.address, "address mono")
                + _cell(inst.node, "node")
                + _cell(status, f"health {_STATUS_CLASS.get(status, 'bad')}")
                + "</tr>"
            )
    return rows


def _refusal_rows(view: StatusView) -> list[str]:
    return [
        "<tr>"
        + _cell(rfc3339(r.at), "time mono")
        + _cell(r.direction, "direction")
        + _cell(r.listener, "listener")
        + _cell(r.source, "source mono")
        + _cell(r.peer, "peer mono")
        + _cell(r.reason, "reason")
        + _cell(r.detail, "detail")
        + "</tr>"
        for r in reversed(view.refusals)  # newest first
    ]


def render_status(view: StatusView) -> str:
    """The status page of `view`: a complete HTML document."""
    total = sum(row.open_connections for row in view.listeners)
    title = f"connect-proxy: {view.service}" if view.service else "connect-proxy"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="taken">As of {html.escape(rfc3339(view.now))}</p>'
        f'<section id="identity"><h2>Identity</h2>{_identity(view)}</section>'
        f'<section id="listeners"><h2>Listeners</h2>'
        f'<p>Open connections: <span class="total-open">{total}</span></p>'
        + _table(
            "listeners",
            ("Kind", "Name", "Address", "Forwards to", "State", "Open connections"),
            _listener_rows(view),
            "no listeners",
        )
        + '</section><section id="upstreams"><h2>Upstream instances</h2>'
        + _table(
            "instances",
            ("Upstream", "Instance", "Address", "Node", "Health"),
            _instance_rows(view),
            "no upstreams",
        )
        + '</section><section id="refusals"><h2>Recent refusals</h2>'
        + _table(
            "refusals",
            ("Time", "Direction", "Listener", "Source", "Peer", "Reason", "Detail"),
            _refusal_rows(view),
            "none",
        )
        + "</section></body></html>"
    )
