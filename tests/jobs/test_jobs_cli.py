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
