"""The figures of each scenario in the report: the headline (proxy CPU per connection, then
conn/s, with the proxy's share of its core in every conn/s run), the main table, the ratios
against the baselines and against every reference of the same layout, and issue 5's targets.

Rule 1: a pure function of the results (nothing here measures or reads the machine).
Rule 2: the text is the harness's public output (bench/README.md quotes it): a change of
layout is a change of behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from bench_table import NW, SCENARIO, Row, get, header, num, ratio, rows, table, text

DIRECT = ("direct-plain", "direct-mtls")
KIB_IDLE_TARGET = 50.0  # per proxy process
CORE_GOAL = 0.95  # issue 13: the proxy under test reaches this share of its core in conn/s runs


class Outcome(Protocol):
    """What the report reads of a run (`bench_scenarios.Harness` is one)."""

    @property
    def results(self) -> dict[str, Any]: ...
    @property
    def proxy_cpu(self) -> int | None: ...
    @property
    def load_cpu(self) -> int | None: ...
    @property
    def versions(self) -> dict[str, str | None]: ...
    @property
    def skipped(self) -> list[str]: ...
    @property
    def logs(self) -> dict[str, Any]: ...
    @property
    def load(self) -> str: ...

    def want(self, name: str, kind: str, base: str = "") -> bool: ...


# -- figures per scenario -------------------------------------------------------------------


def _c64(res: dict[str, Any]) -> dict[str, Any]:
    """The conn/s run at concurrency 64, and the CPUs busy during it."""
    c64 = get(res, "conn_rate", "64") or {}
    cpus = (c64.get("cpu_busy") or {}).items()
    return {
        "cps64": c64.get("conn_per_s"),
        "us_conn": c64.get("proxy_cpu_us_per_conn"),
        "proxy64": c64.get("proxy_cpu_frac"),
        "lg64": c64.get("loadgen_cpu_frac"),
        "busy64": {k: v["busy"] for k, v in cpus},
        "sirq64": {k: v["softirq"] for k, v in cpus},
        "steal64": sum(v["steal"] for _, v in cpus),
        "agent64": get(c64, "other_cpu_frac", "agent"),
        "backend64": get(c64, "other_cpu_frac", "backend"),
        "foreign64": c64.get("foreign_cpu_frac"),
    }


def _foreign_max(res: dict[str, Any]) -> Any:
    """The most other load seen in any window of the scenario (None: none measured)."""
    seen = (
        *(get(res, "conn_rate", str(c), "foreign_cpu_frac") for c in (16, 64)),
        get(res, "throughput", "foreign_cpu_frac"),
        get(res, "latency_ms", "foreign_cpu_frac"),
        get(res, "rtt_us", "foreign_cpu_frac"),
    )
    return max([x for x in seen if x is not None], default=None)


def metrics(res: dict[str, Any]) -> dict[str, Any]:
    """The figures of one scenario's result that the report shows, by short name."""
    c64 = _c64(res)
    return {
        "lat_p50": get(res, "latency_ms", "p50"),
        "lat_p99": get(res, "latency_ms", "p99"),
        "cps16": get(res, "conn_rate", "16", "conn_per_s"),
        "cps64": c64["cps64"],
        "mibs": get(res, "throughput", "mib_per_s"),
        "rtt50": get(res, "rtt_us", "p50"),
        "rtt99": get(res, "rtt_us", "p99"),
        "kib_idle": get(res, "idle", "kib_per_conn"),
        "us_conn": c64["us_conn"],
        "s_gib": get(res, "throughput", "proxy_cpu_s_per_gib"),
        **{k: c64[k] for k in ("proxy64", "lg64", "busy64", "sirq64", "steal64")},
        "agent64": c64["agent64"],
        "backend64": c64["backend64"],
        "errors": sum((get(res, "conn_rate", str(c), "errors") or 0) for c in (16, 64)),
        "foreign64": c64["foreign64"],
        "foreign_max": _foreign_max(res),
    }


def kind_of(res: dict[str, Any]) -> str:
    """direct, ours, peer, go or workers ("" for a result without one)."""
    return str(res.get("kind", ""))


@dataclass(frozen=True, slots=True)
class View:
    """One run as the sections read it: `rows` are the scenarios that gave figures (not
    failed, not worker scaling) with their metrics, `base` the same by name."""

    h: Outcome
    rows: list[tuple[str, dict[str, Any]]]
    base: dict[str, dict[str, Any]]


def _shares(res: dict[str, Any], concurrency: str) -> list[float]:
    """The proxy's share of its core in every repetition of the conn/s run at `concurrency`
    (all its processes together: they share one CPU)."""
    c = get(res, "conn_rate", concurrency) or {}
    shares = c.get("all_proxy_cpu_frac")
    if shares is None and c.get("proxy_cpu_frac") is not None:
        shares = [c["proxy_cpu_frac"]]
    return list(shares or [])


def _reached(res: dict[str, Any]) -> str:
    """Whether the proxy reached CORE_GOAL of its core in every conn/s run, and if not, in
    which runs it stayed under (its conn/s is then held by something else: a lower bound)."""
    under = [f"{x:.2f} at {c}" for c in ("16", "64") for x in _shares(res, c) if x < CORE_GOAL]
    if not under:
        return "yes"
    return "NO: " + ", ".join(under) + " (conn/s is a lower bound)"


HEADLINE = (
    SCENARIO,
    num("µs/conn", 9, "us_conn"),
    num("conn/s64", 10, "cps64"),
    num("conn/s16", 10, "cps16"),
    num("core@64", 9, "core64", 2),
    num("core@16", 9, "core16", 2),
    num("loadgen@64", 11, "lg64", 2),
    text("≥0.95 of its core in every run", "", "reached", pre="  "),
)


def headline(v: View) -> list[str]:
    """Per scenario through a proxy: its CPU per connection (the headline figure: it does not
    depend on who else holds the rate back), conn/s, and its share of its core."""
    data = [
        {
            "name": n,
            **m,
            "core64": min(_shares(v.h.results[n], "64"), default=None),
            "core16": min(_shares(v.h.results[n], "16"), default=None),
            "reached": _reached(v.h.results[n]),
        }
        for n, m in v.rows
        if m["us_conn"] is not None
    ]
    if not data:
        return []
    return [
        f"Proxy CPU per connection, then conn/s (load side: {v.h.load}; core@N: the proxy's "
        "share of its core at concurrency N,",
        "the lowest of the repetitions; loadgen@64: the load generator's own CPU, of one core):",
        *table(HEADLINE, data),
        "",
    ]


FIGURES = (
    SCENARIO,
    num("lat p50", 9, "lat_p50", 2, "ms"),
    num("lat p99", 9, "lat_p99", 2, "ms"),
    num("conn/s16", 10, "cps16"),
    num("conn/s64", 10, "cps64"),
    num("MiB/s", 8, "mibs"),
    num("RTT p50", 9, "rtt50", unit="µs"),
    num("RTT p99", 9, "rtt99", unit="µs"),
    num("KiB/idle", 9, "kib_idle", 1),
    num("µs/conn", 9, "us_conn"),
    num("s/GiB", 7, "s_gib", 2),
)


def figures(v: View) -> list[str]:
    """The main table: one row per scenario with figures, then the failed ones."""
    lines = [*header(FIGURES), ""]
    lines += rows(FIGURES, ({"name": n, **m} for n, m in v.rows))
    for n, r in v.h.results.items():
        if "error" in r:
            lines.append(f"{n:<{NW}}FAILED: {r['error'].splitlines()[0]}")
    return lines


# (heading, width, metric, baseline)
BASELINE_RATIOS = (
    ("conn/s16", 10, "cps16", "direct-mtls"),
    ("conn/s64", 10, "cps64", "direct-mtls"),
    ("lat p50", 9, "lat_p50", "direct-mtls"),
    ("MiB/s", 8, "mibs", "direct-plain"),
    ("RTT p50", 9, "rtt50", "direct-plain"),
)


def vs_baselines(v: View) -> list[str]:
    """Ratios against the baselines of the same run."""
    if not (v.base.get("direct-plain") or v.base.get("direct-mtls")):
        return []
    cols = [SCENARIO, *(text(h, f">{w}", k) for h, w, k, _ in BASELINE_RATIOS)]
    data = [
        {"name": n, **{k: ratio(m[k], get(v.base, b, k)) for _, _, k, b in BASELINE_RATIOS}}
        for n, m in v.rows
        if n not in DIRECT
    ]
    title = "Ratios (conn/s and latency vs direct-mtls; MiB/s and RTT vs direct-plain):"
    return ["", title, *table(cols, data)]


# (heading, width, metric)
REFERENCE_RATIOS = (
    ("conn/s16", 9, "cps16"),
    ("conn/s64", 9, "cps64"),
    ("lat p50", 9, "lat_p50"),
    ("MiB/s", 8, "mibs"),
    ("RTT p50", 9, "rtt50"),
    ("KiB/idle", 9, "kib_idle"),
    ("µs/conn", 9, "us_conn"),
    ("s/GiB", 8, "s_gib"),
)
VS_REFERENCES = (
    text("ours", f"<{NW}", "ours"),
    text("reference", f"<{NW}", "reference"),
    *(text(h, f">{w}", k) for h, w, k in REFERENCE_RATIOS),
)


def _pairs(results: dict[str, Any], base: dict[str, Any]) -> list[tuple[str, str]]:
    """(ours, reference) for each of our scenarios and each reference of its layout."""
    ours = [n for n, r in results.items() if kind_of(r) == "ours" and n in base]
    refs = [n for n, r in results.items() if kind_of(r) in ("go", "peer") and n in base]
    return [(o, r) for o in ours for r in refs if results[o].get("base") == results[r].get("base")]


def vs_references(v: View) -> list[str]:
    """Each of our scenarios against every peer and Go reference of the same layout."""
    base = v.base
    pairs = _pairs(v.h.results, base)
    if not pairs:
        return []
    data = [
        {
            "ours": o,
            "reference": r,
            **{k: ratio(base[o][k], base[r][k]) for *_, k in REFERENCE_RATIOS},
        }
        for o, r in pairs
    ]
    title = "Ours / each reference (conn/s, MiB/s: higher is better; the rest: lower is better):"
    return ["", title, *table(VS_REFERENCES, data)]


# -- issue 5's targets ----------------------------------------------------------------------


class Goal(NamedTuple):
    """A target of issue 5: ours / `reference` in `key` (shown as `label`) at least `goal`
    (`higher`) or at most."""

    key: str
    label: str
    base: str
    reference: str
    goal: float
    higher: bool


TARGETS = (
    Goal("cps64", "conn/s64", "inbound", "inbound-go", 1.0, True),
    Goal("cps64", "conn/s64", "outbound", "outbound-go", 1.0, True),
    Goal("cps64", "conn/s64", "chain", "chain-go", 1.0, True),
    Goal("cps64", "conn/s64", "outbound", "outbound-go-resume", 1.0, True),
    Goal("cps64", "conn/s64", "chain", "chain-go-resume", 1.0, True),
    Goal("cps64", "conn/s64", "inbound", "inbound-haproxy", 1.3, True),
    Goal("mibs", "MiB/s", "inbound", "inbound-haproxy", 1.0, True),
    Goal("rtt50", "RTT p50", "inbound", "inbound-haproxy", 1.1, False),
)
TARGET_COLUMNS = (
    text("ours", f"<{NW}", "ours"),
    text("metric", "<10", "metric"),
    text("reference", f"<{NW}", "reference"),
    text("measured", ">10", "measured"),
    text("goal", ">9", "goal"),
    text("met", "", "met", pre="  "),
)


def _missing(h: Outcome, g: Goal) -> str | None:
    """Why the reference has no figures; None when `--only` did not select it."""
    ref = g.reference
    if ref not in h.results and not h.want(ref, "go" if "-go" in ref else "peers", g.base):
        return None
    return "failed" if ref in h.results else "not measured (skipped)"


def _held_back(v: View, n: str, g: Goal) -> str:
    """A note when the reference did not use its whole core: the load side held it back,
    so its figure is a lower bound and a higher-is-better ratio an upper bound."""
    ref = g.reference
    ref_cpu = {
        "cps64": v.base[ref]["proxy64"],
        "mibs": get(v.h.results[ref], "throughput", "proxy_cpu_frac"),
    }.get(g.key)
    if ref_cpu is None or not ref_cpu < 0.9:
        return ""
    note = f"  ({ref} used only {ref_cpu:.2f} of its core"
    ours_us, ref_us = v.base[n]["us_conn"], v.base[ref]["us_conn"]
    if g.key == "cps64" and ours_us and ref_us:
        note += f"; by proxy CPU per connection: {ref_us / ours_us:.2f}x"
    return note + ")"


def _goal_row(v: View, n: str, g: Goal) -> Row | None:
    """One target of scenario `n`; None when there is nothing to compare."""
    row = {"ours": n, "metric": g.label, "reference": g.reference}
    row["goal"] = ("≥" if g.higher else "≤") + f"{g.goal:.2f}x"
    if g.reference not in v.base:
        why = _missing(v.h, g)
        return None if why is None else {**row, "measured": "-", "met": why}
    mine, theirs = v.base[n][g.key], v.base[g.reference][g.key]
    if not mine or not theirs:
        return None
    r = mine / theirs
    met = r >= g.goal if g.higher else r <= g.goal
    return {**row, "measured": f"{r:.2f}x", "met": ("yes" if met else "no") + _held_back(v, n, g)}


def _kib_row(v: View, n: str) -> Row | None:
    """KiB per idle connection of scenario `n`, per proxy process."""
    kib, nproc = v.base[n]["kib_idle"], v.h.results[n].get("proxy_processes") or 1
    if kib is None:
        return None
    each = kib / nproc
    note = f" ({kib:.1f} for {nproc} processes)" if nproc > 1 else ""
    return {
        "ours": n,
        "metric": "KiB/idle",
        "reference": "per process",
        "measured": f"{each:.1f}",
        "goal": f"≤{KIB_IDLE_TARGET:g}",
        "met": ("yes" if each <= KIB_IDLE_TARGET else "no") + note,
    }


def targets(v: View) -> list[str]:
    """Issue 5's ratios and goals, for each of our scenarios (one per TLS engine)."""
    ours = [n for n, r in v.h.results.items() if kind_of(r) == "ours" and n in v.base]
    if not ours:
        return []
    data: list[Row | None] = []
    for n in ours:
        layout = v.h.results[n].get("base")
        data += [_goal_row(v, n, g) for g in TARGETS if g.base == layout]
        data.append(_kib_row(v, n))
    title = "Targets of issue 5 (ours / reference, same run):"
    return ["", title, *table(TARGET_COLUMNS, [r for r in data if r is not None], "  ")]
