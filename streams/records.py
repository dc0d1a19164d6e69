"""Event records from people and files: parse JSON / JSONL / CSV and check them against the Avro schema.

Bad input is reported, never guessed at: a record with a missing required field, an unknown field or a
value of the wrong type raises :class:`RecordError` naming every problem (and the file and line it came
from), so nothing half-valid reaches Kafka. Optional fields (those with a default in the schema) are
filled with their default, so every record we publish is complete.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from streams.serde import load_schema

# which schema each kind of event uses, and which field is its Kafka key (a user's events share a partition)
SCHEMA_FOR_KIND = {"user": "user_event", "item": "item_event"}
KEY_FIELD = {"user_event": "user_id", "item_event": "item_id", "impression": "user_id"}
MAX_REPORTED = 20  # problems listed per file before the rest are only counted


class RecordError(ValueError):
    """One or more records do not fit their schema; ``problems`` lists each as 'where: what'."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        self.total = len(problems) if total is None else total
        more = f"\n  ... and {self.total - len(problems)} more" if self.total > len(problems) else ""
        super().__init__("\n  ".join(["invalid event record(s):", *problems]) + more)


def _branches(field_type: Any) -> list[Any]:
    return list(field_type) if isinstance(field_type, list) else [field_type]


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else t["type"]


def _is_timestamp(t: Any) -> bool:
    return isinstance(t, dict) and t.get("logicalType") in ("timestamp-millis", "timestamp-micros")


def _iso_to_millis(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return round(moment.timestamp() * 1000)


def _coerce(value: Any, field_type: Any, from_text: bool) -> Any:
    """The value converted to what the Avro writer expects, or ValueError saying why it cannot be."""
    branches = _branches(field_type)
    names = [_type_name(t) for t in branches]
    if value is None or (from_text and value == "" and "null" in names):
        if "null" in names:
            return None
        raise ValueError("is empty/null but the field is not nullable")
    errors = []
    for t in (t for t in branches if _type_name(t) != "null"):
        try:
            return _coerce_one(value, t, from_text)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    raise ValueError("; ".join(errors))


def _coerce_one(value: Any, t: Any, from_text: bool) -> Any:
    name = _type_name(t)
    if name == "string":
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if name == "enum":
        symbols = t["symbols"]
        if value not in symbols:
            raise ValueError(f"{value!r} is not one of {', '.join(symbols)}")
        return value
    if name in ("long", "int"):
        if isinstance(value, str) and _is_timestamp(t) and not value.lstrip("-").isdigit():
            try:
                return _iso_to_millis(value)
            except ValueError:
                raise ValueError(f"{value!r} is neither epoch milliseconds nor an ISO-8601 time") from None
        if isinstance(value, str) and from_text:
            value = value.strip()
            if not value.lstrip("-").isdigit():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"expected an integer{' (epoch ms or ISO-8601)' if _is_timestamp(t) else ''}, got {value!r}")
        return value
    if name in ("float", "double"):
        if isinstance(value, str) and from_text:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if name == "map":
        if isinstance(value, str) and from_text:
            value = _json_cell(value, "a JSON object")
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {value!r}")
        return {str(k): _coerce(v, t["values"], False) for k, v in value.items()}
    if name == "array":
        if isinstance(value, str) and from_text:
            value = _json_cell(value, "a JSON list") if value.lstrip().startswith("[") else [
                v for v in value.split("|") if v
            ]
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        return [_coerce(v, t["items"], False) for v in value]
    if name == "boolean":
        if from_text and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    raise TypeError(f"field type {name} is not supported by the event parser")


def _json_cell(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"expected {what}, got {text!r}") from None


def _exact(t: Any) -> Callable[[Any], bool] | None:
    """A check that a value is already exactly what the writer takes (the fast path), or None."""
    branches = _branches(t)
    if len(branches) == 2 and "null" in [_type_name(b) for b in branches]:
        inner = _exact(next(b for b in branches if _type_name(b) != "null"))
        return None if inner is None else (lambda v: v is None or inner(v))
    if len(branches) != 1:
        return None
    name = _type_name(t)
    if name == "string":
        return lambda v: v.__class__ is str
    if name == "enum":
        symbols = frozenset(t["symbols"])
        return lambda v: v.__class__ is str and v in symbols
    if name == "long":
        return lambda v: v.__class__ is int and -(2**63) <= v < 2**63
    if name == "int":
        return lambda v: v.__class__ is int and -(2**31) <= v < 2**31
    if name in ("float", "double"):
        return lambda v: v.__class__ is float
    if name == "map" and _type_name(t["values"]) == "string" and not isinstance(t["values"], list):
        return lambda v: v.__class__ is dict and all(k.__class__ is str and x.__class__ is str for k, x in v.items())
    if name == "array" and _type_name(t["items"]) == "string" and not isinstance(t["items"], list):
        return lambda v: v.__class__ is list and all(x.__class__ is str for x in v)
    return None


@dataclass(frozen=True)
class _Field:
    name: str
    type: Any
    required: bool
    nullable: bool
    default: Callable[[], Any]  # a fresh default value (a new {} / [] each time)
    exact: Callable[[Any], bool] | None


@cache
def _plan(schema_name: str) -> tuple[tuple[_Field, ...], frozenset[str]]:
    fields = []
    for f in load_schema(schema_name)["fields"]:
        default = f.get("default")
        factory = (lambda d=default: json.loads(json.dumps(d))) if isinstance(default, (dict, list)) else (
            lambda d=default: d)
        nullable = "null" in [_type_name(t) for t in _branches(f["type"])]
        fields.append(_Field(f["name"], f["type"], "default" not in f, nullable, factory, _exact(f["type"])))
    return tuple(fields), frozenset(f.name for f in fields)


def validate_record(schema_name: str, record: Any, where: str = "", from_text: bool = False) -> dict[str, Any]:
    """The record, complete (defaults filled) and typed for the Avro writer; RecordError lists every problem.

    ``from_text`` (CSV cells) lets numbers, lists and maps arrive as strings.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(record, dict):
        raise RecordError([f"{prefix}expected a JSON object, got {type(record).__name__}"])
    fields, known = _plan(schema_name)
    problems = []
    missing = [f.name for f in fields if f.required and (
        f.name not in record or (from_text and record[f.name] == "" and not f.nullable))]
    if missing:  # an empty CSV cell for a required field is as missing as an absent column
        problems.append(f"{prefix}missing required field(s) {', '.join(missing)} (schema {schema_name})")
    if not known.issuperset(record):
        unknown = sorted(set(record) - known)
        problems.append(f"{prefix}unknown field(s) {', '.join(unknown)}; {schema_name} has "
                        f"{', '.join(f.name for f in fields)}")
    out: dict[str, Any] = {}
    for f in fields:
        if f.name not in record:
            if not f.required:
                out[f.name] = f.default()
            continue
        value = record[f.name]
        if from_text and value == "" and not f.required:
            out[f.name] = f.default()
            continue
        if f.exact is not None and f.exact(value):
            out[f.name] = value  # already exactly what the writer takes: the common case, kept cheap
            continue
        if f.name in missing:
            continue
        try:
            out[f.name] = _coerce(value, f.type, from_text)
        except (ValueError, TypeError) as exc:
            problems.append(f"{prefix}field {f.name}: {exc}")
    if problems:
        raise RecordError(problems)
    return out


def parse_json_event(text: str, schema_name: str) -> dict[str, Any]:
    """One event given as a JSON object on the command line."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError([f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"]) from None
    return validate_record(schema_name, record)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def file_format(path: Path) -> str:
    """'jsonl' or 'csv' from the file name (a trailing .gz is allowed)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if last == ".csv":
        return "csv"
    raise RecordError([f"{path}: unknown file type {''.join(path.suffixes) or '(none)'}; use .jsonl, .csv (optionally .gz)"])


def _jsonl_lines(path: Path, schema_name: str) -> Iterator[dict[str, Any] | RecordError]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield validate_record(schema_name, json.loads(line), where)
            except json.JSONDecodeError as exc:
                yield RecordError([f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"])
            except RecordError as exc:
                yield exc


def _csv_lines(path: Path, schema_name: str) -> Iterator[dict[str, Any] | RecordError]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            yield RecordError([f"{path}: empty file, expected a header row naming the fields"])
            return
        width = len(reader.fieldnames)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # more cells than header columns
                yield RecordError([f"{where}: {width + len(row[None])} cells but the header has {width} columns"])
            elif any(v is None for v in row.values()):
                cells = sum(v is not None for v in row.values())
                yield RecordError([f"{where}: {cells} cells but the header has {width} columns"])
            else:
                try:
                    yield validate_record(schema_name, row, where, from_text=True)
                except RecordError as exc:
                    yield exc


def _checked(path: str | Path, schema_name: str) -> Iterator[dict[str, Any] | RecordError]:
    path = Path(path)
    if not path.is_file():
        raise RecordError([f"{path}: no such file"])
    return _jsonl_lines(path, schema_name) if file_format(path) == "jsonl" else _csv_lines(path, schema_name)


def iter_event_file(path: str | Path, schema_name: str) -> Iterator[dict[str, Any]]:
    """Validated records of a .jsonl / .csv file (optionally gzipped), in file order; stops at the first bad one."""
    for item in _checked(path, schema_name):
        if isinstance(item, RecordError):
            raise item
        yield item


def check_event_file(path: str | Path, schema_name: str) -> int:
    """Validate a whole file before anything is published: the record count, or RecordError listing the bad lines."""
    problems: list[str] = []
    total = count = 0
    for item in _checked(path, schema_name):
        if isinstance(item, RecordError):
            total += 1  # one entry per bad record, its problems joined
            if len(problems) < MAX_REPORTED:
                problems.append("; ".join(item.problems))
        else:
            count += 1
    if problems:
        raise RecordError(problems, total)
    return count
