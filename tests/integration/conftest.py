"""The `stack` fixture: the real local stack (Kafka, Schema Registry, Redis, Flink) for integration tests.

Brought up once per session through infra.stack.up(): services already healthy are left alone, and
concurrent sessions serialise on var/run/stack.lock. The stack is left RUNNING afterwards, because
several test sessions (and people) share one stack and a later `up` then costs nothing; it never
stops a stack that was running before the tests. Set UGT_STACK_TEARDOWN=1 to stop, at the end, the
services this session started itself (CI can also simply run `ugt stack down`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from infra import stack as stack_mod
from infra.settings import Settings, get_settings
from streams.topics import ensure_pipeline


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    settings = get_settings()
    was_up = {str(row["service"]) for row in stack_mod.status(settings=settings) if row["healthy"]}
    stack_mod.up(settings=settings, log=lambda line: None, after_kafka=ensure_pipeline)
    yield settings
    started = [name for name in stack_mod.SERVICES if name not in was_up]
    if started and os.environ.get("UGT_STACK_TEARDOWN") == "1":
        stack_mod.down(only=started, settings=settings, log=lambda line: None)
