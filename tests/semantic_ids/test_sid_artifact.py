"""Artifact: save/load round trip, identical encode output, loud failures on corrupt files, no torch to load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sid_synthetic import STRUCTURED_ONLY, make_items

from models.semantic_ids import ArtifactError, SemanticIdArtifact, build_semantic_ids

REPO = Path(__file__).resolve().parents[2]
TEXT_CONFIG = {
    **STRUCTURED_ONLY,
    "codebook_sizes": [8, 8],
    "encoders": [{"type": "text", "weight": 1.0}, {"type": "structured", "weight": 0.5, "hash_dim": 8}],
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[SemanticIdArtifact, Path]:
    artifact = build_semantic_ids(make_items(60), TEXT_CONFIG, dataset="synthetic")
    path = tmp_path_factory.mktemp("sid") / "artifact"
    artifact.save(path)
    return artifact, path


def test_round_trip_gives_identical_encode_output(saved):
    artifact, path = saved
    loaded = SemanticIdArtifact.load(path)
    np.testing.assert_array_equal(loaded.codes, artifact.codes)
    assert loaded.item_ids == artifact.item_ids and loaded.codebook_sizes == artifact.codebook_sizes
    new = make_items(10, seed=5, prefix="new-")
    batch = make_items(60)[:5] + new
    assert loaded.encode(batch) == artifact.encode(batch)
    np.testing.assert_array_equal(loaded.embed(new), artifact.embed(new))
    # known items keep their stored ID; every ID has one code per level and is unique
    assert loaded.encode(make_items(60)[:5]) == [tuple(int(c) for c in row) for row in artifact.codes[:5]]
    ids = loaded.encode(batch)
    assert all(len(t) == loaded.num_levels for t in ids)
    everything = {tuple(r) for r in loaded.codes.tolist()} | set(ids)
    assert len(everything) == len(loaded.codes) + len(new)
    assert loaded.encode(new) == ids[5:]  # asking again gives the same IDs


def test_corrupt_artifact_fails_with_a_clear_message(saved, tmp_path):
    _, path = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((path / "manifest.json").read_bytes())
    data = bytearray((path / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt.*sha256"):
        SemanticIdArtifact.load(broken)
    (broken / "arrays.npz").write_bytes((path / "arrays.npz").read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="corrupt"):
        SemanticIdArtifact.load(broken)
    manifest = json.loads((path / "manifest.json").read_text())
    (broken / "arrays.npz").write_bytes((path / "arrays.npz").read_bytes())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "format": "ugt-semantic-ids/0"}))
    with pytest.raises(ArtifactError, match="not supported"):
        SemanticIdArtifact.load(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        SemanticIdArtifact.load(broken)
    with pytest.raises(ArtifactError, match="not a semantic-ID artifact"):
        SemanticIdArtifact.load(tmp_path / "nowhere")


def test_loading_and_encoding_do_not_import_torch(saved):
    _, path = saved
    code = (
        "import sys, json\n"
        "from models.semantic_ids import SemanticIdArtifact\n"
        f"a = SemanticIdArtifact.load({str(path)!r})\n"
        "ids = a.encode([{'item_id': 'fresh', 'title': 'Dark Star', 'year': 1999, 'genres': ['Sci-Fi']}])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': ids}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    assert len(result["ids"][0]) == 3


def test_artifact_rejects_inconsistent_tables(saved):
    artifact, _ = saved
    with pytest.raises(ArtifactError, match="codes must be"):
        SemanticIdArtifact(artifact.encoder, artifact.quantizer, artifact.item_ids[:-1], artifact.codes, 32)
