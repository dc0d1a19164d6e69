"""The GPU compression bench (bench/compression_gpu.py) and the distillation bench (bench/distill_student.py) end to
end on CPU with a tiny ML-100K checkpoint, so the GPU runs cannot fail for a silly reason: every variant's engine
builds, ranks and is timed, and the result file holds the rows the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import compression_gpu, distill_student
from bench.common import REPO
from bench.compression import TINY_CONFIG
from models.train import fit
from models.train_config import load_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny config trained one epoch on the first 150 ML-100K users (its widths are multiples of 16 but the
    2-expert router's)."""
    out = tmp_path_factory.mktemp("tiny")
    fit(load_config(str(REPO / TINY_CONFIG), {"out_dir": str(out), "progress": False, "device": "cpu",
                                              "max_epochs": 1, "max_users": 150}))
    return out / "checkpoint.pt"


def test_compression_gpu_runs_every_variant_on_cpu(tiny_checkpoint, tmp_path):
    out = tmp_path / "compression_gpu.json"
    assert compression_gpu.main(["--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--dataset", "ml-100k",
                                 "--max-users", "40", "--batches", "8,32", "--seconds", "0.05", "--repeats", "1",
                                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "compression_gpu" and record["conditions"]["device"] == "cpu"
    assert record["conditions"]["users"] == 40
    rows = {row["variant"]: row for row in record["rows"]}
    assert list(rows) == ["bf16", "fp8", "int8_weight", "bf16_forms"]
    for row in rows.values():
        for key in ("config", "hr@10", "hr@10_loss", "hr@10_ratio", "speedup", "req_s@8", "req_s@32", "stack_ms@32"):
            assert row[key] is not None, key
        assert 0.0 <= row["hr@10"] <= 1.0 and row["req_s@32"] > 0
    assert rows["bf16"]["hr@10_loss"] == 0.0 and rows["bf16"]["speedup"] == 1.0
    assert rows["bf16"]["top10_overlap_vs_bf16"] == 1.0
    assert rows["fp8"]["quantized_layers"] == 5  # uvqk, o, experts' up, 2 downs; the 32 -> 2 router stays bf16
    assert list(rows["fp8"]["kept_layers"]) == ["layers.0.ffn.gate"]
    assert rows["int8_weight"]["quantized_layers"] == 6 and rows["int8_weight"]["kept_layers"] == {}
    assert rows["bf16_forms"]["top10_overlap_vs_bf16"] >= 0.9  # the same function, bf16 rounding aside
    assert rows["int8_weight"]["stack_mb"] < rows["bf16"]["stack_mb"] and rows["fp8"]["stack_mb"] < rows["bf16"]["stack_mb"]


def test_compression_gpu_refuses_a_checkpoint_of_another_dataset(tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="trained on ml-100k"):
        compression_gpu.main(["--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--dataset", "ml-1m",
                              "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):  # argparse: unknown variant
        compression_gpu.main(["--device", "cpu", "--checkpoint", str(tiny_checkpoint), "--variants", "bf16,fp4"])


def test_distill_student_trains_and_compares_with_its_teacher_on_cpu(tiny_checkpoint, tmp_path):
    out = tmp_path / "distill.json"
    assert distill_student.main(["--teacher", str(tiny_checkpoint), "--device", "cpu", "--minutes", "1",
                                 "--max-epochs", "1", "--max-users", "60", "--cpu-users", "16", "--batches", "1,8",
                                 "--repeats", "1", "--work-dir", str(tmp_path / "student"), "--out", str(out),
                                 "--student", "d_model=16,num_heads=1,moe.d_ff=32,moe.num_experts=2,moe.top_k=1"]) == 0
    record = json.loads(out.read_text())
    teacher, student = record["rows"]
    assert (teacher["role"], student["role"]) == ("teacher", "student")
    assert student["shape"]["num_layers"] == 2 and student["shape"]["d_model"] == 16
    assert record["conditions"]["student_recipe"]["distill"]["teacher"] == str(tiny_checkpoint)
    assert student["hr@10_ratio_vs_teacher"] is not None and student["cpu_speedup_vs_teacher"] > 0
    assert teacher["cpu_req_s@8"] > 0 and student["users"] == teacher["users"] == 60


def test_distill_student_shape_overrides_and_refuses_unknown_keys():
    shape = distill_student.student_shape("d_model=32, num_layers=3,moe.d_ff=64")
    assert (shape["d_model"], shape["num_layers"], shape["moe"]["d_ff"]) == (32, 3, 64)
    assert shape["moe"]["num_experts"] == distill_student.STUDENT["moe"]["num_experts"]
    assert distill_student.STUDENT["d_model"] == 64  # the default is not changed in place
    for bad in ("width=64", "d_model", "d_model=big", "heads=1", "moe.experts=2", "gln.num_groups=2"):
        with pytest.raises(ValueError, match="--student"):
            distill_student.student_shape(bad)
