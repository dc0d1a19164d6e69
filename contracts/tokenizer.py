"""The one event tokenizer: raw user events -> typed tokens (HSTU-style event tokens).

The Flink ``tokenize`` job and the offline trainer both call :func:`tokenize_event`, so
training and serving never disagree on what a token is. Pure Python, no numpy / torch, so a
Flink Python worker imports it cheaply.

Token groups (the four Group-LayerNorm groups of the design), in the order :data:`TOKEN_LAYOUT` fixes:
  0 user    - the user id (hashed or looked up by the model)
  1 action  - action type, rating bucket, duration bucket
  2 item    - item id and its semantic-ID levels (looked up by the caller from the semantic-ID store)
  3 context - time buckets (hour of day, day of week) and hashed context key=value pairs

Time: HSTU encodes time twice, as absolute calendar buckets of each event (here: hour and weekday, UTC)
and as the log-bucketed gap to the previous event (:func:`time_gap_bucket`, computed per sequence by the
trainer and the user state, since one event alone has no previous one).
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contracts.limits import DOMAIN_PATTERN, MAX_ID_CHARS

TOKENIZER_VERSION = 2  # 2: weekday_token, sid_version

# Must match the ActionType enum in schemas/user_event.avsc (order = token id).
ACTIONS: tuple[str, ...] = ("VIEW", "CLICK", "RATE", "LIKE", "PURCHASE", "SKIP", "SHARE", "UNKNOWN")
ACTION_TOKEN: dict[str, int] = {name: i for i, name in enumerate(ACTIONS)}

TOKEN_GROUP_USER, TOKEN_GROUP_ACTION, TOKEN_GROUP_ITEM, TOKEN_GROUP_CONTEXT = 0, 1, 2, 3

NUM_RATING_TOKENS = 11  # 0 = none, 1..10 = half-star buckets of a 0.5-5 scale (rounded up)
NUM_DURATION_TOKENS = 24  # 0 = none, then log2 buckets of seconds
NUM_TIME_GAP_BUCKETS = 64  # log buckets of seconds since the previous event
NUM_HOUR_TOKENS = 24  # hour of day, UTC
NUM_WEEKDAY_TOKENS = 8  # 0 = unknown (events tokenized before version 2), 1 = Monday .. 7 = Sunday

# Where each token of an event sits and which group it normalises with (GLN). `semantic_ids` and
# `context_tokens` are variable-length: every element takes the slot's group.
TOKEN_LAYOUT: tuple[tuple[str, int], ...] = (
    ("user_id", TOKEN_GROUP_USER),
    ("action_token", TOKEN_GROUP_ACTION),
    ("rating_token", TOKEN_GROUP_ACTION),
    ("duration_token", TOKEN_GROUP_ACTION),
    ("item_id", TOKEN_GROUP_ITEM),
    ("semantic_ids", TOKEN_GROUP_ITEM),
    ("hour_token", TOKEN_GROUP_CONTEXT),
    ("weekday_token", TOKEN_GROUP_CONTEXT),
    ("context_tokens", TOKEN_GROUP_CONTEXT),
)

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
# The context key a client (a player) reports the item's length under, in seconds: feedback_join's completion rule
# compares the event's duration_s with it (docs/EXPERIMENTS.md). Context values are strings; kept when positive.
ITEM_LENGTH_KEY = "item_length_s"
# ids /recommend must be able to ask for: a longer one would be stored where no request can read it
BOUNDED_ID_FIELDS = ("user_id", "item_id")
_MAX_FLOAT = sys.float_info.max  # `-_MAX_FLOAT <= x <= _MAX_FLOAT` is False for NaN, ±inf and ints no float holds
_MAX_FLOAT32 = 3.4028234663852886e38  # the largest Avro float: the raw seconds kept in tokens must fit it


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
    weekday_token: int = 0
    sid_version: str = ""  # the semantic-ID store version the levels came from ("" = none looked up)
    # not tokens: the raw seconds, for feedback_join's watch time and completion (the bucket above loses them)
    duration_s: float | None = None
    item_length_s: float | None = None  # the raw event's context[ITEM_LENGTH_KEY], when a positive number

    def grouped(self) -> list[tuple[str, int, Any]]:
        """(slot, token group, value) in :data:`TOKEN_LAYOUT` order; list slots expand element by element."""
        out: list[tuple[str, int, Any]] = []
        for name, group in TOKEN_LAYOUT:
            value = getattr(self, name)
            if isinstance(value, tuple):
                out.extend((name, group, v) for v in value)
            else:
                out.append((name, group, value))
        return out

    def to_record(self) -> dict[str, Any]:
        """A dict ready for fastavro (tuples become lists); spelled out because ``asdict`` deep-copies (slow)."""
        return {
            "event_id": self.event_id, "user_id": self.user_id, "item_id": self.item_id,
            "event_time": self.event_time, "domain": self.domain, "action_token": self.action_token,
            "rating_token": self.rating_token, "duration_token": self.duration_token,
            "hour_token": self.hour_token, "context_tokens": list(self.context_tokens),
            "semantic_ids": list(self.semantic_ids), "tokenizer_version": self.tokenizer_version,
            "weekday_token": self.weekday_token, "sid_version": self.sid_version,
            "duration_s": self.duration_s, "item_length_s": self.item_length_s,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TokenizedEvent:
        values = dict(record)
        values["event_time"] = _as_epoch_ms(values["event_time"])
        values["context_tokens"] = tuple(values.get("context_tokens") or ())
        values["semantic_ids"] = tuple(values.get("semantic_ids") or ())
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in values.items() if k in known})  # fields of newer writers are skipped


def stable_hash64(text: str) -> int:
    """A signed 64-bit hash that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def rating_token(rating: float | None) -> int:
    if rating is None:
        return 0
    # clamped before ceil, so a huge finite rating (2 * 1e308 overflows to inf) still lands in the top bucket
    return math.ceil(max(1.0, min(NUM_RATING_TOKENS - 1.0, float(rating) * 2)))


def duration_token(duration_s: float | None) -> int:
    if duration_s is None or duration_s < 0:
        return 0
    return min(NUM_DURATION_TOKENS - 1, 1 + int(math.log2(1.0 + float(duration_s))))


def item_length(context: Mapping[str, Any] | None) -> float | None:
    """The item's length in seconds from the event's context (:data:`ITEM_LENGTH_KEY`), None unless a positive,
    finite number: the context is free-form, so a bad value is left out rather than failing the event."""
    if not context:
        return None
    raw = context.get(ITEM_LENGTH_KEY)
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if 0 < value <= _MAX_FLOAT32 else None


def raw_seconds(value: float | None) -> float | None:
    """A duration kept for metrics: None when absent or negative, capped at the largest Avro float."""
    return None if value is None or value < 0 else min(float(value), _MAX_FLOAT32)


def time_gap_bucket(gap_seconds: float) -> int:
    """Log-spaced bucket of the time since the previous event (HSTU's time bias input)."""
    if gap_seconds <= 0:
        return 0
    return min(NUM_TIME_GAP_BUCKETS - 1, 1 + int(math.log(1.0 + gap_seconds) / 0.4))


def hour_token(event_time_ms: int) -> int:
    """Hour of day (UTC), 0-23."""
    return (event_time_ms // 3_600_000) % 24


def weekday_token(event_time_ms: int) -> int:
    """Day of week (UTC), 1 = Monday .. 7 = Sunday (0 stays free for "unknown"); epoch day 0 was a Thursday."""
    return (event_time_ms // 86_400_000 + 3) % 7 + 1


def _as_epoch_ms(value: Any) -> int:
    # fastavro decodes timestamp-millis to an aware datetime; JSON input carries ints.
    if hasattr(value, "timestamp"):
        return int(round(value.timestamp() * 1000))
    return int(value)


_NUMBER = (int, float)
_DOMAIN = re.compile(DOMAIN_PATTERN)


def _plainly_valid(event: dict[str, Any]) -> bool:
    get = event.get
    eid, uid, iid, action, t = get("event_id"), get("user_id"), get("item_id"), get("action"), get("event_time")
    rating, duration, context, domain = get("rating"), get("duration_s"), get("context"), get("domain")
    return (
        eid.__class__ is str and uid.__class__ is str and iid.__class__ is str and action.__class__ is str
        and t.__class__ is int and bool(eid and uid and iid and action)
        and len(uid) <= MAX_ID_CHARS and len(iid) <= MAX_ID_CHARS
        and (rating is None or (rating.__class__ in _NUMBER and -_MAX_FLOAT <= rating <= _MAX_FLOAT))
        and (duration is None or (duration.__class__ in _NUMBER and -_MAX_FLOAT <= duration <= _MAX_FLOAT))
        and (context is None or context.__class__ is dict)
        and (not domain or (domain.__class__ is str and _DOMAIN.match(domain) is not None))
    )


def validate_event(event: Mapping[str, Any]) -> None:
    """Raise :class:`TokenizeError` with MISSING_FIELD / WRONG_TYPE / BAD_VALUE when the event is malformed.

    BAD_VALUE: an empty id, a user or item id over MAX_ID_CHARS, a rating or duration that is not a finite float,
    a domain that is not a name /recommend accepts (contracts.limits.DOMAIN_PATTERN; empty means "movie").
    """
    if event.__class__ is dict and _plainly_valid(event):
        return  # the common case, checked in one expression; anything else takes the path that names the fault
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
        if name in BOUNDED_ID_FIELDS and len(value) > MAX_ID_CHARS:
            raise TokenizeError(
                "BAD_VALUE", f"field {name!r} is {len(value)} characters long, over the {MAX_ID_CHARS} that "
                f"/recommend accepts: {value[:40]!r}..."
            )
    for name in OPTIONAL_NUMBER_FIELDS:
        value = event.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TokenizeError("WRONG_TYPE", f"field {name!r} must be a number, got {type(value).__name__}")
        if not -_MAX_FLOAT <= value <= _MAX_FLOAT:
            raise TokenizeError("BAD_VALUE", f"field {name!r} must be a finite float, got {value!r:.40}")
    context = event.get("context") or {}
    if not isinstance(context, Mapping):
        raise TokenizeError("WRONG_TYPE", f"field 'context' must be a map, got {type(context).__name__}")
    domain = event.get("domain")
    if domain and not isinstance(domain, str):
        raise TokenizeError("WRONG_TYPE", f"field 'domain' must be a string, got {type(domain).__name__}")
    if domain and _DOMAIN.match(domain) is None:
        raise TokenizeError("BAD_VALUE", f"field 'domain' must be 1-64 letters, digits, '_', '.' or '-' starting "
                            f"with a letter or digit (it names Redis keys), got {domain[:70]!r}")


def tokenize_event(
    event: Mapping[str, Any], semantic_ids: tuple[int, ...] | list[int] = (), sid_version: str = ""
) -> TokenizedEvent:
    """Turn one user event (a dict shaped like schemas/user_event.avsc) into typed tokens.

    ``semantic_ids`` are the item's levels from the semantic-ID store version ``sid_version`` (the caller
    looks them up: the Flink job through its per-worker cache, the trainer from the artifact).
    """
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
        context_tokens=tuple(stable_hash64(f"{k}={context[k]}") for k in sorted(context)) if context else (),
        semantic_ids=semantic_ids if semantic_ids.__class__ is tuple else tuple(int(s) for s in semantic_ids),
        weekday_token=(event_time // 86_400_000 + 3) % 7 + 1,
        sid_version=sid_version,
        duration_s=raw_seconds(event.get("duration_s")),
        item_length_s=item_length(context),
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
