"""streams/avro_codegen.py writes exactly the bytes fastavro writes, and fails where fastavro fails."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.avro_codegen import compile_encoder, zigzag
from streams.serde import load_schema

SCHEMAS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "schemas").glob("*.avsc"))


def reference(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def strategy(t: Any, named: dict[str, Any]) -> st.SearchStrategy:
    """Values of Avro type t, edge cases included (unicode, extreme longs, float32 values, empty maps)."""
    if isinstance(t, str) and t in named:
        return strategy(named[t], named)
    if isinstance(t, list):
        return st.one_of(*[strategy(b, named) for b in t])
    name = t if isinstance(t, str) else t["type"]
    simple = {
        "null": st.none(), "boolean": st.booleans(), "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(-(2**63), 2**63 - 1), "float": st.floats(width=32, allow_nan=False),
        "double": st.floats(allow_nan=False), "bytes": st.binary(max_size=20), "string": st.text(max_size=20),
    }
    if name in simple:
        return simple[name]
    if name == "enum":
        return st.sampled_from(t["symbols"])
    if name == "array":
        return st.lists(strategy(t["items"], named), max_size=4)
    if name == "map":
        return st.dictionaries(st.text(max_size=8), strategy(t["values"], named), max_size=4)
    if name == "record":
        required = {f["name"]: strategy(f["type"], named) for f in t["fields"] if "default" not in f}
        optional = {f["name"]: strategy(f["type"], named) for f in t["fields"] if "default" in f}
        return st.fixed_dictionaries(required, optional=optional)
    raise AssertionError(f"no strategy for {name}")


@pytest.mark.parametrize("name", SCHEMAS)
def test_project_schemas_are_compiled(name: str) -> None:
    assert hasattr(compile_encoder(load_schema(name)), "source"), f"{name} fell back to fastavro"


@pytest.mark.parametrize("name", SCHEMAS)
def test_same_bytes_as_fastavro(name: str) -> None:
    schema = load_schema(name)
    encode = compile_encoder(schema)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy(schema, schema["__named_schemas"]))
    def check(record: dict[str, Any]) -> None:
        assert encode(record) == reference(schema, record)

    check()


def test_zigzag_matches_the_spec() -> None:
    # Avro spec table: 0 -> 00, -1 -> 01, 1 -> 02, -2 -> 03, 2 -> 04, -64 -> 7f, 64 -> 80 01
    cases = {0: b"\x00", -1: b"\x01", 1: b"\x02", -2: b"\x03", 2: b"\x04", -64: b"\x7f", 64: b"\x80\x01",
             2**63 - 1: b"\xfe" + b"\xff" * 8 + b"\x01", -(2**63): b"\xff" * 9 + b"\x01"}
    assert {n: zigzag(n) for n in cases} == cases


GOOD = {"event_id": "e", "user_id": "u", "item_id": "i", "action": "RATE", "event_time": 5}


@pytest.mark.parametrize("bad", [
    {k: v for k, v in GOOD.items() if k != "item_id"},  # missing required field
    {**GOOD, "action": "NOPE"},  # unknown enum symbol
    {**GOOD, "user_id": 3},  # wrong type
    {**GOOD, "event_time": "5"},
    {**GOOD, "event_time": 2**63},  # out of long range
    {**GOOD, "context": None},  # null for a map
    {**GOOD, "context": {"k": 1}},
    {**GOOD, "rating": "high"},
])
def test_bad_records_fail_like_fastavro(bad: dict[str, Any]) -> None:
    schema = load_schema("user_event")
    with pytest.raises((ValueError, TypeError, OverflowError)) as expected:
        reference(schema, bad)
    with pytest.raises(expected.type):
        compile_encoder(schema)(bad)


def test_values_only_fastavro_takes_still_encode() -> None:
    schema = load_schema("user_event")
    record = {**GOOD, "event_time": datetime(2024, 1, 1, tzinfo=timezone.utc), "rating": 4}
    assert compile_encoder(schema)(record) == reference(schema, record)


def test_unsupported_unions_fall_back_to_fastavro() -> None:
    schema = fastavro.parse_schema({"type": "record", "name": "U", "fields": [
        {"name": "x", "type": ["null", "string", "long"]}]})
    encode = compile_encoder(schema)
    assert not hasattr(encode, "source")
    for value in (None, "a", 7):
        assert encode({"x": value}) == reference(schema, {"x": value})
