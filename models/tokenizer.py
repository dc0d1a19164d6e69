"""The one event tokenizer: raw user events -> typed tokens (HSTU-style event tokens).

The Flink ``tokenize`` job and the offline trainer both call :func:`tokenize_event`, so
training and serving never disagree on what a token is. Pure Python, no numpy / torch, so a
Flink Python worker imports it cheaply.

Token groups (the four Group-LayerNorm groups of the design):
  0 user    - the user id (hashed or looked up by the model)
  1 action  - action type, rating bucket, duration bucket
  2 item    - item id and its semantic-ID levels
  3 context - hour of day and hashed context key=value pairs
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

TOKENIZER_VERSION = 1

# Must match the ActionType enum in schemas/user_event.avsc (order = token id).
ACTIONS: tuple[str, ...] = ("VIEW", "CLICK", "RATE", "LIKE", "PURCHASE", "SKIP", "SHARE", "UNKNOWN")
ACTION_TOKEN: dict[str, int] = {name: i for i, name in enumerate(ACTIONS)}

TOKEN_GROUP_USER, TOKEN_GROUP_ACTION, TOKEN_GROUP_ITEM, TOKEN_GROUP_CONTEXT = 0, 1, 2, 3

NUM_RATING_TOKENS = 11  # 0 = none, 1..10 = half-star buckets of a 0.5-5 scale (rounded up)
NUM_DURATION_TOKENS = 24  # 0 = none, then log2 buckets of seconds
NUM_TIME_GAP_BUCKETS = 64  # log buckets of seconds since the previous event

# Events further than this in the future (vs. wall clock) are rejected as FAR_FUTURE by the jobs.
MAX_FUTURE_SKEW_MS = 24 * 3600 * 1000

REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "event_id": (str,),
    "user_id": (str,),
    "item_id": (str,),
    "action": (str,),
    "event_time": (int,),
}
OPTIONAL_NUMBER_FIELDS = ("rating", "duration_s")


class TokenizeError(ValueError):
    """An event that cannot be tokenized; ``reason_code`` is what the dead-letter record carries."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason


@dataclass(frozen=True)
class TokenizedEvent:
    """One event as tokens; field names match schemas/tokenized_event.avsc."""

    event_id: str
    user_id: str
    item_id: str
    event_time: int  # epoch milliseconds
    domain: str
    action_token: int
    rating_token: int
    duration_token: int
    hour_token: int
    context_tokens: tuple[int, ...] = ()
    semantic_ids: tuple[int, ...] = ()
    tokenizer_version: int = TOKENIZER_VERSION

    def to_record(self) -> dict[str, Any]:
        """A dict ready for fastavro (tuples become lists)."""
        record = asdict(self)
        record["context_tokens"] = list(self.context_tokens)
        record["semantic_ids"] = list(self.semantic_ids)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TokenizedEvent:
        values = dict(record)
        values["event_time"] = _as_epoch_ms(values["event_time"])
        values["context_tokens"] = tuple(values.get("context_tokens") or ())
        values["semantic_ids"] = tuple(values.get("semantic_ids") or ())
        return cls(**values)


def stable_hash64(text: str) -> int:
    """A signed 64-bit hash that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def rating_token(rating: float | None) -> int:
    if rating is None:
        return 0
    return max(1, min(NUM_RATING_TOKENS - 1, math.ceil(float(rating) * 2)))


def duration_token(duration_s: float | None) -> int:
    if duration_s is None or duration_s < 0:
        return 0
    return min(NUM_DURATION_TOKENS - 1, 1 + int(math.log2(1.0 + float(duration_s))))


def time_gap_bucket(gap_seconds: float) -> int:
    """Log-spaced bucket of the time since the previous event (HSTU's time bias input)."""
    if gap_seconds <= 0:
        return 0
    return min(NUM_TIME_GAP_BUCKETS - 1, 1 + int(math.log(1.0 + gap_seconds) / 0.4))


def _as_epoch_ms(value: Any) -> int:
    # fastavro decodes timestamp-millis to an aware datetime; JSON input carries ints.
    if hasattr(value, "timestamp"):
        return int(round(value.timestamp() * 1000))
    return int(value)


def validate_event(event: Mapping[str, Any]) -> None:
    """Raise :class:`TokenizeError` with MISSING_FIELD / WRONG_TYPE / BAD_VALUE when the event is malformed."""
    if not isinstance(event, Mapping):
        raise TokenizeError("WRONG_TYPE", f"event must be a record, got {type(event).__name__}")
    for name, types in REQUIRED_FIELDS.items():
        if name not in event or event[name] is None:
            raise TokenizeError("MISSING_FIELD", f"field {name!r} is missing")
        value = event[name]
        if name == "event_time" and hasattr(value, "timestamp"):
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise TokenizeError(
                "WRONG_TYPE", f"field {name!r} must be {types[0].__name__}, got {type(value).__name__}"
            )
        if isinstance(value, str) and not value:
            raise TokenizeError("BAD_VALUE", f"field {name!r} is empty")
    for name in OPTIONAL_NUMBER_FIELDS:
        value = event.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TokenizeError("WRONG_TYPE", f"field {name!r} must be a number, got {type(value).__name__}")
    context = event.get("context") or {}
    if not isinstance(context, Mapping):
        raise TokenizeError("WRONG_TYPE", f"field 'context' must be a map, got {type(context).__name__}")


def tokenize_event(
    event: Mapping[str, Any], semantic_ids: tuple[int, ...] | list[int] = ()
) -> TokenizedEvent:
    """Turn one user event (a dict shaped like schemas/user_event.avsc) into typed tokens."""
    validate_event(event)
    event_time = _as_epoch_ms(event["event_time"])
    action = event["action"]
    context = event.get("context") or {}
    return TokenizedEvent(
        event_id=event["event_id"],
        user_id=event["user_id"],
        item_id=event["item_id"],
        event_time=event_time,
        domain=event.get("domain") or "movie",
        action_token=ACTION_TOKEN.get(action, ACTION_TOKEN["UNKNOWN"]),
        rating_token=rating_token(event.get("rating")),
        duration_token=duration_token(event.get("duration_s")),
        hour_token=(event_time // 3_600_000) % 24,
        context_tokens=tuple(stable_hash64(f"{k}={context[k]}") for k in sorted(context)),
        semantic_ids=tuple(int(s) for s in semantic_ids),
    )


@dataclass
class TokenVocab:
    """Dense ids for item strings, for the trainer's embedding tables (0 = padding).

    Streaming jobs keep raw item ids; the model maps them through this vocabulary, which is
    saved with every checkpoint so serving maps exactly the same way.
    """

    item_to_index: dict[str, int] = field(default_factory=dict)

    def add(self, item_id: str) -> int:
        index = self.item_to_index.get(item_id)
        if index is None:
            index = len(self.item_to_index) + 1
            self.item_to_index[item_id] = index
        return index

    def __len__(self) -> int:
        return len(self.item_to_index)

    def index_of(self, item_id: str) -> int:
        return self.item_to_index.get(item_id, 0)
