"""bench.proc_cpu: process CPU through psutil, thread CPU (with names) from /proc, as seconds either way."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from bench import proc_cpu

BURN = ("import sys, time\n"
        "while time.process_time() < 0.4: pass\n"
        "print('burnt', flush=True)\n"
        "sys.stdin.read()\n")  # then idle until the test closes stdin


def test_tree_cpu_counts_the_live_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "burnt"
        assert child.pid in [p.pid for p in proc_cpu.process_tree(os.getpid())]
        own = proc_cpu.cpu_seconds(psutil.Process())
        assert proc_cpu.tree_cpu_seconds(os.getpid()) - own >= 0.35
        assert proc_cpu.tree_cpu_seconds(child.pid) >= 0.35
    finally:
        child.communicate("", timeout=30)
    assert proc_cpu.process_tree(child.pid) == [] and proc_cpu.tree_cpu_seconds(child.pid) == 0.0  # gone: no error


def test_the_bench_process_is_classified_and_timed_in_seconds() -> None:
    before = proc_cpu.snapshot(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    after = proc_cpu.snapshot(os.getpid())
    label, _ = after.processes[os.getpid()]
    assert label == "bench (producer, probes)"
    used = proc_cpu.diff(before, after)["cpu_s_by_process"]["bench (producer, probes)"]
    assert used == pytest.approx(0.2, abs=0.1)


def test_diff_adds_processes_by_class_and_threads_by_folded_name() -> None:
    tick = proc_cpu.TICK
    before = proc_cpu.Snapshot(0.0, {1: ("kafka", 1.0)},
                               {(1, 11): ("kafka", "data-plane-1", 0), (1, 12): ("kafka", "data-plane-2", tick)})
    after = proc_cpu.Snapshot(2.0, {1: ("kafka", 2.5), 2: ("redis", 0.5)},
                              {(1, 11): ("kafka", "data-plane-1", tick), (1, 12): ("kafka", "data-plane-2", 3 * tick)})
    got = proc_cpu.diff(before, after)
    assert got["cpu_s_by_process"] == {"kafka": 1.5, "redis": 0.5}
    assert got["cores_busy"] == 1.0
    assert got["cpu_s_by_thread"] == {"kafka: data-plane-N": 3.0}


def test_diff_sums_each_process_classs_jit_compiler_threads_beyond_the_top_groups() -> None:
    tick = proc_cpu.TICK
    before = proc_cpu.Snapshot(0.0, {1: ("flink-taskmanager", 0.0), 2: ("kafka", 0.0)}, {
        (1, 10): ("flink-taskmanager", "C2 CompilerThre", 0), (1, 11): ("flink-taskmanager", "C1 CompilerThre", 0),
        (1, 12): ("flink-taskmanager", "user-state -> (", 0), (2, 20): ("kafka", "C2 CompilerThre", 0)})
    after = proc_cpu.Snapshot(2.0, {1: ("flink-taskmanager", 9.0), 2: ("kafka", 1.0)}, {
        (1, 10): ("flink-taskmanager", "C2 CompilerThre", 3 * tick),
        (1, 11): ("flink-taskmanager", "C1 CompilerThre", 1 * tick),
        (1, 12): ("flink-taskmanager", "user-state -> (", 5 * tick), (2, 20): ("kafka", "C2 CompilerThre", 1 * tick)})
    out = proc_cpu.diff(before, after, top=1)
    assert out["cpu_s_by_thread"] == {"flink-taskmanager: user-state -> (": 5.0}
    assert out["cpu_s_jit_compiler"] == {"flink-taskmanager": 4.0, "kafka": 1.0}
