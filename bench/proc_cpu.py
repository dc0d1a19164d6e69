"""Who eats the CPU during a benchmark window: per process class (Kafka, Flink TaskManager, ...) and per thread.

Reads the processes' CPU times before and after the window, so it costs nothing while the benchmark runs.
Processes are found and timed with psutil. Threads are read from /proc/<pid>/task/<tid>/stat directly: the
per-thread rows need each thread's name, which psutil does not give (``Process.threads()`` has only ids and
times), and one read of that file gives the name and the times together. Threads are grouped by name with
digits folded ("Source: raw (1/2)#0" and "(2/2)#0" add up), which in the Flink TaskManager names the operator
chain a thread runs (Linux keeps the first 15 characters of a thread name) -- in PyFlink's thread mode the
Python functions run on those task threads (pemja), so their CPU shows up there.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil

TICK = os.sysconf("SC_CLK_TCK")
CLASSES = (  # (label, substring of the command line); the first match wins
    ("flink-taskmanager", "TaskManagerRunner"),
    ("flink-jobmanager", "StandaloneSessionClusterEntrypoint"),
    ("flink-client", "org.apache.flink.client.cli.CliFrontend"),
    ("kafka", "kafka.Kafka"),
    ("redis", "redis-server"),
    ("schema-registry", "schema_registry"),
    ("pyflink-python-worker", "pyflink.fn_execution"),  # process mode's Beam workers
    ("pyflink-python-worker", "pyflink-udf-runner"),
)
PER_THREAD = ("flink-taskmanager", "kafka")  # the classes whose threads are listed too


def _classify(cmdline: str) -> str | None:
    for label, needle in CLASSES:
        if needle in cmdline:
            return label
    return None


def in_scope(cmdline: str, scope: tuple[str, ...]) -> bool:
    """True when ``scope`` is empty or one of its strings is in ``cmdline``: on a box shared by several stacks,
    e.g. (the stack's var folder, ":<its redis port>") keeps one stack's processes and drops the others'."""
    return not scope or any(marker in cmdline for marker in scope)


def processes_running(needle: str, scope: tuple[str, ...] = ()) -> list[psutil.Process]:
    """The processes with ``needle`` in one of their command-line arguments (e.g. "TaskManagerRunner"),
    of this stack only when ``scope`` is given (in_scope)."""
    return [p for p in psutil.process_iter(["cmdline"]) if any(needle in part for part in (p.info["cmdline"] or []))
            and in_scope(" ".join(p.info["cmdline"] or []), scope)]


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of one process (0 once it is gone or hidden)."""
    try:
        times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return times.user + times.system


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its live descendants (uvicorn workers, engine processes); empty once ``pid`` is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    return sum(cpu_seconds(p) for p in process_tree(pid))


class TreeCpu:
    """CPU seconds of this process and every descendant, sampled so workers that exit early still count."""

    def __init__(self, every_s: float = 0.2):
        self.root = psutil.Process()
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        for proc in [self.root, *self.root.children(recursive=True)]:
            self.seen[proc.pid] = max(self.seen.get(proc.pid, 0.0), cpu_seconds(proc))

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sample()

    def total(self) -> float:
        self._stop.set()
        self._thread.join()
        self.sample()
        return sum(self.seen.values())


def _thread_ticks(stat_path: Path) -> tuple[str, int] | None:
    """(thread name, utime + stime in clock ticks) from a /proc/<pid>/task/<tid>/stat file."""
    try:
        text = stat_path.read_text()
    except OSError:
        return None
    name = text[text.index("(") + 1: text.rindex(")")]
    rest = text[text.rindex(")") + 2:].split()
    return name, int(rest[11]) + int(rest[12])  # utime + stime


@dataclass
class Snapshot:
    at: float
    processes: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (class, cpu s)
    threads: dict[tuple[int, int], tuple[str, str, int]] = field(default_factory=dict)  # (pid, tid) -> (class, name, ticks)


def snapshot(own_pid: int | None = None, scope: tuple[str, ...] = ()) -> Snapshot:
    """CPU times of every process we can classify (and of `own_pid` as 'bench (producer, probes)'); with
    ``scope``, only the processes of one stack (in_scope), not those of other stacks on the same box."""
    snap = Snapshot(time.monotonic())
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        label = "bench (producer, probes)" if process.pid == own_pid else _classify(cmdline)
        if label is None or (process.pid != own_pid and not in_scope(cmdline, scope)):
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        snap.processes[process.pid] = (label, times.user + times.system)
        if label in PER_THREAD:
            _snapshot_threads(snap, process.pid, label)
    return snap


def _snapshot_threads(snap: Snapshot, pid: int, label: str) -> None:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return
    for task in tasks:
        got = _thread_ticks(task / "stat")
        if got is not None:
            snap.threads[(pid, int(task.name))] = (label, got[0], got[1])


def _fold(name: str) -> str:
    return re.sub(r"\d+", "N", name)


def diff(before: Snapshot, after: Snapshot, top: int = 8) -> dict[str, object]:
    """CPU seconds per process class and the busiest thread groups between two snapshots."""
    seconds = max(after.at - before.at, 1e-9)
    by_class: dict[str, float] = defaultdict(float)
    for pid, (label, cpu_s) in after.processes.items():
        by_class[label] += cpu_s - before.processes.get(pid, (label, 0.0))[1]
    by_thread: dict[str, float] = defaultdict(float)
    for key, (label, name, ticks) in after.threads.items():
        by_thread[f"{label}: {_fold(name)}"] += (ticks - before.threads.get(key, (label, name, 0))[2]) / TICK
    busiest = sorted(by_thread.items(), key=lambda kv: -kv[1])[:top]
    jit: dict[str, float] = defaultdict(float)
    for group, cpu_s in by_thread.items():
        if "CompilerThre" in group:
            jit[group.split(":", 1)[0]] += cpu_s
    return {
        "window_s": round(seconds, 2),
        "cores_busy": round(sum(by_class.values()) / seconds, 2),
        "cpu_s_by_process": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "cpu_s_by_thread": {k: round(v, 2) for k, v in busiest if v > 0},
        # the JVMs' JIT compiler threads (C1/C2 CompilerThread) per process class, all of them (not only the top
        # groups): a warm-up cost a long-running JVM stops paying, so benches report CPU with and without it
        "cpu_s_jit_compiler": {label: round(v, 2) for label, v in sorted(jit.items())},
    }


def start_py_spy(py_spy: str, pid: int, out: str, rate: int = 50):
    """Sample the Python stacks of `pid` (the TaskManager: its embedded CPython in thread mode, its Beam worker
    children in process mode) until stopped."""
    import subprocess

    # --subprocesses: in process mode the Python runs in the TaskManager's child Beam workers
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", str(rate),
                             "--format", "raw", "--output", out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_py_spy(process, out: str, top: int = 12) -> dict[str, object]:
    """Stop the sampler (SIGINT writes the file) and summarise: the functions the samples sat in (self) and the
    repo functions on the stack (inclusive), as shares of the samples not waiting (IDLE leaf frames dropped)."""
    return stop_py_spies([(process, out)], top)


def stop_py_spies(spies: list[tuple[object, str]], top: int = 12) -> dict[str, object]:
    """stop_py_spy over several samplers (one per TaskManager), their samples summed."""
    import signal

    for process, _ in spies:  # stop them all first: a sampler left running would outlive the bench
        process.send_signal(signal.SIGINT)  # type: ignore[attr-defined]
    for process, _ in spies:
        try:
            process.wait(30)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a stuck sampler must not lose the benchmark
            process.kill()  # type: ignore[attr-defined]
    lines: list[str] = []
    for _, out in spies:
        try:
            lines += Path(out).read_text().splitlines()
        except OSError:
            return {"error": f"py-spy wrote no {out}"}
    self_count: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        if frames[-1].split(" (")[0] in IDLE:
            continue  # a thread waiting, not working
        total += n
        self_count[_frame(frames[-1])] += n
        for name in {_frame(f) for f in frames if _in_repo(f)}:
            inclusive[name] += n
    def share(counts: dict[str, int]) -> dict[str, float]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return {k: round(v / total, 3) for k, v in ranked} if total else {}

    return {"samples": total, "self": share(self_count), "repo_inclusive": share(inclusive)}


IDLE = {"Condition.wait", "_run_channel_spin_thread.<locals>.channel_spin", "Thread._wait_for_tstate_lock",
        "Event.wait", "select", "poll", "sleep", "Queue.get", "_worker"}
REPO_PACKAGES = ("jobs/", "models/", "streams/", "serving/", "infra/")


def _in_repo(frame: str) -> bool:
    """py-spy names files relative to sys.path: this repo's frames start with one of its packages."""
    where = frame.partition(" (")[2]
    return where.startswith(REPO_PACKAGES) or any(f"/{p}" in where for p in REPO_PACKAGES) and "site-packages" not in where


def _frame(frame: str) -> str:
    """'fn (path/to/file.py:123)' -> 'fn (file.py)': lines folded so one function is one row."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"
