"""The tokenize operator: a PyFlink ProcessFunction around jobs.tokenize_logic.EventTokenizer.

Tokens go to the main output as Row(k=user_id, v=TokenizedEvent bytes), with a lake as Row(k, v, *LAKE_FIELDS)
(jobs.lake.token_lake_row_type: SQL splits it into the Kafka and parquet sinks outside the Python call); dead
letters go to the side output DLQ_TAG as Row(k, v=DeadLetter bytes). Counters (Flink metrics, group `ugt`): `processed`,
`tokenized` (handed to Flink in sums, jobs.operators.counters), `dead_lettered`, and `dead_lettered` under the sub-group `reason=<code>`;
`sid_round_trips` (Redis reads of the worker's semantic-ID cache). No Python gauges: in thread mode Flink's metric
thread calls a gauge's Python function outside the task thread, and that crashed the TaskManager (SIGSEGV in
_PyEval_EvalFrameDefault under MetricGauge.getValue, seen once in the demo while it polled job metrics).
"""

from __future__ import annotations

from pyflink.datastream import OutputTag, ProcessFunction, RuntimeContext

from jobs.common import key_value_type
from jobs.lake import lake_values
from jobs.operators.counters import CounterBatch
from jobs.tokenize_logic import EventTokenizer, Rules
from streams.serde import AvroSerde, SchemaRegistryClient

DLQ_TAG = OutputTag("dead-letters", key_value_type())


class TokenizeFunction(ProcessFunction):
    def __init__(
        self, registry_url: str, tokens_topic: str, dlq_topic: str, rules: Rules | None = None,
        redis_url: str = "", sid_version: str = "", lake: bool = False,
    ):
        self.registry_url = registry_url
        self.tokens_topic = tokens_topic
        self.dlq_topic = dlq_topic
        self.rules = rules or Rules()
        self.redis_url = redis_url
        self.sid_version = sid_version
        self.lake = lake

    def open(self, runtime_context: RuntimeContext) -> None:
        # one registry client and one semantic-ID cache per parallel instance, filled once and kept
        serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        sids = None
        if self.redis_url:
            from infra.redis_client import redis_from_url
            from jobs.sid_cache import SemanticIdCache

            sids = SemanticIdCache(redis_from_url(self.redis_url), version=self.sid_version or None)
        self.tokenizer = EventTokenizer(serde, self.tokens_topic, self.dlq_topic, rules=self.rules, sids=sids)
        self.metrics = runtime_context.get_metrics_group().add_group("ugt")
        self.counts = CounterBatch({"processed": self.metrics.counter("processed"),
                                    "tokenized": self.metrics.counter("tokenized"),
                                    "sid_round_trips": self.metrics.counter("sid_round_trips")})
        self.dead_lettered = self.metrics.counter("dead_lettered")
        self.sids = sids
        self.sid_round_trips = 0
        self.by_reason: dict = {}

    def close(self) -> None:
        if hasattr(self, "counts"):
            self.counts.flush()

    def _reason_counter(self, code: str):
        counter = self.by_reason.get(code)
        if counter is None:
            counter = self.metrics.add_group("reason", code).counter("dead_lettered")
            self.by_reason[code] = counter
        return counter

    def process_element(self, value, ctx: ProcessFunction.Context):
        from pyflink.common import Row

        counts = self.counts
        counts.add("processed")
        counts.record()
        out = self.tokenizer.process(value[0], value[1], value[2], value[3])
        if self.sids is not None and self.sids.round_trips != self.sid_round_trips:
            counts.add("sid_round_trips", self.sids.round_trips - self.sid_round_trips)
            self.sid_round_trips = self.sids.round_trips
        if out.dead is None:
            counts.add("tokenized")
            if self.lake:
                yield Row(out.key, out.value, *lake_values(out.event, value[2], value[3]))
            else:
                yield Row(k=out.key, v=out.value)
        else:
            counts.flush()  # dead letters are rare: keep their counters exact and in order
            self.dead_lettered.inc()
            self._reason_counter(out.dead).inc()
            yield DLQ_TAG, Row(k=out.key, v=out.value)
