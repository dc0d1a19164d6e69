"""The row-wise sharded item table (models/sharded_items.py, ``shard_items: true``) under `torchrun --nproc-per-node 2`
(gloo, CPU): the same loss and gradients as the unsharded table, the same ML-100K training curve, and checkpoints
holding the whole table that resume at another world size.

Tolerances: loss and gradients to GRAD_ATOL (float32 sums in another order: measured <= 5e-7); a training curve to
LOSS_RTOL per epoch, as tests/models/test_distributed_train.py allows a two-rank DDP run against one process (the
sharded two-rank run itself equals the unsharded two-rank DDP run to ~1e-8: docs/TRAINING.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.distributed import DistEnv
from models.sharded_items import ItemShards, ShardGroup, check_shardable
from models.train import INTERRUPTED_EXIT, fit
from models.train_config import TrainConfig, load_config

CONFIG = "models/configs/ugt_ml100k_tiny.yaml"
SETS = {"max_epochs": 2, "patience": 10, "max_users": 200, "model_config.dropout": 0,
        "model_config.embedding.dropout": 0, "device": "cpu"}
GRAD_ATOL = 1e-5
LOSS_RTOL = 0.01
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*args: str, deadline: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, "UGT_TRAIN_DEADLINE": deadline}, capture_output=True, text=True,
                          timeout=300)


def _train(out: Path, deadline: str = "") -> subprocess.CompletedProcess:
    sets = [arg for key, value in {**SETS, "shard_items": True}.items()
            for arg in ("--set", f"{key}={json.dumps(value)}")]
    return _torchrun("-m", "ugt", "train", "--config", CONFIG, "--out-dir", str(out), "--quiet", *sets,
                     deadline=deadline)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _config(out: Path, **extra) -> TrainConfig:
    return load_config(CONFIG, {**SETS, "out_dir": str(out), "progress": False, **extra})


def test_shard_blocks_cover_the_table_once():
    """Contiguous equal blocks; the last rank's is padded past the end, and every id has exactly one owner."""
    rows, world = 38, 4
    groups = [ShardGroup(rows, r, world) for r in range(world)]
    ids = torch.arange(rows)
    owners = torch.stack([g.owned(ids)[0] for g in groups]).sum(0)
    assert groups[0].block == 10 and bool((owners == 1).all())
    full = torch.arange(rows * 2, dtype=torch.float32).view(rows, 2)
    last = groups[-1].shard_of(full)
    assert last.shape == (10, 2) and bool((last[8:] == 0).all()) and bool((last[:8] == full[30:]).all())


def test_shard_items_refuses_what_scores_whole_logits_rows():
    cfg = TrainConfig(model="ugt", num_negatives=128)

    class Model:
        embed = type("E", (), {"config": type("C", (), {"item_repr": "id"})()})()
        freshness = None
        ranker = None

    with pytest.raises(ValueError, match=r"num_negatives: 0"):
        check_shardable(Model(), cfg, None, None)


def test_one_process_trains_the_unsharded_table(tiny_data, tmp_path):
    """``shard_items`` in a world of one changes nothing: the model keeps its ``nn.Embedding`` (so the run is the
    unsharded one, bit for bit) and every ItemShards step is a no-op."""
    from models.checkpoint import build_model

    cfg = _config(tmp_path, shard_items=True)
    model = build_model(cfg, tiny_data)
    table = model.embed.item_emb
    items = ItemShards(model, DistEnv(), cfg)
    assert not items.active and model.embed.item_emb is table and isinstance(table, torch.nn.Embedding)
    state = {"state": {}, "param_groups": []}
    assert items.shard_optimizer(None, state, "torch") is state


def test_sharded_loss_and_gradients_equal_unsharded():
    """Two ranks, each with its own rows, against one process on the whole batch (tests/models/sharded_items_worker.py):
    the loss, the item table's gradient (gathered from the owners), a replicated layer's (averaged as DDP does)."""
    done = _torchrun("tests/models/sharded_items_worker.py")
    assert done.returncode == 0, done.stderr[-3000:]
    diff = json.loads(done.stdout.strip().splitlines()[-1])
    assert diff["world"] == 2 and diff["gathered_weight"] == 0.0
    assert diff["loss"] < GRAD_ATOL, diff
    assert diff["table_grad"] < GRAD_ATOL and diff["table_grad_scale"] > 0.1, diff
    assert diff["linear_grad"] < GRAD_ATOL and diff["linear_grad_scale"] > 0.1, diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """One process, the table whole: the curve the sharded runs must follow."""
    out = tmp_path_factory.mktemp("whole") / "run"
    fit(_config(out))
    return _losses(out)


@pytest.mark.slow  # a torchrun launch and two in-process runs: 60-90 s on the loaded 2-core box
def test_sharded_training_follows_one_process_and_resumes_at_another_world_size(reference, tmp_path):
    """Two ranks with the table sharded train epoch 1 on the one-process curve; their last.pt holds the whole table
    and its whole AdamW moments; one process resumes it (2 -> 1) and finishes on the same curve. (One torchrun
    launch keeps the suite short; the worker test above checks every gradient of a step exactly.)"""
    parted = _train(tmp_path / "run", deadline="1")  # long past: stop after epoch 1
    assert f"exitcode  : {INTERRUPTED_EXIT}" in parted.stderr, parted.stderr[-3000:]
    assert _losses(tmp_path / "run") == pytest.approx(reference[:1], rel=LOSS_RTOL)
    best = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert best["state_dict"]["embed.item_emb.weight"].shape[0] == best["model_config"]["num_items"] + 1
    model, _, _, last = load_checkpoint(tmp_path / "run" / "last.pt")
    table = last["state_dict"]["embed.item_emb.weight"]
    params = [name for name, _ in model.named_parameters()]  # the optimizer's order
    moments = last["optimizer"]["state"][params.index("embed.item_emb.weight")]
    assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == table.shape
    assert float(moments["exp_avg_sq"].abs().sum()) > 0
    summary = fit(_config(tmp_path / "run"), resume=tmp_path / "run" / "last.pt")
    assert summary["world_size"] == 1
    assert _losses(tmp_path / "run") == pytest.approx(reference, rel=LOSS_RTOL)

