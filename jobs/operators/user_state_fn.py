"""The user_state operator: per-user state, keyed by the events.tokens record key (the user_id).

The stream is keyed by the record key as text (the Kafka key, which the tokenize job sets to the user_id; keyed
in the JVM by jobs.common.keyed_kafka_source), so nothing is decoded or pickled before the shuffle.
UserStateFunction gets Row(value, k, src_topic, src_partition, src_offset), decodes the TokenizedEvent, and
sends records that are not one (SerdeError codes) or whose user_id is not their key (KEY_MISMATCH) to DLQ_TAG
as dead letters. It wires jobs.user_state_logic.UserStateProcessor to Flink: two ValueStates of bytes (the
encoded UserState + its write track; the long-term groups) and a ListState (events since that snapshot), all
with StateTtlConfig (--state-ttl-days), processing-time timers (confirm flushes, nearline compaction) and
LATE_EVENT dead letters on LATE_TAG.
Counters (group `ugt`): `events`, `applied`, `duplicates`, `late_events`, `rows_written`, `compactions`,
`dead_lettered`, `bundle_flushes` (process mode: flushes at a bundle end, jobs/operators/bundle_flush.py),
`batches` (UserStateBatchFunction: micro-batches of jobs/user_state_batch.py).
With --redis-wait-replicas every flush ends with a WAIT on each Redis master (jobs/replica_wait.py).
"""

from __future__ import annotations

import logging
import time

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from contracts.user_state_rule import DUPLICATE, LATE
from jobs.common import key_value_type
from jobs.dead_letters import dead_letter_key, dead_letter_record
from jobs.operators.bundle_flush import in_process_mode, on_bundle_end
from jobs.operators.bundle_flush import remove as remove_bundle_hook
from jobs.operators.counters import CounterBatch
from jobs.operators.state_ttl import state_ttl
from jobs.popularity_writer import redis_popularity_writer
from jobs.replica_wait import ReplicaBarrier
from jobs.token_batch import TokenBatchDecoder, decode_keyed
from jobs.user_state_batch import iter_records
from jobs.user_state_logic import (
    APPLIED,
    JOB_NAME,
    LATE_EVENT,
    OnlineStateWriter,
    ProcessorConfig,
    UserStateProcessor,
    feast_direct_writer,
    feast_long_term_writer,
    feast_row_writer,
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
LATE_TAG = OutputTag("late-events", key_value_type())


class _DeadLetters:
    """Encodes DeadLetter records for the DLQ topic (schema registered once per worker)."""

    def __init__(self, serde: AvroSerde, dlq_topic: str):
        self.schema_id = serde.registry.register(subject_for(dlq_topic), schema_text("dead_letter"))
        self.schema = load_schema("dead_letter")

    def row(self, data, topic: str, partition: int, offset: int, code: str, reason: str) -> Row:
        record = dead_letter_record(data, topic, partition, offset, code, reason, JOB_NAME, int(time.time() * 1000))
        return Row(k=dead_letter_key(topic, partition, offset), v=encode_with_id(self.schema_id, self.schema, record))


class _FlinkStore:
    """KeyedStore over the two ValueStates and the log ListState (Flink scopes them to the current key).

    Log entries added during one call for a key (a micro-batch) go to the ListState in one add_all at its end
    (:meth:`end_key`): one crossing into the JVM per batch instead of one per event."""

    def __init__(self, state, long_state, log):
        self.state = state
        self.long_state = long_state
        self.log = log
        self.added: list[bytes] = []

    def get(self):
        return self.state.value()

    def put(self, data: bytes) -> None:
        self.state.update(data)

    def get_long(self):
        return self.long_state.value()

    def put_long(self, data: bytes) -> None:
        self.long_state.update(data)

    def log_get(self):
        stored = self.log.get()
        if not self.added:
            return stored
        return [*(stored or ()), *self.added]

    def log_add(self, data: bytes) -> None:
        self.added.append(data)

    def log_clear(self) -> None:
        self.added = []
        self.log.clear()

    def end_key(self) -> None:
        """Write the log entries added for the current key (call before Flink moves to another key)."""
        if self.added:
            self.log.add_all(self.added)
            self.added = []


class UserStateFunction(KeyedProcessFunction):
    def __init__(self, redis_url: str, feature_repo: str, registry_url: str, dlq_topic: str,
                 config: ProcessorConfig, flush_rows: int, feast_write: str = "direct",
                 wait_replicas: int = 0, wait_timeout_ms: int = 5000):
        self.redis_url = redis_url
        self.feature_repo = feature_repo
        self.registry_url = registry_url
        self.dlq_topic = dlq_topic
        self.config = config
        self.flush_rows = flush_rows
        self.feast_write = feast_write
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        import sys

        from infra.redis_client import redis_from_url

        # Feast imports torch at import time when it is installed (~10 s and ~300 MB per Python worker on the
        # 2-core box); nothing in this worker uses it, so make that import fail fast (feast handles it).
        sys.modules.setdefault("torch", None)

        from infra.feast_store import open_feature_store
        from jobs.common import _JobSettings

        # cleanup named explicitly (jobs/operators/state_ttl.py): PyFlink's default adds a RocksDB strategy whose
        # Duration needs the py4j gateway, which a thread-mode worker does not have
        ttl = state_ttl(self.config.state_ttl_ms)
        descriptors = [ValueStateDescriptor(name, Types.PICKLED_BYTE_ARRAY()) for name in ("user_state", "long_term")]
        log = ListStateDescriptor("event_log", Types.PICKLED_BYTE_ARRAY())
        for descriptor in (*descriptors, log):
            descriptor.enable_time_to_live(ttl)
        self.store = _FlinkStore(*(runtime_context.get_state(d) for d in descriptors),
                                 runtime_context.get_list_state(log))
        store = open_feature_store(_JobSettings(redis_override=self.redis_url), repo=self.feature_repo)
        self.redis = redis_from_url(self.redis_url)
        writer = OnlineStateWriter(
            feast_direct_writer(store) if self.feast_write == "direct" else feast_row_writer(store),
            redis_popularity_writer(self.redis, ttl_s=max(1, self.config.state_ttl_ms // 1000)),
            max_rows=self.flush_rows, max_delay_s=self.config.flush_ms / 1000.0,
            write_long_rows=feast_long_term_writer(store),
            after_write=ReplicaBarrier(self.redis, self.wait_replicas, self.wait_timeout_ms)
            if self.wait_replicas > 0 else None,
        )
        self.processor = UserStateProcessor(writer, self.config)
        # process mode: flush at the end of every bundle, which Flink ends before a checkpoint barrier passes
        # (jobs/operators/bundle_flush.py); thread mode: the confirm timers alone (jobs/user_state_logic.py)
        # (the subtask index names the hook; PyFlink 2.2's thread-mode runtime context cannot give it)
        self.bundle_hook = f"user_state-{runtime_context.get_index_of_this_subtask()}" if in_process_mode() else ""
        self.bundle_flushed = False
        self.flushes_at_barrier = bool(self.bundle_hook) and on_bundle_end(self.bundle_hook,
                                                                           self._flush_at_bundle_end)
        logging.getLogger(__name__).info("user_state subtask %s: writes flushed %s", self.bundle_hook,
                                         "at every bundle end (before each checkpoint barrier)"
                                         if self.flushes_at_barrier else "by the confirm timers (thread mode)")
        self.serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        self.letters = _DeadLetters(self.serde, self.dlq_topic)
        group = runtime_context.get_metrics_group().add_group("ugt")
        # per-event counts go to Flink in sums (jobs.operators.counters); flushed on timers and dead letters too
        self.counts = CounterBatch({name: group.counter(name) for name in (
            "events", "applied", "duplicates", "late_events", "dead_lettered", "rows_written", "compactions",
            "bundle_flushes", "batches")})
        self.counted = (0, 0)

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        """One record: Row(value, k, src_topic, src_partition, src_offset)."""
        yield from self._record(value[0], value[1], value[2], value[3], value[4], ctx, int(time.time() * 1000))
        self.store.end_key()
        self._count(self.processor.flush_if_due())
        self.counts.record()

    def _record(self, data, key, topic: str, partition: int, offset: int, ctx: KeyedProcessFunction.Context,
                now_ms: int):
        counts = self.counts
        try:
            event = decode_keyed(self.serde, data, key)
        except SerdeError as exc:
            counts.add("dead_lettered")
            counts.flush()
            yield DLQ_TAG, self.letters.row(data, topic, partition, offset, exc.reason_code, exc.reason)
            return
        counts.add("events")
        timers = ctx.timer_service()
        # now_ms: wall clock, as Flink's processing-time service reads it: one JNI call less per event
        outcome = self.processor.on_event(event, self.store, now_ms)
        if outcome.status == APPLIED:
            counts.add("applied")
            for _, at in outcome.timers:
                timers.register_processing_time_timer(at)
        elif outcome.status == DUPLICATE:
            counts.add("duplicates")
        elif outcome.status == LATE:
            counts.add("late_events")
            counts.add("dead_lettered")
            counts.flush()
            yield LATE_TAG, self.letters.row(data, topic, partition, offset, LATE_EVENT, self._late_reason(event))

    def _late_reason(self, event) -> str:
        return (f"event_time {event.event_time} is more than {self.processor.config.allowed_lateness_ms} ms "
                f"older than user {event.user_id!r}'s newest event")

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        timers = ctx.timer_service()
        for _, at in self.processor.on_timer(ctx.get_current_key(), timestamp, self.store,
                                             timers.current_processing_time()):
            timers.register_processing_time_timer(at)
        self.store.end_key()
        self._count(self.processor.flush_if_due())
        self.counts.flush()
        return iter(())

    def _flush_at_bundle_end(self) -> None:
        """Write every buffered row and increment now: a failure here fails the bundle and the checkpoint."""
        if self.processor.writer.pending():
            users = self.processor.writer.flush()
            self._count(users)
            self.counts.add("bundle_flushes")
            if not self.bundle_flushed:  # once per worker: the hook runs in the real worker (the Redis-kill test)
                self.bundle_flushed = True
                logging.getLogger(__name__).info("%s: first flush at a bundle end, %d users", self.bundle_hook, users)

    def _count(self, _: int) -> None:
        """Move the processor's running totals into the Flink counters."""
        written, compactions = self.processor.writer.rows_written, self.processor.compactions
        if written > self.counted[0]:
            self.counts.add("rows_written", written - self.counted[0])
        if compactions > self.counted[1]:
            self.counts.add("compactions", compactions - self.counted[1])
        self.counted = (written, compactions)

    def close(self) -> None:
        if getattr(self, "bundle_hook", None):
            remove_bundle_hook(self.bundle_hook)
        processor = getattr(self, "processor", None)
        if processor is not None:
            processor.writer.flush()
            self._count(0)
            self.counts.flush()
        if getattr(self, "redis", None) is not None:
            self.redis.close()


class UserStateBatchFunction(UserStateFunction):
    """UserStateFunction fed micro-batches (jobs/user_state_batch.py): Row(records, k, src_topic), one call per
    (user, batch). The batch is decoded in one pass (jobs/token_batch.py) and folded with the user's state loaded
    once (UserStateProcessor.on_events); dead letters leave in the records' order, as one call per record sent
    them. per_record=True (--batch-fold per-record) sends each record through the per-record path instead, as
    before 2026-12-07: the A/B baseline."""

    def __init__(self, *args, per_record: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_record = per_record

    def open(self, runtime_context: RuntimeContext) -> None:
        super().open(runtime_context)
        self.decoder = TokenBatchDecoder(self.serde)

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        now_ms = int(time.time() * 1000)
        counts = self.counts
        counts.add("batches")  # events / batches = the mean batch size
        if self.per_record:
            yield from self._per_record(value, ctx, now_ms)
            return
        records = self.decoder.decode(value[0], value[1])
        events = [record[0] for record in records if record[0] is not None]
        statuses: list[str] = []
        if events:
            counts.add("events", len(events))
            statuses, timers = self.processor.on_events(events, self.store, now_ms)
            if timers:
                service = ctx.timer_service()
                for _, at in timers:
                    service.register_processing_time_timer(at)
            applied = statuses.count(APPLIED)
            counts.add("applied", applied)
            if applied < len(statuses):
                counts.add("duplicates", statuses.count(DUPLICATE))
        if len(events) < len(records) or (events and LATE in statuses):
            yield from self._dead_letters(records, statuses, value[2])
        self.store.end_key()
        self._count(self.processor.flush_if_due())
        counts.record()

    def _per_record(self, value, ctx: KeyedProcessFunction.Context, now_ms: int):
        key, topic = value[1], value[2]
        for data, partition, offset in iter_records(value[0]):
            yield from self._record(data, key, topic, partition, offset, ctx, now_ms)
        self.store.end_key()
        self._count(self.processor.flush_if_due())
        self.counts.record()

    def _dead_letters(self, records, statuses: list[str], topic: str):
        """The batch's dead letters in record order: each record that is not an event, each event LATE for the user."""
        counts = self.counts
        late = iter(statuses)
        for event, error, data, partition, offset in records:
            if event is None:
                counts.add("dead_lettered")
                counts.flush()
                yield DLQ_TAG, self.letters.row(data, topic, partition, offset, error.reason_code, error.reason)
            elif next(late) == LATE:
                counts.add("late_events")
                counts.add("dead_lettered")
                counts.flush()
                yield LATE_TAG, self.letters.row(data, topic, partition, offset, LATE_EVENT, self._late_reason(event))
