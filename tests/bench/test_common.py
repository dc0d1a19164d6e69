"""bench.common: the one writer of result files (who, what, where, when) and the one table printer."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench import common
from bench.common import command_line, git_commit, markdown_table, print_table, write_result


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A one-commit git repository with a tracked file."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "tracked.txt").write_text("one\n")
    _git(root, "add", "tracked.txt")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "first")
    return root


def test_the_record_names_command_commit_machine_date_and_conditions(tmp_path: Path, repo: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "REPO", repo)
    out = write_result(tmp_path / "sub" / "x.json", "state_fetch", {"reads": 2000}, {"rows": [{"p50_ms": 0.1}]},
                       argv=["--reads", "2000"], prog="python -m bench.state_fetch")
    record = json.loads(out.read_text())
    assert record["benchmark"] == "state_fetch"
    assert record["command"] == "python -m bench.state_fetch --reads 2000"
    assert record["commit"] == _git(repo, "rev-parse", "HEAD") and len(record["commit"]) == 40
    assert record["dirty"] is False
    assert record["conditions"] == {"reads": 2000}
    assert record["rows"] == [{"p50_ms": 0.1}]
    machine = record["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0 and machine["cpu"]
    when = dt.datetime.fromisoformat(record["date"])
    assert when.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 60


def test_a_changed_tracked_file_marks_the_record_dirty(repo: Path) -> None:
    assert git_commit(repo)[1] is False
    (repo / "untracked.txt").write_text("not part of the tree\n")
    assert git_commit(repo)[1] is False
    (repo / "tracked.txt").write_text("two\n")
    head, dirty = git_commit(repo)
    assert dirty is True and head == _git(repo, "rev-parse", "HEAD")


def test_outside_git_the_commit_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == (None, None)


def test_results_may_not_set_what_the_writer_records(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['commit', 'date'\]"):
        write_result(tmp_path / "x.json", "b", {}, {"commit": "by hand", "date": "today", "rows": []},
                     argv=[], prog="python -m bench.b")
    assert not (tmp_path / "x.json").exists()


def test_the_command_is_this_process_own_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "orig_argv", ["/opt/venv/bin/python3", "-m", "bench.serving", "--rates", "500,1000",
                                           "--tokenize-args", "--lake ''"])
    # the interpreter by its name only; every argument comes back as given when the line is split again
    assert shlex.split(command_line()) == ["python3", "-m", "bench.serving", "--rates", "500,1000",
                                           "--tokenize-args", "--lake ''"]
    assert command_line(["--n", "2"], "python bench/cold_start.py") == "python bench/cold_start.py --n 2"
    assert command_line([], "python -m bench.x") == "python -m bench.x"
    with pytest.raises(ValueError, match="prog"):
        command_line(["--n", "2"])


def test_print_table_prints_and_returns_the_same_text(capsys: pytest.CaptureFixture[str]) -> None:
    text = print_table([{"config": "ugt-tiny", "qps": 1000.0, "p99_ms": 12.3456}, {"config": "anchor", "qps": 250.0}],
                       ["config", "qps", "p99_ms"])
    assert capsys.readouterr().out == text + "\n"
    header, rule, first, second = text.splitlines()
    assert header.split() == ["config", "qps", "p99_ms"]
    assert first.split() == ["ugt-tiny", "1,000", "12.35"]
    assert second.split() == ["anchor", "250"]
    assert print_table([]) == ""


def test_markdown_table_is_github_flavoured() -> None:
    text = markdown_table([["UGT", "0.3450"]], ["model", "HR@10"])
    header, rule, row = text.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "HR@10"]
    assert set(rule) <= {"|", "-", ":"}
    assert [c.strip() for c in row.strip("|").split("|")] == ["UGT", "0.3450"]


def test_a_copy_inside_another_repository_records_no_commit(repo: Path) -> None:
    """The GPU machine gets the tree as a folder of another checkout: its HEAD is not ours."""
    inner = repo / "copy_of_the_project"
    inner.mkdir()
    (inner / "README.md").write_text("a copy\n")
    assert git_commit(inner) == (None, None)


def test_the_commit_passed_in_wins(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UGT_COMMIT", "a" * 40)
    monkeypatch.setenv("UGT_DIRTY", "0")
    assert git_commit(repo) == ("a" * 40, False)
