"""User states written the way Feast writes them, without the Feast SDK: for benchmarks on a machine without Feast.

The GPU machine has no Feast (and no network to install it). :class:`StateWriter` writes the hash Feast's Redis
online store writes for a ``user_recent_events`` row (the layout serving's direct reader reads,
infra/feast_store.py): one HSET of every feature's serialized ``feast.types.Value`` (serving/feast_redis.py
``encode_typed``) and ``_ts:<view>``, plus the view's key TTL. tests/test_feast_online_store.py checks that the
bytes equal what the project's own write path (infra/feast_online_store.py ``write_rows``, the user_state job's)
stores for the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from contracts.user_state_rule import FEATURE_NAMES
from infra.feast_store import FeastRedisLayout, feature_field
from serving.feast_redis import encode_typed
from serving.user_state_reader import STORED_KIND, USER_JOIN_KEY

FEATURE_VIEW = "user_recent_events"
KEY_TTL_S = 7_776_000  # feature_store.yaml key_ttl_seconds


def state_fields(row: Mapping[str, Any], stamp: datetime, view: str = FEATURE_VIEW) -> dict[bytes, bytes]:
    """One user's hash: every feature of ``row`` (FEATURE_NAMES) as Feast's Value bytes, and the row's timestamp."""
    ts = Timestamp()
    ts.FromDatetime(stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc))
    fields = {f"_ts:{view}".encode(): ts.SerializeToString()}
    for name in FEATURE_NAMES:
        fields[feature_field(view, name)] = encode_typed(row[name], STORED_KIND[name])
    return fields


class StateWriter:
    """Pipelined HSETs of whole states (one round trip per call), in Feast's layout."""

    def __init__(self, client: Any, layout: FeastRedisLayout, view: str = FEATURE_VIEW, ttl_s: int = KEY_TTL_S):
        self.client, self.layout, self.view, self.ttl_s = client, layout, view, ttl_s

    def write(self, rows: Sequence[Mapping[str, Any]], stamp: datetime | None = None) -> None:
        stamp = stamp or datetime.now(timezone.utc)
        pipe = self.client.pipeline(transaction=False)
        for row in rows:
            key = self.layout.entity_key(USER_JOIN_KEY, row[USER_JOIN_KEY])
            pipe.hset(key, mapping=state_fields(row, stamp, self.view))
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
        pipe.execute()
