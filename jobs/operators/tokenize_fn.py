"""The tokenize operator: a PyFlink ProcessFunction around jobs.tokenize_logic.EventTokenizer.

Tokens go to the main output as Row(k=user_id, v=TokenizedEvent bytes); dead letters go to the side
output DLQ_TAG as Row(k, v=DeadLetter bytes). Counters (Flink metrics, group `ugt`): `processed`,
`tokenized`, `dead_lettered`, and `dead_lettered` under the sub-group `reason=<code>`.
"""

from __future__ import annotations

from pyflink.datastream import OutputTag, ProcessFunction, RuntimeContext

from jobs.common import key_value_type
from jobs.tokenize_logic import EventTokenizer
from streams.serde import AvroSerde, SchemaRegistryClient

DLQ_TAG = OutputTag("dead-letters", key_value_type())


class TokenizeFunction(ProcessFunction):
    def __init__(self, registry_url: str, tokens_topic: str, dlq_topic: str):
        self.registry_url = registry_url
        self.tokens_topic = tokens_topic
        self.dlq_topic = dlq_topic

    def open(self, runtime_context: RuntimeContext) -> None:
        # one registry client per parallel instance: schema ids are looked up once and cached
        serde = AvroSerde(SchemaRegistryClient(self.registry_url))
        self.tokenizer = EventTokenizer(serde, self.tokens_topic, self.dlq_topic)
        self.metrics = runtime_context.get_metrics_group().add_group("ugt")
        self.processed = self.metrics.counter("processed")
        self.tokenized = self.metrics.counter("tokenized")
        self.dead_lettered = self.metrics.counter("dead_lettered")
        self.by_reason: dict = {}

    def _reason_counter(self, code: str):
        counter = self.by_reason.get(code)
        if counter is None:
            counter = self.metrics.add_group("reason", code).counter("dead_lettered")
            self.by_reason[code] = counter
        return counter

    def process_element(self, value, ctx: ProcessFunction.Context):
        from pyflink.common import Row

        self.processed.inc()
        out = self.tokenizer.process(value[0], value[1], value[2], value[3])
        if out.dead is None:
            self.tokenized.inc()
            yield Row(k=out.key, v=out.value)
        else:
            self.dead_lettered.inc()
            self._reason_counter(out.dead).inc()
            yield DLQ_TAG, Row(k=out.key, v=out.value)
