"""Distillation (models/distill.py): the KL to the teacher's scores is zero for the teacher itself, trains only the
student, and a student trained on it alone comes closer to the teacher's distribution than it started."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import build_model, load_checkpoint
from models.data import build_sequences, make_split
from models.distill import Teacher
from models.eval import batch_to_device
from models.train import fit
from models.train_config import TrainConfig
from tests.models.conftest import random_dataset


def _cfg(out, dim: int, **kw) -> TrainConfig:
    base = dict(name="d", model="hstu", max_len=12, batch_size=8, max_epochs=3, patience=10, progress=False,
                device="cpu", out_dir=str(out), model_config={"embedding_dim": dim, "dqk": dim, "dv": dim},
                eval_batch_size=16, num_negatives=0, temperature=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    data = build_sequences(random_dataset(users=30, items=40, events=18, seed=2), "stable")
    out = tmp_path_factory.mktemp("teacher")
    fit(_cfg(out, 16), data=data)
    batch = batch_to_device(make_split(data, "train", 12).rows(np.arange(16)), torch.device("cpu"))
    return data, out / "checkpoint.pt", batch


def _kl(teacher: Teacher, model, batch) -> torch.Tensor:
    user, _ = model(batch)
    return teacher.loss(user, model.item_embeddings(), batch, 0.1)


def test_the_teacher_has_nothing_to_teach_itself_and_only_the_student_learns(teacher_run, tmp_path):
    data, ckpt, batch = teacher_run
    cfg = _cfg(tmp_path, 8, distill={"teacher": str(ckpt), "weight": 1.0})
    teacher = Teacher(cfg.distill, cfg, data, torch.device("cpu"))
    itself = load_checkpoint(ckpt, data=data)[0].eval()
    with torch.no_grad():
        assert float(_kl(teacher, itself, batch)) == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(0)
    student = build_model(cfg, data).eval()
    loss = _kl(teacher, student, batch)
    loss.backward()
    assert float(loss.detach()) > 0.01
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_a_student_trained_on_the_teacher_alone_comes_closer_to_it(teacher_run, tmp_path):
    data, ckpt, batch = teacher_run
    cfg = _cfg(tmp_path, 8, max_epochs=4, lr=0.01, distill={"teacher": str(ckpt), "weight": 1.0, "temperature": 2.0})
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg, data).eval()  # what fit starts from (same seed)
    summary = fit(cfg, data=data)
    trained = load_checkpoint(tmp_path / "checkpoint.pt", data=data)[0].eval()
    teacher = Teacher(cfg.distill, cfg, data, torch.device("cpu"))
    with torch.no_grad():
        before, after = float(_kl(teacher, untrained, batch)), float(_kl(teacher, trained, batch))
    assert after < 0.7 * before, (before, after)  # measured 6.53 -> 1.76
    assert summary["epochs_run"] == 4


def test_bad_distill_settings_are_clear_errors(teacher_run, tmp_path):
    data, ckpt, _ = teacher_run
    cpu = torch.device("cpu")
    with pytest.raises(FileNotFoundError, match="distill.teacher"):
        Teacher({"teacher": str(tmp_path / "none.pt")}, _cfg(tmp_path, 8), data, cpu)
    with pytest.raises(ValueError, match="weight must be in"):
        Teacher({"teacher": str(ckpt), "weight": 2.0}, _cfg(tmp_path, 8), data, cpu)
    with pytest.raises(ValueError, match="max_len 12"):
        Teacher({"teacher": str(ckpt)}, _cfg(tmp_path, 8, max_len=20), data, cpu)
