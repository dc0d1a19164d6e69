"""The failure drills under the jobs on the cluster profile (issue #20), small: 0 lost, 0 doubled, every row equal.

Brings up the whole cluster profile (3 KRaft brokers, the registry, a 3+3 Redis Cluster, Flink with 3
TaskManagers) on the stack's ports + 600 in var/drills-test/ (bench.drills.drill_settings), then runs each drill of
bench/drills_jobs.py with a few thousand ML-1M events streamed at a steady rate into tokenize + user_state at
parallelism 2: kill -9 a Redis master (while `ugt serve` answers for the stream's users), kill -9 a TaskManager,
stop and start the whole stack. Each drill compares the online state with the offline fold of its events. `python -m bench.drills` runs the same functions, larger,
and records their timings. Skipped when the box has too little free memory for the profile (~9 GiB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from bench.drills import drill_settings
from bench.drills_jobs import JOB_DRILLS
from infra import stack as stack_mod
from infra.settings import Settings
from streams.topics import ensure_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT_OFFSET = 600
MIN_FREE_GIB = 9.0
EVENTS = 3000
RATE = 60.0  # events/s: the stream lasts ~50 s, so each failure meets it running
SERVING_RATE = 30.0  # /recommend calls/s during the Redis-master drill
# Fallbacks caused by the kill may come from the kill until this long after the failover completed: serving's
# clients learn the new slot owner on their next error (a refresh of the cluster's slot map), and a request
# already waiting on the dead node ends at serving's request timeout (1 s).
CLIENT_TIMEOUT_S = 3.0  # bench.drills_serving.ServingLoad's


@pytest.fixture(scope="module")
def cluster_profile() -> Iterator[Settings]:
    free_gib = psutil.virtual_memory().available / 2**30
    if free_gib < MIN_FREE_GIB:
        pytest.skip(f"the cluster profile needs ~{MIN_FREE_GIB:.0f} GiB free; {free_gib:.1f} GiB available")
    saved = dict(os.environ)
    settings = drill_settings(PORT_OFFSET, folder="drills-test")
    try:
        stack_mod.up(settings=settings, log=print, after_kafka=ensure_pipeline)
        yield settings
    finally:
        stack_mod.down(settings=settings, log=print)
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("drill", list(JOB_DRILLS))
def test_drill_loses_and_doubles_nothing(cluster_profile: Settings, drill: str) -> None:
    result = (JOB_DRILLS[drill](cluster_profile, EVENTS, RATE, serving_rate=SERVING_RATE) if drill == "redis_master"
              else JOB_DRILLS[drill](cluster_profile, EVENTS, RATE))
    print(result)
    assert result["restored"], f"{drill}: the jobs did not resume from a checkpoint or savepoint: {result}"
    assert (result["lost"], result["doubled"], result["users_differing"], result["dead_letters"]) == (0, 0, 0, 0), result
    assert result["users"] > 10
    if drill == "redis_master":
        check_serving(result)


def check_serving(result: dict) -> None:
    """Serving carried on: no 5xx, every call answered, fallbacks only in the failover window, the model after."""
    assert (result["http_5xx"], result["no_answer"]) == (0, 0), result
    assert result["serving_answers_before_kill"] > 0, result
    sent, answered = result["fallback_window_s"], result["fallback_answered_window_s"]
    if answered is not None:  # each fallback came back in the failover or the rejoin window (+ grace), none before
        assert 0 <= answered[0] and result["fallbacks_outside_windows"] == 0, result
        assert -CLIENT_TIMEOUT_S <= sent[0], result  # a call in flight at the kill, at most one timeout before it
    assert result["fallback_answers"] == sum(result["fallback_reasons"].values()), result
    assert result["model_answers_after_window"] > 0, result
