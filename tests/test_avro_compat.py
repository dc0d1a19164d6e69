"""The registry's compatibility rule (infra/schema_registry.py): Confluent's levels built on the `avro` library's
reader/writer resolution check, level by level, on the cases the Avro specification names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.schema_registry import (
    InvalidSchema,
    ParsedSchema,
    RegistryError,
    SchemaStore,
    compatibility_errors,
    read_errors,
)


def record(*fields: dict, name: str = "R", **extra: object) -> ParsedSchema:
    return ParsedSchema(json.dumps({"type": "record", "name": name, "namespace": "t", "fields": list(fields), **extra}))


def f(name: str, type_: object, **extra: object) -> dict:
    return {"name": name, "type": type_, **extra}


def test_identical_schemas_are_compatible_both_ways() -> None:
    a = record(f("id", "string"), f("n", "int"))
    assert read_errors(a, a) == []
    assert compatibility_errors(a, [a], "FULL_TRANSITIVE") == []


def test_added_field_needs_a_default_for_backward() -> None:
    old = record(f("id", "string"))
    assert compatibility_errors(record(f("id", "string"), f("x", "int", default=0)), [old], "BACKWARD") == []
    errors = compatibility_errors(record(f("id", "string"), f("x", "int")), [old], "BACKWARD")
    assert errors == ["BACKWARD: reader_field_missing_default_value: x (at /fields/1)"]


def test_removed_field_breaks_forward_only_without_default() -> None:
    old = record(f("id", "string"), f("x", "int"))
    new = record(f("id", "string"))
    assert compatibility_errors(new, [old], "BACKWARD") == []
    assert compatibility_errors(new, [old], "FORWARD") != []
    assert compatibility_errors(new, [record(f("id", "string"), f("x", "int", default=1))], "FULL") == []


@pytest.mark.parametrize(
    ("writer", "reader", "ok"),
    [("int", "long", True), ("int", "double", True), ("long", "float", True), ("float", "double", True),
     ("string", "bytes", True), ("bytes", "string", True), ("long", "int", False), ("double", "float", False),
     ("string", "int", False), ("boolean", "int", False)],
)
def test_primitive_promotions(writer: str, reader: str, ok: bool) -> None:
    assert (read_errors(record(f("v", reader)), record(f("v", writer))) == []) is ok


def test_unions_resolve_branch_by_branch() -> None:
    nullable = record(f("v", ["null", "string"], default=None))
    plain = record(f("v", "string"))
    assert read_errors(nullable, plain) == []  # reader union has a branch for the writer's type
    assert read_errors(plain, nullable) != []  # writer may write null, reader cannot take it
    assert read_errors(record(f("v", ["null", "long"], default=None)), record(f("v", ["null", "int"], default=None))) == []


def test_enum_symbols_and_default() -> None:
    def enum(symbols: list[str], **extra: object) -> ParsedSchema:
        return record(f("e", {"type": "enum", "name": "E", "symbols": symbols, **extra}))

    assert read_errors(enum(["A", "B", "C"]), enum(["A", "B"])) == []
    assert read_errors(enum(["A"]), enum(["A", "B"])) == ["missing_enum_symbols: {'B'} (at /fields/0/type/symbols)"]
    assert read_errors(enum(["A", "U"], default="U"), enum(["A", "B"])) == []


def test_record_names_must_match_unless_aliased_by_full_name() -> None:
    assert read_errors(record(f("id", "string"), name="S"), record(f("id", "string"), name="R")) != []
    assert read_errors(record(f("id", "string"), name="S", aliases=["t.R"]), record(f("id", "string"), name="R")) == []
    # the library compares aliases with the writer's full name: an unqualified alias is not resolved against the
    # namespace as the Avro specification says (docs/STACK.md, the registry paragraph)
    assert read_errors(record(f("id", "string"), name="S", aliases=["R"]), record(f("id", "string"), name="R")) != []


def test_field_alias_reads_a_renamed_field() -> None:
    assert read_errors(record(f("user", "string", aliases=["uid"])), record(f("uid", "string"))) == []


def test_arrays_maps_fixed_and_logical_types() -> None:
    assert read_errors(record(f("a", {"type": "array", "items": "long"})), record(f("a", {"type": "array", "items": "int"}))) == []
    assert read_errors(record(f("m", {"type": "map", "values": "int"})), record(f("m", {"type": "map", "values": "string"}))) != []
    fixed = lambda n: record(f("x", {"type": "fixed", "name": "F", "size": n}))  # noqa: E731
    assert read_errors(fixed(4), fixed(4)) == [] and read_errors(fixed(4), fixed(8)) != []
    ts = record(f("t", {"type": "long", "logicalType": "timestamp-millis"}))
    assert read_errors(ts, record(f("t", "long"))) == []


def test_recursive_types_terminate() -> None:
    node = {"type": "record", "name": "Node", "fields": [f("next", ["null", "Node"], default=None)]}
    a = ParsedSchema(json.dumps(node))
    assert read_errors(a, a) == []


def test_transitive_checks_every_version_plain_only_the_latest() -> None:
    v1 = record(f("id", "string"), f("x", "int"))
    v2 = record(f("id", "string"), f("x", "int"), f("y", "int", default=0))
    v3 = record(f("id", "string"), f("y", "int", default=0))  # drops x: old v1 readers break FORWARD
    assert compatibility_errors(v3, [v1, v2], "FORWARD") != []
    v3b = record(f("id", "string"), f("x", "int"), f("y", "int", default=0), f("z", "int", default=0))
    assert compatibility_errors(v3b, [v1, v2], "FULL_TRANSITIVE") == []
    # BACKWARD vs BACKWARD_TRANSITIVE: new requires x with a default it does not have in v0
    v0 = record(f("id", "string"))
    v1b = record(f("id", "string"), f("x", "int", default=0))
    v2b = record(f("id", "string"), f("x", "int"))  # reads v1b (x written), not v0 (x missing, no default)
    assert compatibility_errors(v2b, [v0, v1b], "BACKWARD") == []
    assert compatibility_errors(v2b, [v0, v1b], "BACKWARD_TRANSITIVE") != []


@pytest.mark.parametrize(("level", "accepted"), [("BACKWARD", True), ("BACKWARD_TRANSITIVE", False), ("NONE", True)])
def test_the_store_applies_the_subjects_level_on_register(tmp_path: Path, level: str, accepted: bool) -> None:
    store = SchemaStore(tmp_path / "registry.json", default_level=level)
    v0 = record(f("id", "string"))
    store.register("s", v0)
    store.register("s", record(f("id", "string"), f("x", "int", default=0)))
    later = record(f("id", "string"), f("x", "int"))  # reads v2 (x written) but not v1 (x missing, no default)
    if accepted:
        assert store.register("s", later) == 3
    else:
        with pytest.raises(RegistryError, match="BACKWARD_TRANSITIVE.*reader_field_missing_default_value: x"):
            store.register("s", later)


def test_none_accepts_anything_and_bad_level_is_rejected() -> None:
    assert compatibility_errors(record(f("a", "int")), [record(f("b", "string"))], "NONE") == []
    with pytest.raises(ValueError, match="unknown compatibility level"):
        compatibility_errors(record(f("a", "int")), [], "SIDEWAYS")


@pytest.mark.parametrize(
    "text", ["{not json", '{"type": "record", "name": "R"}', '"no_such_type"', '{"type": 5}', "null"]
)
def test_invalid_schemas_raise(text: str) -> None:
    with pytest.raises(InvalidSchema):
        ParsedSchema(text)
