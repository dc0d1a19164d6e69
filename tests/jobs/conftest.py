"""Fixtures of the jobs' tests: a real Schema Registry (the stack's own server) in-process on a free port."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from infra.schema_registry import PREFIX, make_server
from streams.serde import AvroSerde, SchemaRegistryClient, schema_text

USER_EVENT = json.loads(schema_text("user_event"))


def user_event_variant(drop: str | None = None, retype: dict[str, object] | None = None) -> str:
    """The UserEvent schema with a field dropped or retyped: how a broken producer writes."""
    schema = json.loads(json.dumps(USER_EVENT))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != drop]
    for f in schema["fields"]:
        if retype and f["name"] in retype:
            f["type"] = retype[f["name"]]
    return json.dumps(schema)


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, tmp_path_factory.mktemp("registry") / "registry.json")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}{PREFIX}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def serde(registry_url: str) -> AvroSerde:
    return AvroSerde(SchemaRegistryClient(registry_url))


def make_event(i: int, user: str = "u1", t_ms: int | None = None, **over) -> dict:
    event = {
        "event_id": f"e{i}", "user_id": user, "item_id": f"item{i % 7}", "action": "RATE",
        "event_time": t_ms if t_ms is not None else 1_600_000_000_000 + i * 1000,
        "rating": float(1 + i % 5), "duration_s": None, "domain": "movie", "context": {"device": "web"},
    }
    event.update(over)
    return event
