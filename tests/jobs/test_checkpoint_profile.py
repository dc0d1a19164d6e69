"""The checkpoint settings per delivery profile: jobs.common's defaults, checks and the Flink / Kafka options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from jobs.common import (
    DEFAULT_CHECKPOINT_MS,
    JobConfig,
    JobSetupError,
    add_common_arguments,
    checkpoint_interval_ms,
    config_from_args,
    flink_configuration,
    kafka_sink_ddl,
)


def parse(*argv: str, connector: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_common_arguments(parser, "tokenize")
    return parser.parse_args([*argv, "--connector-jar", str(connector)])


@pytest.fixture
def connector(tmp_path: Path) -> Path:
    jar = tmp_path / "flink-sql-connector-kafka.jar"
    jar.write_bytes(b"jar")
    return jar


def test_exactly_once_defaults_to_a_sub_second_interval(connector: Path) -> None:
    eo = config_from_args(parse("--delivery", "exactly-once", connector=connector), "tokenize")
    alo = config_from_args(parse(connector=connector), "tokenize")
    assert eo.checkpoint_interval_ms == DEFAULT_CHECKPOINT_MS["exactly-once"] == 250
    assert eo.checkpoint_min_pause_ms == 125
    assert alo.checkpoint_interval_ms == 10_000 and alo.checkpoint_min_pause_ms == 5_000


def test_an_explicit_interval_and_pause_win(connector: Path) -> None:
    args = parse("--delivery", "exactly-once", "--checkpoint-interval-ms", "2000", "--checkpoint-min-pause-ms", "0",
                 "--unaligned-checkpoints", connector=connector)
    assert checkpoint_interval_ms(args) == 2000
    cfg = config_from_args(args, "tokenize")
    assert (cfg.checkpoint_interval_ms, cfg.checkpoint_min_pause_ms, cfg.unaligned_checkpoints) == (2000, 0, True)


@pytest.mark.parametrize("argv, message", [
    (("--delivery", "exactly-once", "--checkpoint-interval-ms", "0"), "commits Kafka transactions on checkpoints"),
    (("--checkpoint-min-pause-ms", "-1"), "--checkpoint-min-pause-ms must be >= 0"),
])
def test_bad_checkpoint_options_say_what_is_wrong(argv: tuple[str, ...], message: str, connector: Path) -> None:
    with pytest.raises(JobSetupError, match=message):
        config_from_args(parse(*argv, connector=connector), "tokenize")


def test_flink_and_kafka_options_of_the_exactly_once_profile(connector: Path) -> None:
    cfg = JobConfig(job_name="tokenize", bootstrap="b", registry="r", redis="redis://x", group_id="g", local=True,
                    connector_jar=str(connector), python=sys.executable, checkpoint_interval_ms=500,
                    checkpoint_min_pause_ms=250, unaligned_checkpoints=True, delivery="exactly-once",
                    checkpoint_dir="/tmp/ckpt")
    conf = flink_configuration(cfg)
    assert conf["execution.checkpointing.interval"] == "500 ms"
    assert conf["execution.checkpointing.min-pause"] == "250 ms"
    assert conf["execution.checkpointing.unaligned.enabled"] == "true"
    ddl = kafka_sink_ddl("tokens_sink", "events.tokens", cfg)
    assert "'sink.delivery-guarantee' = 'exactly-once'" in ddl
    assert "'sink.transaction-naming-strategy' = 'POOLING'" in ddl
    at_least_once = kafka_sink_ddl("tokens_sink", "events.tokens", JobConfig(**{**vars(cfg), "delivery": "at-least-once"}))
    assert "transaction" not in at_least_once
