"""`ugt data fetch / info` write event files that are exactly the replay's events, and valid for the schema."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

import contracts.datasets as datasets
from infra.settings import Settings, get_settings
from streams.records import check_event_file
from ugt.cli import main as ugt

REAL = get_settings().cache_dir / "datasets" / "ml-100k"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache holding a copy of the raw ML-100K files (fetched into the real cache once)."""
    datasets.fetch_dataset("ml-100k")
    target = tmp_path / "datasets" / "ml-100k"
    target.mkdir(parents=True)
    for f in REAL.iterdir():
        if f.is_file():
            shutil.copy(f, target / f.name)
    monkeypatch.setattr(datasets, "get_settings", lambda: Settings(cache_dir=tmp_path))
    return tmp_path


def test_info_before_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(datasets, "get_settings", lambda: Settings(cache_dir=tmp_path))
    assert ugt(["data", "info", "ml-1m"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fetched"] is False
    assert "run `ugt data fetch ml-1m`" in captured.err


def test_fetch_writes_the_replay_events(cache: Path, capsys: pytest.CaptureFixture) -> None:
    assert ugt(["data", "fetch", "ml-100k", "--no-progress"]) == 0
    out = cache / "datasets" / "ml-100k" / "events"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["user_events"] == summary["ratings"] == 100_000 and summary["item_events"] == 1682
    assert check_event_file(out / "user_events.jsonl.gz", "user_event") == 100_000
    assert check_event_file(out / "item_events.jsonl", "item_event") == 1682

    dataset = datasets.load_dataset("ml-100k")
    with gzip.open(out / "user_events.jsonl.gz", "rt") as handle:
        head = [json.loads(next(handle)) for _ in range(500)]
    assert head == list(datasets.user_events(dataset, 500))
    items = [json.loads(line) for line in (out / "item_events.jsonl").read_text().splitlines()]
    assert items == list(datasets.item_events(dataset))
    assert not list(out.glob("*.part"))

    capsys.readouterr()
    assert ugt(["data", "info", "ml-100k"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"] == summary and set(info["event_files"]) == {"user_events.jsonl.gz", "item_events.jsonl"}
