"""The feedback_join operators: decode, the per-user join, the per-arm aggregation (jobs/feedback_join_logic.py).

``DecodeFunction`` turns an events.impressions or events.tokens record into ``Row(user_id, time, payload)`` (payload:
the pickled :class:`~jobs.feedback_join_logic.Impression` or :class:`~jobs.feedback_join_logic.Feedback` and where
it came from); a record it cannot decode is a dead letter on DLQ_TAG. ``FeedbackJoinFunction`` (keyed by user)
and ``ArmMetricsFunction`` (keyed by experiment and arm) keep their state as one pickled value per key and run on
event-time timers. Late and undecodable records go to events.dlq (LATE_EVENT, LATE_IMPRESSION, serde codes), once.
Counters (group `ugt`): decode: `impressions`, `events`, `dead_lettered`; join: `joined`, `duplicates`,
`late_impressions`, `late_events`, `no_experiment`, `outcomes`; aggregation: `windows_emitted`, `late_outcomes` (past --update-grace-min), and per
experiment and arm (labels) `arm_impressions`, `arm_users`, `arm_clicked`, `arm_conversions`, `arm_item_clicks`,
`arm_items_shown`, `arm_fallbacks`, `arm_watch_ms`, `arm_completions`, counted when a window is emitted.
"""

from __future__ import annotations

import pickle
import time

from pyflink.common import Row, Types
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import KeyedProcessFunction, OutputTag, ProcessFunction, RuntimeContext, TimeDomain
from pyflink.datastream.state import ValueStateDescriptor

from contracts.redis_keys import experiment_index_key, experiment_window_key
from jobs.common import key_value_type
from jobs.dead_letters import dead_letter_key, dead_letter_record
from jobs.feedback_join_logic import (
    ARM_COUNTERS,
    DUPLICATE,
    JOB_NAME,
    LATE,
    LATE_EVENT,
    LATE_IMPRESSION,
    NO_EXPERIMENT,
    ArmAggregator,
    ArmState,
    Feedback,
    FeedbackJoiner,
    Impression,
    JoinConfig,
    UserJoinState,
    metrics_json,
    redis_fields,
)
from jobs.operators.counters import CounterBatch
from jobs.operators.state_ttl import state_ttl
from streams.serde import (
    AvroSerde,
    SchemaRegistryClient,
    SerdeError,
    encode_with_id,
    load_schema,
    subject_for,
)

DLQ_TAG = OutputTag("dead-letters", key_value_type())
IMPRESSION, EVENT = "impression", "event"


def decoded_type():
    """Row(user_id, time, payload): payload pickles (Impression | Feedback, value, topic, partition, offset)."""
    return Types.ROW_NAMED(["user_id", "time", "payload"], [Types.STRING(), Types.LONG(), Types.PICKLED_BYTE_ARRAY()])


class RecordTime(TimestampAssigner):
    """Event time of a decoded row: served_at of an impression, event_time of a user event."""

    def extract_timestamp(self, value, record_timestamp: int) -> int:
        return value[1]


class _DeadLetters:
    """DeadLetter records for the DLQ topic (schema registered once per worker)."""

    def __init__(self, registry_url: str, dlq_topic: str):
        from streams.serde import schema_text

        registry = SchemaRegistryClient(registry_url)
        self.schema_id = registry.register(subject_for(dlq_topic), schema_text("dead_letter"))
        self.schema = load_schema("dead_letter")

    def row(self, data, topic: str, partition: int, offset: int, code: str, reason: str) -> Row:
        record = dead_letter_record(data, topic, partition, offset, code, reason, JOB_NAME, int(time.time() * 1000))
        return Row(k=dead_letter_key(topic, partition, offset), v=encode_with_id(self.schema_id, self.schema, record))


class DecodeFunction(ProcessFunction):
    """Avro (Confluent wire format) of one topic -> Row(user_id, time, payload); bad records -> DLQ_TAG."""

    def __init__(self, kind: str, registry_url: str, dlq_topic: str):
        self.kind = kind
        self.registry_url = registry_url
        self.dlq_topic = dlq_topic

    def open(self, runtime_context: RuntimeContext) -> None:
        self.serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        self.letters = _DeadLetters(self.registry_url, self.dlq_topic)
        group = runtime_context.get_metrics_group().add_group("ugt")
        self.counts = CounterBatch({n: group.counter(n) for n in ("impressions", "events", "dead_lettered")})

    def process_element(self, value, ctx: ProcessFunction.Context):
        data, topic, partition, offset = value[0], value[1], value[2], value[3]
        try:
            record = self.serde.decode_raw(data).record
            parsed = Impression.from_record(record) if self.kind == IMPRESSION else Feedback.from_token(record)
        except SerdeError as exc:
            self.counts.add("dead_lettered")
            self.counts.flush()
            yield DLQ_TAG, self.letters.row(data, topic, partition, offset, exc.reason_code, exc.reason)
            return
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            self.counts.add("dead_lettered")
            self.counts.flush()
            yield DLQ_TAG, self.letters.row(data, topic, partition, offset, "WRONG_TYPE",
                                            f"not a {self.kind}: {exc.__class__.__name__}: {exc}")
            return
        self.counts.add("impressions" if self.kind == IMPRESSION else "events")
        self.counts.record()
        when = parsed.served_at if self.kind == IMPRESSION else parsed.event_time
        payload = pickle.dumps((parsed, bytes(data), topic, partition, offset), protocol=pickle.HIGHEST_PROTOCOL)
        yield Row(parsed.user_id, when, payload)

    def close(self) -> None:
        if getattr(self, "counts", None) is not None:
            self.counts.flush()


class FeedbackJoinFunction(KeyedProcessFunction):
    """Keyed by user: impressions and events joined on event-time timers; outcomes out, late records to DLQ_TAG."""

    def __init__(self, config: JoinConfig, registry_url: str, dlq_topic: str, state_ttl_ms: int):
        self.config = config
        self.registry_url = registry_url
        self.dlq_topic = dlq_topic
        self.state_ttl_ms = state_ttl_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        descriptor = ValueStateDescriptor("join", Types.PICKLED_BYTE_ARRAY())
        descriptor.enable_time_to_live(state_ttl(self.state_ttl_ms))
        self.state = runtime_context.get_state(descriptor)
        self.joiner = FeedbackJoiner(self.config)
        self.letters = _DeadLetters(self.registry_url, self.dlq_topic)
        group = runtime_context.get_metrics_group().add_group("ugt")
        self.counts = CounterBatch({n: group.counter(n) for n in (
            "joined", "duplicates", "late_impressions", "late_events", "no_experiment", "outcomes")})

    def _load(self) -> UserJoinState:
        return self.state.value() or UserJoinState()

    def _save(self, state: UserJoinState) -> None:
        if state.empty():
            self.state.clear()
        else:
            self.state.update(state)

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        parsed, data, topic, partition, offset = pickle.loads(value[2])
        state = self._load()
        watermark = ctx.timer_service().current_watermark()
        is_impression = isinstance(parsed, Impression)
        if is_impression:
            status, timer = self.joiner.on_impression(state, parsed, watermark)
        else:
            status, timer = self.joiner.on_event(state, parsed, watermark)
        if timer is not None:
            ctx.timer_service().register_event_time_timer(timer)
        self._save(state)
        if status == DUPLICATE:
            self.counts.add("duplicates")
        elif status == NO_EXPERIMENT:
            self.counts.add("no_experiment")
        elif status == LATE:
            self.counts.add("late_impressions" if is_impression else "late_events")
            self.counts.flush()
            code = LATE_IMPRESSION if is_impression else LATE_EVENT
            yield DLQ_TAG, self.letters.row(data, topic, partition, offset, code,
                                            f"event time {value[1]} is at or behind the watermark {watermark}")
        self.counts.record()

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        state = self._load()
        outcomes, attributed = self.joiner.on_timer(state, timestamp)
        self._save(state)
        self.counts.add("joined", attributed)
        self.counts.add("outcomes", len(outcomes))
        self.counts.flush()
        for outcome in outcomes:
            yield pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)

    def close(self) -> None:
        if getattr(self, "counts", None) is not None:
            self.counts.flush()


def arm_key(outcome_bytes: bytes) -> str:
    """The aggregation key of a pickled outcome: ``<experiment>:<arm>`` (names hold no ':')."""
    outcome = pickle.loads(outcome_bytes)
    return f"{outcome.experiment}:{outcome.arm}"


class ArmMetricsFunction(KeyedProcessFunction):
    """Keyed by (experiment, arm): windows of outcomes; each complete window -> Redis hash + Row(k, v) JSON."""

    def __init__(self, config: JoinConfig, redis_url: str, redis_ttl_s: int, state_ttl_ms: int):
        self.config = config
        self.redis_url = redis_url
        self.redis_ttl_s = redis_ttl_s
        self.state_ttl_ms = state_ttl_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        from infra.redis_client import redis_from_url

        descriptor = ValueStateDescriptor("arm", Types.PICKLED_BYTE_ARRAY())
        descriptor.enable_time_to_live(state_ttl(self.state_ttl_ms))
        self.state = runtime_context.get_state(descriptor)
        self.aggregator = ArmAggregator(self.config)
        self.redis = redis_from_url(self.redis_url) if self.redis_url else None  # a Redis Cluster URL too
        self.group = runtime_context.get_metrics_group().add_group("ugt")
        self.windows = self.group.counter("windows_emitted")
        self.dropped = self.group.counter("late_outcomes")
        self.arm_counters: dict[tuple[str, str], dict] = {}

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        outcome = pickle.loads(value)
        state = self.state.value() or ArmState()
        timers = ctx.timer_service()
        watermark = timers.current_watermark()
        due = self.aggregator.on_outcome(state, outcome, watermark)
        if due is None:
            self.dropped.inc()
        elif due > watermark:
            timers.register_event_time_timer(due)
            self.state.update(state)
        else:  # an update of an emitted window: now, not at the next watermark (there may be none for long)
            timers.register_processing_time_timer(timers.current_processing_time() + 100)
            self.state.update(state)
        return iter(())

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        state = self.state.value() or ArmState()
        experiment, arm = ctx.get_current_key().split(":", 1)
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:  # updates: every window due by the watermark
            timestamp = ctx.timer_service().current_watermark()
        rows = self.aggregator.on_timer(state, experiment, arm, timestamp)
        for row in rows:
            self._count(row, self.aggregator.newly_counted(state, row))
        self.state.update(state)
        if rows and self.redis is not None:
            self._write(rows)
        self.windows.inc(len(rows))
        for row in rows:
            yield Row(k=f"{experiment}:{arm}".encode(), v=metrics_json(row))

    def _count(self, row: dict, delta: dict[str, int]) -> None:
        """Per-arm counters for Prometheus: experiment and arm become labels (Flink key-value metric groups)."""
        key = (row["experiment"], row["arm"])
        if key not in self.arm_counters:
            group = self.group.add_group("experiment", key[0]).add_group("arm", key[1])
            self.arm_counters[key] = {name: group.counter(f"arm_{name}") for name in ARM_COUNTERS}
        for name, counter in self.arm_counters[key].items():
            if delta[name] > 0:
                counter.inc(delta[name])

    def _write(self, rows: list[dict]) -> None:
        """HSET each window's hash and index it; idempotent (a replay writes the same values)."""
        pipe = self.redis.pipeline(transaction=False)
        for row in rows:
            key = experiment_window_key(row["experiment"], row["arm"], row["window_start"])
            index = experiment_index_key(row["experiment"])
            pipe.hset(key, mapping=redis_fields(row))
            pipe.zadd(index, {f"{row['arm']}:{row['window_start']}": row["window_start"]})
            if self.redis_ttl_s > 0:
                pipe.expire(key, self.redis_ttl_s)
                pipe.expire(index, self.redis_ttl_s)
        pipe.execute()

    def close(self) -> None:
        if getattr(self, "redis", None) is not None:
            self.redis.close()
