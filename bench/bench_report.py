"""The text report of the benchmark, from the results of a run: the figures
(bench_figures.py), worker scaling, who was busy during the runs, and notes (TLS, versions,
what was skipped, profiles, problems in the processes' output).

Rule 1: a pure function of the results: nothing here measures, starts a process or reads
the machine, and the same results always give the same text.
Rule 2: the text is the harness's public output (bench/README.md quotes it): a change of
layout is a change of behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench_figures import (
    Outcome,
    View,
    figures,
    headline,
    kind_of,
    metrics,
    targets,
    vs_baselines,
    vs_references,
)
from bench_table import NW, SCENARIO, Column, Row, fmt, get, num, table, text


def bottleneck(m: dict[str, Any], proxy_cpu: int | None, load_cpu: int | None) -> str:
    """What held a run back: the proxy (≥ 90 % of its core), other programs on the machine
    (≥ 0.25 of a core of other load) or the load CPU (≥ 95 % busy)."""
    load_busy = m["busy64"].get(str(load_cpu)) if load_cpu is not None else None
    proxy, foreign = m["proxy64"], m.get("foreign64")
    if proxy is not None and proxy >= 0.9:
        return "proxy (CPU-bound)"
    if foreign is not None and foreign >= 0.25:
        return f"other load on the machine ({foreign:.2f} core)"
    if load_busy is not None and load_busy >= 0.95:
        return f"load side (CPU {load_cpu} full)"
    return "neither core full"


# -- worker scaling -------------------------------------------------------------------------


def _worker_row(n: str, r: dict[str, Any]) -> Row:
    """A worker-scaling result as a row; `key` is (engine, number of workers)."""
    c = get(r, "conn_rate", "64") or {}
    busy = {k: v["busy"] for k, v in (c.get("cpu_busy") or {}).items()}
    each = list((c.get("proxy_cpu_frac_each") or {}).values())
    cps, proxy = c.get("conn_per_s"), c.get("proxy_cpu_frac")
    return {
        "name": n,
        "key": (r.get("engine"), int(r.get("workers", 0))),
        "cps": cps,
        "proxy": proxy,
        "each": "+".join(f"{x:.2f}" for x in each),
        "lg": c.get("loadgen_cpu_frac"),
        "agent": get(c, "other_cpu_frac", "agent"),
        "backend": get(c, "other_cpu_frac", "backend"),
        "other": c.get("foreign_cpu_frac"),
        "busy": busy,
        "machine": sum(busy.values()),
        "per_core": cps / proxy if cps and proxy else None,
        "errors": c.get("errors", 0),
    }


def _busy_of(cpu: int | None, width: int, key: str) -> Column:
    """The busy fraction of one CPU, from the row's per-CPU dict `key`."""
    return Column(f"cpu{cpu}", f">{width}", lambda r: fmt(r[key].get(str(cpu)), 2))


def _worker_columns(pc: int | None, lc: int | None) -> list[Column]:
    return [
        SCENARIO,
        num("conn/s64", 9, "cps"),
        num("proxy", 7, "proxy", 2),
        text("per process", "<12", "each", pre="  "),
        num("loadgen", 8, "lg", 2),
        num("agent", 7, "agent", 2),
        num("backend", 8, "backend", 2),
        num("other", 7, "other", 2),
        _busy_of(pc, 6, "busy"),
        _busy_of(lc, 6, "busy"),
        num("machine", 8, "machine", 2),
        num("c/s per proxy core", 19, "per_core"),
        text("errors", ">7", "errors"),
    ]


def _per_core(one: Row, two: Row) -> float | None:
    """conn/s per proxy core with 2 workers / with 1 (None without the proxy's CPU)."""
    if not one["proxy"] or not two["proxy"]:
        return None
    return float((two["cps"] / two["proxy"]) / (one["cps"] / one["proxy"]))


def _scaling(engine: str | None, one: Row | None, two: Row | None) -> list[str]:
    """-workers 2 / -workers 1 under one engine, and what the machine allowed."""
    if not one or not two or not one["cps"] or not two["cps"]:
        return []
    label = "" if engine is None else f" ({engine})"
    lines = [
        f"  -workers 2 / -workers 1{label}: conn/s {two['cps'] / one['cps']:.2f}x, "
        f"conn/s per proxy core {fmt(_per_core(one, two), 2)}x (1.00x: the workers together "
        "are as efficient per core as one)"
    ]
    if one["machine"]:
        cores = len(one["busy"])
        lines.append(
            f"    with 1 worker the whole machine was {one['machine']:.2f} of "
            f"{cores} cores busy; at that cost per connection a full machine "
            f"allows at most {cores / one['machine']:.2f}x"
        )
    if all(b >= 0.95 for b in two["busy"].values()):
        lines.append(
            "    with 2 workers every CPU was ≥ 95 % busy: the machine (proxy and load side "
            "together), not the proxy alone, sets this ratio"
        )
    return lines


def _workers(v: View) -> list[str]:
    """-workers 1 against -workers 2: conn/s at 64 and who used which CPU."""
    data = [
        _worker_row(n, r)
        for n, r in v.h.results.items()
        if kind_of(r) == "workers" and "error" not in r
    ]
    if not data:
        return []
    pc, lc = v.h.proxy_cpu, v.h.load_cpu
    lines = [
        "",
        "Worker scaling: inbound, conn/s at 64 (-workers N: N processes, one listener each "
        "with SO_REUSEPORT;",
        f"every proxy process may run on CPUs {pc} and {lc}; the load generator, agent and "
        f"backend stay on CPU {lc}):",
        *table(_worker_columns(pc, lc), data),
    ]
    by = {r["key"]: r for r in data}
    for engine in dict.fromkeys(e for e, _ in by):
        lines += _scaling(engine, by.get((engine, 1)), by.get((engine, 2)))
    return lines


# -- the cost of metrics and the access log ------------------------------------------------


def _observe_rows(n: str, r: dict[str, Any], load_cpu: int | None) -> list[Row]:
    """One row per variant of an observe scenario (`on`, `nolog`, `bare`)."""
    return [
        {
            "name": n if i == 0 else "",
            "variant": label,
            "cps": x.get("conn_per_s"),
            "proxy": x.get("proxy_cpu_frac"),
            "us": x.get("proxy_cpu_us_per_conn"),
            "lg": x.get("loadgen_cpu_frac"),
            "harness": x.get("harness_cpu_frac"),
            "load_busy": get(x, "cpu_busy", str(load_cpu)),
            "other": x.get("foreign_cpu_frac_max"),
            "log": x.get("access_log_lines_per_conn"),
            "windows": x.get("windows"),
            "errors": x.get("errors", 0),
        }
        for i, (label, x) in enumerate(r["variants"].items())
    ]


def _observe_columns(lc: int | None) -> list[Column]:
    return [
        text("scenario", f"<{NW + 4}", "name"),  # room for `outbound-bare/openssl`
        text("variant", "<8", "variant"),
        num("conn/s64", 9, "cps"),
        num("proxy", 7, "proxy", 2),
        num("µs/conn", 9, "us"),
        num("loadgen", 8, "lg", 2),
        num("harness", 8, "harness", 2),
        Column(f"cpu{lc}", ">6", lambda r: fmt(r["load_busy"], 2)),
        num("other", 6, "other", 2),
        num("log/conn", 9, "log", 2),
        text("windows", ">8", "windows"),
        text("errors", ">7", "errors"),
    ]


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _comparison(c: dict[str, Any]) -> str:
    """One ratio line: conn/s, its spread over the rounds, CPU per connection, and the goal
    (for on / bare only) with whether it was met."""
    line = f"    {c['compared']:<13} conn/s {_x(c['conn_per_s'])}"
    if spread := c.get("rounds"):
        line += f" (rounds {_x(spread[0])}..{_x(spread[1])})"
    line += f", µs/conn {_x(c['us_per_conn'])}, capacity {_x(c['capacity'])}"
    if c.get("goal") is None:
        return line
    line += f"; goal ≥{c['goal']:.2f}x in both: {'yes' if c.get('met') else 'no'}"
    proxy = c.get("proxy_cpu_frac")
    if proxy is not None and proxy < 0.9:
        line += (
            f" (the proxy used only {proxy:.2f} of its core, so its conn/s was held by the "
            "load side: capacity is the better estimate)"
        )
    return line


def _observe(v: View) -> list[str]:
    """Issue 11: on / off per layout, from alternating windows of the same scenario."""
    found = [(n, r) for n, r in v.h.results.items() if kind_of(r) == "observe" and "error" not in r]
    if not found:
        return []
    lc = v.h.load_cpu
    lines = [
        "",
        "Cost of metrics and access log (issue 11: on / bare at least 0.95x in conn/s): conn/s "
        "at 64, windows alternating",
        "between the variants of each scenario, medians (on: as shipped; nolog: "
        "-access-log=false; bare: CONNECT_PROXY_METRICS=off):",
        *table(_observe_columns(lc), [x for n, r in found for x in _observe_rows(n, r, lc)]),
        "  ratios (conn/s: num / den of the medians, rounds: the same per round; µs/conn: num "
        "/ den; capacity: den / num",
        "  of µs/conn, the conn/s a proxy bound by its own CPU keeps):",
    ]
    for n, r in found:
        lines.append(f"  {n}:")
        lines += [_comparison(c) for c in r.get("comparisons", [])]
    for n, r in found:
        lines += [
            f"  WARNING: {n}, {p}: the variant did not run as intended, its figures are "
            "not the cost asked for"
            for p in r.get("switch_problems", [])
        ]
    noisy = [
        n
        for n, r in found
        if any((x.get("foreign_cpu_frac_max") or 0) > 0.1 for x in r["variants"].values())
    ]
    if noisy:
        lines.append(
            "  WARNING: more than 0.1 core of other load during "
            + ", ".join(noisy)
            + ": run again on a quiet machine"
        )
    return lines


# -- who was busy ---------------------------------------------------------------------------


def _busy_columns(h: Outcome, errors: str) -> list[Column]:
    """Who was busy: the columns of both tables (`errors` heads the errors column)."""
    pc, lc = h.proxy_cpu, h.load_cpu
    return [
        SCENARIO,
        num("proxy", 7, "proxy64", 2),
        num("loadgen", 9, "lg64", 2),
        num("agent", 7, "agent64", 2),
        num("backend", 9, "backend64", 2),
        num("other", 7, "foreign64", 2),
        _busy_of(pc, 7, "busy64"),
        _busy_of(lc, 7, "busy64"),
        text(errors, ">8", "errors"),
        Column("bottleneck", "", lambda r: bottleneck(r, pc, lc), pre="  "),
    ]


def _busy64(v: View) -> list[str]:
    title = "Who was busy at concurrency 64 (fraction of one core; CPU busy from /proc/stat):"
    data = [{"name": n, **m} for n, m in v.rows]
    return ["", title, *table(_busy_columns(v.h, "errors"), data)]


def _throughput_row(n: str, tp: dict[str, Any]) -> Row:
    """A throughput run in the columns of the conn/s one (no errors)."""
    return {
        "name": n,
        "proxy64": tp.get("proxy_cpu_frac"),
        "lg64": tp.get("loadgen_cpu_frac"),
        "agent64": get(tp, "other_cpu_frac", "agent"),
        "backend64": get(tp, "other_cpu_frac", "backend"),
        "foreign64": tp.get("foreign_cpu_frac"),
        "busy64": {k: v["busy"] for k, v in (tp.get("cpu_busy") or {}).items()},
        "errors": "",
    }


def _busy_throughput(v: View) -> list[str]:
    data = [
        _throughput_row(n, r["throughput"]) for n, r in v.h.results.items() if r.get("throughput")
    ]
    title = "Who was busy during the throughput run (same columns):"
    return [
        "",
        title,
        *table(_busy_columns(v.h, ""), data),
        "  other = busy CPU time not used by our processes (other programs, kernel work not "
        "charged to a process)",
    ]


def _disturbed(res: dict[str, Any]) -> bool:
    """Whether more than 0.1 core of other load ran during a window of this scenario."""
    return (metrics(res)["foreign_max"] or 0) > 0.1 or (
        get(res, "conn_rate", "64", "foreign_cpu_frac") or 0
    ) > 0.1


def _noisy(v: View) -> list[str]:
    noisy = [n for n, r in v.h.results.items() if "error" not in r and _disturbed(r)]
    if not noisy:
        return []
    return [
        "  WARNING: more than 0.1 core of other load during "
        + ", ".join(noisy)
        + ": those figures are disturbed; run again on a quiet machine"
    ]


# -- the rest -------------------------------------------------------------------------------


def _tls(v: View) -> list[str]:
    tls = {n: r["tls"] for n, r in v.h.results.items() if r.get("tls")}
    if not tls:
        return []
    lines = ["", "TLS negotiated on the load generator's hop:"]
    return lines + [f"  {n:<{NW}}{t['version']} {t['cipher']}" for n, t in tls.items()]


def _go(v: View) -> list[str]:
    go = [r for r in v.h.results.values() if kind_of(r) == "go" and "error" not in r]
    if not go:
        return []
    r = go[0]
    return [
        f"Go reference: GOMAXPROCS={r.get('gomaxprocs')}, pinned to CPU {v.h.proxy_cpu}, "
        f"outbound discovery: {r.get('discovery')}; upstream TLS sessions resumed only "
        "in *-go-resume (Consul's proxy never resumes them, ours does)"
    ]


def _versions(v: View) -> list[str]:
    versions = [f"{k}: {x}" for k, x in v.h.versions.items() if x is not None]
    return ["Versions: " + "; ".join(versions)] if versions else []


def _skipped(v: View) -> list[str]:
    return ["", "Skipped:"] + [f"  {s}" for s in v.h.skipped] if v.h.skipped else []


def _profile(n: str, prof: dict[str, Any]) -> list[str]:
    if "skipped" in prof:
        return ["", f"Profile of {n}: skipped, {prof['skipped']}"]
    lines: list[str] = []
    for proc_name, data in prof.items():
        if "skipped" in data:
            lines += ["", f"Profile of {n}, {proc_name}: skipped, {data['skipped']}"]
            continue
        lines += ["", f"Profile of {n}, {proc_name} (inclusive share of py-spy samples):"]
        lines += [f"  {share:6.1%}  {fn[:110]}" for fn, share in data["top"]]
    return lines


def _profiles(v: View) -> list[str]:
    return [
        x for n, r in v.h.results.items() if r.get("profile") for x in _profile(n, r["profile"])
    ]


def _problems(v: View) -> list[str]:
    problems = {k: x for k, x in v.h.logs.items() if x["problem_lines"]}
    if not problems:
        return []
    lines = ["", "Warnings/errors in process logs:"]
    for k, x in problems.items():
        lines.append(f"  {k}: {x['problem_lines']} line(s), e.g.")
        lines += [f"    {ln[:200]}" for p in x["problems"][:5] for ln in p.splitlines()]
    return lines


def _blank_without_rows(v: View) -> list[str]:
    """An extra blank line before "Who was busy" when no scenario gave figures (the report
    has always been laid out so)."""
    return [] if v.rows else [""]


SECTIONS: tuple[Callable[[View], list[str]], ...] = (
    headline,
    figures,
    vs_baselines,
    vs_references,
    targets,
    _observe,
    _workers,
    _blank_without_rows,
    _busy64,
    _busy_throughput,
    _noisy,
    _tls,
    _go,
    _versions,
    _skipped,
    _profiles,
    _problems,
)


def render(h: Outcome) -> str:
    """The whole report (without the heading line: see `heading`)."""
    shown = [
        (n, metrics(r))
        for n, r in h.results.items()
        if "error" not in r and kind_of(r) not in ("workers", "observe")
    ]
    v = View(h, shown, dict(shown))
    return "\n".join(line for section in SECTIONS for line in section(v))


def heading(info: dict[str, Any]) -> str:
    """The first line: when, on what, which code (`info` is the JSON's `meta`)."""
    sources = info["sources"]
    return (
        f"\nconnect-proxy benchmark, {info['date']}, Python {info['python']}, {info['openssl']}, "
        f"uvloop {info['uvloop']}, proxy on CPU {info['proxy_cpu']}, "
        f"load on CPU {info['load_cpu']} ({info.get('load', 'python')}), "
        f"{'quick' if info['quick'] else 'full'} run in {info['elapsed_s']:g}s, "
        f"code at {sources.get('git_head')}"
        f"{' + local changes' if sources.get('git_changed') else ''}\n"
    )
