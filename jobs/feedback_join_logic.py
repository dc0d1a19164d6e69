"""The feedback_join job's logic as plain Python: impressions joined with the feedback that follows them, per arm.

Two keyed stages, so the join scales with users and the aggregation with arms:

1. :class:`FeedbackJoiner`, keyed by user. An impression (``schemas/impression.avsc``) stays open for the
   attribution window ``[served_at, served_at + window)`` of event time. A user event (``events.tokens``) waits
   in state until the watermark passes its event time, so every impression served before it has arrived, then
   attributes to the newest open impression of that user that showed its item (last touch). When the watermark
   passes ``served_at + window`` the impression is final: one :class:`Outcome` (which positions were interacted
   with, whether it converted).
   Late records (event time at or behind the watermark) and duplicates (an ``event_id`` or ``request_id`` seen
   within ``dedup_horizon_ms``) are reported, never joined: a record counts once, as joined, late or duplicate.
2. :class:`ArmAggregator`, keyed by (experiment, arm): sums outcomes into tumbling event-time windows of
   ``served_at`` and emits a window's metrics once the watermark passes ``window_end + attribution window``.

Users are the randomisation unit, so each outcome also carries how it changes its user's running
``n² , c², n·c`` (n impressions, c clicked ones, per user and arm): summed per arm they give the user-clustered
(delta-method) variance of the CTR that ``ugt experiment report`` tests with, without a per-user pass; the same
for watch time (w: milliseconds) and completions (m: completed impressions).

Watch time of an impression: the ``duration_s`` of the events attributed to it, summed (whole milliseconds, so
sums are exact in any order). Completed: one attributed event completes its item (:meth:`JoinConfig.completes`):
its duration is at least ``completion_share`` of the item's length when the event carries both, else its action
is one of ``completion_actions``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from contracts.tokenizer import ACTIONS

JOB_NAME = "feedback_join"
INTERACTIONS = frozenset(ACTIONS) - {"SKIP", "UNKNOWN"}  # actions that count as "the user took the item"
JOINED, PENDING, DUPLICATE, LATE, NO_EXPERIMENT = "joined", "pending", "duplicate", "late", "no_experiment"
LATE_IMPRESSION, LATE_EVENT = "LATE_IMPRESSION", "LATE_EVENT"  # dead-letter reason codes
NO_WATERMARK = -(2**63)  # Long.MIN_VALUE: Flink's watermark before the first one


@dataclass(frozen=True)
class JoinConfig:
    """What the job attributes and how it windows (flat; logged whole at start)."""

    attribution_ms: int = 30 * 60_000  # an interaction counts for an impression this long after it was served
    metric_window_ms: int = 5 * 60_000  # tumbling windows of served_at the metrics are reported in
    ctr_ks: tuple[int, ...] = (1, 5, 10)  # CTR@k: an item at position < k was interacted with
    conversions: frozenset[str] = frozenset({"PURCHASE"})  # actions that convert an impression
    max_positions: int = 50  # position-wise CTR for positions 0 .. max_positions-1
    dedup_horizon_ms: int = 24 * 3600_000  # event ids / request ids remembered this long past their event time
    # an emitted window is kept this long (event time) and emitted again, whole, if outcomes still arrive for it
    update_grace_ms: int = 60 * 60_000
    completion_share: float = 0.9  # a view of at least this share of the item's length completes it
    # when the event lacks a duration or the item's length: actions that mean "finished the item" (a rating of a
    # title follows watching it, as in MovieLens); empty = only measured views complete
    completion_actions: frozenset[str] = frozenset({"RATE"})

    def __post_init__(self) -> None:
        if self.attribution_ms < 1 or self.metric_window_ms < 1 or self.max_positions < 1:
            raise ValueError("attribution_ms, metric_window_ms and max_positions must be >= 1")
        if not self.ctr_ks or min(self.ctr_ks) < 1:
            raise ValueError(f"ctr_ks must be positive, got {self.ctr_ks}")
        unknown = (set(self.conversions) | set(self.completion_actions)) - set(ACTIONS)
        if unknown:
            raise ValueError(f"unknown conversion or completion actions {sorted(unknown)}; known: {', '.join(ACTIONS)}")
        if not 0 < self.completion_share <= 1:
            raise ValueError(f"completion_share must be in (0, 1], got {self.completion_share}")

    def completes(self, event: Feedback) -> bool:
        """Did this (attributed) event finish its item? Measured when it can be, by its action otherwise."""
        if event.duration_s is not None and event.item_length_s is not None:
            return event.duration_s >= self.completion_share * event.item_length_s
        return event.action in self.completion_actions

    def window_start(self, served_at: int) -> int:
        return served_at - served_at % self.metric_window_ms


@dataclass(frozen=True, slots=True)
class Impression:
    request_id: str
    user_id: str
    experiment: str | None
    arm: str | None
    served_at: int
    items: tuple[str, ...]  # by position: items[p] was shown at position p
    fallback: bool = False

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Impression:
        """From a decoded ``schemas/impression.avsc`` record (served_at as epoch ms or a datetime)."""
        shown = sorted(record["items"], key=lambda it: it["position"])
        served = record["served_at"]
        served_ms = served if isinstance(served, int) else int(served.timestamp() * 1000)
        return cls(str(record["request_id"]), str(record["user_id"]), record.get("experiment"), record.get("arm"),
                   served_ms, tuple(str(it["item_id"]) for it in shown), bool(record.get("fallback", False)))


@dataclass(frozen=True, slots=True)
class Feedback:
    """A user event as the join needs it (from ``events.tokens``)."""

    event_id: str
    user_id: str
    item_id: str
    action: str
    event_time: int
    duration_s: float | None = None  # watch / dwell seconds (tokens keep them whole since schema v3)
    item_length_s: float | None = None  # the item's length as the client reported it

    @classmethod
    def from_token(cls, record: Mapping[str, Any]) -> Feedback:
        token = int(record["action_token"])
        action = ACTIONS[token] if 0 <= token < len(ACTIONS) else "UNKNOWN"
        time = record["event_time"]
        time_ms = time if isinstance(time, int) else int(time.timestamp() * 1000)
        return cls(str(record["event_id"]), str(record["user_id"]), str(record["item_id"]), action, time_ms,
                   record.get("duration_s"), record.get("item_length_s"))

    def watch_ms(self) -> int:
        """The duration in whole milliseconds (0 without one): integer sums do not depend on their order."""
        return round(self.duration_s * 1000) if self.duration_s is not None and self.duration_s > 0 else 0


@dataclass(slots=True)
class OpenImpression:
    impression: Impression
    clicked: set[int] = field(default_factory=set)  # positions interacted with
    converted: bool = False
    watch_ms: int = 0  # the attributed events' durations, summed
    completed: bool = False  # an attributed event finished its item


@dataclass(frozen=True, slots=True)
class Outcome:
    """One final impression, what the arm aggregation sums."""

    experiment: str
    arm: str
    served_at: int
    items: tuple[str, ...]
    clicked: tuple[int, ...]  # positions interacted with, ascending
    converted: bool
    fallback: bool
    new_user: bool  # the user's first impression in this (experiment, arm)
    d_n2: int  # change of the user's n², c², n·c (n impressions, c clicked impressions)
    d_c2: int
    d_nc: int
    watch_ms: int = 0
    completed: bool = False
    d_w2: int = 0  # change of the user's w², n·w (w their watch ms) and m², n·m (m completed impressions)
    d_nw: int = 0
    d_m2: int = 0
    d_nm: int = 0


@dataclass
class UserJoinState:
    """Everything the join keeps per user (one pickled value in Flink state)."""

    open: dict[str, OpenImpression] = field(default_factory=dict)  # request_id -> impression
    pending: list[Feedback] = field(default_factory=list)  # events waiting for the watermark
    seen_events: dict[str, int] = field(default_factory=dict)  # event_id -> event time
    seen_requests: dict[str, int] = field(default_factory=dict)  # request_id -> served_at
    # (exp, arm) -> (n, c, w, m): impressions, clicked ones, watch ms, completed ones (2-tuples in older state)
    totals: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.open or self.pending or self.seen_events or self.seen_requests or self.totals)


class FeedbackJoiner:
    """The per-user join. Each call returns what to do: a status, and the event-time timer to register."""

    def __init__(self, config: JoinConfig):
        self.config = config

    def on_impression(self, state: UserJoinState, imp: Impression, watermark: int) -> tuple[str, int | None]:
        if not imp.experiment or not imp.arm:
            return NO_EXPERIMENT, None
        if imp.request_id in state.seen_requests:
            return DUPLICATE, None
        if imp.served_at <= watermark:
            return LATE, None
        state.seen_requests[imp.request_id] = imp.served_at
        state.open[imp.request_id] = OpenImpression(imp)
        return PENDING, imp.served_at + self.config.attribution_ms

    def on_event(self, state: UserJoinState, event: Feedback, watermark: int) -> tuple[str, int | None]:
        if event.event_id in state.seen_events:
            return DUPLICATE, None
        state.seen_events[event.event_id] = event.event_time  # a late copy delivered again is then a duplicate
        if event.event_time <= watermark:
            return LATE, None
        state.pending.append(event)
        return PENDING, event.event_time

    def on_timer(self, state: UserJoinState, timestamp: int) -> tuple[list[Outcome], int]:
        """The watermark reached ``timestamp``: attribute the events up to it (in event-time order), then close
        the impressions whose window ended. Returns the outcomes and how many events were attributed."""
        ready = sorted((e for e in state.pending if e.event_time <= timestamp), key=lambda e: e.event_time)
        state.pending = [e for e in state.pending if e.event_time > timestamp]
        attributed = sum(self._attribute(state, e) for e in ready)
        outcomes = []
        window = self.config.attribution_ms
        closing = sorted((o.impression.served_at, r) for r, o in state.open.items()
                         if o.impression.served_at + window <= timestamp)
        for _, request_id in closing:  # in served_at order: a user's first impression is the first closed
            outcomes.append(self._close(state, state.open.pop(request_id)))
        horizon = timestamp - self.config.dedup_horizon_ms
        state.seen_events = {k: t for k, t in state.seen_events.items() if t > horizon}
        state.seen_requests = {k: t for k, t in state.seen_requests.items() if t > horizon}
        return outcomes, attributed

    def _attribute(self, state: UserJoinState, event: Feedback) -> bool:
        """Last touch: the newest impression open at the event's time that showed its item."""
        if event.action not in INTERACTIONS:
            return False
        best: OpenImpression | None = None
        for candidate in state.open.values():
            imp = candidate.impression
            if imp.served_at <= event.event_time < imp.served_at + self.config.attribution_ms \
                    and event.item_id in imp.items and (best is None or imp.served_at > best.impression.served_at):
                best = candidate
        if best is None:
            return False
        best.clicked.add(best.impression.items.index(event.item_id))
        best.converted = best.converted or event.action in self.config.conversions
        best.watch_ms += event.watch_ms()
        best.completed = best.completed or self.config.completes(event)
        return True

    def _close(self, state: UserJoinState, final: OpenImpression) -> Outcome:
        imp = final.impression
        key = (str(imp.experiment), str(imp.arm))
        n, c, w, m = (*state.totals.get(key, ()), 0, 0, 0, 0)[:4]
        x, dw, dm = 1 if final.clicked else 0, final.watch_ms, 1 if final.completed else 0
        state.totals[key] = (n + 1, c + x, w + dw, m + dm)
        return Outcome(key[0], key[1], imp.served_at, imp.items, tuple(sorted(final.clicked)), final.converted,
                       imp.fallback, n == 0, 2 * n + 1, x * (2 * c + 1), (n + 1) * (c + x) - n * c,
                       dw, final.completed, dw * (2 * w + dw), (n + 1) * (w + dw) - n * w,
                       dm * (2 * m + dm), (n + 1) * (m + dm) - n * m)


ARM_COUNTERS = ("impressions", "users", "clicked", "conversions", "item_clicks", "items_shown", "fallbacks",
                "watch_ms", "completions")
ADDITIVE = ("impressions", "users", "fallbacks", "items_shown", "item_clicks", "clicked", "conversions",
            "watch_ms", "watched", "completions",
            "user_n2", "user_c2", "user_nc", "user_w2", "user_nw", "user_m2", "user_nm")  # sums over windows


@dataclass
class ArmWindow:
    """The sums of one (experiment, arm, window)."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ADDITIVE, 0))
    clicked_at: dict[int, int] = field(default_factory=dict)  # k -> impressions with a click at position < k
    position_impressions: list[int] = field(default_factory=list)
    position_clicks: list[int] = field(default_factory=list)
    items: set[str] = field(default_factory=set)
    reported: dict[str, int] = field(default_factory=dict)  # counts at the last emission (Prometheus deltas)

    def add(self, o: Outcome, config: JoinConfig) -> None:
        c = self.counts
        if len(c) != len(ADDITIVE):  # a window restored from an older job's state lacks the newer sums
            self.counts = c = {k: c.get(k, 0) for k in ADDITIVE}
        c["impressions"] += 1
        c["users"] += o.new_user
        c["fallbacks"] += o.fallback
        c["items_shown"] += len(o.items)
        c["item_clicks"] += len(o.clicked)
        c["clicked"] += bool(o.clicked)
        c["conversions"] += o.converted
        c["watch_ms"] += o.watch_ms
        c["watched"] += o.watch_ms > 0
        c["completions"] += o.completed
        c["user_n2"] += o.d_n2
        c["user_c2"] += o.d_c2
        c["user_nc"] += o.d_nc
        c["user_w2"] += o.d_w2
        c["user_nw"] += o.d_nw
        c["user_m2"] += o.d_m2
        c["user_nm"] += o.d_nm
        for k in config.ctr_ks:
            self.clicked_at[k] = self.clicked_at.get(k, 0) + (bool(o.clicked) and o.clicked[0] < k)
        shown = min(len(o.items), config.max_positions)
        if len(self.position_impressions) < shown:
            grow = shown - len(self.position_impressions)
            self.position_impressions += [0] * grow
            self.position_clicks += [0] * grow
        for p in range(shown):
            self.position_impressions[p] += 1
        for p in o.clicked:
            if p < shown:
                self.position_clicks[p] += 1
        self.items.update(o.items)


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


@dataclass
class ArmState:
    """What the aggregation keeps per (experiment, arm)."""

    windows: dict[int, ArmWindow] = field(default_factory=dict)  # window start -> sums, not emitted yet
    emitted: dict[int, ArmWindow] = field(default_factory=dict)  # emitted, kept for update_grace_ms
    # item -> the first window that showed it: coverage up to a window does not depend on when it is emitted
    covered: dict[str, int] = field(default_factory=dict)


class ArmAggregator:
    """Per (experiment, arm): outcomes into windows; a window's metrics once the watermark has passed it."""

    def __init__(self, config: JoinConfig):
        self.config = config

    def on_outcome(self, state: ArmState, o: Outcome, watermark: int) -> int | None:
        """Add the outcome; when its window is due (None: too late even to update it, dropped).

        An outcome normally arrives before its window is due. One can arrive after, when the join instance that
        closed it was idle and another instance's watermark emitted the window (Flink ignores idle inputs); the
        window, kept for ``update_grace_ms``, then takes it, and a due time at or behind the watermark says: emit
        it again, whole, now (the operator does so on a processing-time timer)."""
        start = self.config.window_start(o.served_at)
        due = self.emit_at(start)
        if start not in state.windows:
            if due + self.config.update_grace_ms <= watermark:
                return None
            state.windows[start] = state.emitted.pop(start, None) or ArmWindow()
        state.windows[start].add(o, self.config)
        for item in o.items:
            if state.covered.get(item, start) >= start:
                state.covered[item] = start
        return due

    def newly_counted(self, state: ArmState, row: Mapping[str, Any]) -> dict[str, int]:
        """What an emitted row adds to the arm's running counters: all of it the first time, the difference when
        a window is emitted again (so Prometheus counters never count an impression twice)."""
        window = state.emitted.get(row["window_start"])
        before = window.reported if window is not None else {}
        delta = {k: int(row[k]) - before.get(k, 0) for k in ARM_COUNTERS}
        if window is not None:
            window.reported = {k: int(row[k]) for k in ARM_COUNTERS}
        return delta

    def emit_at(self, start: int) -> int:
        """When a window is complete: every impression served in it has been closed by then."""
        return start + self.config.metric_window_ms + self.config.attribution_ms - 1

    def on_timer(self, state: ArmState, experiment: str, arm: str, timestamp: int) -> list[dict[str, Any]]:
        done = sorted(s for s in state.windows if self.emit_at(s) <= timestamp)
        rows = []
        for s in done:
            state.emitted[s] = state.windows.pop(s)
            rows.append(self.metrics(experiment, arm, s, state.emitted[s], sum(f <= s for f in state.covered.values())))
        horizon = timestamp - self.config.update_grace_ms
        state.emitted = {s: w for s, w in state.emitted.items() if self.emit_at(s) > horizon}
        return rows

    def metrics(self, experiment: str, arm: str, start: int, w: ArmWindow, covered: int) -> dict[str, Any]:
        """The metrics row of one window: counts (additive over windows) and their rates."""
        c = w.counts
        n = c["impressions"]
        return {
            "experiment": experiment, "arm": arm, "window_start": start,
            "window_end": start + self.config.metric_window_ms, "attribution_ms": self.config.attribution_ms,
            **c,
            "ctr": _rate(c["clicked"], n),
            "item_ctr": _rate(c["item_clicks"], c["items_shown"]),
            "conversion_rate": _rate(c["conversions"], n),
            "fallback_rate": _rate(c["fallbacks"], n),
            "watch_s": c["watch_ms"] / 1000,
            "watch_s_per_impression": _rate(c["watch_ms"], n) / 1000,
            "completion_rate": _rate(c["completions"], n),
            "clicked_at": {str(k): v for k, v in sorted(w.clicked_at.items())},
            "ctr_at": {str(k): _rate(v, n) for k, v in sorted(w.clicked_at.items())},
            "position_impressions": w.position_impressions,
            "position_clicks": w.position_clicks,
            "position_ctr": [_rate(cl, im) for cl, im in zip(w.position_clicks, w.position_impressions, strict=True)],
            "items_distinct": len(w.items),
            "items_covered": covered,
        }


def metrics_json(row: Mapping[str, Any]) -> bytes:
    return json.dumps(row, sort_keys=True, separators=(",", ":")).encode()


def redis_fields(row: Mapping[str, Any]) -> dict[str, str]:
    """A metrics row as a flat Redis hash: numbers as text, lists and maps as JSON."""
    return {k: json.dumps(v, separators=(",", ":")) if isinstance(v, list | dict) else str(v) for k, v in row.items()}


def row_from_redis(fields: Mapping[bytes | str, bytes | str]) -> dict[str, Any]:
    """The inverse of :func:`redis_fields` (names stay text; numbers and JSON parsed)."""
    out: dict[str, Any] = {}
    for raw_key, raw_value in fields.items():
        key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        value = raw_value.decode() if isinstance(raw_value, bytes) else raw_value
        if key in ("experiment", "arm"):
            out[key] = value
            continue
        out[key] = json.loads(value)
    return out


def metrics_from_redis(client: Any, experiment: str) -> list[dict[str, Any]]:
    """Every window the job wrote for the experiment (contracts.redis_keys), in one pipelined round trip."""
    from contracts.redis_keys import experiment_index_key, experiment_window_key

    members = client.zrange(experiment_index_key(experiment), 0, -1)
    pipe = client.pipeline(transaction=False)
    for member in members:
        arm, _, start = (member.decode() if isinstance(member, bytes) else member).rpartition(":")
        pipe.hgetall(experiment_window_key(experiment, arm, int(start)))
    return [row_from_redis(fields) for fields in pipe.execute() if fields]


def offline_metrics(impressions: Iterable[Impression], events: Iterable[Feedback],
                    config: JoinConfig) -> list[dict[str, Any]]:
    """The same metrics computed in one pass over complete data (no lateness): the reference the stream must
    equal. Records in arrival order; duplicates count once. Outcomes reach the arms at their close time and a
    window is emitted at :meth:`ArmAggregator.emit_at`, as the stream's timers do."""
    joiner, aggregator = FeedbackJoiner(config), ArmAggregator(config)
    users: dict[str, UserJoinState] = {}
    for imp in impressions:
        joiner.on_impression(users.setdefault(imp.user_id, UserJoinState()), imp, NO_WATERMARK)
    for event in events:
        joiner.on_event(users.setdefault(event.user_id, UserJoinState()), event, NO_WATERMARK)
    outcomes = [o for state in users.values() for o in joiner.on_timer(state, 2**62)[0]]
    arms: dict[tuple[str, str], ArmState] = {}
    steps: list[tuple[int, int, Outcome | tuple[str, str]]] = []
    for o in outcomes:
        steps.append((o.served_at + config.attribution_ms, 0, o))
        steps.append((aggregator.emit_at(config.window_start(o.served_at)), 1, (o.experiment, o.arm)))
    rows: list[dict[str, Any]] = []
    for at, kind, what in sorted(steps, key=lambda s: (s[0], s[1], repr(s[2]))):
        if kind == 0:
            aggregator.on_outcome(arms.setdefault((what.experiment, what.arm), ArmState()), what, NO_WATERMARK)
        else:
            rows += aggregator.on_timer(arms[what], what[0], what[1], at)
    return rows
