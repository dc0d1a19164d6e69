"""bench.nearline_paths.cpu_budget: the CPU each event costs against what the box has (pure arithmetic)."""

from __future__ import annotations

import pytest

from bench.nearline_paths import cpu_budget


def test_budget_from_the_committed_run() -> None:
    # cpu_s_by_process of the 2026-12-01 19:09 nearline run (200,000 events, 2 cores), kept in git:
    # git show 52e74a4:bench/results/nearline-2026-12-01-1909.json
    cpu = {"flink-taskmanager": 38.83, "kafka": 3.25, "bench (producer, probes)": 3.23, "redis": 1.55,
           "flink-jobmanager": 0.72, "schema-registry": 0.01}
    b = cpu_budget(cpu, 200_000, 2, 50_000)
    assert b["us_per_event_by_process"]["flink-taskmanager"] == pytest.approx(194.2, abs=0.05)
    assert b["flink_us_per_event"] == pytest.approx(197.8, abs=0.1)
    assert b["outside_flink_us_per_event"] == pytest.approx(40.2, abs=0.1)
    assert b["budget_us_per_event_at_target"] == 40.0
    assert b["max_events_per_s_at_measured_cost"] == round(2e6 / (197.75 + 40.2))
    # Kafka, Redis and the load generator alone would fill the box just below the target
    assert b["max_events_per_s_if_flink_were_free"] == round(2e6 / 40.2)
    assert b["max_events_per_s_if_flink_were_free"] < 50_000


def test_budget_without_outside_processes_has_no_ceiling() -> None:
    b = cpu_budget({"flink-taskmanager": 10.0}, 100_000, 2, 50_000)
    assert b["outside_flink_us_per_event"] == 0
    assert b["max_events_per_s_if_flink_were_free"] is None
    assert b["max_events_per_s_at_measured_cost"] == 20_000



def test_each_engine_run_gets_its_engine_on_top_of_the_tokenize_args() -> None:
    import argparse

    from bench.nearline import engine_args

    args = argparse.Namespace(tokenize_args="--lake ''", events=10)
    assert engine_args(args, "sql").tokenize_args == "--lake '' --engine sql"
    assert engine_args(argparse.Namespace(tokenize_args=""), "python").tokenize_args == "--engine python"
    assert args.tokenize_args == "--lake ''"
    variant = engine_args(argparse.Namespace(tokenize_args="", user_state_args="--max-events 50"), "sql:--batch-ms 0")
    assert (variant.tokenize_args, variant.user_state_args) == ("--engine sql", "--max-events 50 --batch-ms 0")
    assert engine_args(args, "sql").user_state_args == ""
    # an entry's own tokenize options follow its engine, before the ':'
    both = engine_args(argparse.Namespace(tokenize_args="", user_state_args=""), "sql --lake '':--batch-ms 0")
    assert (both.tokenize_args, both.user_state_args) == ("--engine sql --lake ''", "--batch-ms 0")
    assert engine_args(args, " python --batch 4 ").tokenize_args == "--lake '' --engine python --batch 4"


def test_per_event_split_reads_the_thread_groups_of_a_window() -> None:
    from bench.nearline import per_event_us

    # thread groups of a run's sql window (50,000 events; nearline-engines-batch-3.json, in git at 7e4f99e), with its JIT sum
    threads = {"flink-taskmanager: user-state -> (": 1.12, "flink-taskmanager: Source: raw_sou": 0.75,
               "flink-taskmanager: CN CompilerThre": 0.6, "flink-taskmanager: Source: tokens_": 0.03}
    window = {"events": 50_000, "cpu": {"cpu_s_by_thread": threads,
                                        "budget": {"flink_us_per_event": 60.0, "flink_jit_us_per_event": 12.0}}}
    split = per_event_us(window)
    assert split == {"user_state": 23.0, "tokenize_task": 15.0, "jit": 12.0, "flink": 60.0,
                     "flink_without_jit": 48.0}
    assert per_event_us(None) is None and per_event_us({"events": 1, "cpu": None}) is None
