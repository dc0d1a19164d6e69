"""Reading a user's state at request time: one protocol, two readers (Feast SDK, direct Redis).

Both return the same typed :class:`UserStateView` (or None for a user the stream has never seen) and turn
any failure to reach the store into :class:`StateUnavailable`, which the app answers with the fallback.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import redis
from google.protobuf.message import DecodeError

from contracts.user_state_rule import FEATURE_NAMES
from infra.feast_store import FeastRedisLayout, feature_field
from serving.feast_redis import UnsupportedValue, decode_appended, decode_typed

USER_JOIN_KEY = "user_id"
# How Feast stores each of FEATURE_NAMES (feature_repo/features.py: Array(String), Array(Int64), Int64).
STORED_KIND: dict[str, str] = {
    "recent_item_ids": "string_list_val",
    "recent_action_tokens": "int64_list_val",
    "recent_rating_tokens": "int64_list_val",
    "recent_event_times": "int64_list_val",
    "event_count": "int64_val",
    "last_event_time": "int64_val",
    "state_version": "int64_val",
}


# The stored kind of each feature in FEATURE_NAMES' order, the order RedisStateReader reads them in.
_KINDS = tuple(STORED_KIND[name] for name in FEATURE_NAMES)
if FEATURE_NAMES != ("recent_item_ids", "recent_action_tokens", "recent_rating_tokens", "recent_event_times",
                     "event_count", "last_event_time", "state_version"):
    raise ImportError(f"contracts.user_state_rule.FEATURE_NAMES changed ({FEATURE_NAMES}): update RedisStateReader")


class StateError(Exception):
    """Base of the errors a state read can raise."""


class StateUnavailable(StateError):
    """The online store could not be reached or did not answer in time."""


class BadState(StateError):
    """The stored state exists but cannot be used (wrong shape or type); the user is served the fallback."""


@dataclass(frozen=True, slots=True)
class UserStateView:
    """The read-only state a generator sees; fields mirror contracts.user_state_rule.FEATURE_NAMES."""

    user_id: str
    item_ids: tuple[str, ...]
    action_tokens: tuple[int, ...]
    rating_tokens: tuple[int, ...]
    event_times: tuple[int, ...]  # epoch ms, oldest first
    event_count: int
    last_event_time: int
    state_version: int
    # frozenset(item_ids), built once by history(): a reader that keeps views hands the same one back for the
    # same stored state, so an unchanged user's set is built once, not per request (and not compared: a cache)
    _history: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def history(self) -> frozenset[str]:
        """The set of the state's item ids (built on first use, then kept with the view)."""
        got = self._history
        if got is None:
            got = frozenset(self.item_ids)
            object.__setattr__(self, "_history", got)  # a cache of a frozen view's own items, not a new value
        return got

    @classmethod
    def from_features(cls, user_id: str, features: Mapping[str, Any]) -> UserStateView | None:
        """None when the store has nothing for the user; BadState when what it has is malformed."""
        if all(features.get(name) is None for name in FEATURE_NAMES):
            return None
        try:
            view = cls(
                user_id=user_id,
                item_ids=tuple(map(str, features.get("recent_item_ids") or ())),
                action_tokens=tuple(map(int, features.get("recent_action_tokens") or ())),
                rating_tokens=tuple(map(int, features.get("recent_rating_tokens") or ())),
                event_times=tuple(map(int, features.get("recent_event_times") or ())),
                event_count=int(features.get("event_count") or 0),
                last_event_time=int(features.get("last_event_time") or 0),
                state_version=int(features.get("state_version") or 0),
            )
        except (TypeError, ValueError) as exc:
            raise BadState(f"state of user {user_id!r} has a malformed feature: {exc}") from exc
        return view.checked()

    def checked(self) -> UserStateView:
        """The view itself, or BadState when its per-event lists disagree in length."""
        n = len(self.item_ids)
        if len(self.action_tokens) != n or len(self.rating_tokens) != n or len(self.event_times) != n:
            lengths = {n, len(self.action_tokens), len(self.rating_tokens), len(self.event_times)}
            raise BadState(
                f"state of user {self.user_id!r} has per-event lists of different lengths {sorted(lengths)}"
            )
        return self


@runtime_checkable
class UserStateReader(Protocol):
    """Where user state comes from. ``name`` appears in /health."""

    name: str

    def read(self, user_id: str) -> UserStateView | None:
        """The user's state, None if unknown; raises StateUnavailable / BadState."""
        ...

    def check(self) -> str:
        """Raise StateUnavailable unless the store answers; return a one-line detail."""
        ...


# One user's result in a batched read: the state, None (unknown user) or why it cannot be used.
StateResult = UserStateView | None | BadState


def read_many(reader: UserStateReader, user_ids: Sequence[str]) -> list[StateResult]:
    """States of many users, in one store round trip when the reader has ``read_many``.

    Raises StateUnavailable (the store is down for everyone); a malformed state is returned as BadState,
    so one user's bad row never fails the batch.
    """
    batched = getattr(reader, "read_many", None)
    if callable(batched):
        return batched(user_ids)
    out: list[StateResult] = []
    for user_id in user_ids:
        try:
            out.append(reader.read(user_id))
        except BadState as exc:
            out.append(exc)
    return out


def _ping(client: redis.Redis) -> str:
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StateUnavailable(f"Redis does not answer: {exc}") from exc
    return "Redis answers PING"


class FeastStateReader:
    """get_online_features through the Feast SDK for the feature service (default recommend_v1)."""

    name = "feast"

    def __init__(self, store: Any, feature_service: str, health_client: redis.Redis):
        self.store = store
        # Resolved once at start: a missing service or an unapplied repo fails `ugt serve` at once.
        self.feature_service = store.get_feature_service(feature_service)
        self.health_client = health_client

    def read(self, user_id: str) -> UserStateView | None:
        try:
            response = self.store.get_online_features(
                features=self.feature_service, entity_rows=[{USER_JOIN_KEY: user_id}]
            ).to_dict()
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailable(f"Feast online store unreachable: {exc}") from exc
        return UserStateView.from_features(
            user_id, {name: _first(response.get(name)) for name in FEATURE_NAMES}
        )

    def read_many(self, user_ids: Sequence[str]) -> list[StateResult]:
        """One get_online_features call for the whole batch."""
        try:
            response = self.store.get_online_features(
                features=self.feature_service, entity_rows=[{USER_JOIN_KEY: u} for u in user_ids]
            ).to_dict()
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailable(f"Feast online store unreachable: {exc}") from exc
        out: list[StateResult] = []
        for i, user_id in enumerate(user_ids):
            try:
                features = {name: (response.get(name) or [None] * len(user_ids))[i] for name in FEATURE_NAMES}
                out.append(UserStateView.from_features(user_id, features))
            except BadState as exc:
                out.append(exc)
        return out

    def check(self) -> str:
        return _ping(self.health_client) + f"; Feast feature service {self.feature_service.name!r} loaded"


def _first(values: Sequence[Any] | None) -> Any:
    return values[0] if values else None


def _decoded(raw: Sequence[bytes | None], kept: tuple[list[bytes | None], list[Any], UserStateView] | None
             ) -> tuple[list[Any], int]:
    """The stored values of FEATURE_NAMES decoded, and how many kept item ids start the item ids when only new ones
    follow them (else 0); a list equal to the kept state's reuses its values, one that grew decodes only its new
    values."""
    if kept is None:
        return [decode_typed(data, kind) for data, kind in zip(raw, _KINDS, strict=True)], 0
    old_raw, old_values, _ = kept
    out = []
    grew_from = 0
    for data, kind, old, old_value in zip(raw, _KINDS, old_raw, old_values, strict=True):
        if data == old:
            out.append(old_value)
            continue
        if data and old and isinstance(old_value, tuple):
            grown = decode_appended(old, old_value, data, kind)
            if grown is not None:
                grew_from = grew_from or (len(old_value) if not out else 0)  # the first field: the item ids
                out.append(grown)
                continue
        out.append(decode_typed(data, kind))
    return out, grew_from


class RedisStateReader:
    """One HMGET on the hash Feast wrote for the user (same data as FeastStateReader, no SDK overhead).

    With ``recent_users`` > 0 it keeps the stored bytes and the view of that many recently read users (LRU): a user
    whose stored state did not change gets the same view back (no decode; what is built from it, like its history
    set, is reused), and one whose lists only grew at the end has only the new values decoded. At history 1,024 a
    whole decode is ~0.1 ms of a worker's CPU per request (bench/worker_stages.py); the kept bytes are ~20 KB a user.
    """

    name = "redis"

    def __init__(self, client: redis.Redis, layout: FeastRedisLayout, feature_view: str, recent_users: int = 0):
        self.client = client
        self.layout = layout
        self.fields = [feature_field(feature_view, name) for name in FEATURE_NAMES]
        self.recent_users = recent_users
        # user -> (stored values as read, their decoded values, the view); batches read from one thread at a time,
        # the lock keeps a direct read (a batch of one) from another thread safe
        self.recent: OrderedDict[str, tuple[list[bytes | None], list[Any], UserStateView]] = OrderedDict()
        self.lock = threading.Lock()

    def read(self, user_id: str) -> UserStateView | None:
        try:
            raw = self.client.hmget(self.layout.entity_key(USER_JOIN_KEY, user_id), self.fields)
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailable(f"Redis unreachable: {exc}") from exc
        return self._view(user_id, raw)

    def read_many(self, user_ids: Sequence[str]) -> list[StateResult]:
        """One pipelined round trip (an HMGET per user) for the whole batch."""
        if len(user_ids) == 1:
            try:
                return [self.read(user_ids[0])]
            except BadState as exc:
                return [exc]
        try:
            pipe = self.client.pipeline(transaction=False)
            for user_id in user_ids:
                pipe.hmget(self.layout.entity_key(USER_JOIN_KEY, user_id), self.fields)
            rows = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailable(f"Redis unreachable: {exc}") from exc
        out: list[StateResult] = []
        for user_id, raw in zip(user_ids, rows, strict=True):
            try:
                out.append(self._view(user_id, raw))
            except BadState as exc:
                out.append(exc)
        return out

    def _view(self, user_id: str, raw: list[bytes | None]) -> UserStateView | None:
        kept = None
        if self.recent_users:
            with self.lock:
                kept = self.recent.get(user_id)
            if kept is not None and raw == kept[0]:  # the same stored state: the same view
                with self.lock:
                    if user_id in self.recent:
                        self.recent.move_to_end(user_id)
                return kept[2]
        try:
            values, grew_from = _decoded(raw, kept)
        except (UnsupportedValue, DecodeError) as exc:
            raise BadState(f"state of user {user_id!r} cannot be decoded: {exc}") from exc
        items, actions, ratings, times, count, last, version = values  # FEATURE_NAMES' order (checked at import)
        if items is None and actions is None and ratings is None and times is None and count is None \
                and last is None and version is None:
            return None
        view = UserStateView(user_id, items or (), actions or (), ratings or (), times or (), count or 0, last or 0,
                             version or 0).checked()
        if grew_from and kept is not None and kept[2]._history is not None:  # the kept items and new ones
            object.__setattr__(view, "_history", kept[2]._history.union(items[grew_from:]))
        if self.recent_users:
            with self.lock:
                self.recent[user_id] = (raw, values, view)
                self.recent.move_to_end(user_id)
                while len(self.recent) > self.recent_users:
                    self.recent.popitem(last=False)
        return view

    def check(self) -> str:
        return _ping(self.client)
