"""A tiny PyFlink job for the stack test: proves `flink run -py` + the Kafka connector jar work.

Reads every record of one topic (bounded: up to the offsets at start), upper-cases it in a
Python map (so the TaskManager's Python worker runs too) and writes it to another topic.
Usage: flink run -py flink_kafka_echo_job.py --bootstrap localhost:9092 --source a --sink b --jar file:///...jar
"""

from __future__ import annotations

import argparse

from pyflink.common import Types, WatermarkStrategy
from pyflink.common.serialization import SimpleStringSchema
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.connectors.base import DeliveryGuarantee
from pyflink.datastream.connectors.kafka import (
    KafkaOffsetsInitializer,
    KafkaRecordSerializationSchema,
    KafkaSink,
    KafkaSource,
)


def build_pipeline(env: StreamExecutionEnvironment, bootstrap: str, source: str, sink: str) -> None:
    kafka_source = (
        KafkaSource.builder()
        .set_bootstrap_servers(bootstrap)
        .set_topics(source)
        .set_group_id(f"echo-{source}")
        .set_starting_offsets(KafkaOffsetsInitializer.earliest())
        .set_bounded(KafkaOffsetsInitializer.latest())
        .set_value_only_deserializer(SimpleStringSchema())
        .build()
    )
    kafka_sink = (
        KafkaSink.builder()
        .set_bootstrap_servers(bootstrap)
        .set_record_serializer(
            KafkaRecordSerializationSchema.builder().set_topic(sink).set_value_serialization_schema(SimpleStringSchema()).build()
        )
        .set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
        .build()
    )
    stream = env.from_source(kafka_source, WatermarkStrategy.no_watermarks(), "kafka-source")
    stream.map(lambda v: v.upper(), output_type=Types.STRING()).sink_to(kafka_sink)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--sink", required=True)
    parser.add_argument("--jar", required=True, help="file:// URL of flink-sql-connector-kafka")
    args, _ = parser.parse_known_args()
    env = StreamExecutionEnvironment.get_execution_environment()
    env.add_jars(args.jar)
    env.set_parallelism(1)
    build_pipeline(env, args.bootstrap, args.source, args.sink)
    env.execute(f"ugt-stack-echo-{args.source}")


if __name__ == "__main__":
    main()
