"""The user_state operators: decode tokens (non-keyed), then keep per-user state (keyed by user_id).

DecodeTokensFunction: Row(value, src_topic, src_partition, src_offset) -> Row(user_id, event) where event is
the pickled TokenizedEvent; records that are not TokenizedEvents go to DLQ_TAG as dead letters.
UserStateFunction: ValueState holds UserState.to_dict() (pickled); every event is applied with
models.user_state.apply_event and the new feature row goes to Feast online through OnlineStateWriter
(batched: a batch goes out at `flush_rows` users, after `flush_ms`, on a timer, and at close).
Counters (group `ugt`): `events`, `applied`, `duplicates`, `rows_written`, `dead_lettered`.
"""

from __future__ import annotations

import time

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, ProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from jobs.common import key_value_type
from jobs.tokenize_logic import dead_letter_key, dead_letter_record
from jobs.user_state_logic import (
    JOB_NAME,
    OnlineStateWriter,
    decode_token_event,
    feast_direct_writer,
    feast_row_writer,
    popularity_key,
    redis_popularity_writer,
    update_state,
)
from streams.serde import (
    AvroSerde,
    SchemaRegistryClient,
    SerdeError,
    encode_with_id,
    load_schema,
    schema_text,
    subject_for,
)

DLQ_TAG = OutputTag("dead-letters", key_value_type())


def keyed_event_type():
    return Types.ROW_NAMED(["user_id", "event"], [Types.STRING(), Types.PICKLED_BYTE_ARRAY()])


class DecodeTokensFunction(ProcessFunction):
    def __init__(self, registry_url: str, dlq_topic: str):
        self.registry_url = registry_url
        self.dlq_topic = dlq_topic

    def open(self, runtime_context: RuntimeContext) -> None:
        self.serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        self.dlq_schema_id = self.serde.registry.register(subject_for(self.dlq_topic), schema_text("dead_letter"))
        self.dlq_schema = load_schema("dead_letter")
        self.dead_lettered = runtime_context.get_metrics_group().add_group("ugt").counter("dead_lettered")

    def process_element(self, value, ctx: ProcessFunction.Context):
        data, topic, partition, offset = value[0], value[1], value[2], value[3]
        try:
            event = decode_token_event(self.serde, data)
        except SerdeError as exc:
            self.dead_lettered.inc()
            record = dead_letter_record(data, topic, partition, offset, exc.reason_code, exc.reason, JOB_NAME,
                                        int(time.time() * 1000))
            yield DLQ_TAG, Row(k=dead_letter_key(topic, partition, offset),
                               v=encode_with_id(self.dlq_schema_id, self.dlq_schema, record))
            return
        yield Row(user_id=event.user_id, event=event)


class UserStateFunction(KeyedProcessFunction):
    def __init__(self, redis_url: str, feature_repo: str, max_events: int, flush_rows: int, flush_ms: int,
                 feast_write: str = "direct"):
        self.feast_write = feast_write
        self.redis_url = redis_url
        self.feature_repo = feature_repo
        self.max_events = max_events
        self.flush_rows = flush_rows
        self.flush_ms = flush_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        import sys

        import redis

        # Feast imports torch at import time when it is installed (~10 s and ~300 MB per Python worker on the
        # 2-core box); nothing in this worker uses it, so make that import fail fast (feast handles it).
        sys.modules.setdefault("torch", None)
        from infra.feast_store import open_feature_store
        from jobs.common import _JobSettings

        self.state = runtime_context.get_state(ValueStateDescriptor("user_state", Types.PICKLED_BYTE_ARRAY()))
        settings = _JobSettings(redis_override=self.redis_url)
        store = open_feature_store(settings, repo=self.feature_repo)
        self.redis = redis.Redis.from_url(self.redis_url)
        self.writer = OnlineStateWriter(
            feast_direct_writer(store) if self.feast_write == "direct" else feast_row_writer(store),
            redis_popularity_writer(self.redis),
            max_rows=self.flush_rows, max_delay_s=self.flush_ms / 1000.0,
        )
        group = runtime_context.get_metrics_group().add_group("ugt")
        self.events = group.counter("events")
        self.applied = group.counter("applied")
        self.duplicates = group.counter("duplicates")
        self.rows_written = group.counter("rows_written")
        self.timer_at = 0

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        event = value[1]
        self.events.inc()
        state, is_new = update_state(self.state.value(), event, self.max_events)
        if is_new:
            self.applied.inc()
            self.state.update(state.to_dict())
        else:
            self.duplicates.inc()
        self.writer.add(state, (popularity_key(event.domain), event.item_id) if is_new else None)
        if self.writer.due():
            self._flush()
        elif self.timer_at == 0:
            # flush the tail of a burst even if no further event arrives
            self.timer_at = ctx.timer_service().current_processing_time() + self.flush_ms
            ctx.timer_service().register_processing_time_timer(self.timer_at)
        return iter(())

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        if timestamp >= self.timer_at:
            self.timer_at = 0
        self._flush()
        return iter(())

    def _flush(self) -> None:
        self.rows_written.inc(self.writer.flush())

    def close(self) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            self._flush()
        if getattr(self, "redis", None) is not None:
            self.redis.close()
