"""jobs.cli.wait_placed: `ugt jobs submit all` waits until a job's tasks hold slots before submitting the next."""

from __future__ import annotations

import pytest

from jobs import cli


def answers(monkeypatch: pytest.MonkeyPatch, states: list[dict]) -> list[str]:
    """Fake the Flink REST API: each GET /jobs/<id> returns the next state (the last one repeats)."""
    asked: list[str] = []

    def fake_get(url: str) -> dict:
        asked.append(url)
        return states[min(len(asked), len(states)) - 1]

    monkeypatch.setattr(cli, "_get", fake_get)
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
    return asked


def test_waits_until_every_task_has_a_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = answers(monkeypatch, [
        {"state": "RUNNING", "vertices": [{"status": "CREATED"}, {"status": "SCHEDULED"}]},
        {"state": "RUNNING", "vertices": [{"status": "DEPLOYING"}, {"status": "SCHEDULED"}]},
        {"state": "RUNNING", "vertices": [{"status": "RUNNING"}, {"status": "INITIALIZING"}]},
    ])
    assert cli.wait_placed("http://flink", "abc", timeout_s=5)
    assert asked == ["http://flink/jobs/abc"] * 3


def test_a_job_that_ended_counts_as_placed(monkeypatch: pytest.MonkeyPatch) -> None:
    answers(monkeypatch, [{"state": "FAILED", "vertices": [{"status": "FAILED"}]}])
    assert cli.wait_placed("http://flink", "abc", timeout_s=5)


def test_gives_up_when_no_slot_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    answers(monkeypatch, [{"state": "RUNNING", "vertices": [{"status": "SCHEDULED"}]}])
    assert not cli.wait_placed("http://flink", "abc", timeout_s=0.05)


def test_submit_from_a_savepoint_adds_flink_runs_restore_flags() -> None:
    plain = cli.job_command("user_state", ["--", "--parallelism", "2"], detached=True)
    assert plain[1:3] == ["run", "-d"] and "-s" not in plain and plain[-2:] == ["--parallelism", "2"]
    restored = cli.job_command("user_state", ["--parallelism", "2"], detached=True, savepoint="file:///sp/savepoint-1")
    assert restored[1:5] == ["run", "-d", "-s", "file:///sp/savepoint-1"] and restored[5] == "-py"
    lenient = cli.job_command("user_state", [], detached=False, savepoint="/sp/x", allow_non_restored=True)
    assert lenient[1:5] == ["run", "-s", "/sp/x", "-n"]
    with pytest.raises(cli.JobsError, match="only applies with --from-savepoint"):
        cli.job_command("user_state", [], detached=False, allow_non_restored=True)


def test_a_savepoint_is_a_folder_with_metadata(tmp_path) -> None:
    folder = tmp_path / "savepoint-abc"
    folder.mkdir()
    assert not cli.savepoint_exists(str(folder))
    (folder / "_metadata").write_bytes(b"x")
    assert cli.savepoint_exists(str(folder)) and cli.savepoint_exists(folder.as_uri())
    assert cli.savepoint_exists(str(folder / "_metadata"))
    assert not cli.savepoint_exists(str(tmp_path / "missing"))
    with pytest.raises(cli.JobsError, match="no savepoint at"):
        cli.submit("user_state", [], detached=True, savepoint=str(tmp_path / "missing"))
