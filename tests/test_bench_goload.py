"""The pure parts of the benchmark's compiled load side: reading goload's output, and the
report's verdict on whether the proxy reached its core (bench/ itself is not collected)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_figures  # noqa: E402
import bench_goload  # noqa: E402


def test_result_line_is_parsed() -> None:
    lines = ["READY mode=connrate gomaxprocs=1", 'RESULT {"count": 12, "errors": 0}']
    assert bench_goload.parse_result(lines) == {"count": 12, "errors": 0}


def test_the_last_result_line_counts() -> None:
    lines = ['RESULT {"count": 1}', "noise", 'RESULT {"count": 2}']
    assert bench_goload.parse_result(lines)["count"] == 2


def test_missing_result_quotes_the_output() -> None:
    lines = ["READY mode=rtt gomaxprocs=1", "[ERROR] goload: read: connection reset by peer"]
    with pytest.raises(RuntimeError, match=r"no RESULT line.*connection reset by peer"):
        bench_goload.parse_result(lines)


@pytest.mark.parametrize(
    ("line", "why"),
    [("RESULT {not json", "not JSON"), ("RESULT [1, 2]", "not a JSON object")],
)
def test_bad_result_line_is_named(line: str, why: str) -> None:
    with pytest.raises(RuntimeError, match=why):
        bench_goload.parse_result([line])


def test_material_line_is_one_line() -> None:
    from bench_load import Target
    from bench_util import TLSMaterial

    mat = TLSMaterial("-----CERT-----\nA\n", "-----KEY-----\nB\n", "-----ROOTS-----\nC\n")
    line = bench_goload.material_line(Target("127.0.0.1", 1, mat))
    assert line.endswith("\n") and line.count("\n") == 1
    assert bench_goload.material_line(Target("127.0.0.1", 1)) == "{}\n"


def test_core_share_verdict_names_every_run_under_the_goal() -> None:
    res = {
        "conn_rate": {
            "16": {"proxy_cpu_frac": 0.97, "all_proxy_cpu_frac": [0.97, 0.96, 0.99]},
            "64": {"proxy_cpu_frac": 0.96, "all_proxy_cpu_frac": [0.91, 0.96, 0.98]},
        }
    }
    assert bench_figures._reached(res) == "NO: 0.91 at 64 (conn/s is a lower bound)"
    res["conn_rate"]["64"]["all_proxy_cpu_frac"] = [0.95, 0.99]
    assert bench_figures._reached(res) == "yes"
    # a result of a run before all_proxy_cpu_frac existed: the median's share alone
    assert bench_figures._reached({"conn_rate": {"64": {"proxy_cpu_frac": 0.5}}}).startswith(
        "NO: 0.50 at 64"
    )
