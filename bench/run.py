#!/usr/bin/env python3
"""Benchmark of connect-proxy against direct connections (and peers, when installed).

    python bench/run.py [--quick] [--json out.json]

See bench/README.md for what is measured and how. In short: the dev agent, a backend
process (plain and mTLS echo/sink servers) and the load generator run on one CPU; the
proxy process(es) on the other, started for real with `python -m proxy ...`.

This file is the command: options, the heading, the report on stdout and the JSON. The
scenarios are in bench_scenarios.py (the peers and Go in bench_references.py, what they
all stand on in bench_stage.py), process control in bench_procs.py, the measurement
windows in bench_measure.py (py-spy in bench_profile.py), the report in bench_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import re
import shutil
import ssl
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_procs import ENGINE_VAR  # noqa: E402
from bench_report import heading, render  # noqa: E402
from bench_scenarios import Harness  # noqa: E402
from bench_util import log  # noqa: E402


def meta(h: Harness) -> dict[str, Any]:
    """The JSON's `meta`: when, on what machine and software, with which parameters."""
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = None
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": uv,
        "kernel": platform.release(),
        "cpu_model": model,
        "proxy_cpu": h.proxy_cpu,
        "load_cpu": h.load_cpu,
        "quick": bool(h.args.quick),
        "params": asdict(h.params),
        "elapsed_s": round(h.elapsed, 1),
        "machine_busy_before": h.busy_before,
        "waited_for_quiet_s": round(h.bench.waited, 1) if h.bench else None,
        "sources": h.sources,
        "engines": h.engines,
        "versions": h.versions,
        "load": h.load,
    }


def _engines(value: str) -> list[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in names if not re.fullmatch(r"[a-z0-9_]+", x)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"engine names are lowercase words, got {value!r}")
    return list(dict.fromkeys(names))


def parser() -> argparse.ArgumentParser:
    """The command line (bench/README.md documents every option)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--clients", type=int, default=0, help="load-generator processes (default 2)"
    )
    parser.add_argument(
        "--load",
        choices=("go", "python"),
        default=None,
        help="the load side of the conn/s, RTT and throughput windows: go (bench/goload, "
        "compiled at run time; the default when `go` is on PATH) or python (a multiprocessing "
        "pool of uvloop clients)",
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="at most this long in all to wait for other load on the machine to stop "
        "(default 180, 20 with --quick; 0: never wait)",
    )
    parser.add_argument(
        "--engine",
        type=_engines,
        default=None,
        metavar="LIST",
        help=f"run our proxy's scenarios once per TLS engine, e.g. ssl,openssl ({ENGINE_VAR} "
        "passed to the proxy processes; names get a /ENGINE suffix). Default: the variable "
        "is not set",
    )
    parser.add_argument(
        "--only",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        metavar="LIST",
        help="run only these scenarios: names (inbound, chain-go, inbound-w2, inbound-bare, "
        "...), layouts (inbound, outbound, chain) or kinds (direct, ours, peers, go, workers, "
        "observe)",
    )
    parser.add_argument(
        "--observe-rounds",
        type=int,
        default=None,
        metavar="N",
        help="rounds of the on/bare comparison (kind observe): each variant gets N conn/s "
        "windows in alternating order (default: 2 x the repetitions, 6; 2 with --quick)",
    )
    parser.add_argument(
        "--go-maxprocs",
        type=int,
        default=1,
        metavar="N",
        help="GOMAXPROCS of the Go reference proxy (default 1: one core, as our proxy)",
    )
    parser.add_argument(
        "--go-discovery",
        choices=("watch", "per-conn"),
        default="watch",
        help="outbound upstream discovery of the Go reference proxy: one blocking watch "
        "(default, as our proxy) or one health query per connection (as Consul's proxy)",
    )
    parser.add_argument(
        "--go-session-cache",
        choices=("off", "on", "both"),
        default="both",
        help="TLS session resumption on the Go reference proxy's upstream dials: off (as "
        "Consul's proxy), on (as ours), or both: outbound-go and chain-go, then "
        "outbound-go-resume and chain-go-resume (default)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after the conn/s runs of each scenario of ours, one more run at concurrency 64 "
        "(not counted) with py-spy sampling every proxy process; raw stacks go to DIR, the "
        "top functions into the report",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.load == "go" and shutil.which("go") is None:
        parser().error("--load go needs `go` on PATH (apt-get install golang-go)")
    h = Harness(args)
    try:
        h.run()
    except KeyboardInterrupt:
        log("interrupted; every process stopped")
        return 130
    report = render(h)
    info = meta(h)
    print(heading(info))
    print(report)
    if args.json:
        data = {"meta": info, "scenarios": h.results, "skipped": h.skipped, "process_logs": h.logs}
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"\nJSON written to {args.json}")
    failed = [n for n, r in h.results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
