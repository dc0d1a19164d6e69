"""The bundle-end hook: runs before PyFlink's process-mode operation commits a bundle, and a failure fails it."""

from __future__ import annotations

import sys
import types

import pytest

from jobs.operators import bundle_flush


class StatefulOperation:
    """Stands in for pyflink's process-mode operation: finish() commits the bundle's keyed state."""

    def __init__(self) -> None:
        self.committed = 0

    def finish(self) -> None:
        self.committed += 1


@pytest.fixture
def process_mode(monkeypatch):
    module = types.ModuleType(bundle_flush.PROCESS_MODE_OPERATIONS)
    module.StatefulOperation = type("StatefulOperation", (StatefulOperation,), {})
    monkeypatch.setitem(sys.modules, bundle_flush.PROCESS_MODE_OPERATIONS, module)
    monkeypatch.delitem(sys.modules, bundle_flush.THREAD_MODE_OPERATIONS, raising=False)
    monkeypatch.setattr(bundle_flush, "_installed", False)
    monkeypatch.setattr(bundle_flush, "_callbacks", {})
    return module.StatefulOperation


def test_callback_runs_before_the_bundle_commits(process_mode):
    order: list[str] = []
    operation = process_mode()
    original = process_mode.finish

    def commit(self) -> None:
        order.append("commit")
        original(self)

    process_mode.finish = commit
    assert bundle_flush.on_bundle_end("op-0", lambda: order.append("flush"))
    operation.finish()
    operation.finish()
    assert order == ["flush", "commit", "flush", "commit"]


def test_a_failed_flush_fails_the_bundle_and_nothing_is_committed(process_mode):
    operation = process_mode()

    def flush() -> None:
        raise ConnectionError("Redis is gone")

    bundle_flush.on_bundle_end("op-0", flush)
    with pytest.raises(ConnectionError):
        operation.finish()
    assert operation.committed == 0


def test_registering_again_replaces_and_remove_stops(process_mode):
    calls: list[str] = []
    operation = process_mode()
    bundle_flush.on_bundle_end("op-0", lambda: calls.append("old"))
    bundle_flush.on_bundle_end("op-0", lambda: calls.append("new"))  # a restarted operator in the same worker
    operation.finish()
    bundle_flush.remove("op-0")
    operation.finish()
    assert calls == ["new"] and operation.committed == 2


def test_thread_mode_has_no_bundles(monkeypatch):
    monkeypatch.delitem(sys.modules, bundle_flush.PROCESS_MODE_OPERATIONS, raising=False)
    monkeypatch.setattr(bundle_flush, "_callbacks", {})
    assert not bundle_flush.on_bundle_end("op-0", lambda: None)
    assert bundle_flush._callbacks == {}


def test_process_mode_is_told_by_the_loaded_operations(process_mode, monkeypatch):
    assert bundle_flush.in_process_mode()
    monkeypatch.delitem(sys.modules, bundle_flush.PROCESS_MODE_OPERATIONS)
    assert not bundle_flush.in_process_mode()


def test_thread_mode_also_loads_the_process_module_but_is_told_apart(process_mode, monkeypatch):
    """pyflink's embedded (thread-mode) operations import the process-mode module too, through async functions."""
    monkeypatch.setitem(sys.modules, bundle_flush.THREAD_MODE_OPERATIONS, types.ModuleType("embedded"))
    assert not bundle_flush.in_process_mode()
    assert not bundle_flush.on_bundle_end("op-0", lambda: None)
