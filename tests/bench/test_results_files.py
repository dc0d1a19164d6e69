"""Every file in bench/results/ is a result its bench wrote: valid JSON that names its command and commit.

The docs cite these files as the current numbers, so each must say how to reproduce it (`command`, a bench
entry point that exists) and from which code (`commit`, a git hash). Fields written by hand (`note`, `gpu_call`,
`git_commit_note`) are not allowed: what a run means belongs in the docs, what it measured in the file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
RESULT_FILES = sorted(p for p in RESULTS.iterdir() if p.is_file()) if RESULTS.is_dir() else []
HAND_ADDED = {"note", "gpu_call", "git_commit_note"}
COMMIT = re.compile(r"[0-9a-f]{7,40}")
BENCH_ENTRY = re.compile(r"\bbench[./]([A-Za-z0-9_]+)(\.py|\.sh)?\b")


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict), f"{path.name}: top level is {type(data).__name__}, not an object"
    return data


def hand_added_keys(value: Any, where: str = "") -> list[str]:
    """Paths of every hand-added key, at any depth."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in HAND_ADDED:
                found.append(f"{where}.{key}".lstrip("."))
            found += hand_added_keys(inner, f"{where}.{key}")
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            found += hand_added_keys(inner, f"{where}[{i}]")
    return found


def test_there_are_result_files() -> None:
    assert RESULT_FILES, f"no files in {RESULTS}"


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_result_file_names_its_command_and_commit(path: Path) -> None:
    assert path.suffix == ".json", f"{path.name}: bench/results/ holds JSON result files only"
    data = load(path)
    command, commit = data.get("command"), data.get("commit")
    assert isinstance(command, str) and command.strip(), f"{path.name}: no top-level 'command'"
    entries = [m.group(1) + (m.group(2) or ".py") for m in BENCH_ENTRY.finditer(command)]
    assert any((REPO / "bench" / entry).is_file() for entry in entries), (
        f"{path.name}: command {command!r} names no script in bench/"
    )
    assert isinstance(commit, str) and COMMIT.fullmatch(commit), f"{path.name}: 'commit' {commit!r} is not a git hash"
    assert not hand_added_keys(data), f"{path.name}: hand-added fields {hand_added_keys(data)}"


def full_history() -> bool:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return False
    shallow = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True, check=False)
    return shallow.returncode == 0 and shallow.stdout.strip() == "false"


@pytest.mark.skipif(not full_history(), reason="needs a git checkout with full history")
@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.name)
def test_result_commit_is_in_the_history(path: Path) -> None:
    commit = load(path).get("commit", "")
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True, check=False)
    assert known.returncode == 0, f"{path.name}: commit {commit!r} is not in this repository's history"


def test_hand_added_keys_are_found_at_any_depth() -> None:
    assert hand_added_keys({"rows": [{"gpu_call": 1}], "machine": {"git_commit_note": "x"}, "note": ""}) == [
        "rows[0].gpu_call", "machine.git_commit_note", "note"]
    assert hand_added_keys({"rows": [{"p99_ms": 1.0}]}) == []
