"""A private Flink standalone cluster for tests/integration/test_user_state_exactly_once.py.

Rendered like infra.flink_home.write_flink_conf (same template, same lib/ with flink-python), but with its own
REST/RPC ports, conf, logs and pids under a temp folder, a short heartbeat timeout and a restart strategy,
so the test can `kill -9` its TaskManager without touching the shared cluster.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests

from infra.flink_home import flink_env, flink_lib_dir, pyflink_home, write_flink_conf
from infra.processes import pid_alive
from infra.settings import REPO_ROOT, Settings
from jobs import cli as jobs_cli

EXTRA_CONF = """
heartbeat:
  interval: 1000
  timeout: 6000
restart-strategy:
  type: fixed-delay
  fixed-delay:
    attempts: 20
    delay: 1 s
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class PrivateFlinkCluster:
    """One JobManager + one TaskManager (4 slots) on free ports; everything under `root`."""

    def __init__(self, settings: Settings, root: Path):
        self.shared = settings
        # the stack's own renderer, pointed at other ports and at `root` instead of var/
        self.settings = replace(settings, var_dir=root, flink_rest_port=free_port(), flink_rpc_port=free_port(),
                                flink_metrics_port=free_port())
        self.rest_port = self.settings.flink_rest_port
        self.conf = write_flink_conf(self.settings)
        with (self.conf / "config.yaml").open("a") as f:
            f.write(EXTRA_CONF)
        self.log = self.settings.log_dir / "flink"
        self.pids = root / "run" / "flink"
        for d in (self.log, self.pids):
            d.mkdir(parents=True, exist_ok=True)
        self.started: list[int] = []

    @property
    def rest(self) -> str:
        return f"http://localhost:{self.rest_port}"

    def env(self) -> dict[str, str]:
        env = flink_env(self.settings)
        # the shared stack's lib/ (with flink-python, for thread mode)
        env.update(FLINK_LIB_DIR=str(flink_lib_dir(self.shared)), FLINK_CONF_DIR=str(self.conf),
                   FLINK_LOG_DIR=str(self.log), FLINK_PID_DIR=str(self.pids))
        return env

    def _daemon(self, name: str) -> int:
        pid_file = self.pids / f"flink-{self.env()['FLINK_IDENT_STRING']}-{name}.pid"
        pid_file.unlink(missing_ok=True)
        script = pyflink_home() / "bin" / ("jobmanager.sh" if name == "standalonesession" else "taskmanager.sh")
        # one TaskManager with all 4 slots (tokenize + user_state at parallelism 2), so one kill takes both jobs down
        extra = ["-D", "taskmanager.numberOfTaskSlots=4"] if name == "taskexecutor" else []
        subprocess.run(["bash", str(script), "start", *extra], env=self.env(), check=True, capture_output=True,
                       timeout=120)
        pid = int(pid_file.read_text().split()[-1])
        self.started.append(pid)
        return pid

    def start(self) -> None:
        self._daemon("standalonesession")
        self.taskmanager_pid = self._daemon("taskexecutor")
        self.wait_taskmanagers(1)

    def overview(self) -> dict[str, Any]:
        try:
            return requests.get(f"{self.rest}/overview", timeout=2).json()
        except (requests.RequestException, ValueError):
            return {}

    def wait_taskmanagers(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.overview().get("taskmanagers", 0) < n:
            assert time.monotonic() < deadline, f"private Flink: {n} TaskManager(s) not up; see {self.log}"
            time.sleep(0.5)

    def kill_taskmanager(self) -> None:
        """kill -9 the TaskManager (what a crashed machine looks like to the JobManager)."""
        os.kill(self.taskmanager_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while pid_alive(self.taskmanager_pid):
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def start_taskmanager(self) -> None:
        self.taskmanager_pid = self._daemon("taskexecutor")

    def submit(self, job: str, args: list[str]) -> str:
        command = jobs_cli.job_command(job, args, detached=True)
        out = subprocess.run(command, env=self.env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        found = re.search(r"JobID ([0-9a-f]{32})", out.stdout + out.stderr)
        assert out.returncode == 0 and found, f"flink run {job} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return found.group(1)

    def job(self, jid: str) -> dict[str, Any]:
        return requests.get(f"{self.rest}/jobs/{jid}", timeout=5).json()

    def failures(self, jid: str) -> list[str]:
        """Root exceptions Flink recorded for the job (each restart adds one)."""
        history = requests.get(f"{self.rest}/jobs/{jid}/exceptions", timeout=5).json().get("exceptionHistory", {})
        return [e.get("stacktrace", e.get("exceptionName", ""))[:2000] for e in history.get("entries", [])]

    def checkpoints(self, jid: str) -> dict[str, Any]:
        return requests.get(f"{self.rest}/jobs/{jid}/checkpoints", timeout=5).json()

    def cancel(self, jid: str) -> None:
        try:
            requests.patch(f"{self.rest}/jobs/{jid}", params={"mode": "cancel"}, timeout=5)
        except requests.RequestException:
            pass

    def stop(self) -> None:
        """Kill only the processes this object started."""
        for pid in self.started:
            if pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for pid in self.started:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
