"""Every schema in schemas/ stays compatible with its released versions (schemas/history/<name>.v<N>.avsc).

The check is by data, through fastavro's schema resolution: sample records that exercise every union
branch, enum symbol, array and map are written with one schema and read with the other. BACKWARD =
data written with each old version is read by the current schema; FORWARD = data written with the
current schema is read by each old version. schemas/history/compatibility.json says which a schema keeps.
The negative cases build breaking variants and assert the check catches them.
"""

from __future__ import annotations

import copy
import io
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
HISTORY = SCHEMA_DIR / "history"
RULES: dict[str, str] = {k: v for k, v in json.loads((HISTORY / "compatibility.json").read_text()).items()
                         if not k.startswith("_")}
PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def current(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def snapshots(name: str) -> list[tuple[int, dict[str, Any]]]:
    found = []
    for path in HISTORY.glob(f"{name}.v*.avsc"):
        match = re.fullmatch(rf"{re.escape(name)}\.v(\d+)\.avsc", path.name)
        if match:
            found.append((int(match.group(1)), json.loads(path.read_text())))
    return sorted(found, key=lambda x: x[0])


def sample_value(t: Any, k: int, named: dict[str, Any]) -> Any:
    """The k-th sample of type t; k cycles through union branches, enum symbols and collection sizes."""
    if isinstance(t, str):
        if t in named:
            return sample_value(named[t], k, named)
        return {
            "null": None, "boolean": k % 2 == 0, "int": k * 7 - 3, "long": 1_700_000_000_000 + k * 1009,
            "float": k + 0.5, "double": k / 4, "bytes": bytes(range(k % 5)), "string": f"s{k}-é",
        }[t]
    if isinstance(t, list):
        return sample_value(t[k % len(t)], k // len(t) + k, named)
    kind = t["type"]
    if kind == "record":
        return {f["name"]: sample_value(f["type"], k + i, named) for i, f in enumerate(t["fields"])}
    if kind == "enum":
        return t["symbols"][k % len(t["symbols"])]
    if kind == "array":
        return [sample_value(t["items"], k + i, named) for i in range(k % 3)]
    if kind == "map":
        return {f"key{i}": sample_value(t["values"], k + i, named) for i in range(k % 3)}
    if kind == "fixed":
        return bytes([k % 256]) * t["size"]
    return sample_value(kind, k, named)  # a primitive with attributes (logical types)


def _cycle_length(t: Any, named: dict[str, Any], seen: set[str]) -> int:
    """How many samples it takes to visit every union branch and enum symbol at least once (an upper bound)."""
    if isinstance(t, str):
        if t in named and t not in seen:
            return _cycle_length(named[t], named, seen | {t})
        return 1
    if isinstance(t, list):
        return len(t) * max(_cycle_length(b, named, seen) for b in t)
    if t["type"] == "record":
        return max([_cycle_length(f["type"], named, seen) for f in t["fields"]] + [1])
    if t["type"] == "enum":
        return len(t["symbols"])
    if t["type"] in ("array", "map"):
        return 3 * _cycle_length(t.get("items", t.get("values")), named, seen)
    return 1


def samples(schema: dict[str, Any]) -> list[dict[str, Any]]:
    parsed = fastavro.parse_schema(copy.deepcopy(schema))
    named = parsed["__named_schemas"]
    n = _cycle_length(parsed, named, set()) + 3
    return [sample_value(parsed, k, named) for k in range(n)]


def _normal(value: Any) -> Any:
    if isinstance(value, datetime):
        return round(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)  # float32 fields
    return value


def read_problems(writer: dict[str, Any], reader: dict[str, Any], label: str) -> list[str]:
    """Write samples with `writer`, read them with `reader`; each failure or changed value is a problem."""
    w = fastavro.parse_schema(copy.deepcopy(writer))
    r = fastavro.parse_schema(copy.deepcopy(reader))
    reader_fields = {f["name"]: f for f in reader["fields"]}
    problems = []
    for k, record in enumerate(samples(writer)):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, w, record)
        buffer.seek(0)
        try:
            got = fastavro.schemaless_reader(buffer, w, r)
        except Exception as exc:  # SchemaResolutionError and friends
            problems.append(f"{label}: sample {k} cannot be read: {exc.__class__.__name__}: {exc}")
            continue
        for name, field in reader_fields.items():
            if name in record:
                # same-named fields must carry the value across (unless an enum default absorbed a symbol)
                if _normal(got[name]) != _normal(record[name]) and not _enum_default_applied(field, got[name]):
                    problems.append(f"{label}: sample {k} field {name}: wrote {record[name]!r}, read {got[name]!r}")
            elif _normal(got[name]) != _normal(field.get("default")):
                problems.append(f"{label}: sample {k} field {name} missing in writer, read {got[name]!r} not the default")
    return problems


def _enum_default_applied(field: dict[str, Any], value: Any) -> bool:
    t = field["type"]
    return isinstance(t, dict) and t.get("type") == "enum" and value == t.get("default")


def compatibility_problems(rule: str, schema: dict[str, Any], history: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """Problems of `schema` against the snapshots under a registry rule (BACKWARD / FORWARD / FULL[_TRANSITIVE])."""
    against = history if rule.endswith("_TRANSITIVE") else history[-1:]
    base = rule.removesuffix("_TRANSITIVE")
    problems = []
    for version, old in against:
        if base in ("BACKWARD", "FULL"):
            problems += read_problems(old, schema, f"BACKWARD v{version}")
        if base in ("FORWARD", "FULL"):
            problems += read_problems(schema, old, f"FORWARD v{version}")
    return problems


SCHEMAS = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))


def test_every_schema_has_a_snapshot_and_a_rule() -> None:
    assert SCHEMAS, "no schemas found"
    for name in SCHEMAS:
        assert snapshots(name), f"schemas/history has no {name}.v1.avsc: snapshot every released schema"
        assert RULES.get(name) in {"BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
                                   "FULL", "FULL_TRANSITIVE"}, f"compatibility.json has no valid rule for {name}"


@pytest.mark.parametrize("name", SCHEMAS)
def test_current_schema_keeps_its_rule(name: str) -> None:
    assert compatibility_problems(RULES[name], current(name), snapshots(name)) == []


@pytest.mark.parametrize("name", SCHEMAS)
def test_samples_visit_every_enum_symbol_and_union_branch(name: str) -> None:
    schema = current(name)
    records = samples(schema)
    for field in schema["fields"]:
        t = field["type"]
        if isinstance(t, dict) and t["type"] == "enum":
            assert {r[field["name"]] for r in records} == set(t["symbols"])
        if isinstance(t, list):
            assert any(r[field["name"]] is None for r in records) == ("null" in t)
            assert any(r[field["name"]] is not None for r in records)


def _with_field(schema: dict[str, Any], field: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    out["fields"].append(field)
    return out


@pytest.mark.parametrize("name", SCHEMAS)
def test_adding_a_required_field_breaks_backward(name: str) -> None:
    broken = _with_field(current(name), {"name": "new_required", "type": "string"})
    problems = compatibility_problems("BACKWARD", broken, snapshots(name))
    assert problems and all(p.startswith("BACKWARD") for p in problems)
    assert "new_required" in problems[0]


@pytest.mark.parametrize("name", SCHEMAS)
def test_adding_an_optional_field_keeps_full(name: str) -> None:
    fine = _with_field(current(name), {"name": "note", "type": ["null", "string"], "default": None})
    assert compatibility_problems("FULL_TRANSITIVE", fine, snapshots(name)) == []


@pytest.mark.parametrize("name", SCHEMAS)
def test_removing_a_required_field_breaks_forward(name: str) -> None:
    broken = copy.deepcopy(current(name))
    victim = next(f for f in broken["fields"] if "default" not in f)
    broken["fields"].remove(victim)
    assert compatibility_problems("BACKWARD", broken, snapshots(name)) == []  # new readers ignore it
    problems = compatibility_problems("FORWARD", broken, snapshots(name))
    assert problems and victim["name"] in problems[0]


@pytest.mark.parametrize("name", SCHEMAS)
def test_changing_a_field_type_breaks_both(name: str) -> None:
    broken = copy.deepcopy(current(name))
    victim = next(f for f in broken["fields"] if f["type"] == "string")
    victim["type"] = "int"
    assert compatibility_problems("BACKWARD", broken, snapshots(name))
    assert compatibility_problems("FORWARD", broken, snapshots(name))


def test_dropping_an_enum_symbol_without_a_default_breaks_backward() -> None:
    broken = copy.deepcopy(current("user_event"))
    action = next(f for f in broken["fields"] if f["name"] == "action")
    action["type"]["symbols"].remove("SHARE")
    action["type"].pop("default")
    problems = compatibility_problems("BACKWARD", broken, snapshots("user_event"))
    assert any("SHARE" in p for p in problems)


def test_dropping_an_enum_symbol_with_a_default_reads_as_the_default() -> None:
    # ActionType declares default UNKNOWN, so readers without a symbol map it there (Avro spec): compatible.
    changed = copy.deepcopy(current("user_event"))
    action = next(f for f in changed["fields"] if f["name"] == "action")
    action["type"]["symbols"].remove("SHARE")
    assert compatibility_problems("BACKWARD", changed, snapshots("user_event")) == []


def test_a_type_promotion_is_backward_but_not_forward() -> None:
    # float -> double: new readers promote old floats; old float readers cannot read doubles.
    promoted = copy.deepcopy(current("user_event"))
    rating = next(f for f in promoted["fields"] if f["name"] == "rating")
    rating["type"] = ["null", "double"]
    assert compatibility_problems("BACKWARD", promoted, snapshots("user_event")) == []
    assert compatibility_problems("FULL", promoted, snapshots("user_event"))
