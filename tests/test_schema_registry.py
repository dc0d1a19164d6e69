"""The project's Confluent-compatible Schema Registry (infra/schema_registry.py), over real HTTP in-process."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from infra.schema_registry import PREFIX, make_server

REPO = Path(__file__).resolve().parents[1]
USER_EVENT = (REPO / "schemas" / "user_event.avsc").read_text()
HEADERS = {"Content-Type": "application/vnd.schemaregistry.v1+json"}


def _serve(data: Path) -> tuple[object, str]:
    server = make_server("127.0.0.1", 0, data)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"


@pytest.fixture
def base(tmp_path: Path) -> Iterator[str]:
    server, url = _serve(tmp_path / "registry.json")
    yield url
    server.shutdown()
    server.server_close()


def post(url: str, schema: str) -> requests.Response:
    return requests.post(url, json={"schema": schema, "schemaType": "AVRO"}, headers=HEADERS, timeout=5)


def with_field(schema: str, field: dict) -> str:
    parsed = json.loads(schema)
    parsed["fields"].append(field)
    return json.dumps(parsed)


def test_register_is_idempotent_and_ids_are_global(base: str) -> None:
    first = post(f"{base}/subjects/a-value/versions", USER_EVENT)
    assert first.status_code == 200 and first.headers["Content-Type"] == HEADERS["Content-Type"]
    schema_id = first.json()["id"]
    assert post(f"{base}/subjects/a-value/versions", USER_EVENT).json()["id"] == schema_id
    # same schema, other subject: same global id (as Confluent), version 1 there
    assert post(f"{base}/subjects/b-value/versions", USER_EVENT).json()["id"] == schema_id
    assert requests.get(f"{base}/subjects/a-value/versions", timeout=5).json() == [1]
    assert requests.get(f"{base}/subjects", timeout=5).json() == ["a-value", "b-value"]
    assert requests.get(f"{base}/schemas/ids/{schema_id}/versions", timeout=5).json() == [
        {"subject": "a-value", "version": 1}, {"subject": "b-value", "version": 1}]


def test_fetch_by_id_latest_and_lookup(base: str) -> None:
    schema_id = post(f"{base}/subjects/s/versions", USER_EVENT).json()["id"]
    assert json.loads(requests.get(f"{base}/schemas/ids/{schema_id}", timeout=5).json()["schema"]) == json.loads(USER_EVENT)
    latest = requests.get(f"{base}/subjects/s/versions/latest", timeout=5).json()
    assert (latest["subject"], latest["version"], latest["id"]) == ("s", 1, schema_id)
    # lookup ignores key order and whitespace
    reordered = json.dumps(dict(reversed(list(json.loads(USER_EVENT).items()))), indent=3)
    assert post(f"{base}/subjects/s", reordered).json()["id"] == schema_id


def test_backward_rule_refuses_a_breaking_version_and_accepts_a_compatible_one(base: str) -> None:
    post(f"{base}/subjects/s/versions", USER_EVENT)
    breaking = with_field(USER_EVENT, {"name": "new_required", "type": "string"})
    check = post(f"{base}/compatibility/subjects/s/versions/latest?verbose=true", breaking).json()
    assert check["is_compatible"] is False and "new_required" in check["messages"][0]
    refused = post(f"{base}/subjects/s/versions", breaking)
    assert refused.status_code == 409 and refused.json()["error_code"] == 409
    fine = with_field(USER_EVENT, {"name": "new_optional", "type": ["null", "string"], "default": None})
    assert post(f"{base}/compatibility/subjects/s/versions/latest", fine).json() == {"is_compatible": True}
    assert post(f"{base}/subjects/s/versions", fine).status_code == 200
    assert requests.get(f"{base}/subjects/s/versions", timeout=5).json() == [1, 2]


def test_config_level_none_allows_anything(base: str) -> None:
    post(f"{base}/subjects/s/versions", USER_EVENT)
    r = requests.put(f"{base}/config/s", json={"compatibility": "NONE"}, headers=HEADERS, timeout=5)
    assert r.json() == {"compatibility": "NONE"}
    assert requests.get(f"{base}/config/s", timeout=5).json() == {"compatibilityLevel": "NONE"}
    assert requests.get(f"{base}/config", timeout=5).json() == {"compatibilityLevel": "BACKWARD"}
    assert post(f"{base}/subjects/s/versions", with_field(USER_EVENT, {"name": "x", "type": "int"})).status_code == 200
    bad = requests.put(f"{base}/config", json={"compatibility": "SIDEWAYS"}, headers=HEADERS, timeout=5)
    assert bad.status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [("GET", "/subjects/nope/versions/latest", None, 404, 40401),
     ("GET", "/schemas/ids/999", None, 404, 40403),
     ("POST", "/subjects/s/versions", {"schema": "{not json"}, 422, 42201),
     ("POST", "/subjects/s/versions", {"schema": '{"type":"record","name":"R","fields":[]}', "schemaType": "PROTOBUF"}, 422, 42201),
     ("POST", "/subjects/s/versions", {}, 422, 42201),
     ("GET", "/no/such/endpoint", None, 404, 404)],
)
def test_errors_use_confluent_error_bodies(base: str, method: str, path: str, body: dict | None, status: int, code: int) -> None:
    r = requests.request(method, base + path, json=body, headers=HEADERS, timeout=5)
    assert r.status_code == status
    assert r.json()["error_code"] == code and r.json()["message"]


def test_delete_version_and_subject(base: str) -> None:
    post(f"{base}/subjects/s/versions", USER_EVENT)
    post(f"{base}/subjects/s/versions", with_field(USER_EVENT, {"name": "o", "type": "int", "default": 0}))
    assert requests.delete(f"{base}/subjects/s/versions/2", timeout=5).json() == 2
    assert requests.delete(f"{base}/subjects/s", timeout=5).json() == [1]
    assert requests.get(f"{base}/subjects", timeout=5).json() == []


def test_schemas_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "registry.json"
    server, url = _serve(data)
    schema_id = post(f"{url}/subjects/s/versions", USER_EVENT).json()["id"]
    server.shutdown()
    server.server_close()
    server, url = _serve(data)
    try:
        assert requests.get(f"{url}/subjects/s/versions/latest", timeout=5).json()["id"] == schema_id
        other = with_field(USER_EVENT, {"name": "o", "type": "int", "default": 0})
        assert post(f"{url}/subjects/t/versions", other).json()["id"] == schema_id + 1
    finally:
        server.shutdown()
        server.server_close()


def test_paths_without_the_ccompat_prefix_work_too(base: str) -> None:
    root = base[: -len(PREFIX)]
    post(f"{base}/subjects/s/versions", USER_EVENT)
    assert requests.get(f"{root}/subjects", timeout=5).json() == ["s"]
