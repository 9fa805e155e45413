"""Tables of the benchmark's report, rendered from data: a list of `Column`s (heading,
format, how to get the cell from a row) and a list of rows (dicts).

Rule 1: pure text formatting; nothing here knows what a figure means.
Rule 2: columns only place and format values: the sections compute their rows (ratios,
notes, "-" for a missing figure) before the table is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

NW = 20  # width of the scenario column

Row = dict[str, Any]


# -- cells ----------------------------------------------------------------------------------


def get(d: Any, *keys: str) -> Any:
    """`d[k1][k2]...`, or None where a key or a dict is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def fmt(v: Any, digits: int = 0) -> str:
    """A number with `digits` decimals and thousands separators; "-" for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float | int):
        return f"{v:,.{digits}f}"
    return str(v)


def ratio(a: Any, b: Any) -> str:
    """`a / b` as "1.23x"; "-" when either is missing or zero."""
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


# -- tables ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its heading (and unit line), the format spec of its cells (`>9`: right
    in 9, `<20`: left in 20, "": as is), `pre` printed before it, and its cell of a row."""

    head: str
    spec: str
    cell: Callable[[Row], Any]
    unit: str = ""
    pre: str = ""


def text(head: str, spec: str, key: str, pre: str = "") -> Column:
    """A cell printed as it is in the row (a string, or an int in `spec`)."""
    return Column(head, spec, lambda r: r[key], pre=pre)


def num(head: str, width: int, key: str, digits: int = 0, unit: str = "") -> Column:
    """A number with `digits` decimals and thousands separators, right in `width` ("-" for
    none)."""
    return Column(head, f">{width}", lambda r: fmt(r[key], digits), unit=unit)


def header(columns: Sequence[Column], indent: str = "") -> list[str]:
    """The heading line, and the unit line when a column has a unit."""
    lines = [indent + "".join(c.pre + format(c.head, c.spec) for c in columns)]
    if any(c.unit for c in columns):
        lines.append((indent + "".join(c.pre + format(c.unit, c.spec) for c in columns)).rstrip())
    return lines


def rows(columns: Sequence[Column], data: Iterable[Row], indent: str = "") -> list[str]:
    """One line per row."""
    return [indent + "".join(c.pre + format(c.cell(r), c.spec) for c in columns) for r in data]


def table(columns: Sequence[Column], data: Iterable[Row], indent: str = "") -> list[str]:
    """The heading line(s), then one line per row."""
    return header(columns, indent) + rows(columns, data, indent)


SCENARIO = text("scenario", f"<{NW}", "name")
