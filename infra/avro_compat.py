"""Avro schema compatibility, the rule a Confluent-compatible registry enforces on every new version.

Implements the reader/writer resolution rules of the Avro specification ("Schema Resolution"):
a reader schema can read data written with a writer schema when every field the reader needs is
either written or has a default, types match or promote (int -> long -> float -> double,
string <-> bytes), enums keep the writer's symbols (or the reader has a default), and unions
resolve branch by branch. The registry's levels are built from that one check:
BACKWARD (new reads old), FORWARD (old reads new), FULL (both), their *_TRANSITIVE variants
(against every earlier version, not only the latest) and NONE.
"""

from __future__ import annotations

import json
from typing import Any

from fastavro.schema import SchemaParseException, parse_schema

LEVELS = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
# writer type -> reader types that can read it (Avro spec, "Schema Resolution")
_PROMOTIONS = {
    "int": {"int", "long", "float", "double"},
    "long": {"long", "float", "double"},
    "float": {"float", "double"},
    "string": {"string", "bytes"},
    "bytes": {"bytes", "string"},
}


class InvalidSchema(ValueError):
    """The text is not a valid Avro schema (bad JSON or rejected by fastavro)."""


class ParsedSchema:
    """A parsed Avro schema plus its table of named types (records, enums, fixed by full name)."""

    def __init__(self, text: str) -> None:
        try:
            raw = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise InvalidSchema(f"schema is not valid JSON: {exc}") from exc
        _require_fields(raw)
        try:
            parsed = parse_schema(raw, _write_hint=False)
        except (SchemaParseException, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InvalidSchema(f"invalid Avro schema: {exc}") from exc
        self.text = text
        self.root: Any = parsed
        self.names: dict[str, dict] = {}
        self._collect(parsed)

    def canonical(self) -> str:
        """A stable string for 'is this the same schema' (key order and whitespace do not matter)."""
        return json.dumps(json.loads(self.text), sort_keys=True, separators=(",", ":"))

    def _collect(self, node: Any) -> None:
        if isinstance(node, list):
            for branch in node:
                self._collect(branch)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error", "enum", "fixed") and "name" in node:
                if node["name"] in self.names:
                    return
                self.names[node["name"]] = node
            if kind in ("record", "error"):
                for f in node.get("fields", []):
                    self._collect(f["type"])
            elif kind == "array":
                self._collect(node["items"])
            elif kind == "map":
                self._collect(node["values"])
            elif isinstance(kind, (dict, list)):
                self._collect(kind)

    def resolve(self, node: Any) -> Any:
        """Follow a named reference ('ns.Name') to its definition; unwrap {'type': 'int', ...}."""
        if isinstance(node, str) and node not in _PRIMITIVES:
            if node not in self.names:
                raise InvalidSchema(f"unknown named type {node!r}")
            return self.names[node]
        if isinstance(node, dict) and node.get("type") in _PRIMITIVES:
            return node["type"]  # logical types resolve as their underlying type
        if isinstance(node, dict) and isinstance(node.get("type"), (dict, list)):
            return self.resolve(node["type"])
        return node


def _require_fields(node: Any) -> None:
    """fastavro fills in a missing 'fields' with []; the Avro spec (and Confluent) require it."""
    if isinstance(node, list):
        for branch in node:
            _require_fields(branch)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "error"):
            if not isinstance(node.get("fields"), list):
                raise InvalidSchema(f"record {node.get('name')!r} needs a 'fields' list")
            for f in node["fields"]:
                if isinstance(f, dict):
                    _require_fields(f.get("type"))
        for key in ("items", "values"):
            _require_fields(node.get(key))
        if isinstance(node.get("type"), (dict, list)):
            _require_fields(node["type"])


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _kind(node: Any) -> str:
    if isinstance(node, list):
        return "union"
    if isinstance(node, str):
        return node
    return node["type"]


class _Checker:
    """Collects every reason why `reader` cannot read data written with `writer`."""

    def __init__(self, reader: ParsedSchema, writer: ParsedSchema) -> None:
        self.reader = reader
        self.writer = writer
        self.errors: list[str] = []
        self._assumed: set[tuple[str, str]] = set()  # recursive named types: assume ok on re-entry

    def check(self, r_node: Any, w_node: Any, path: str) -> bool:
        r = self.reader.resolve(r_node)
        w = self.writer.resolve(w_node)
        rk, wk = _kind(r), _kind(w)
        if wk == "union":
            ok = True
            for i, branch in enumerate(w):
                ok = self.check(r, branch, f"{path}/union[{i}]") and ok
            return ok
        if rk == "union":
            for branch in r:
                if self._quiet(branch, w, path):
                    return True
            return self._fail(path, f"no branch of the reader union can read writer type {wk}")
        if wk in _PRIMITIVES:
            if rk in _PROMOTIONS.get(wk, {wk}):
                return True
            return self._fail(path, f"reader type {rk} cannot read writer type {wk}")
        if rk != wk:
            return self._fail(path, f"reader type {rk} cannot read writer type {wk}")
        if rk in ("record", "error", "enum", "fixed"):
            if not self._names_match(r, w):
                return self._fail(path, f"reader name {r['name']} does not match writer name {w['name']}")
        if rk in ("record", "error"):
            key = (r["name"], w["name"])
            if key in self._assumed:
                return True
            self._assumed.add(key)
            return self._record(r, w, path)
        if rk == "enum":
            missing = [s for s in w["symbols"] if s not in r["symbols"]]
            if missing and "default" not in r:
                return self._fail(path, f"reader enum {r['name']} lacks writer symbols {missing} and has no default")
            return True
        if rk == "fixed":
            if r["size"] != w["size"]:
                return self._fail(path, f"fixed size {r['size']} != writer size {w['size']}")
            return True
        if rk == "array":
            return self.check(r["items"], w["items"], f"{path}/items")
        if rk == "map":
            return self.check(r["values"], w["values"], f"{path}/values")
        return self._fail(path, f"unsupported type {rk}")

    def _record(self, r: dict, w: dict, path: str) -> bool:
        written = {f["name"]: f for f in w.get("fields", [])}
        ok = True
        for field in r.get("fields", []):
            names = [field["name"], *field.get("aliases", [])]
            source = next((written[n] for n in names if n in written), None)
            where = f"{path}/{field['name']}"
            if source is None:
                if "default" not in field:
                    ok = self._fail(where, f"reader field {field['name']!r} is not written and has no default")
                continue
            ok = self.check(field["type"], source["type"], where) and ok
        return ok

    def _names_match(self, r: dict, w: dict) -> bool:
        aliases = {_short(a) for a in r.get("aliases", [])}
        return _short(r["name"]) == _short(w["name"]) or _short(w["name"]) in aliases

    def _quiet(self, r_node: Any, w_node: Any, path: str) -> bool:
        saved = list(self.errors)
        ok = self.check(r_node, w_node, path)
        self.errors = saved
        return ok

    def _fail(self, path: str, message: str) -> bool:
        self.errors.append(f"{path or '/'}: {message}")
        return False


def read_errors(reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
    """Why `reader` cannot read what `writer` wrote; an empty list means it can."""
    checker = _Checker(reader, writer)
    checker.check(reader.root, writer.root, "")
    return checker.errors


def compatibility_errors(new: ParsedSchema, existing: list[ParsedSchema], level: str) -> list[str]:
    """Check `new` against the subject's versions (oldest first) under a Confluent compatibility level."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}; choose one of {', '.join(LEVELS)}")
    if level == "NONE" or not existing:
        return []
    against = existing if level.endswith("_TRANSITIVE") else existing[-1:]
    errors: list[str] = []
    for old in against:
        if level.startswith(("BACKWARD", "FULL")):
            errors += [f"BACKWARD: {e}" for e in read_errors(new, old)]
        if level.startswith(("FORWARD", "FULL")):
            errors += [f"FORWARD: {e}" for e in read_errors(old, new)]
    return errors
