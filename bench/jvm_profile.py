"""Where a JVM's CPU goes, by Java Flight Recorder (in every JDK 11+): `jcmd PID JFR.start`, later `JFR.stop`, then
`jfr print --json` summarised into the methods samples sat in (self), the code on their stacks (inclusive, by
component: Avro, Kafka client, Flink SQL runtime, UGT's own Java, PEMJA's Python bridge ...) and the threads.

A diagnosis for the nearline bench (`python -m bench.nearline --jfr`): py-spy sees the TaskManager's embedded
Python, this sees its Java. Shares are of Java execution samples; a thread inside native code (PEMJA running
Python, but also one blocked in epoll) is a jdk.NativeMethodSample, only counted (``native_samples``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter

RECORDING = "ugt-bench"
# the first matching prefix names a frame's component (inclusive shares: a sample counts once per component)
COMPONENTS = (
    ("ugt.flink.", "ugt (jobs/jvm)"),
    ("org.apache.avro.", "avro"),
    ("org.apache.kafka.", "kafka client"),
    ("org.apache.flink.connector.kafka.", "flink kafka connector"),
    ("org.apache.parquet.", "parquet"),
    ("org.apache.flink.formats.", "flink formats"),
    ("org.apache.flink.table.", "flink table/sql runtime"),
    ("org.apache.flink.python.", "flink python operators"),
    ("org.apache.flink.streaming.api.operators.python.", "flink python operators"),
    ("pemja.", "pemja (python bridge)"),
    ("redis.clients.jedis.", "jedis"),
    ("org.apache.flink.runtime.checkpoint.", "flink checkpoints"),
    ("org.apache.flink.runtime.state.", "flink state"),
    ("org.apache.flink.contrib.streaming.state.", "flink state"),
    ("org.rocksdb.", "rocksdb"),
    ("org.apache.flink.runtime.io.network.", "flink network"),
    ("org.apache.flink.api.common.typeutils.", "flink serializers"),
    ("org.apache.flink.api.java.typeutils.", "flink serializers"),
    ("com.fasterxml.jackson.", "jackson"),
    ("java.util.zip.", "java zip"),
)


def tools_missing() -> str | None:
    """Why JFR cannot run here, or None."""
    missing = [tool for tool in ("jcmd", "jfr") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not on PATH (a JDK 11+ has both)" if missing else None


def start(pid: int, out: str) -> None:
    """Start a recording (JFR's `profile` settings: a Java sample every 10 ms per running thread) into `out`."""
    subprocess.run(["jcmd", str(pid), "JFR.start", f"name={RECORDING}", "settings=profile", f"filename={out}"],
                   check=True, capture_output=True, text=True, timeout=60)


def component(frame_type: str) -> str | None:
    for prefix, name in COMPONENTS:
        if frame_type.startswith(prefix):
            return name
    return None


def summarise(events: list[dict], top: int = 15) -> dict[str, object]:
    """jdk.ExecutionSample / jdk.NativeMethodSample events (`jfr print --json`) -> shares of the Java samples."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = native = 0
    for event in events:
        if event.get("type") == "jdk.NativeMethodSample":
            native += 1
            continue
        values = event.get("values", {})
        frames = (values.get("stackTrace") or {}).get("frames") or []
        if not frames:
            continue
        total += 1
        types = [f["method"]["type"]["name"].replace("/", ".") for f in frames]  # JFR writes a/b/C
        self_counts[f"{types[0]}.{frames[0]['method']['name']}"] += 1
        inclusive.update({c for t in types if (c := component(t))})
        thread = (values.get("sampledThread") or {}).get("javaName") or "?"
        threads[re.sub(r"\d+", "N", thread)[:48]] += 1

    def shares(counter: Counter[str], n: int) -> dict[str, float]:
        return {k: round(v / total, 3) for k, v in counter.most_common(n)} if total else {}

    return {"java_samples": total, "native_samples": native, "self": shares(self_counts, top),
            "inclusive_by_component": shares(inclusive, len(COMPONENTS)), "by_thread": shares(threads, 8)}


def stop(recordings: list[tuple[int, str]], top: int = 15) -> dict[str, object]:
    """Stop each recording (its file is written then), read them all and summarise their samples together."""
    events: list[dict] = []
    for pid, out in recordings:
        try:
            subprocess.run(["jcmd", str(pid), "JFR.stop", f"name={RECORDING}"], check=True, capture_output=True,
                           text=True, timeout=120)
            printed = subprocess.run(["jfr", "print", "--json", "--events", "jdk.ExecutionSample,jdk.NativeMethodSample",
                                      out], check=True, capture_output=True, text=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as exc:  # a JVM gone mid-run must not lose the benchmark
            return {"error": f"JFR on pid {pid}: {exc}"}
        events += json.loads(printed.stdout)["recording"]["events"]
    # the recordings stay for a closer look: `jfr print --events jdk.ExecutionSample FILE`, or JDK Mission Control
    return {**summarise(events, top), "recordings": [out for _, out in recordings]}
