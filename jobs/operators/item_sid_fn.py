"""The item_semantic_ids operators: decode item events (non-keyed), then assign IDs in batches (keyed by item_id).

DecodeItemsFunction: Row(value, src_topic, src_partition, src_offset) -> Row(item_id, item, origin) with the
canonical item dict and (bytes, topic, partition, offset) pickled; unusable records go to DLQ_TAG.
ItemSidFunction: loads the artifact ONCE in open() (and a backfilled one once, when ugt:sid:active flips to it),
buffers items (jobs.item_semantic_ids_logic.ItemBatcher)
and assigns a batch at `batch_size` items, after `flush_ms` (timer) and at close; its main output is the
dead letters of items whose prefix ran out of dedup indices. Keying by item_id keeps every event of one item
on one instance, so two versions of an item never race for two IDs.
Counters (group `ugt`): `dead_lettered`, `items`, `new_ids`.
"""

from __future__ import annotations

import time

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, ProcessFunction, RuntimeContext

from jobs.common import key_value_type
from jobs.dead_letters import dead_letter_key, dead_letter_record
from jobs.item_semantic_ids_logic import JOB_NAME, DeadLetterError, decode_item_event
from streams.serde import (
    AvroSerde,
    SchemaRegistryClient,
    encode_with_id,
    load_schema,
    schema_text,
    subject_for,
)

DLQ_TAG = OutputTag("dead-letters", key_value_type())


def keyed_item_type():
    return Types.ROW_NAMED(["item_id", "item", "origin"],
                           [Types.STRING(), Types.PICKLED_BYTE_ARRAY(), Types.PICKLED_BYTE_ARRAY()])


class DecodeItemsFunction(ProcessFunction):
    def __init__(self, registry_url: str, dlq_topic: str):
        self.registry_url = registry_url
        self.dlq_topic = dlq_topic

    def open(self, runtime_context: RuntimeContext) -> None:
        self.serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        self.dlq_schema_id = self.serde.registry.register(subject_for(self.dlq_topic), schema_text("dead_letter"))
        self.dlq_schema = load_schema("dead_letter")
        self.metrics = runtime_context.get_metrics_group().add_group("ugt")
        self.dead_lettered = self.metrics.counter("dead_lettered")

    def process_element(self, value, ctx: ProcessFunction.Context):
        data, topic, partition, offset = value[0], value[1], value[2], value[3]
        try:
            item = decode_item_event(self.serde, data)
        except DeadLetterError as exc:
            self.dead_lettered.inc()
            record = dead_letter_record(data, topic, partition, offset, exc.reason_code, exc.reason, JOB_NAME,
                                        int(time.time() * 1000))
            yield DLQ_TAG, Row(k=dead_letter_key(topic, partition, offset),
                               v=encode_with_id(self.dlq_schema_id, self.dlq_schema, record))
            return
        yield Row(item_id=item["item_id"], item=item,
                  origin=(bytes(data), topic, int(partition), int(offset)))


class ItemSidFunction(KeyedProcessFunction):
    def __init__(self, artifact_path: str, registry_url: str, redis_url: str, feature_repo: str, dlq_topic: str,
                 batch_size: int, flush_ms: int, active_key: str = "ugt:sid:active"):
        self.artifact_path = artifact_path
        self.active_key = active_key
        self.registry_url = registry_url
        self.redis_url = redis_url
        self.feature_repo = feature_repo
        self.dlq_topic = dlq_topic
        self.batch_size = batch_size
        self.flush_ms = flush_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        import sys

        from infra.redis_client import redis_from_url

        # Feast imports torch when installed (slow, large); nothing here needs it (see user_state_fn)
        sys.modules.setdefault("torch", None)
        from infra.feast_store import open_feature_store
        from jobs.common import _JobSettings
        from jobs.item_semantic_ids_logic import ItemBatcher, feast_item_writer, follow_active

        self.redis = redis_from_url(self.redis_url)
        feast = open_feature_store(_JobSettings(redis_override=self.redis_url), repo=self.feature_repo)
        # loads the artifact once per worker, seeds its dedup store + index, activates it if none is active,
        # then follows ugt:sid:active (a backfill's flip) batch by batch
        assigner = follow_active(self.redis, self.artifact_path, feast_item_writer(feast), self.active_key)
        self.batcher = ItemBatcher(assigner, self.batch_size, self.flush_ms / 1000.0)
        serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        self.dlq_schema_id = serde.registry.register(subject_for(self.dlq_topic), schema_text("dead_letter"))
        self.dlq_schema = load_schema("dead_letter")
        group = runtime_context.get_metrics_group().add_group("ugt")
        self.items = group.counter("items")
        self.new_ids = group.counter("new_ids")
        self.dead_lettered = group.counter("dead_lettered")
        self.timer_at = 0

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        self.batcher.add(value[1], value[2])
        if self.batcher.due():
            yield from self._flush()
        elif self.timer_at == 0:
            self.timer_at = ctx.timer_service().current_processing_time() + self.flush_ms
            ctx.timer_service().register_processing_time_timer(self.timer_at)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        if timestamp >= self.timer_at:
            self.timer_at = 0
        yield from self._flush()

    def _flush(self):
        assigned, dead = self.batcher.flush()
        self.items.inc(len(assigned))
        self.new_ids.inc(sum(1 for a in assigned if a.new))
        for key, record in dead:
            self.dead_lettered.inc()
            yield Row(k=key, v=encode_with_id(self.dlq_schema_id, self.dlq_schema, record))

    def close(self) -> None:
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            for _ in self._flush():  # no output is possible at close: overflowed items are logged only
                pass
        if getattr(self, "redis", None) is not None:
            self.redis.close()
