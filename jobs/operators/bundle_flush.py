"""Flush before every checkpoint barrier in PyFlink's process mode: a hook on the end of each Beam bundle.

PyFlink gives a Python function no snapshotState / prepareSnapshotPreBarrier. In process mode
(``python.execution-mode: process``) the JVM operator finishes the current bundle before it lets a barrier pass
(AbstractExternalPythonFunctionOperator.prepareSnapshotPreBarrier -> invokeFinishBundle), and the Python worker
ends a bundle by calling ``finish()`` on its operation (pyflink.fn_execution.datastream.process.operations
.StatefulOperation), which commits the keyed state of the bundle. :func:`on_bundle_end` runs a callback there,
before that commit: the user_state operator flushes its buffered Redis writes, so no checkpoint completes while
writes of records before its barrier sit in a buffer, and a write that fails fails the bundle, hence the
checkpoint and the task (the restore replays it). Bundles also end on their own (python.fn-execution.bundle.size
/ .time), so this costs at most one extra batch per bundle.

Thread mode (pemja) has no bundles: the JVM calls Python once per record and a barrier passes between two calls,
so a buffered write is covered by the operator's confirm timers alone (jobs/user_state_logic.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# the module a process-mode worker runs its keyed functions from (a thread-mode interpreter imports it too, through
# pyflink's async-function module); and the module only a thread-mode (pemja) interpreter runs them from
PROCESS_MODE_OPERATIONS = "pyflink.fn_execution.datastream.process.operations"
THREAD_MODE_OPERATIONS = "pyflink.fn_execution.embedded.operations"

_callbacks: dict[str, Callable[[], None]] = {}
_installed = False


def in_process_mode() -> bool:
    """Does this Python worker run keyed functions in bundles (process mode)?"""
    if THREAD_MODE_OPERATIONS in sys.modules:
        return False
    return getattr(sys.modules.get(PROCESS_MODE_OPERATIONS), "StatefulOperation", None) is not None


def on_bundle_end(name: str, callback: Callable[[], None]) -> bool:
    """Call `callback` at the end of every bundle of this Python worker, before its keyed state is committed.

    `name` identifies the caller: registering the same name again replaces its callback (a restarted operator in
    the same worker). Returns False where this worker has no bundles (thread mode): the caller relies on its other
    guarantee. An exception from `callback` fails the bundle, and with it the pending checkpoint and the task.
    """
    global _installed
    if not in_process_mode():
        return False
    operation = sys.modules[PROCESS_MODE_OPERATIONS].StatefulOperation
    if not _installed:
        finish = operation.finish

        def finish_after_callbacks(self) -> None:
            for run in list(_callbacks.values()):
                run()
            finish(self)

        operation.finish = finish_after_callbacks
        _installed = True
    _callbacks[name] = callback
    return True


def remove(name: str) -> None:
    """Stop calling `name`'s callback (the operator closed)."""
    _callbacks.pop(name, None)
