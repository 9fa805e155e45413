"""Command-line parsing with the semantics and messages of Go's `flag` package.

Consul's users call `consul connect proxy -service web -upstream db:9191`; scripts written
for it must work unchanged, errors included. argparse differs in small ways that matter
here (abbreviations, `-flag=value` for single-dash long names, bool values, messages), so
this module reproduces Go's rules:

- `-name value`, `-name=value`, and the same with `--`; a bool flag takes no separate value
  (`-register`, `-register=false`);
- parsing stops at the first non-flag argument, or after `--`;
- errors: `flag provided but not defined: -x`, `flag needs an argument: -x`,
  `invalid value "v" for flag -x: <reason>`, `invalid boolean value "v" for -x: parse error`;
- `-h` and `-help` ask for help.

Also Go's duration syntax (`time.ParseDuration`) and integer syntax (`strconv.ParseInt`
with base 0), which flag values and Consul's config files use.

Rule 1: pure; no I/O. Values are strings (or bools); the caller converts them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class FlagError(ValueError):
    """A command line Go's flag package would refuse, with its message."""


class HelpRequested(Exception):
    """`-h` or `-help` was given."""


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def go_quote(value: str) -> str:
    """Go's %q for a string: double quotes, with backslash escapes (strconv.Quote)."""
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            code = ord(ch)
            out.append(
                f"\\x{code:02x}"
                if code < 0x80
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def parse_bool(value: str) -> bool:
    """strconv.ParseBool."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("parse error")


# -- Go's duration and integer syntax ---------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go duration string (`10s`, `1m30s`, `250ms`, `1.5h`) into seconds.

    As with Go's time.ParseDuration, a bare number is an error unless it is `0`.

    Raises:
        ValueError: not a Go duration.
    """
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(ns: int) -> str:
    """Go's `time.Duration.String()` of `ns` nanoseconds: `0s`, `1.5ms`, `10s`, `24h0m0s`."""
    if ns == 0:
        return "0s"
    sign, u = ("-" if ns < 0 else ""), abs(ns)
    if u < 1_000_000_000:
        for unit, scale, digits in (("ns", 1, 0), ("\u00b5s", 1_000, 3), ("ms", 1_000_000, 6)):
            if u < scale * 1000:
                return sign + _with_fraction(u, scale, digits) + unit
    secs = u // 1_000_000_000
    hours, rest = divmod(secs, 3600)
    minutes, _ = divmod(rest, 60)
    seconds = _with_fraction(u - (hours * 3600 + minutes * 60) * 1_000_000_000, 10**9, 9)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{sign}{out}{seconds}s"


def _with_fraction(value: int, scale: int, digits: int) -> str:
    whole, frac = divmod(value, scale)
    if not frac:
        return str(whole)
    return f"{whole}." + f"{frac:0{digits}d}".rstrip("0")


def _underscore_ok(s: str) -> bool:
    """Go's rule for `_` digit separators with base 0: only between digits (or after a
    base prefix such as `0x`)."""
    saw = "^"
    i = 0
    if s[:1] in "+-":
        s = s[1:]
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i, saw = 2, "0"
    for ch in s[i:]:
        if ch.isascii() and ch.isalnum():
            saw = "0"
        elif ch == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
    return saw != "_"


def parse_go_int(text: str) -> int:
    """strconv.ParseInt(text, 0, 64): base from the prefix (0x, 0o, 0b, or a leading 0),
    `_` separators allowed between digits, nothing else (no spaces, one sign at most).

    Raises:
        ValueError: with Go's message (`strconv.ParseInt: parsing "x": invalid syntax`).
    """
    error = ValueError(f"strconv.ParseInt: parsing {go_quote(text)}: invalid syntax")
    body = text
    sign = 1
    if body[:1] in ("+", "-"):
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    if not body:
        raise error
    base = 10
    digits = body
    lowered = body.lower()
    if lowered.startswith(("0x", "0o", "0b")):
        base = {"x": 16, "o": 8, "b": 2}[lowered[1]]
        digits = body[2:]
    elif body[0] == "0" and len(body) > 1:
        base, digits = 8, body[1:]
    allowed = "0123456789abcdef"[:base]
    if "_" in body and not _underscore_ok(body):
        raise error
    digits = digits.replace("_", "")
    if not digits or any(ch.lower() not in allowed for ch in digits):
        raise error
    value = sign * int(digits, base)
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"strconv.ParseInt: parsing {go_quote(text)}: value out of range")
    return value


@dataclass(slots=True)
class Flag:
    name: str
    usage: str
    default: str | bool = ""
    is_bool: bool = False
    # Called with each value as it is parsed (repeatable flags); raising ValueError makes
    # `invalid value "..." for flag -name: <message>`.
    on_value: Callable[[str], None] | None = None


@dataclass(slots=True)
class FlagSet:
    flags: dict[str, Flag] = field(default_factory=dict)

    def string(self, name: str, default: str, usage: str) -> None:
        self.flags[name] = Flag(name, usage, default)

    def boolean(self, name: str, default: bool, usage: str) -> None:
        self.flags[name] = Flag(name, usage, default, is_bool=True)

    def repeated(self, name: str, usage: str, on_value: Callable[[str], None]) -> None:
        self.flags[name] = Flag(name, usage, "", on_value=on_value)

    def parse(self, args: Sequence[str]) -> tuple[dict[str, str | bool], list[str]]:
        """Parse `args`.

        Returns:
            (values of the flags that were set, remaining non-flag arguments)

        Raises:
            FlagError: the message Go would print.
            HelpRequested: `-h` / `-help` (unless defined as a flag).
        """
        values: dict[str, str | bool] = {}
        rest = list(args)
        while rest:
            arg = rest[0]
            if len(arg) < 2 or arg[0] != "-":
                break
            num_minuses = 2 if arg[1] == "-" else 1
            if num_minuses == 2 and len(arg) == 2:
                rest.pop(0)  # "--" ends the flags
                break
            name = arg[num_minuses:]
            if not name or name[0] == "-" or name[0] == "=":
                raise FlagError(f"bad flag syntax: {arg}")
            rest.pop(0)
            has_value = "=" in name
            value = ""
            if has_value:
                name, value = name.split("=", 1)
            flag = self.flags.get(name)
            if flag is None:
                if name in ("h", "help"):
                    raise HelpRequested
                raise FlagError(f"flag provided but not defined: -{name}")
            if flag.is_bool:
                if has_value:
                    try:
                        values[name] = parse_bool(value)
                    except ValueError:
                        raise FlagError(
                            f"invalid boolean value {go_quote(value)} for -{name}: parse error"
                        ) from None
                else:
                    values[name] = True
                continue
            if not has_value:
                if not rest:
                    raise FlagError(f"flag needs an argument: -{name}")
                value = rest.pop(0)
            if flag.on_value is not None:
                try:
                    flag.on_value(value)
                except ValueError as exc:
                    raise FlagError(
                        f"invalid value {go_quote(value)} for flag -{name}: {exc}"
                    ) from None
            values[name] = value
        return values, rest

    def usage(self) -> str:
        """The option list, in Go's layout (name, then the usage text indented below)."""
        lines = []
        for name in sorted(self.flags):
            flag = self.flags[name]
            head = f"  -{name}" + ("" if flag.is_bool else "=<value>")
            lines.append(head)
            lines.append(f"     {flag.usage}")
        return "\n".join(lines)
