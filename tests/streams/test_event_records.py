"""streams/records.py: JSON / JSONL / CSV events checked against the schema, with clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from streams.records import (
    MAX_REPORTED,
    RecordError,
    check_event_file,
    iter_event_file,
    parse_json_event,
    validate_record,
)

GOOD = {"event_id": "e1", "user_id": "42", "item_id": "7", "action": "CLICK", "event_time": 1_700_000_000_000}


def test_defaults_are_filled_and_types_normalised() -> None:
    record = validate_record("user_event", {**GOOD, "rating": 4})
    assert record == {**GOOD, "rating": 4.0, "duration_s": None, "domain": "movie", "context": {}}
    assert isinstance(record["rating"], float)


def test_iso_time_is_converted_to_epoch_ms() -> None:
    record = validate_record("user_event", {**GOOD, "event_time": "2023-11-14T22:13:20Z"})
    assert record["event_time"] == 1_700_000_000_000
    naive = validate_record("user_event", {**GOOD, "event_time": "2023-11-14T22:13:20"})  # naive = UTC
    assert naive["event_time"] == 1_700_000_000_000


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(RecordError) as err:
        parse_json_event('{"user_id": 5, "colour": "red", "action": "WATCH", "event_time": "soon", "rating": "x"}',
                         "user_event")
    text = str(err.value)
    assert "missing required field(s) event_id, item_id" in text
    assert "unknown field(s) colour" in text
    assert "field user_id: expected a string" in text
    assert "'WATCH' is not one of VIEW" in text
    assert "'soon' is neither epoch milliseconds nor an ISO-8601 time" in text
    assert "field rating: expected a number" in text
    assert len(err.value.problems) == 6


@pytest.mark.parametrize("bad, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({**GOOD, "event_time": True}), "expected an integer"),
    (json.dumps({**GOOD, "event_time": 1.5}), "expected an integer"),
    (json.dumps({**GOOD, "context": {"device": 3}}), "field context: expected a string"),
    (json.dumps({**GOOD, "user_id": None}), "field user_id: is empty/null but the field is not nullable"),
])
def test_single_event_errors(bad: str, fragment: str) -> None:
    with pytest.raises(RecordError, match=fragment):
        parse_json_event(bad, "user_event")


def test_item_events_need_their_own_fields() -> None:
    with pytest.raises(RecordError, match="missing required field.* domain, title, updated_at"):
        validate_record("item_event", {"item_id": "7"})
    ok = validate_record("item_event", {"item_id": "7", "domain": "movie", "title": "T", "updated_at": 5})
    assert ok["categories"] == [] and ok["attributes"] == {} and ok["description"] == ""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_jsonl_file_gz_and_blank_lines(tmp_path: Path) -> None:
    lines = [json.dumps({**GOOD, "event_id": f"e{i}"}) for i in range(3)]
    path = tmp_path / "events.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n")
    assert check_event_file(path, "user_event") == 3
    assert [r["event_id"] for r in iter_event_file(path, "user_event")] == ["e0", "e1", "e2"]


def test_jsonl_errors_name_file_and_line_and_all_bad_lines(tmp_path: Path) -> None:
    good = json.dumps(GOOD)
    path = _write(tmp_path / "e.jsonl", "\n".join([good, "{oops", good, json.dumps({"user_id": "1"}), good]) + "\n")
    with pytest.raises(RecordError) as err:
        check_event_file(path, "user_event")
    assert err.value.total == 2
    assert f"{path}:2: not valid JSON" in str(err.value)
    assert f"{path}:4: missing required field(s) event_id, item_id, action, event_time" in str(err.value)
    with pytest.raises(RecordError, match=":2: not valid JSON"):
        list(iter_event_file(path, "user_event"))  # the streaming reader stops at the first bad line


def test_many_bad_lines_are_counted_beyond_the_listed_ones(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.jsonl", "{}\n" * (MAX_REPORTED + 5))
    with pytest.raises(RecordError) as err:
        check_event_file(path, "user_event")
    assert err.value.total == MAX_REPORTED + 5 and len(err.value.problems) == MAX_REPORTED
    assert "... and 5 more" in str(err.value)


def test_csv_cells_are_typed(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv",
                  "event_id,user_id,item_id,action,event_time,rating,context\n"
                  'e1,42,7,RATE,1700000000000,3.5,"{""device"": ""tv""}"\n'
                  "e2,43,8,VIEW,2023-11-14T22:13:20Z,,\n")
    first, second = list(iter_event_file(path, "user_event"))
    assert first == {**GOOD, "action": "RATE", "rating": 3.5, "duration_s": None, "domain": "movie",
                     "context": {"device": "tv"}}
    assert second["rating"] is None and second["context"] == {} and second["event_time"] == 1_700_000_000_000


def test_csv_item_lists_as_pipes_or_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "items.csv",
                  "item_id,domain,title,categories,updated_at\n"
                  "1,movie,Heat,Action|Crime,0\n"
                  '2,movie,Up,"[""Animation""]",5\n')
    first, second = list(iter_event_file(path, "item_event"))
    assert first["categories"] == ["Action", "Crime"] and second["categories"] == ["Animation"]


@pytest.mark.parametrize("text, fragment", [
    ("", "empty file, expected a header row"),
    ("event_id,user_id\ne1,42\n", ":2: missing required field(s) item_id, action, event_time"),
    ("event_id,user_id,item_id,action,event_time\ne1,42,7,RATE,12,extra\n", ":2: 6 cells but the header has 5"),
    ("event_id,user_id,item_id,action,event_time\ne1,42,7\n", ":2: 3 cells but the header has 5"),
    ("event_id,user_id,item_id,action,event_time\ne1,42,7,RATE,\n", ":2: missing required field(s) event_time"),
    ("event_id,user_id,item_id,action,event_time\ne1,42,7,RATE,12x\n", "12x"),
    ("event_id,user_id,item_id,action,event_time,rating\ne1,42,7,RATE,12,five\n", "expected a number, got 'five'"),
    ("event_id,user_id,item_id,action,event_time,color\ne1,42,7,RATE,12,red\n", "unknown field(s) color"),
])
def test_csv_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = _write(tmp_path / "e.csv", text)
    with pytest.raises(RecordError) as err:
        check_event_file(path, "user_event")
    assert fragment in str(err.value)


def test_file_type_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="unknown file type .parquet"):
        check_event_file(_write(tmp_path / "e.parquet", "x"), "user_event")
    with pytest.raises(RecordError, match="no such file"):
        check_event_file(tmp_path / "absent.jsonl", "user_event")


def test_csv_empty_cell_takes_the_default(tmp_path: Path) -> None:
    path = _write(tmp_path / "e.csv", "event_id,user_id,item_id,action,event_time,domain\ne1,42,7,RATE,12,\n")
    [record] = list(iter_event_file(path, "user_event"))
    assert record["domain"] == "movie"


def test_defaults_are_fresh_objects() -> None:
    a = validate_record("user_event", GOOD)
    a["context"]["device"] = "tv"
    assert validate_record("user_event", GOOD)["context"] == {}
