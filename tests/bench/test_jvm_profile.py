"""bench/jvm_profile.py's summary of JFR samples (the recording itself runs against a TaskManager in the bench)."""

from __future__ import annotations

from bench import jvm_profile


def sample(thread: str, *frames: str) -> dict:
    return {"type": "jdk.ExecutionSample", "values": {
        "sampledThread": {"javaName": thread},
        "stackTrace": {"frames": [{"method": {"type": {"name": f.rsplit(".", 1)[0]}, "name": f.rsplit(".", 1)[1]}}
                                  for f in frames]}}}


def test_summary_counts_self_methods_components_once_per_sample_and_threads():
    events = [
        sample("Source: raw_source (1/1)#0", "org.apache.avro.io.BinaryDecoder.readLong",
               "org.apache.avro.generic.GenericDatumReader.read", "ugt.flink.RecordTokenizer.decode",
               "ugt.flink.TokenizeRecord.eval", "org.apache.flink.table.runtime.X.process"),
        sample("Source: raw_source (1/1)#0", "ugt.flink.RecordTokenizer.tokenize", "ugt.flink.RecordTokenizer.apply",
               "ugt.flink.TokenizeRecord.eval"),
        sample("kafka-producer-network-thread | p-12", "org/apache/kafka/common/Sender.run"),  # JFR's a/b/C
        sample("Thread-3", "java.lang.Object.wait"),
        {"type": "jdk.NativeMethodSample", "values": {}},
        {"type": "jdk.ExecutionSample", "values": {"stackTrace": {"frames": []}}},
    ]
    got = jvm_profile.summarise(events)
    assert (got["java_samples"], got["native_samples"]) == (4, 1)
    assert got["self"]["org.apache.avro.io.BinaryDecoder.readLong"] == 0.25
    # the two ugt frames of the second sample count once
    assert got["inclusive_by_component"] == {"ugt (jobs/jvm)": 0.5, "avro": 0.25, "flink table/sql runtime": 0.25,
                                             "kafka client": 0.25}
    assert got["by_thread"] == {"Source: raw_source (N/N)#N": 0.5, "kafka-producer-network-thread | p-N": 0.25,
                                "Thread-N": 0.25}
    assert jvm_profile.summarise([])["self"] == {}


def test_components_take_the_first_matching_prefix():
    assert jvm_profile.component("org.apache.flink.connector.kafka.sink.KafkaWriter") == "flink kafka connector"
    assert jvm_profile.component("org.apache.flink.streaming.api.operators.python.X") == "flink python operators"
    assert jvm_profile.component("java.lang.String") is None
