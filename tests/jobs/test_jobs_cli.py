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


class _Response:
    def __init__(self, status: int, body: dict):
        self.status_code, self._body, self.text = status, body, str(body)

    def json(self) -> dict:
        return self._body


def fake_stop(monkeypatch: pytest.MonkeyPatch, polls: list[dict]) -> list[tuple[str, dict]]:
    """Fake Flink's stop-with-savepoint: one running job `abc`, POST /stop gives trigger t1, then `polls`."""
    posted: list[tuple[str, dict]] = []
    answers = iter(polls)

    def fake_get(url: str) -> dict:
        if url.endswith("/jobs/overview"):
            return {"jobs": [{"jid": "abc", "name": "user_state", "state": "RUNNING", "start-time": 1}]}
        assert url == "http://flink/jobs/abc/savepoints/t1", url
        return next(answers)

    def fake_post(url: str, json: dict, timeout: float) -> _Response:
        posted.append((url, json))
        return _Response(202, {"request-id": "t1"})

    monkeypatch.setattr(cli, "_get", fake_get)
    monkeypatch.setattr(cli.requests, "post", fake_post)
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
    return posted


def test_stop_polls_the_savepoint_until_it_has_a_location(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    posted = fake_stop(monkeypatch, [{"status": {"id": "IN_PROGRESS"}},
                                     {"status": {"id": "COMPLETED"}, "operation": {"location": "file:/sp/savepoint-1"}}])
    assert cli.stop_with_savepoint("http://flink", "user_state", target_dir=str(tmp_path)) == \
        [("abc", "file:/sp/savepoint-1")]
    assert posted == [("http://flink/jobs/abc/stop",
                       {"drain": False, "formatType": "CANONICAL", "targetDirectory": tmp_path.resolve().as_uri()})]


def test_a_failed_savepoint_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    trace = "java.util.concurrent.CompletionException: x\nCaused by: java.io.IOException: disk full\n\tat y"
    fake_stop(monkeypatch, [{"status": {"id": "COMPLETED"}, "operation": {"failure-cause": {"stack-trace": trace}}}])
    with pytest.raises(cli.JobsError, match="failed: java.io.IOException: disk full"):
        cli.stop_with_savepoint("http://flink", "abc")


def parse_submit(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.split_submit_args(parser.parse_args(["submit", *argv]))


def test_submit_options_after_the_job_name_are_submits_own() -> None:
    # argparse's REMAINDER hands everything after the job name over as job_args: they must come back out
    args = parse_submit(["user_state", "--detached", "--from-savepoint", "file:///sp/x", "--allow-non-restored-state",
                         "--", "--max-events", "5", "--detached"])
    assert (args.detached, args.from_savepoint, args.allow_non_restored_state) == (True, "file:///sp/x", True)
    assert args.job_args == ["--max-events", "5", "--detached"]  # after `--`: the job's, even a same-named one
    args = parse_submit(["--detached", "tokenize", "--from-savepoint=/sp/y"])
    assert (args.detached, args.from_savepoint, args.job_args) == (True, "/sp/y", [])
    assert parse_submit(["all", "--", "--parallelism", "2"]).job_args == ["--parallelism", "2"]


def test_a_job_option_before_the_separator_is_refused() -> None:
    with pytest.raises(cli.JobsError, match="the job's own options go after `--`"):
        parse_submit(["tokenize", "--parallelism", "2", "--", "--bounded"])
    # without a separator, the job's options start at the first token that is not submit's
    args = parse_submit(["tokenize", "--detached", "--parallelism", "2", "--detached"])
    assert args.detached and args.job_args == ["--parallelism", "2", "--detached"]
    with pytest.raises(cli.JobsError, match="needs a value"):
        parse_submit(["tokenize", "--from-savepoint"])
