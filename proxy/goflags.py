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

Rule 1: pure; no I/O. Values are strings (or bools); the caller converts them.
"""

from __future__ import annotations

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
