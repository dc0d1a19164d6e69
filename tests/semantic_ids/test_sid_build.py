"""Build, report and stage-1 reuse on a synthetic catalog; the CLI on the same artifact."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from sid_synthetic import STRUCTURED_ONLY, make_items

from models.semantic_ids.build import SemanticIdConfig, build_semantic_ids, stage1
from models.semantic_ids.report import QUANTIZER_FIELDS, write_report

BOTH = {**STRUCTURED_ONLY, "quantizer": "rqvae", "compare_baseline": True,
        "rqvae": {"epochs": 3, "hidden_dims": [32], "latent_dim": 8}}


@pytest.fixture(scope="module")
def built():
    return build_semantic_ids(make_items(150), BOTH, dataset="synthetic")


def test_report_has_the_same_fields_for_rqvae_and_rqkmeans(built, tmp_path):
    report = built.metrics
    assert set(report["quantizers"]) == {"rqvae", "rqkmeans"}
    for name, section in report["quantizers"].items():
        for key in QUANTIZER_FIELDS:
            assert key in section, (name, key)
        assert [u["level"] for u in section["codebook_usage"]] == [0, 1]
        assert 0 <= section["collisions"]["collision_rate"] < 1
        assert len(section["reconstruction"]["input"]) == 2
    assert report["dedup"]["unique_after_dedup"] is True
    assert report["encode_new_items_per_s"] > 0
    assert all(p["items_per_s"] > 0 for p in report["encoders"]["parts"])
    json_path, png_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["chosen"] == "rqvae"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_codes_are_unique_and_within_codebooks(built):
    codes = built.codes
    assert codes.shape == (150, 3)
    assert len(np.unique(codes, axis=0)) == 150
    assert (codes >= 0).all() and (codes < np.asarray(built.codebook_sizes)).all()


def test_stage1_reuses_an_unchanged_artifact_and_rebuilds_a_changed_one(tmp_path):
    items = make_items(80)
    first = stage1(items, STRUCTURED_ONLY, tmp_path / "sid")
    mtime = (tmp_path / "sid" / "arrays.npz").stat().st_mtime_ns
    again = stage1(items, STRUCTURED_ONLY, tmp_path / "sid")
    assert (tmp_path / "sid" / "arrays.npz").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.codes, first.codes)
    changed = stage1(items, {**STRUCTURED_ONLY, "codebook_sizes": [4, 4]}, tmp_path / "sid")
    assert changed.codebook_sizes[:2] == [4, 4]
    assert (tmp_path / "report.png").exists() is False and (tmp_path / "sid" / "report.png").exists()


def test_config_validation():
    with pytest.raises(ValueError, match="unknown semantic-ID config key"):
        SemanticIdConfig.from_dict({"codebook_size": [8]})
    with pytest.raises(ValueError, match="quantizer"):
        SemanticIdConfig(quantizer="vq")
    with pytest.raises(ValueError, match="top level"):
        SemanticIdConfig(rqvae={"codebook_sizes": [8]})


def test_shipped_configs_parse():
    from infra.settings import REPO_ROOT

    for name in ("semantic_ids_ml1m.yaml", "semantic_ids_ml100k.yaml"):
        cfg = SemanticIdConfig.from_yaml(REPO_ROOT / "models" / "configs" / name)
        assert len(cfg.codebook_sizes) == 3 and cfg.encoders[0]["type"] == "text"


def test_cli_report_on_an_artifact(built, tmp_path, capsys):
    from ugt import semantic_ids_cli as cli

    built.save(tmp_path / "a")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["report", str(tmp_path / "a")])) == 0
    out = capsys.readouterr().out
    assert "unique after dedup: True" in out and "rqkmeans" in out
    assert (tmp_path / "a" / "report.png").exists()
    assert cli.run(parser.parse_args(["report", str(tmp_path / "missing")])) == 2
