"""Event helpers of the jobs' tests (a plain module: pytest puts tests/jobs on sys.path)."""

from __future__ import annotations

import json

from streams.serde import schema_text

USER_EVENT = json.loads(schema_text("user_event"))


def user_event_variant(drop: str | None = None, retype: dict[str, object] | None = None) -> str:
    """The UserEvent schema with a field dropped or retyped: how a broken producer writes."""
    schema = json.loads(json.dumps(USER_EVENT))
    schema["fields"] = [f for f in schema["fields"] if f["name"] != drop]
    for f in schema["fields"]:
        if retype and f["name"] in retype:
            f["type"] = retype[f["name"]]
    return json.dumps(schema)


def make_event(i: int, user: str = "u1", t_ms: int | None = None, **over) -> dict:
    """A valid UserEvent dict; keyword arguments override fields."""
    event = {
        "event_id": f"e{i}", "user_id": user, "item_id": f"item{i % 7}", "action": "RATE",
        "event_time": t_ms if t_ms is not None else 1_600_000_000_000 + i * 1000,
        "rating": float(1 + i % 5), "duration_s": None, "domain": "movie", "context": {"device": "web"},
    }
    event.update(over)
    return event
