"""One service of the local stack (infra/stack.py, infra/stack_cluster.py): its health check, start and log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.processes import owned_pids
from infra.settings import Settings


@dataclass
class Service:
    """One part of the stack: how to tell it is healthy, how to start it, where it logs."""

    name: str
    port: int
    find_log: Callable[[], Path]  # the main log file (Flink's name carries user and host)
    healthy: Callable[[], bool]
    start: Callable[[], list[int]]  # spawns and returns the pids to record

    @property
    def log(self) -> Path:
        return self.find_log()

    def status(self, s: Settings) -> dict[str, object]:
        pids = owned_pids(s, self.name)
        return {"service": self.name, "port": self.port, "pid": pids, "healthy": self.healthy(), "log": self.log}
