"""What every benchmark shares: the machine it ran on, a printed table, and the one writer of its result JSON.

Every bench writes through ``write_result``, which records who produced the file (the command line, the git
commit and whether the tree had uncommitted changes, the machine, the UTC date) beside the bench's stated
conditions and its numbers, so no field of a result file is ever added by hand.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
# the fields write_result owns: a bench's results may not set them
RECORD_FIELDS = ("benchmark", "command", "commit", "dirty", "machine", "date", "conditions")


def result_path(name: str) -> Path:
    """bench/results/<name>.json, where the committed current result of a benchmark lives."""
    return RESULTS / f"{name}.json"


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python; the GPU's name and torch's version when torch is installed."""
    import psutil

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit(repo: Path | None = None) -> tuple[str | None, bool | None]:
    """(HEAD's full hash, whether the tree has uncommitted changes to tracked files) of ``repo`` (default: this
    repository); (None, None) when it is not the top of its own git checkout.

    ``UGT_COMMIT`` (and ``UGT_DIRTY``) win: a GPU machine gets a copy of the tree inside another repository, whose
    HEAD is not ours, so the GPU scripts pass the project's commit in; a copy that is not its own checkout records
    none rather than a wrong one.
    """
    if os.environ.get("UGT_COMMIT"):
        dirty = os.environ.get("UGT_DIRTY")
        return os.environ["UGT_COMMIT"], None if dirty is None else dirty == "1"
    repo = (repo or REPO).resolve()
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if Path(top).resolve() != repo:
            return None, None
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, bool(status.strip())


def command_line(argv: Sequence[str] | None = None, prog: str | None = None) -> str:
    """The command that produced a result, to run again as written.

    With no ``argv``: this process's own command line (``sys.orig_argv``, so ``python -m bench.x`` stays a
    ``-m`` command), the interpreter named by its file name only. With ``argv`` (a bench's ``main(argv)``
    called from Python): ``prog`` followed by those arguments.
    """
    if argv is None:
        interpreter, *rest = sys.orig_argv
        return shlex.join([Path(interpreter).name, *rest])
    if not prog:
        raise ValueError("command_line: argv given without the prog that takes it (e.g. 'python -m bench.x')")
    return f"{prog} {shlex.join(argv)}".rstrip()


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (what a result's ``date`` says)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def result_record(benchmark: str, conditions: dict[str, Any], results: dict[str, Any],
                  command: str) -> dict[str, Any]:
    """The JSON object of one result: who produced it, on what, when, under which conditions, then the numbers."""
    clash = sorted(set(results) & set(RECORD_FIELDS))
    if clash:
        raise ValueError(f"write_result: the results of {benchmark!r} set {clash}, which the writer records itself")
    commit, dirty = git_commit()
    return {
        "benchmark": benchmark,
        "command": command,
        "commit": commit,
        "dirty": dirty,
        "machine": machine_info(),
        "date": utc_now(),
        "conditions": conditions,
        **results,
    }


def write_result(path: Path | str, benchmark: str, conditions: dict[str, Any], results: dict[str, Any],
                 argv: Sequence[str] | None = None, prog: str | None = None) -> Path:
    """Write a bench's result JSON to ``path`` (see result_record); ``argv``/``prog`` as in command_line."""
    record = result_record(benchmark, conditions, results, command_line(argv, prog))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Print ``rows`` as a plain table (floats to 4 significant digits) and return its text, for logs."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    text = tabulate([[_cell(r.get(c, "")) for c in columns] for r in rows], headers=columns,
                    disable_numparse=True)
    print(text)
    return text


def markdown_table(rows: list[list[Any]], headers: list[str]) -> str:
    """A GitHub-flavoured markdown table of ready-formatted cells (what docs/RESULTS.md pastes)."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
