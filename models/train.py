"""Training: one loop for SASRec, HSTU and UGT in the seed's three stages, with early stopping.

Stage 1 -- semantic IDs: built by ``models.semantic_ids`` (or loaded from an artifact) and mapped onto
  the vocabulary; UGT embeds them, generates them and contrasts against them.
Stage 2 -- next-token prediction: sampled softmax (HSTU's: uniform negatives, L2-normalised embeddings,
  temperature) at every position, + MoE load balancing, + next-semantic-ID cross-entropy, + contrastive
  loss in semantic-ID space. Early stopping on validation NDCG@10 (leave-one-out, the item before the
  test item); the best state is kept and checkpointed.
Stage 3 -- DPO: preference pairs from the data (see :func:`models.dpo.preference_pairs`), the stage-2 model frozen as
  the reference; loss = NTP + dpo.weight * DPO. Kept only if validation does not drop (both recorded).

Reads top to bottom like nanoGPT's train.py: data, stage 1, the losses, then the loop (:class:`TrainRun`,
:func:`fit`) and stage 3. The config is models/train_config.py; checkpoints (models/checkpoint.py) hold the
whole config, the model config and the vocabulary, so eval and serving rebuild the model from the file alone
without importing this module, and ``resume`` continues a run where it stopped.

Resume across processes: after every stage-2 epoch and at its end, ``last.pt`` holds the weights, optimizer, best
weights, RNG states and minutes spent, so ``--resume <out_dir>/last.pt`` continues as if never stopped (and
``max_minutes`` counts all processes). A run that would pass ``UGT_TRAIN_DEADLINE`` (UNIX time) with one more epoch
or stage 3 stops after saving it, with no summary.json (`ugt train` exits INTERRUPTED_EXIT); a finished run drops it.

Under torchrun every rank runs :func:`fit`: DDP or FSDP, the global batch dealt to ranks and micro-batches, rank 0
evaluating and saving (models/distributed.py, docs/TRAINING.md). ``distill`` trains against a teacher (models/distill.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from models import distributed
from models.baselines.popularity import Popularity
from models.checkpoint import build_model, load_data, long_history_len, save_checkpoint
from models.data import Batchable, SequenceData, iterate_batches, make_split, without_items
from models.distill import Teacher
from models.distributed import DistEnv
from models.dpo import PreferenceStep
from models.eval import batch_to_device, evaluate
from models.semantic_stage import codes_for_vocab, semantic_codes
from models.sharded_items import ItemShards
from models.train_cold import cold_holdout, hold_out_features
from models.train_config import DPOConfig, TrainConfig
from models.train_curves import plot_curves
from models.train_loss import StepLoss, stage2_loss
from models.ugt.model import UGT
from models.ugt.stream_items import mean_state, training_events

__all__ = ["INTERRUPTED_EXIT", "TrainRun", "codes_for_vocab", "cold_holdout", "fit", "make_splits", "semantic_codes",
           "stage2_loss"]

log = logging.getLogger(__name__)

DEADLINE_ENV = "UGT_TRAIN_DEADLINE"  # UNIX time by which a run stops and saves last.pt (bench/ml1m_quality.py)
INTERRUPTED_EXIT = 75  # `ugt train`'s exit status for a run stopped by the deadline, resumable from last.pt


def train_deadline() -> float | None:
    """The deadline from ``UGT_TRAIN_DEADLINE``, or None; a value that is not a number is an error, not ignored."""
    value = os.environ.get(DEADLINE_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV} must be a UNIX time in seconds, got {value!r}") from None

# ---- data -------------------------------------------------------------------------------------


def fingerprint(data: SequenceData) -> str:
    """Hash of every user's ordered item sequence: shows whether two runs saw the same tie order."""
    h = hashlib.sha256()
    for seq in data.items:
        h.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def make_splits(cfg: TrainConfig, data: SequenceData, cold: np.ndarray | None = None) -> dict[str, Batchable]:
    """train / valid / test; with a cold-start holdout (``cold``), training never sees those items' events."""
    max_long = long_history_len(cfg)
    if cfg.train_windows not in ("last", "all"):
        raise ValueError(f"train_windows must be 'last' or 'all', got {cfg.train_windows!r}")
    train_data = without_items(data, cold) if cold is not None else data
    return {s: make_split(train_data if s == "train" else data, s, cfg.max_len, max_long,
                          all_windows=cfg.train_windows == "all") for s in ("train", "valid", "test")}


# ---- the loop ---------------------------------------------------------------------------------------


def _compiled(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    if cfg.compile and device.type == "cuda":
        try:
            return torch.compile(model)
        except Exception as exc:  # compile is an optimisation: never let it stop a run
            log.warning("torch.compile unavailable (%s); training eagerly", exc)
    return model


def _run_epoch(step_fn, split: Batchable, cfg: TrainConfig, rng: np.random.Generator, device: torch.device) -> float:
    losses = []
    for np_batch in iterate_batches(split, cfg.batch_size, shuffle=True, rng=rng):
        losses.append(step_fn(batch_to_device(np_batch, device), np_batch))
    return float(np.mean(losses)) if losses else float("nan")


class TrainRun:
    """One run's moving parts in stages 2 and 3: the model, its optimizer, the early-stopping state, the best weights.

    ``state`` (epoch, best validation NDCG@10 and its epoch and stage, evaluations without a gain, history) is
    the checkpoint's ``train_state``, so ``resume`` continues where a run stopped.
    """

    def __init__(self, cfg: TrainConfig, model: Any, data: SequenceData, splits: dict[str, Batchable],
                 device: torch.device, semantic: tuple[np.ndarray | None, list[int]], cold: np.ndarray | None,
                 summary: dict[str, Any], env: DistEnv | None = None):
        self.cfg, self.model, self.data, self.splits, self.device = cfg, model, data, splits, device
        self.env = env or DistEnv()
        self.amp = cfg.bf16 and device.type == "cuda"
        self.codes, self.sizes = semantic
        self.summary = summary
        model.to(device)
        self.codes_t = torch.as_tensor(self.codes, device=device) if self.codes is not None else None
        self.excluded = torch.as_tensor(cold, device=device) if cold is not None else None  # held-out items
        self.teacher = Teacher(cfg.distill, cfg, data, device) if cfg.distill else None  # models/distill.py
        self.sharded = self.env.active and self.env.kind == "fsdp"
        self.optimizer = self._optimizer(model.parameters())
        self.state: dict[str, Any] = {"epoch": 0, "best_metric": -1.0, "best_epoch": -1, "bad_evals": 0, "stage": 2,
                                      "history": []}
        self.loss_fn: torch.nn.Module | None = None  # StepLoss, wrapped for the world (start)
        self.eager = True  # the step runs the model uncompiled
        self.best_state: dict[str, torch.Tensor] = {}
        self.ckpt_path = cfg.output_dir / "checkpoint.pt"
        self.last_path = cfg.output_dir / "last.pt"
        self.deadline = train_deadline()
        self.epoch_seconds = 0.0  # the last stage-2 epoch with its validation: what one more would cost

    def start(self, resume: str | Path | None, rng: np.random.Generator) -> float:
        """Load ``resume`` (weights, optimizer, train state; from a ``last.pt`` also the best weights and the RNG
        states) if given, compile, and keep the best; returns the minutes the run had already spent."""
        saved: dict[str, Any] = {}
        ckpt: dict[str, Any] = {}
        if resume:
            ckpt = torch.load(resume, map_location=self.device, weights_only=False)
            self.model.load_state_dict(ckpt["state_dict"])
            self.state = ckpt["train_state"]
            saved = ckpt.get("resume") or {}
            if saved:
                rng.bit_generator.state = saved["numpy_rng"]
                distributed.restore_rng(saved, self.env, self.device, self.cfg.seed, self.state["epoch"])
            log.info("resumed from %s at epoch %d", resume, self.state["epoch"])
        self.summary["parameters"] = sum(p.numel() for p in self.model.parameters())
        best = saved.get("best_state_dict") or self.model.state_dict()  # rank 0's to keep
        self.best_state = copy.deepcopy(best) if self.env.main else {}
        self.items = ItemShards(self.model, self.env, self.cfg, self.excluded, self.teacher, self.best_state)
        if self.items.active:
            self.optimizer = self._optimizer(self.model.parameters())  # over the shard
        if self.sharded:  # FSDP shards a copy; self.model stays whole on every rank: rank 0 evaluates and saves it
            self.loss_fn = self._wrap(copy.deepcopy(self.model))
            self.optimizer = self._optimizer(self.loss_fn.parameters())
        else:
            compiled = self.model if self.items.active else _compiled(self.model, self.cfg, self.device)
            self.eager = compiled is self.model
            self.loss_fn = self._wrap(compiled)
        if ckpt.get("optimizer"):
            fmt = ckpt.get("optimizer_format")
            state = self.items.shard_optimizer(self.optimizer, ckpt["optimizer"], fmt)
            distributed.load_optimizer(self.loss_fn, self.optimizer, state, fmt)
        return float(self.state.get("minutes", 0.0))

    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                 weight_decay=self.cfg.weight_decay)

    def sync_model(self) -> None:
        """Under FSDP or shard_items, gather the trained shards into ``self.model`` on rank 0 (every rank calls it)."""
        self.items.sync()
        if self.sharded:
            full = distributed.full_model_state(self.loss_fn)
            if self.env.main:
                self.model.load_state_dict({k.removeprefix("inner."): v for k, v in full.items()})

    def _wrap(self, inner: torch.nn.Module) -> torch.nn.Module:
        return distributed.wrap(StepLoss(inner, self.cfg, self.codes_t, self.amp, self.excluded, self.teacher),
                                self.env, self.device)

    def save_resume(self, rng: np.random.Generator, t0: float) -> None:
        """last.pt (rank 0 writes it): all ``start`` needs to continue here, at this or another world size (every
        rank's torch RNG); best weights only if not the current (it travels)."""
        ranks = self.env.gather(distributed.rng_state(self.device))
        optimizer = self.items.full_optimizer(self.optimizer, distributed.full_optimizer_state(
            self.loss_fn, self.optimizer, self.sharded))
        if not self.env.main:
            return
        self.state["minutes"] = (time.time() - t0) / 60
        best_is_current = self.state["best_epoch"] == self.state["epoch"] or self.state.get("stage2_done")
        saved = {"best_state_dict": None if best_is_current else self.best_state, "numpy_rng": rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state(), "rank_rngs": ranks,
                 "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}
        partial = self.last_path.with_suffix(".pt.partial")
        with self.items.whole_model(self.device):
            save_checkpoint(partial, self.model, self.cfg, self.data, None, self.state, self.codes, self.sizes,
                            extra={"resume": saved, "optimizer": optimizer,
                                   "optimizer_format": "fqn" if self.sharded else "torch"})
        os.replace(partial, self.last_path)

    def past_deadline(self, seconds: float) -> bool:  # never without a deadline
        return self.deadline is not None and time.time() + seconds > self.deadline

    def step(self, micro: list[distributed.Micro]) -> float:
        """One stage-2 optimizer step over this rank's micro-batches; returns its share of the step's mean loss.
        A compiled step that fails falls back to eager for the rest of the run."""
        self.loss_fn.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            share = self._backward(micro)
        except Exception as exc:
            if self.eager:
                raise
            log.warning("compiled step failed (%s: %s); continuing eagerly", type(exc).__name__, exc)
            self.summary["compile_fallback"] = f"{type(exc).__name__}: {exc}"[:300]
            self.eager, self.loss_fn = True, self._wrap(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            share = self._backward(micro)
        self.optimizer.step()
        return share

    def _backward(self, micro: list[distributed.Micro]) -> float:
        """Gradients of the weighted micro-batch losses, synced across ranks on the last one."""
        share = 0.0
        for i, (np_batch, weight) in enumerate(micro):
            with distributed.grad_sync(self.loss_fn, i == len(micro) - 1):
                loss = self.loss_fn(batch_to_device(np_batch, self.device))
                (loss * weight).backward()
            share += float(loss.detach()) * weight / self.env.world_size  # the ranks' shares sum to the step's loss
        return share

    def run_epoch(self, rng: np.random.Generator) -> float:
        """One pass over the training split: the mean over optimizer steps of each step's loss (ranks' shares summed)."""
        batches = distributed.step_batches(self.splits["train"], self.cfg.batch_size, self.cfg.grad_accum, self.env,
                                           rng)
        shares = [self.step(micro) for micro in batches]
        return self.env.all_sum(float(np.sum(shares))) / len(shares) if shares else float("nan")

    def evaluate(self, split: str, **kwargs: Any) -> dict[str, Any]:
        """The current model on ``split`` (or ``rows`` of it), as evaluation is configured for this run."""
        rows = kwargs.pop("rows", None)
        data = self.splits[split] if rows is None else self.splits[split].subset(rows)
        return evaluate(self.model, self.data, data, split, device=self.device, batch_size=self.cfg.eval_batch_size,
                        mask_history=self.cfg.mask_history, amp=self.amp, **kwargs)

    def log_eval(self, epoch: int, loss: float, stage: int) -> bool:
        """Validate, record, checkpoint on improvement; returns True when patience ran out."""
        cfg, state = self.cfg, self.state
        entry: dict[str, Any] = {"epoch": epoch, "stage": stage, "loss": loss}
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
            v = self.evaluate("valid", beyond=False)
            entry.update({f"valid_{k}": v[k] for k in ("hr@10", "ndcg@10", "hr@50", "mrr")})
            if v["ndcg@10"] > state["best_metric"]:
                state.update(best_metric=v["ndcg@10"], best_epoch=epoch, bad_evals=0, best_stage=stage)
                self.best_state.clear()
                self.best_state.update(self.items.host_copy(self.model.state_dict()))
                save_checkpoint(self.ckpt_path, self.model, cfg, self.data, None if self.sharded or self.items.active
                                else self.optimizer, state, self.codes, self.sizes)  # shards: last.pt has it
            else:
                state["bad_evals"] += 1
        state["history"].append(entry)
        with (cfg.output_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        return state["bad_evals"] >= cfg.patience

    def stage2(self, rng: np.random.Generator, t0: float, minutes: float) -> bool:
        """Next-token prediction (+ auxiliary losses) until patience or ``minutes`` run out; ends on the best state.
        Returns False when the deadline stopped it first (last.pt holds the run)."""
        cfg, state = self.cfg, self.state
        if state.get("stage2_done"):  # resumed after stage 2: the saved weights are its best
            self.summary.update({k: v for k, v in state.items() if k in ("stage2_best", "stopped_by_time")})
            return True
        bar = tqdm(range(state["epoch"] + 1, cfg.max_epochs + 1), desc=f"{cfg.name} stage 2",
                   disable=not cfg.progress or not self.env.main)
        for epoch in bar:
            started = time.time()
            loss = self.run_epoch(rng)
            state["epoch"] = epoch
            self.sync_model()
            with self.items.whole_model(self.device):
                stop = self.log_eval(epoch, loss, 2) if self.env.main else False
            self.epoch_seconds = time.time() - started
            bar.set_postfix(loss=f"{loss:.4f}", best=f"{state['best_metric']:.4f}@{state['best_epoch']}")
            action = self.env.broadcast(self.next_action(stop, epoch, t0, minutes))  # rank 0 decides for all
            if action == "patience":
                break
            if action == "time":
                state["stopped_by_time"] = epoch
                log.warning("stage 2 stopped by max_minutes at epoch %d", epoch)
                break
            self.save_resume(rng, t0)
            if action == "deadline":
                bar.close()
                self.summary["interrupted"] = f"deadline after epoch {epoch}"
                return False
        bar.close()
        state["stage2_best"] = {"epoch": state["best_epoch"], "valid_ndcg@10": state["best_metric"]}
        self.summary.update({k: v for k, v in state.items() if k in ("stage2_best", "stopped_by_time")})
        if self.env.main:  # the other ranks stop here (fit)
            self.items.finish(self.device)
            self.model.load_state_dict(self.best_state)
        state["stage2_done"] = True
        return True

    def next_action(self, stop: bool, epoch: int, t0: float, minutes: float) -> str:
        """After an epoch: "patience" (ran out), "time" (max_minutes), "deadline" (save and stop) or "go"."""
        if stop:
            return "patience"
        if minutes > 0 and (time.time() - t0) / 60 > minutes:
            return "time"
        if epoch < self.cfg.max_epochs and self.past_deadline(self.epoch_seconds):
            return "deadline"
        return "go"

    def stage3(self, dpo: DPOConfig, rng: np.random.Generator, t0: float) -> dict[str, Any]:
        """DPO on preference pairs, reference = the best stage-2 model; ends on the best state; returns its report."""
        cfg, state = self.cfg, self.state
        preference = PreferenceStep(self.model, cfg, dpo, self.splits["train"], self.device, self.amp, rng)
        start = state["epoch"]
        state["bad_evals"] = 0
        for epoch in tqdm(range(start + 1, start + dpo.epochs + 1), desc=f"{cfg.name} stage 3 (DPO)",
                          disable=not cfg.progress):
            loss = _run_epoch(preference.step, self.splits["train"], cfg, rng, self.device)
            preference.end_epoch()
            state["epoch"] = epoch
            if self.log_eval(epoch, loss, 3):
                break
            if cfg.max_minutes > 0 and (time.time() - t0) / 60 > cfg.max_minutes:
                break
        self.model.load_state_dict(self.best_state)
        return preference.report()

    def test_report(self, cold: np.ndarray | None, holdout: bool) -> None:
        """Valid and test metrics of the kept model into the summary; with cold-start items, test split by them."""
        model, summary = self.model, self.summary
        generative = isinstance(model, UGT) and model.sid_head is not None
        summary["valid"] = self.evaluate("valid", beyond=False)
        rerank_top = model.config.heads.rank_top if isinstance(model, UGT) and model.ranker is not None else 0
        summary["test"] = self.evaluate("test", generative=generative, rerank_top=rerank_top)
        if cold is None:
            return
        # the same test rows split by whether the target is a cold-start item
        summary["cold_items"] = {**self.cfg.cold_items, "items": int(cold.sum()), "holdout": holdout,
                                 "id_rows_zero": bool(holdout and not model.embed.item_emb.weight[
                                     torch.as_tensor(cold)].abs().sum().item())}
        is_cold = cold[self.splits["test"].targets]
        summary["test_quota"] = self.evaluate("test", beyond=False, new_items=cold)["new_item_quota"]
        for name, rows in (("test_cold", is_cold), ("test_warm", ~is_cold)):
            summary[name] = self.evaluate("test", rows=rows, beyond=False, generative=generative,
                                          rerank_top=rerank_top, new_items=cold)
        valid_cold = cold[self.splits["valid"].targets]  # what variants are chosen on (never the test rows)
        for name, rows in (("valid_cold", valid_cold), ("valid_warm", ~valid_cold)):
            summary[name] = self.evaluate("valid", rows=rows, beyond=False)


def _use_tf32(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _stage1(cfg: TrainConfig, data: SequenceData, env: DistEnv) -> tuple[np.ndarray | None, list[int]]:
    """Semantic IDs; under torchrun a ``build`` runs on rank 0 and the other ranks load what it wrote."""
    if not env.active or "build" not in (cfg.semantic_ids or {}):
        return semantic_codes(cfg, data)
    built = semantic_codes(cfg, data) if env.main else None
    env.barrier()
    return built or semantic_codes(replace(cfg, semantic_ids={"artifact": str(cfg.output_dir / "semantic_ids")}), data)


def _check_world(cfg: TrainConfig, env: DistEnv) -> None:
    """What the run cannot do at this world size, as a clear error before any step."""
    if cfg.batch_size < env.world_size * cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch of one optimizer step: it must be at least "
                         f"world size {env.world_size} x grad_accum {cfg.grad_accum}")
    dpo = DPOConfig(**(cfg.dpo or {}))
    if env.active and dpo.enabled and dpo.epochs > 0:
        raise ValueError("stage 3 (DPO) runs in one process: set dpo.enabled=false under torchrun (world size "
                         f"{env.world_size})")


def _fit_popularity(model: Popularity, cfg: TrainConfig, data: SequenceData, splits: dict[str, Batchable],
                    device: torch.device, summary: dict[str, Any], t0: float) -> dict[str, Any]:
    """The popularity baseline has nothing to train: evaluate it and write the summary."""
    summary["test"] = evaluate(model, data, splits["test"], "test", device=device, batch_size=cfg.eval_batch_size,
                               mask_history=cfg.mask_history)
    summary["valid"] = evaluate(model, data, splits["valid"], "valid", device=device,
                                batch_size=cfg.eval_batch_size, mask_history=cfg.mask_history, beyond=False)
    summary["train_minutes"] = (time.time() - t0) / 60
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def fit(cfg: TrainConfig, resume: str | Path | None = None, data: SequenceData | None = None) -> dict[str, Any]:
    """Train (stages 1-3), keep the best validation state, evaluate it on test; returns the summary.

    Under torchrun every rank calls this; rank 0's summary is the run's (the others stop after stage 2)."""
    env, device = distributed.setup(cfg.distributed, cfg.device)
    try:
        return _fit(cfg, env, device, resume, data)
    finally:
        distributed.teardown(env)


def _fit(cfg: TrainConfig, env: DistEnv, device: torch.device, resume: str | Path | None,
         data: SequenceData | None) -> dict[str, Any]:
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    _use_tf32(device)
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if env.main:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    data = load_data(cfg, data)
    cold, holdout = cold_holdout(cfg, data)
    splits = make_splits(cfg, data, cold if holdout else None)
    codes, sizes = _stage1(cfg, data, env)
    model = build_model(cfg, data, codes, sizes)
    if holdout:
        hold_out_features(model.embed, torch.as_tensor(cold))
        if getattr(model, "freshness", None) is not None:  # scored with the ID-less freshness values
            model.freshness.trained[torch.as_tensor(cold)] = False
    summary: dict[str, Any] = {"name": cfg.name, "model": cfg.model, "tie_order": cfg.tie_order,
                               "dataset": cfg.dataset, "device": str(device), "data_fingerprint": fingerprint(data),
                               "world_size": env.world_size, "grad_accum": cfg.grad_accum}
    if isinstance(model, Popularity):
        return _fit_popularity(model, cfg, data, splits, device, summary, t0) if env.main else summary
    _check_world(cfg, env)
    if env.rank > 0:  # its own dropout masks and negatives; the weights are rank 0's (built above, DDP broadcasts)
        torch.manual_seed(cfg.seed + env.rank)
    run = TrainRun(cfg, model, data, splits, device, (codes, sizes), cold if holdout else None, summary, env)
    t0 -= run.start(resume, rng) * 60  # minutes spent before a resume count toward max_minutes
    dpo = DPOConfig(**(cfg.dpo or {}))
    dpo_on = dpo.enabled and dpo.epochs > 0
    if not run.stage2(rng, t0, cfg.max_minutes * (0.8 if dpo_on else 1.0)) or not env.main:  # DPO gets a fifth
        return summary
    if dpo_on:
        run.save_resume(rng, t0)  # a stop inside stage 3 restarts stage 3 from here
        if run.past_deadline(2 * dpo.epochs * run.epoch_seconds):
            summary["interrupted"] = "deadline before stage 3 (DPO)"
            return summary
        summary["dpo"] = run.stage3(dpo, rng, t0)
    state = run.state
    summary.update(best_epoch=state["best_epoch"], best_stage=state.get("best_stage", 2), epochs_run=state["epoch"],
                   train_minutes=(time.time() - t0) / 60)
    if getattr(getattr(model, "embed", None), "stream_mean", None) is not None:  # serving's stream vectors center
        model.embed.stream_mean.copy_(mean_state(model, training_events(
            data, cold if holdout else None, cfg.max_len, long_history_len(cfg)), device))
        save_checkpoint(run.ckpt_path, model, cfg, data, None, state, codes, sizes)
    run.test_report(cold, holdout)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    run.last_path.unlink(missing_ok=True)  # finished: nothing left to resume
    plot_curves(state["history"], out / "curves.png", f"{cfg.name} ({cfg.model}, {cfg.dataset}, ties={cfg.tie_order})")
    return summary
