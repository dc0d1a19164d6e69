"""`ugt train` under `torchrun --nproc-per-node 2` (gloo, CPU) on ML-100K: the same run as one process, resumable.

A tiny UGT (models/configs/ugt_ml100k_tiny.yaml, 200 users, no dropout so one process and two ranks draw no different
masks) trained 2 epochs with the global batch of the config (64 rows per optimizer step: 32 per rank on two):
- two ranks follow one process's loss curve within LOSS_RTOL (1 % per epoch; what is left differs: the MoE balance
  loss is computed per rank's half batch, and float sums run in another order);
- a two-rank run stopped after epoch 1 (UGT_TRAIN_DEADLINE) and resumed on two ranks is the uninterrupted run, to
  float round-off (every rank's RNG, the optimizer and the data order are in last.pt);
- the same last.pt resumed in one process (2 -> 1) finishes the run on the same curve within LOSS_RTOL, and so does
  one written by a two-rank FSDP run (``distributed: fsdp``, FSDP2 ``fully_shard`` on gloo): its weights and optimizer
  state are gathered from the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.tensor import DTensor

from models.data import build_sequences, make_split
from models.distributed import DistEnv, step_batches
from models.train import INTERRUPTED_EXIT, fit
from models.train_config import TrainConfig, load_config
from tests.models.conftest import random_dataset

CONFIG = "models/configs/ugt_ml100k_tiny.yaml"
SETS = {"max_epochs": 2, "patience": 10, "max_users": 200, "model_config.dropout": 0,
        "model_config.embedding.dropout": 0, "device": "cpu"}
LOSS_RTOL = 0.01
ROOT = Path(__file__).resolve().parents[2]


def _torchrun(out: Path, *extra: str, deadline: str = "") -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m ugt train` (a free rendezvous port; one thread per rank)."""
    sets = [arg for key, value in SETS.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UGT_TRAIN_DEADLINE": deadline, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ugt",
           "train", "--config", CONFIG, "--out-dir", str(out), "--quiet", *sets, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted two-rank run, and two stopped by the deadline after epoch 1 (DDP, FSDP)."""
    base = tmp_path_factory.mktemp("ddp")
    whole = _torchrun(base / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for name, extra in (("parts", ()), ("fsdp_parts", ("--set", "distributed=fsdp"))):
        parted = _torchrun(base / name, *extra, deadline="1")  # long past: stop after the first epoch
        # torchrun reports its workers' INTERRUPTED_EXIT as a failure; rank 0 printed where to resume
        assert f"exitcode  : {INTERRUPTED_EXIT}" in parted.stderr, parted.stderr[-3000:]
        assert json.loads(parted.stdout.strip().splitlines()[-1])["interrupted"] == "deadline after epoch 1"
    return {"whole": base / "whole", "parts": base / "parts", "fsdp_parts": base / "fsdp_parts"}


def test_step_batches_split_each_global_batch_between_ranks_without_overlap():
    """Each optimizer step's rows are the one-process batch, dealt to ranks and micro-batches with no row twice;
    the loss weights make the synced gradient that of the whole batch's mean."""
    split = make_split(build_sequences(random_dataset(users=23), "stable"), "train", max_len=10)
    counts = (split.targets > 0).sum(axis=1)
    world, accum, batch = 2, 2, 8
    per_rank = [list(step_batches(split, batch, accum, DistEnv(rank=r, world_size=world), np.random.default_rng(5)))
                for r in range(world)]
    one = list(step_batches(split, batch, 1, DistEnv(), np.random.default_rng(5)))
    assert len(per_rank[0]) == len(per_rank[1]) == len(one) == 3
    for step, whole in enumerate(one):
        rows = [m[0]["row_index"] for r in range(world) for m in per_rank[r][step] if m[1] > 0]
        joined = np.concatenate(rows)
        assert len(joined) == len(set(joined.tolist()))  # no row on two ranks or in two micro-batches
        assert sorted(joined.tolist()) == sorted(whole[0][0]["row_index"].tolist())
        weights = [m[1] for r in range(world) for m in per_rank[r][step]]
        assert sum(weights) / world == pytest.approx(1.0)
        assert all(len(per_rank[r][step]) == accum for r in range(world))  # same backward passes on every rank
        assert whole[0][1] == 1.0 and counts[whole[0][0]["row_index"]].sum() > 0


@pytest.mark.slow
def test_two_ranks_follow_one_process(runs, tmp_path):
    cfg = load_config(CONFIG, {**SETS, "out_dir": str(tmp_path), "progress": False})
    one = fit(cfg)
    two = json.loads((runs["whole"] / "summary.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["epochs_run"] == one["epochs_run"] == 2
    assert _losses(runs["whole"]) == pytest.approx(_losses(tmp_path), rel=LOSS_RTOL)
    assert (runs["whole"] / "checkpoint.pt").exists() and not (runs["whole"] / "last.pt").exists()


@pytest.mark.slow
def test_a_resumed_two_rank_run_continues_identically(runs, tmp_path):
    parts = tmp_path / "parts"
    shutil.copytree(runs["parts"], parts)
    resumed = _torchrun(parts, "--resume", str(parts / "last.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(parts) == pytest.approx(_losses(runs["whole"]), rel=1e-9)
    done, whole = (json.loads((d / "summary.json").read_text()) for d in (parts, runs["whole"]))
    assert done["test"]["ndcg@10"] == pytest.approx(whole["test"]["ndcg@10"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("stopped", ["parts", "fsdp_parts"])
def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path, stopped):
    parts = tmp_path / "parts"
    shutil.copytree(runs[stopped], parts)
    saved = torch.load(parts / "last.pt", weights_only=False)
    assert saved["optimizer_format"] == ("fqn" if stopped == "fsdp_parts" else "torch")
    assert len(saved["resume"]["rank_rngs"]) == 2 and not any(isinstance(v, DTensor) for v in saved["state_dict"].values())
    cfg = load_config(CONFIG, {**SETS, "out_dir": str(parts), "progress": False})
    summary = fit(cfg, resume=parts / "last.pt")
    assert summary["world_size"] == 1 and summary["epochs_run"] == 2 and not (parts / "last.pt").exists()
    assert _losses(parts) == pytest.approx(_losses(runs["whole"]), rel=LOSS_RTOL)
    assert summary["test"]["users"] == 200


def test_grad_accum_keeps_the_run_of_one_batch(tmp_path):
    """The same global batch in 4 micro-batches: the same losses as in one (no dropout, full softmax, no MoE)."""
    data = build_sequences(random_dataset(users=24, events=16), "stable")
    losses = []
    for accum in (1, 4):
        cfg = TrainConfig(name="a", model="hstu", max_len=10, batch_size=8, grad_accum=accum, max_epochs=3,
                          patience=5, progress=False, device="cpu", out_dir=str(tmp_path / str(accum)),
                          model_config={"embedding_dim": 8, "dqk": 8, "dv": 8, "dropout": 0.0}, num_negatives=0,
                          eval_batch_size=8)
        summary = fit(cfg, data=data)
        assert summary["grad_accum"] == accum
        losses.append(_losses(tmp_path / str(accum)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    with pytest.raises(ValueError, match="at least world size 1 x grad_accum 16"):
        fit(replace(cfg, grad_accum=16), data=data)
