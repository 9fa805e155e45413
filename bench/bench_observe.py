"""What the proxy's metrics and access log cost per connection (issue 11: at most 5 % fewer
connections per second): the scenarios `inbound-bare`, `outbound-bare` and `chain-bare`.

Each starts, side by side on the proxy CPU, our proxy of one layout in two or three
variants: `on` (as shipped: metrics and the access log), `bare` (`CONNECT_PROXY_METRICS=off`:
the listeners get no observer at all) and, in the inbound layout only, `nolog`
(`-access-log=false`: metrics without the log line). Then conn/s windows at concurrency 64
alternate between the variants in a balanced order (on, bare, bare, on, ...; with three:
on, nolog, bare, bare, nolog, on, ...), so that a drift of the machine during the scenario
falls on every variant alike, and each variant's figure is the median of its windows.

Rule 1: the variants differ only in the switch under test: same arguments, engine, CPU,
layout and load; in the chain each variant has its own pair of services (`db1`/`web1`,
`db2`/`web2`, ...), since one `web` sidecar would spread its connections over every `db`
sidecar.
Rule 2: every ratio is taken within one scenario, between windows of the same rounds;
nothing here renders (bench_report does), and processes come from `bench_procs`.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench_load import Target, latency
from bench_procs import Proc, Scene
from bench_stage import Stage
from bench_util import free_port, log

METRICS_VAR = "CONNECT_PROXY_METRICS"
GOAL = 0.95  # issue 11: on / off at least this in conn/s
WARMUP_S = 0.5  # one uncounted window per variant before the first counted one


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running the same proxy: `label`, extra arguments and environment."""

    label: str
    what: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


ON = Variant("on", "metrics and access log (as shipped)")
NOLOG = Variant("nolog", "metrics only (-access-log=false)", args=("-access-log=false",))
BARE = Variant("bare", f"neither ({METRICS_VAR}=off: no observer)", env={METRICS_VAR: "off"})
VARIANTS = {"inbound": (ON, NOLOG, BARE), "outbound": (ON, BARE), "chain": (ON, BARE)}
# (numerator, denominator, whether issue 11's goal applies): on/bare is the issue's figure;
# the other two split it into the metrics' and the log line's share.
COMPARISONS = (("on", "bare", True), ("nolog", "bare", False), ("on", "nolog", False))


def schedule(labels: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, label) in a balanced order: the labels forward in even rounds, backward in
    odd ones, so each label's mean position is the same over every two rounds."""
    out: list[tuple[int, str]] = []
    for r in range(rounds):
        out += [(r, x) for x in (labels if r % 2 == 0 else reversed(labels))]
    return out


@dataclass
class Running:
    """One variant started: its proxy processes and where the load generator connects."""

    variant: Variant
    target: Target
    procs: list[Proc]


def _window(res: dict[str, Any], rnd: int) -> dict[str, Any]:
    """What the report and the JSON keep of one conn/s window."""
    busy = {k: v["busy"] for k, v in (res.get("cpu_busy") or {}).items()}
    return {
        "round": rnd,
        "conn_per_s": res["conn_per_s"],
        "connections": res["connections"],
        "errors": res["errors"],
        "first_error": res["first_error"],
        "proxy_cpu_frac": res.get("proxy_cpu_frac"),
        "proxy_cpu_us_per_conn": res.get("proxy_cpu_us_per_conn"),
        "loadgen_cpu_frac": res["loadgen_cpu_frac"],
        "harness_cpu_frac": res["other_cpu_frac"].get("harness"),
        "agent_cpu_frac": res["other_cpu_frac"].get("agent"),
        "cpu_busy": busy,
        "foreign_cpu_frac": res["foreign_cpu_frac"],
        "attempts": res.get("attempts", 1),
    }


def _median(windows: list[dict[str, Any]], key: str) -> float | None:
    values = [w[key] for w in windows if w.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's figures: the median of its windows, each figure on its own."""
    cpus = sorted({c for w in windows for c in w["cpu_busy"]})
    return {
        "windows": len(windows),
        **{
            k: _median(windows, k)
            for k in (
                "conn_per_s",
                "proxy_cpu_frac",
                "proxy_cpu_us_per_conn",
                "loadgen_cpu_frac",
                "harness_cpu_frac",
                "agent_cpu_frac",
            )
        },
        "cpu_busy": {
            c: statistics.median(w["cpu_busy"].get(c, 0.0) for w in windows) for c in cpus
        },
        "foreign_cpu_frac_max": max((w["foreign_cpu_frac"] for w in windows), default=None),
        "connections": sum(w["connections"] for w in windows),
        "errors": sum(w["errors"] for w in windows),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(
    variants: dict[str, dict[str, Any]], windows: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The ratios between variants of one scenario (COMPARISONS, where both ran).

    `conn_per_s` is num / den of the medians, `rounds` the same per round (min, max);
    `us_per_conn` num / den of proxy CPU per connection, `capacity` its inverse: what a
    proxy bound by its own CPU would keep of its conn/s. `met` (for the issue's pair only):
    both conn/s and capacity at least GOAL.
    """
    out: list[dict[str, Any]] = []
    for num, den, goal in COMPARISONS:
        if num not in variants or den not in variants:
            continue
        a, b = variants[num], variants[den]
        per_round = [
            r
            for x, y in zip(windows[num], windows[den], strict=False)
            if (r := _ratio(x["conn_per_s"], y["conn_per_s"])) is not None
        ]
        cps = _ratio(a["conn_per_s"], b["conn_per_s"])
        us = _ratio(a["proxy_cpu_us_per_conn"], b["proxy_cpu_us_per_conn"])
        capacity = 1 / us if us else None
        row: dict[str, Any] = {
            "compared": f"{num} / {den}",
            "conn_per_s": cps,
            "rounds": [min(per_round), max(per_round)] if per_round else None,
            "us_per_conn": us,
            "capacity": capacity,
            "proxy_cpu_frac": a["proxy_cpu_frac"],
            "goal": GOAL if goal else None,
        }
        if goal and cps is not None and capacity is not None:
            row["met"] = cps >= GOAL and capacity >= GOAL
        out.append(row)
    return out


class Observe:
    """The `<layout>-bare` scenarios of a run (one per layout and TLS engine)."""

    def __init__(self, stage: Stage) -> None:
        self.s = stage

    def run(self, layout: str, engine: str | None) -> None:
        name = f"{layout}-bare" if engine is None else f"{layout}-bare/{engine}"
        if not self.s.want(name, "observe", layout):
            return
        with self.s.scenario(name, "observe", layout, engine=engine) as scene:
            running = self._start(scene, name, layout, engine)
            self.s.results[name] = self._alternate(name, running)
            scene.after.append(functools.partial(self._log_lines, name, running))

    # starting the variants

    def _start(self, scene: Scene, name: str, layout: str, engine: str | None) -> list[Running]:
        if layout == "outbound":
            self.s.register_native_db(scene)
        return [
            self._variant(scene, name, layout, engine, i=i, v=v)
            for i, v in enumerate(VARIANTS[layout], 1)
        ]

    def _variant(
        self, scene: Scene, name: str, layout: str, engine: str | None, *, i: int, v: Variant
    ) -> Running:
        s = self.s

        def proxy(suffix: str, args: Sequence[str]) -> Proc:
            label = f"proxy-{name}-{v.label}{suffix}"
            return s.procs.proxy(scene, label, [*args, *v.args], s.agent_addr, engine, env=v.env)

        if layout == "inbound":
            listen = free_port()
            return Running(
                v, Target("127.0.0.1", listen, s.web), [proxy("", s.inbound_args(listen))]
            )
        if layout == "outbound":
            up = free_port()
            return Running(
                v,
                Target("127.0.0.1", up),
                [proxy("", ["-service", "web", "-upstream", f"db:{up}"])],
            )
        db, web = f"db{i}", f"web{i}"
        s.allow(scene, web, db)
        db_side, up = s.register_chain(scene, db, web)
        procs = [proxy("-db", ["-sidecar-for", db]), proxy("-web", ["-sidecar-for", web])]
        s.api.wait_connect_instance(db, db_side)
        return Running(v, Target("127.0.0.1", up), procs)

    # measuring

    def _alternate(self, name: str, running: list[Running]) -> dict[str, Any]:
        bench = self.s.bench
        assert bench is not None, "setup() first"
        uncounted: dict[str, int] = {}
        for r in running:
            latency(r.target, 1, warmup=0)  # end to end once, or fail here
            log(f"{name}: warm-up of {r.variant.label} ({WARMUP_S:g}s at 64, not counted)")
            warm = bench.conn_rate(r.target, r.procs, 64, duration=WARMUP_S)
            uncounted[r.variant.label] = 1 + warm["connections"]
        by = {r.variant.label: r for r in running}
        rounds = getattr(self.s.args, "observe_rounds", None) or 2 * self.s.params.repeats
        order = schedule(list(by), rounds)
        windows: dict[str, list[dict[str, Any]]] = {label: [] for label in by}
        for i, (rnd, label) in enumerate(order, 1):
            r = by[label]
            log(f"{name}: conn/s at 64, {label} (window {i} of {len(order)})")
            res = bench.measured(r.procs, functools.partial(bench.conn_rate, r.target, r.procs, 64))
            windows[label].append(_window(res, rnd))
        variants = {
            label: {
                "what": by[label].variant.what,
                **summarize(ws),
                "warmup_connections": uncounted[label],
            }
            for label, ws in windows.items()
        }
        return {
            "scenario": name,
            "proxy_processes": len(running[0].procs),
            "concurrency": 64,
            "window_s": self.s.params.rate_duration,
            "order": [label for _, label in order],
            "variants": variants,
            "windows": windows,
            "comparisons": compare(variants, windows),
        }

    def _log_lines(self, name: str, running: list[Running]) -> None:
        """After the proxies stopped (every line drained): access-log lines per connection
        and proxy process, per variant (1 when every connection was logged once by each
        process; `on` reads a little over 1: connections still in flight at the end of a
        window are logged but not counted)."""
        res = self.s.results.get(name)
        if res is None or "variants" not in res:
            return
        for r in running:
            figures = res["variants"][r.variant.label]
            lines = sum(p.counted_lines for p in r.procs)
            conns = (figures["connections"] + figures["warmup_connections"]) * len(r.procs)
            per_conn = lines / conns if conns else None
            figures["access_log_lines"] = lines
            figures["access_log_lines_per_conn"] = per_conn
            if per_conn is None:
                continue
            # A switch that did not take effect would make the comparison meaningless.
            logs = r.variant is ON
            if (per_conn < 0.95) if logs else lines > 0:
                res.setdefault("switch_problems", []).append(
                    f"{r.variant.label}: {lines} access-log lines for {conns} connections "
                    f"({per_conn:.2f} per connection and process; expected "
                    f"{'1' if logs else 'none'})"
                )
