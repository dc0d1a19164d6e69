"""The `stack` fixture: the real local stack (Kafka, Schema Registry, Redis, Flink) for integration tests.

Brought up once per session through infra.stack.up(), which leaves already-healthy services alone.
At the end it stops only the services it started itself, so a stack that was running before the
tests (someone's `ugt stack up`) keeps running; set UGT_KEEP_STACK=1 to keep those too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from infra import stack as stack_mod
from infra.settings import Settings, get_settings


@pytest.fixture(scope="session")
def stack() -> Iterator[Settings]:
    settings = get_settings()
    was_up = {row["service"] for row in stack_mod.status(settings=settings) if row["healthy"]}
    stack_mod.up(settings=settings, log=lambda line: None)
    yield settings
    started = [name for name in stack_mod.SERVICES if name not in was_up]
    if started and os.environ.get("UGT_KEEP_STACK") != "1":
        stack_mod.down(only=started, settings=settings, log=lambda line: None)
