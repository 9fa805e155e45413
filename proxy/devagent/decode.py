"""Decode Consul's request bodies and config-file blocks into canonical CamelCase dicts.

Consul accepts `DestinationName`, `destinationname` and `destination_name` alike (Go's JSON
decoder matches field names case-insensitively, and the agent translates snake_case keys).
This module does the same, driven by small schemas, so the rest of the agent only ever sees
canonical field names. Maps that belong to the user (`Meta`, `Config`, `Header`, ...) are
copied as they are: their keys are data, not field names.

The schemas themselves (the shapes of Consul's bodies and blocks) are in
`proxy.devagent.schemas`.

Rule 1: pure functions over JSON values; no I/O, no agent state.
Rule 2: a value of the wrong JSON type is an error naming the field and the Go type Consul
would have reported, never silently coerced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from proxy.goflags import parse_duration

# A field kind is a scalar tag, a nested schema, or a list or string-keyed map of one of those.
Kind = Union[str, "Schema", "ListOf", "MapOf"]


@dataclass(frozen=True, slots=True)
class Schema:
    """A Go struct: its name (for error texts) and its fields."""

    name: str
    fields: Mapping[str, Kind]
    aliases: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Kind


@dataclass(frozen=True, slots=True)
class MapOf:
    """A Go `map[string]T`: the keys are data, kept as sent; the values are decoded as T."""

    item: Kind


class DecodeError(ValueError):
    """A body or config block that does not fit the schema."""


_GO_TYPES = {
    "str": "string",
    "int": "int",
    "bool": "bool",
    "raw": "map[string]interface {}",
    "any": "interface {}",
    "strmap": "map[string]string",
    "duration": "time.Duration",
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _go_type(kind: Kind) -> str:
    if isinstance(kind, Schema):
        return f"structs.{kind.name}"
    if isinstance(kind, ListOf):
        return "[]" + _go_type(kind.item)
    if isinstance(kind, MapOf):
        return "map[string]" + _go_type(kind.item)
    return _GO_TYPES.get(kind, kind)


def _fold(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _mismatch(value: object, kind: Kind, path: str) -> DecodeError:
    return DecodeError(
        f"json: cannot unmarshal {_json_type(value)} into Go struct field {path} "
        f"of type {_go_type(kind)}"
    )


def _decode_value(value: Any, kind: Kind, path: str, unknown: list[str]) -> Any:
    if value is None:
        return None
    if (isinstance(kind, Schema) or kind == "raw") and (
        isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
    ):
        value = value[0]  # an HCL block written once
    if isinstance(kind, Schema):
        if not isinstance(value, dict):
            raise _mismatch(value, kind, path)
        return decode(value, kind, unknown=unknown, _path=path)
    if isinstance(kind, ListOf):
        # HCL blocks written once arrive as a single object where a list is expected.
        items = value if isinstance(value, list) else [value]
        if not isinstance(value, list) and not isinstance(kind.item, Schema):
            raise _mismatch(value, kind, path)
        return [_decode_value(v, kind.item, path, unknown) for v in items]
    if isinstance(kind, MapOf):
        if not isinstance(value, dict):
            raise _mismatch(value, kind, path)
        return {k: _decode_value(v, kind.item, path, unknown) for k, v in value.items()}
    if kind == "str":
        if not isinstance(value, str):
            raise _mismatch(value, kind, path)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _mismatch(value, kind, path)
        # Go's int is 64 bits: a number beyond it is refused, not stored as a Python bigint.
        if (isinstance(value, float) and not value.is_integer()) or not (
            -(1 << 63) <= value < 1 << 63
        ):
            raise DecodeError(
                f"json: cannot unmarshal number {value} into Go struct field {path} of type int"
            )
        return int(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise _mismatch(value, kind, path)
        return value
    if kind == "raw":
        if not isinstance(value, dict):
            raise _mismatch(value, kind, path)
        return value
    if kind == "strmap":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _mismatch(value, kind, path)
        return dict(value)
    if kind == "duration":
        # Consul takes "10s"-style strings, or a number of nanoseconds.
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _mismatch(value, kind, path)
        return value
    return value  # "any"


def decode(
    body: Mapping[str, Any],
    schema: Schema,
    *,
    unknown: list[str] | None = None,
    _path: str | None = None,
) -> dict[str, Any]:
    """Map `body`'s keys onto `schema`'s canonical names, recursively.

    Args:
        body: a decoded JSON object.
        schema: the struct it should be.
        unknown: if given, dotted paths of keys the schema does not know are appended to it
            (a config file treats them as errors; the HTTP API ignores them, as Consul does).

    Returns:
        A new dict with canonical keys; fields absent from `body` are absent from it.

    Raises:
        DecodeError: a field holds a JSON value of the wrong type.
    """
    path = _path or schema.name
    index = {_fold(name): name for name in schema.fields}
    for alias, target in (schema.aliases or {}).items():
        index[_fold(alias)] = target
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = index.get(_fold(key))
        if name is None:
            if unknown is not None:
                unknown.append(f"{path}.{key}")
            continue
        out[name] = _decode_value(
            value, schema.fields[name], f"{path}.{name}", [] if unknown is None else unknown
        )
    return out


def duration_seconds(value: object, field: str) -> float:
    """A duration field of a definition: a Go duration string, or nanoseconds as a number.

    Raises:
        DecodeError: neither.
    """
    if isinstance(value, bool):
        raise DecodeError(f"{field}: invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise DecodeError(f"{field}: {exc}") from exc
    raise DecodeError(f"{field}: invalid duration {value!r}")


def _from_hcl(value: Any) -> Any:
    if isinstance(value, dict):
        return {_from_hcl(k): _from_hcl(v) for k, v in value.items() if k != "__is_block__"}
    if isinstance(value, list):
        items = [_from_hcl(v) for v in value]
        # A block written once (`connect { ... }`) is an object in Consul's JSON form.
        if len(value) == 1 and isinstance(value[0], dict) and value[0].get("__is_block__"):
            return items[0]
        return items
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value[1:-1]
    return value


def load_hcl(text: str) -> Any:
    """Parse HCL into the JSON shape Consul would see (quotes and block markers removed).

    Raises:
        ValueError: the text is not HCL.
    """
    import hcl2

    try:
        parsed = hcl2.loads(text)
    except Exception as exc:
        raise ValueError(
            str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        ) from exc
    return _from_hcl(parsed)
