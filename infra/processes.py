"""The stack's processes: pid files, finding our own processes, spawning, stopping, ports and java.

Every service runs detached (its own session), so `ugt stack down` from another shell can stop it: its pids
live in var/run/<service>.pid, and a /proc scan finds the ones a crash left without a pid file.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from infra.flink_home import flink_conf_dir
from infra.settings import Settings
from infra.stack_errors import StackError


def run_dir(s: Settings) -> Path:
    return s.var_dir / "run"


def pid_file(s: Settings, name: str) -> Path:
    return run_dir(s) / f"{name}.pid"


def port_open(port: int, host: str = "localhost", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our exited child, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_pids(s: Settings, name: str) -> list[int]:
    path = pid_file(s, name)
    if not path.exists():
        return []
    return [int(x) for x in path.read_text().split() if x.strip().isdigit()]


def write_pids(s: Settings, name: str, pids: Iterable[int]) -> None:
    run_dir(s).mkdir(parents=True, exist_ok=True)
    pid_file(s, name).write_text("".join(f"{p}\n" for p in pids))


def _is_ours(s: Settings, name: str, pid: int, args: list[str]) -> bool:
    """Is this process the stack's `name`, started from this var/? (by its arguments or, for
    redis-server, which rewrites its title, by its working directory under var/redis)."""
    exe = os.path.basename(args[0]) if args else ""
    joined = " ".join(args)
    if name == "kafka":
        # the single node's var/kafka/server.properties, a cluster-profile node's var/kafka/broker-<n>/server.properties
        return exe.startswith("java") and re.search(
            re.escape(str(s.var_dir / "kafka")) + r"/(broker-\d+/)?server\.properties", joined) is not None
    if name == "registry":
        return "infra.schema_registry" in joined and str(s.var_dir / "registry" / "registry.json") in joined
    if name == "flink":
        return exe.startswith("java") and str(flink_conf_dir(s)) in joined
    if name == "redis":
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")  # the single node's var/redis, a cluster node's var/redis/cluster-<port>
            return exe.startswith("redis-server") and re.fullmatch(
                re.escape(str(s.var_dir / "redis")) + r"(/cluster-\d+)?", cwd) is not None
        except OSError:
            return False
    return False


def owned_pids(s: Settings, name: str) -> list[int]:
    """Live pids of `name` started from this var/: the pid file, plus a /proc scan for orphans
    (a pid file lost to a crash or an interrupted `up` must not leave a process nobody can stop)."""
    pids = {p for p in read_pids(s, name) if pid_alive(p)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
        if _is_ours(s, name, int(entry.name), args) and pid_alive(int(entry.name)):
            pids.add(int(entry.name))
    return sorted(pids)


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start a long-running process detached from us (own session), stdout+stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )
    return proc.pid


def log_tail(path: Path, lines: int = 12) -> str:
    """What to show from a failed service's log: its last error lines if it has any, else its tail
    (the tail of a Java log is usually the bottom of a stack trace, which says little)."""
    if not path.is_file():
        return f"    ({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    errors = [line for line in text if re.search(r"\b(ERROR|FATAL)\b|^\S*(Exception|Error)\b", line)]
    shown = errors[-lines // 2:] if errors else text[-lines:]
    return "\n".join("    " + line[:400] for line in shown)


def terminate(pids: list[int], grace_s: float) -> list[int]:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; returns the pids that had to be killed."""
    alive = [p for p in pids if pid_alive(p)]
    _signal_all(alive, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in alive):
        reap_children()
        time.sleep(0.1)
    killed = [p for p in alive if pid_alive(p)]
    _signal_all(killed, signal.SIGKILL)
    return killed


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each pid; one that is already gone is not an error."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def reap_children() -> None:
    """Collect exited children (when `up` and `down` run in one process, e.g. the tests)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    exe = Path(home) / "bin" / "java" if home else shutil.which("java")
    if not exe or not Path(exe).exists():
        raise StackError("java not found: install Java 17 (bash infra/install.sh) or set JAVA_HOME")
    return str(exe)
