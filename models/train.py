"""Training: one loop for SASRec, HSTU and UGT in the seed's three stages, with early stopping.

Stage 1 -- semantic IDs: built by ``models.semantic_ids`` (or loaded from an artifact) and mapped onto
  the vocabulary; UGT embeds them, generates them and contrasts against them.
Stage 2 -- next-token prediction: sampled softmax (HSTU's: uniform negatives, L2-normalised embeddings,
  temperature) at every position, + MoE load balancing, + next-semantic-ID cross-entropy, + contrastive
  loss in semantic-ID space. Early stopping on validation NDCG@10 (leave-one-out, the item before the
  test item); the best state is kept and checkpointed.
Stage 3 -- DPO: preference pairs from the data (see :func:`preference_pairs`), the stage-2 model frozen as
  the reference; loss = NTP + dpo.weight * DPO. Kept only if validation does not drop (both recorded).

Reads top to bottom like nanoGPT's train.py: config, data, model, helpers, then :func:`fit`.
Checkpoints hold the whole config, the model config and the vocabulary, so eval and serving rebuild the
model from the file alone, and ``resume`` continues a run where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from contracts.tokenizer import TokenVocab
from models.baselines.popularity import Popularity
from models.baselines.sasrec import SASRec, SASRecConfig
from models.data import (
    Batchable,
    SequenceData,
    build_sequences,
    cold_item_mask,
    iterate_batches,
    make_split,
    without_items,
)
from models.eval import batch_to_device, evaluate
from models.hstu import HSTU, HSTUConfig
from models.losses import dpo_loss, sampled_softmax_loss, semantic_contrastive_loss
from models.ugt.model import UGT, UGTConfig
from models.ugt.ranking import ranking_loss

log = logging.getLogger(__name__)

MODELS = ("sasrec", "hstu", "ugt", "popularity")


@dataclass
class DPOConfig:
    enabled: bool = False
    epochs: int = 5
    lr: float = 1e-4
    beta: float = 0.1
    weight: float = 0.5  # DPO loss weight next to the NTP loss
    window: int = 10  # chosen/rejected come from the next `window` events after the state
    high: int = 8  # rating token >= high (4 stars and up) -> chosen
    low: int = 4  # 0 < rating token <= low (2 stars and down) -> rejected
    max_pairs_per_row: int = 32


@dataclass
class TrainConfig:
    name: str = "run"
    dataset: str = "ml-1m"  # contracts.datasets name
    tie_order: str = "hstu"  # hstu | stable (models.data)
    model: str = "ugt"  # sasrec | hstu | ugt | popularity
    model_config: dict = field(default_factory=dict)  # fields of the model's config dataclass
    seed: int = 42
    max_len: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    max_epochs: int = 101
    eval_every: int = 1
    patience: int = 10  # evaluations without a validation gain before stopping
    num_negatives: int = 128  # 0 = full softmax over the catalog
    temperature: float = 0.05
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    semantic_ids: dict = field(default_factory=dict)  # {} | {"artifact": path} | {"build": {...builder kwargs}}
    dpo: dict = field(default_factory=dict)  # DPOConfig fields
    eval_batch_size: int = 512
    mask_history: str = "window"
    device: str = "auto"
    bf16: bool = True  # CUDA only
    compile: bool = True  # CUDA only; falls back to eager if compilation fails
    out_dir: str = ""  # default runs/<name>
    progress: bool = True
    max_users: int = 0  # > 0: keep only the first N users (quick runs)
    train_windows: str = "last"  # last (HSTU: each user's last max_len events) | all (every window)
    max_minutes: float = 0.0  # > 0: stop training after this long (then evaluate the best state)
    # cold-start protocol (models.data.cold_item_mask): {} | {"year_from": 2000} | {"fraction": 0.1, "seed": 0}.
    # These items "arrive after training": their events are removed from the training split, they are never
    # softmax negatives, and their ID rows stay zero, so validation and test score them as the serving live catalog
    # does (semantic ID + metadata). The test report adds test_cold / test_warm (rows by target). With
    # "holdout": false the set only splits the report (the reference: a model trained on everything).
    cold_items: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.max_len < 2 or self.batch_size < 1 or self.max_epochs < 0 or self.eval_every < 1:
            raise ValueError("max_len >= 2, batch_size >= 1, max_epochs >= 0 and eval_every >= 1 are required")

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; unknown keys raise. ``overrides`` (dotted keys allowed) win over the file."""
    text = Path(path).read_text()
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a YAML mapping")
    for key, value in (overrides or {}).items():
        target = values
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig(**values)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- data -------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig) -> SequenceData:
    from contracts.datasets import load_dataset

    dataset = load_dataset(cfg.dataset)
    data = build_sequences(dataset, cfg.tie_order)
    if cfg.max_users > 0:
        data.user_ids = data.user_ids[: cfg.max_users]
        data.items, data.times, data.ratings = (
            data.items[: cfg.max_users], data.times[: cfg.max_users], data.ratings[: cfg.max_users]
        )
    return data


def long_history_len(cfg: TrainConfig) -> int:
    if cfg.model != "ugt":
        return 0
    ms = (cfg.model_config or {}).get("multiscale", {}) or {}
    groups = ms.get("long_groups", UGTConfig().multiscale.long_groups)
    return int(ms.get("max_long", UGTConfig().multiscale.max_long)) if groups > 0 else 0


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


@torch.no_grad()
def hold_out_features(embed: Any, cold: torch.Tensor) -> None:
    """Describe the held-out items as the serving live catalog would: no ID row, and no part that only they have
    (the model never trains it): a semantic-ID code no other item has is dropped, a newer decade is clamped to the
    latest one the other items have, a genre only they have is dropped
    (:meth:`models.ugt.embedding.UnifiedEmbedding.set_items` applies the same rule to items coded after training)."""
    embed.item_emb.weight[cold] = 0
    if getattr(embed, "content_tower", None) is not None:
        embed.has_id[cold] = False
    warm = ~cold
    warm[0] = False
    if embed.item_codes is not None:
        codes = embed.item_codes[cold]
        embed.item_codes[cold] = torch.where(torch.isin(codes, embed.item_codes[warm].unique()), codes,
                                             torch.zeros_like(codes))
    latest = int(embed.item_year[warm].max())
    embed.item_year[cold] = embed.item_year[cold].clamp(max=latest)
    genres = embed.item_genres[cold]
    known = torch.isin(genres, embed.item_genres[warm].unique())
    embed.item_genres[cold] = torch.where(known, genres, torch.zeros_like(genres))


def cold_holdout(cfg: TrainConfig, data: SequenceData) -> tuple[np.ndarray | None, bool]:
    """(the cold-start item mask or None, whether training holds those items out)."""
    cold = cold_item_mask(data, {k: v for k, v in (cfg.cold_items or {}).items() if k != "holdout"})
    holdout = cold is not None and bool((cfg.cold_items or {}).get("holdout", True))
    if holdout and cfg.model != "ugt":
        raise ValueError("cold_items holdout needs model: ugt (new items are embedded by semantic ID and metadata)")
    dpo = DPOConfig(**(cfg.dpo or {}))
    if holdout and dpo.enabled and dpo.epochs > 0:
        raise ValueError("cold_items holdout with DPO (stage 3) is not supported: set dpo.enabled=false")
    return cold, holdout


# ---- stage 1: semantic IDs ----------------------------------------------------------------------


def semantic_codes(cfg: TrainConfig, data: SequenceData) -> tuple[np.ndarray | None, list[int]]:
    """Stage 1: semantic-ID codes per vocabulary index ([V + 1, L], row 0 unused) and codebook sizes.

    ``semantic_ids: {artifact: path}`` loads a saved ``models.semantic_ids`` artifact (or an ``.npz`` with
    codes / item_ids / codebook_sizes exported from one); ``{build: {...}}`` runs the builder
    (``models.semantic_ids.stage1``, its config as the value) into ``<out_dir>/semantic_ids``.
    """
    spec = cfg.semantic_ids or {}
    if not spec:
        return None, []
    if "artifact" in spec:
        path = Path(spec["artifact"])
        if path.suffix == ".npz":
            with np.load(path) as z:
                artifact = SimpleNamespace(codes=z["codes"], item_ids=[str(i) for i in z["item_ids"]],
                                           codebook_sizes=[int(k) for k in z["codebook_sizes"]])
        else:
            from models.semantic_ids import SemanticIdArtifact

            artifact = SemanticIdArtifact.load(path)
    elif "build" in spec:
        from models.semantic_ids import stage1

        artifact = stage1(cfg.dataset, spec.get("build") or {}, cfg.output_dir / "semantic_ids", dataset=cfg.dataset)
    else:
        raise ValueError("semantic_ids needs 'artifact' or 'build'")
    return codes_for_vocab(artifact, data), list(artifact.codebook_sizes)


def semantic_ids_version(cfg: TrainConfig) -> str | None:
    """The artifact version the model's codes come from (the key of the item job's Redis index and feed), so a
    generator follows the right one for new items; None for an exported ``.npz`` (no manifest to name it)."""
    from models.semantic_ids.artifact import artifact_version

    spec = cfg.semantic_ids or {}
    if "artifact" in spec:
        folder = Path(spec["artifact"])
    elif "build" in spec:
        folder = cfg.output_dir / "semantic_ids"
    else:
        return None
    try:
        return None if folder.suffix == ".npz" else artifact_version(folder)
    except ValueError:
        return None


def codes_for_vocab(artifact: Any, data: SequenceData) -> np.ndarray:
    """Rows of ``artifact.codes`` in vocabulary order (row 0 = padding, zeros)."""
    position = {str(item): i for i, item in enumerate(artifact.item_ids)}
    codes = np.zeros((data.num_items + 1, len(artifact.codebook_sizes)), dtype=np.int64)
    missing = []
    for item_id, index in data.vocab.item_to_index.items():
        row = position.get(item_id)
        if row is None:
            missing.append(item_id)
        else:
            codes[index] = artifact.codes[row]
    if missing:
        raise ValueError(f"{len(missing)} vocabulary items have no semantic ID, e.g. {missing[0]!r}")
    return codes


# ---- model ----------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, data: SequenceData, codes: np.ndarray | None = None,
                codebook_sizes: list[int] | None = None):
    mc = dict(cfg.model_config or {})
    if cfg.model == "popularity":
        return Popularity(data)
    if cfg.model == "sasrec":
        return SASRec(SASRecConfig(num_items=data.num_items, max_len=cfg.max_len, **mc))
    if cfg.model == "hstu":
        return HSTU(HSTUConfig(num_items=data.num_items, max_len=cfg.max_len, **mc))
    mc.setdefault("multiscale", {})
    mc["multiscale"] = {**mc["multiscale"], "recent_len": cfg.max_len}
    config = UGTConfig.from_dict({**mc, "num_items": data.num_items})
    if "sid" in config.embedding.item_repr and codes is None:
        raise ValueError("UGT item_repr uses semantic IDs: set semantic_ids in the config")
    return UGT(config, data.item_genres, data.item_year_bucket, codes, codebook_sizes)


def model_config_dict(model: Any) -> dict[str, Any]:
    c = model.config
    return c.to_dict() if hasattr(c, "to_dict") else asdict(c)


# ---- losses of one step ---------------------------------------------------------------------------


def stage2_loss(model: Any, batch: dict[str, torch.Tensor], cfg: TrainConfig, codes_t: torch.Tensor | None,
                amp: bool, excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    device_type = batch["ids"].device.type
    core = getattr(model, "_orig_mod", model)
    ranking = isinstance(core, UGT) and core.ranker is not None
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        if ranking:  # the ranking head reads every layer's input of this same forward
            user, aux, kept = model(batch, keep=True)
        else:
            user, aux = model(batch)
        table = model.item_embeddings()
    targets = batch["targets"]
    ntp = sampled_softmax_loss(user, targets, table, cfg.num_negatives, cfg.temperature, excluded=excluded)
    total = ntp + aux.float()
    parts = {"ntp": float(ntp.detach()), "aux": float(aux.detach())}
    if ranking:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            rank = ranking_loss(core, user, *kept, batch, table)
        total = total + core.config.heads.ranking_loss_weight * rank
        parts["rank"] = float(rank.detach())
    if isinstance(core, UGT) and codes_t is not None:
        mask = targets > 0
        u = user[mask].float()
        tgt = targets[mask]
        if core.sid_head is not None and core.config.heads.sid_loss_weight > 0:
            sid = core.sid_head.loss(u, codes_t[tgt])
            total = total + core.config.heads.sid_loss_weight * sid
            parts["sid"] = float(sid.detach())
        if cfg.contrastive_weight > 0:
            con = semantic_contrastive_loss(u, core.embed.sid_vectors(tgt).float(), tgt, cfg.contrastive_temperature)
            total = total + cfg.contrastive_weight * con
            parts["contrastive"] = float(con.detach())
    return total, parts


def _next_true(flag: np.ndarray, missing: int) -> np.ndarray:
    """For each position t, the first index >= t where ``flag`` holds (``missing`` if none)."""
    nxt = np.where(flag, np.arange(len(flag)), missing)
    return np.minimum.accumulate(nxt[::-1])[::-1]


def preference_pairs(split: Batchable, dpo: DPOConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DPO pairs from the training rows: for the state at position t, chosen = the nearest of the next
    ``window`` events rated >= ``high`` and rejected = the nearest rated in (0, ``low``].

    Both were actually consumed by the user right after that state, so the pair says "among what came
    next, the model should prefer what the user liked". Returns pos/chosen/rejected arrays [R, P]
    (pos -1 = no pair), at most ``max_pairs_per_row`` random pairs per row.
    """
    R, N = split.targets.shape
    P = dpo.max_pairs_per_row
    pos = np.full((R, P), -1, np.int64)
    chosen = np.zeros((R, P), np.int64)
    rejected = np.zeros((R, P), np.int64)
    big = np.iinfo(np.int64).max // 2
    for r in range(R):
        n = int(split.lengths[r])
        rt = split.target_ratings[r, :n]
        idx = np.arange(n)

        nh = _next_true(rt >= dpo.high, big)
        nl = _next_true((rt > 0) & (rt <= dpo.low), big)
        ok = np.flatnonzero((nh - idx < dpo.window) & (nl - idx < dpo.window))
        if len(ok) == 0:
            continue
        if len(ok) > P:
            ok = np.sort(rng.choice(ok, P, replace=False))
        pos[r, : len(ok)] = ok
        chosen[r, : len(ok)] = split.targets[r, nh[ok]]
        rejected[r, : len(ok)] = split.targets[r, nl[ok]]
    return {"pos": pos, "chosen": chosen, "rejected": rejected}


def pair_logprobs(model: Any, batch: dict[str, torch.Tensor], pos: torch.Tensor, chosen: torch.Tensor,
                  rejected: torch.Tensor, temperature: float, amp: bool, with_aux: bool = False):
    """log p(chosen), log p(rejected) under the full softmax over items, the step's user states (and aux loss)."""
    with torch.autocast(batch["ids"].device.type, dtype=torch.bfloat16, enabled=amp):
        user, aux = model(batch)
        table = model.item_embeddings()
    keep = pos >= 0
    rows = torch.arange(pos.shape[0], device=pos.device).view(-1, 1).expand_as(pos)[keep]
    u = user[rows, pos[keep]].float()
    logp = F.log_softmax(u @ table.float()[1:].T / temperature, dim=-1)
    lc = logp.gather(1, (chosen[keep] - 1).view(-1, 1)).squeeze(1)
    lr = logp.gather(1, (rejected[keep] - 1).view(-1, 1)).squeeze(1)
    return (lc, lr, user, aux) if with_aux else (lc, lr, user)


# ---- checkpoints, logs, plots -----------------------------------------------------------------------


def save_checkpoint(path: Path, model: Any, cfg: TrainConfig, data: SequenceData, optimizer: Any, state: dict,
                    codes: np.ndarray | None, codebook_sizes: list[int]) -> None:
    core = getattr(model, "_orig_mod", model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "config": asdict(cfg),
            "model": cfg.model,
            "model_config": model_config_dict(core),
            "vocab": dict(data.vocab.item_to_index),
            # the item side of the data, so a checkpoint loads without its training data (a lake keeps growing)
            "item_meta": {"genre_names": list(data.genre_names), "item_genres": data.item_genres,
                          "item_year_bucket": data.item_year_bucket, "item_titles": list(data.item_titles)},
            "semantic_codes": codes,
            "codebook_sizes": codebook_sizes,
            "semantic_ids_version": semantic_ids_version(cfg) if codes is not None else None,
            "state_dict": core.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "train_state": state,
        },
        path,
    )


LAKE_PREFIX = "lake:"  # TrainConfig.dataset of a model trained with `ugt train --lake <path>`


def items_only_data(cfg: TrainConfig, ckpt: dict, path: str | Path) -> SequenceData:
    """The vocabulary and item metadata a checkpoint carries, with no user sequences: what serving needs."""
    meta = ckpt.get("item_meta")
    if meta is None:
        raise ValueError(f"{path}: trained on {cfg.dataset} by an older `ugt train` that did not store the item "
                         "metadata; retrain it to serve it")
    vocab = TokenVocab()
    for item_id, index in sorted(ckpt["vocab"].items(), key=lambda kv: kv[1]):
        if vocab.add(item_id) != index:
            raise ValueError(f"{path}: the stored vocabulary is not dense (item {item_id!r} at {index})")
    return SequenceData(name=cfg.dataset, tie_order=cfg.tie_order, vocab=vocab, user_ids=[], items=[], times=[],
                        ratings=[], genre_names=list(meta["genre_names"]), item_genres=np.asarray(meta["item_genres"]),
                        item_year_bucket=np.asarray(meta["item_year_bucket"]), item_titles=list(meta["item_titles"]))


def load_checkpoint(path: str | Path, data: SequenceData | None = None, map_location: str = "cpu"):
    """Rebuild (model, cfg, data, checkpoint dict) from a checkpoint file alone: the dataset is re-read, except
    for a model trained on the lake, whose vocabulary and item metadata come from the checkpoint."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    cfg = TrainConfig(**ckpt["config"])
    if data is None and cfg.dataset.startswith(LAKE_PREFIX):
        data = items_only_data(cfg, ckpt, path)  # the lake has grown since: serve what was trained
    if data is None:
        data = load_data(cfg)
    if dict(data.vocab.item_to_index) != ckpt["vocab"]:
        raise ValueError(f"{path}: the dataset's vocabulary differs from the checkpoint's")
    model = build_model(cfg, data, ckpt.get("semantic_codes"), ckpt.get("codebook_sizes") or None)
    model.load_state_dict(ckpt["state_dict"])
    return model, cfg, data, ckpt


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ep = [h["epoch"] for h in history if "loss" in h]
    axes[0].plot(ep, [h["loss"] for h in history if "loss" in h], label="train loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training loss")
    axes[0].legend()
    ev = [h for h in history if "valid_ndcg@10" in h]
    axes[1].plot([h["epoch"] for h in ev], [h["valid_hr@10"] for h in ev], label="valid HR@10")
    axes[1].plot([h["epoch"] for h in ev], [h["valid_ndcg@10"] for h in ev], label="valid NDCG@10")
    axes[1].set_xlabel("epoch")
    axes[1].set_title("validation")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def fit(cfg: TrainConfig, resume: str | Path | None = None, data: SequenceData | None = None) -> dict[str, Any]:
    """Train (stages 1-3), keep the best validation state, evaluate it on test; returns the summary."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    amp = cfg.bf16 and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    data = data or load_data(cfg)
    cold, holdout = cold_holdout(cfg, data)
    splits = make_splits(cfg, data, cold if holdout else None)
    codes, sizes = semantic_codes(cfg, data)
    model = build_model(cfg, data, codes, sizes)
    if holdout:
        hold_out_features(model.embed, torch.as_tensor(cold))
    summary: dict[str, Any] = {"name": cfg.name, "model": cfg.model, "tie_order": cfg.tie_order,
                               "dataset": cfg.dataset, "device": str(device), "data_fingerprint": fingerprint(data)}
    if isinstance(model, Popularity):
        summary["test"] = evaluate(model, data, splits["test"], "test", device=device, batch_size=cfg.eval_batch_size,
                                   mask_history=cfg.mask_history)
        summary["valid"] = evaluate(model, data, splits["valid"], "valid", device=device,
                                    batch_size=cfg.eval_batch_size, mask_history=cfg.mask_history, beyond=False)
        summary["train_minutes"] = (time.time() - t0) / 60
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    model.to(device)
    codes_t = torch.as_tensor(codes, device=device) if codes is not None else None
    excluded = torch.as_tensor(cold, device=device) if holdout else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best_metric": -1.0, "best_epoch": -1, "bad_evals": 0, "stage": 2, "history": []}
    if resume:
        ckpt = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["train_state"]
        log.info("resumed from %s at epoch %d", resume, state["epoch"])
    n_params = sum(p.numel() for p in model.parameters())
    summary["parameters"] = n_params
    step_model = _compiled(model, cfg, device)
    best_state = copy.deepcopy(model.state_dict())
    ckpt_path = out / "checkpoint.pt"

    def step(batch: dict[str, torch.Tensor], _np: dict) -> float:
        nonlocal step_model
        model.train()
        optimizer.zero_grad(set_to_none=True)
        try:
            loss, _ = stage2_loss(step_model, batch, cfg, codes_t, amp, excluded)
            loss.backward()
        except Exception as exc:
            if step_model is model:
                raise
            log.warning("compiled step failed (%s: %s); continuing eagerly", type(exc).__name__, exc)
            summary["compile_fallback"] = f"{type(exc).__name__}: {exc}"[:300]
            step_model = model
            optimizer.zero_grad(set_to_none=True)
            loss, _ = stage2_loss(model, batch, cfg, codes_t, amp, excluded)
            loss.backward()
        optimizer.step()
        return float(loss.detach())

    def validate() -> dict[str, float]:
        return evaluate(model, data, splits["valid"], "valid", device=device, batch_size=cfg.eval_batch_size,
                        mask_history=cfg.mask_history, beyond=False, amp=amp)

    def log_eval(epoch: int, loss: float, stage: int) -> bool:
        """Validate, record, checkpoint on improvement; returns True when patience ran out."""
        entry: dict[str, Any] = {"epoch": epoch, "stage": stage, "loss": loss}
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs:
            v = validate()
            entry.update({f"valid_{k}": v[k] for k in ("hr@10", "ndcg@10", "hr@50", "mrr")})
            if v["ndcg@10"] > state["best_metric"]:
                state.update(best_metric=v["ndcg@10"], best_epoch=epoch, bad_evals=0, best_stage=stage)
                best_state.clear()
                best_state.update(copy.deepcopy(model.state_dict()))
                save_checkpoint(ckpt_path, model, cfg, data, optimizer, state, codes, sizes)
            else:
                state["bad_evals"] += 1
        state["history"].append(entry)
        with (out / "log.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
        return state["bad_evals"] >= cfg.patience

    # Stage 2: next-token prediction (+ auxiliary losses).
    dpo = DPOConfig(**(cfg.dpo or {}))
    dpo_on = dpo.enabled and dpo.epochs > 0
    bar = tqdm(range(state["epoch"] + 1, cfg.max_epochs + 1), desc=f"{cfg.name} stage 2", disable=not cfg.progress)
    for epoch in bar:
        loss = _run_epoch(step, splits["train"], cfg, rng, device)
        state["epoch"] = epoch
        stop = log_eval(epoch, loss, 2)
        bar.set_postfix(loss=f"{loss:.4f}", best=f"{state['best_metric']:.4f}@{state['best_epoch']}")
        if stop:
            break
        if cfg.max_minutes > 0 and (time.time() - t0) / 60 > cfg.max_minutes * (0.8 if dpo_on else 1.0):
            summary["stopped_by_time"] = epoch
            log.warning("stage 2 stopped by max_minutes at epoch %d", epoch)
            break
    bar.close()
    summary["stage2_best"] = {"epoch": state["best_epoch"], "valid_ndcg@10": state["best_metric"]}
    model.load_state_dict(best_state)

    # Stage 3: DPO on preference pairs, reference = the best stage-2 model.
    if dpo_on:
        summary["dpo"] = run_dpo(model, cfg, dpo, data, splits, device, amp, rng, state, log_eval, codes_t, t0)
        model.load_state_dict(best_state)

    minutes = (time.time() - t0) / 60
    summary.update(
        best_epoch=state["best_epoch"], best_stage=state.get("best_stage", 2), epochs_run=state["epoch"],
        train_minutes=minutes,
    )
    generative = isinstance(model, UGT) and model.sid_head is not None
    summary["valid"] = evaluate(model, data, splits["valid"], "valid", device=device, batch_size=cfg.eval_batch_size,
                                mask_history=cfg.mask_history, beyond=False, amp=amp)
    rerank_top = model.config.heads.rank_top if isinstance(model, UGT) and model.ranker is not None else 0
    summary["test"] = evaluate(model, data, splits["test"], "test", device=device, batch_size=cfg.eval_batch_size,
                               mask_history=cfg.mask_history, generative=generative, amp=amp, rerank_top=rerank_top)
    if cold is not None:  # the same test rows split by whether the target is a cold-start item
        summary["cold_items"] = {**cfg.cold_items, "items": int(cold.sum()), "holdout": holdout,
                                 "id_rows_zero": bool(holdout and not model.embed.item_emb.weight[
                                     torch.as_tensor(cold)].abs().sum().item())}
        is_cold = cold[splits["test"].targets]
        summary["test_quota"] = evaluate(model, data, splits["test"], "test", device=device,
                                         batch_size=cfg.eval_batch_size, mask_history=cfg.mask_history, beyond=False,
                                         amp=amp, new_items=cold)["new_item_quota"]
        for name, rows in (("test_cold", is_cold), ("test_warm", ~is_cold)):
            summary[name] = evaluate(model, data, splits["test"].subset(rows), "test", device=device,
                                     batch_size=cfg.eval_batch_size, mask_history=cfg.mask_history, beyond=False,
                                     generative=generative, amp=amp, rerank_top=rerank_top, new_items=cold)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(state["history"], out / "curves.png", f"{cfg.name} ({cfg.model}, {cfg.dataset}, ties={cfg.tie_order})")
    return summary


def run_dpo(model, cfg: TrainConfig, dpo: DPOConfig, data, splits, device, amp, rng, state, log_eval, codes_t,
            t_start: float):
    """Stage 3. Returns pair counts and preference accuracy before/after on the training pairs."""
    pairs = preference_pairs(splits["train"], dpo, rng)
    n_pairs = int((pairs["pos"] >= 0).sum())
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=dpo.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    split = splits["train"]
    pair_t = {k: torch.as_tensor(v) for k, v in pairs.items()}
    accs: list[float] = []

    def step(batch: dict[str, torch.Tensor], np_batch: dict) -> float:
        model.train()
        idx = torch.as_tensor(np_batch["row_index"])
        pos, ch, rj = (pair_t[k][idx].to(device) for k in ("pos", "chosen", "rejected"))
        with torch.no_grad():
            ref_c, ref_r, _ = pair_logprobs(reference, batch, pos, ch, rj, cfg.temperature, amp)
        # One policy forward serves both losses: DPO on the pairs, NTP on every position.
        pol_c, pol_r, user, aux = pair_logprobs(model, batch, pos, ch, rj, cfg.temperature, amp, with_aux=True)
        ntp = sampled_softmax_loss(user, batch["targets"], model.item_embeddings(), cfg.num_negatives,
                                   cfg.temperature) + aux.float()
        pref = dpo_loss(pol_c, pol_r, ref_c, ref_r, dpo.beta) if len(pol_c) else ntp.new_zeros(())
        loss = ntp + dpo.weight * pref
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if len(pol_c):
            accs.append(float((pol_c > pol_r).float().mean()))
        return float(loss.detach())

    start = state["epoch"]
    first_acc = None
    state["bad_evals"] = 0
    for epoch in tqdm(range(start + 1, start + dpo.epochs + 1), desc=f"{cfg.name} stage 3 (DPO)", disable=not cfg.progress):
        loss = _run_epoch(step, split, cfg, rng, device)
        if first_acc is None and accs:
            first_acc = float(np.mean(accs[: max(1, len(accs) // 4)]))
        state["epoch"] = epoch
        if log_eval(epoch, loss, 3):
            break
        if cfg.max_minutes > 0 and (time.time() - t_start) / 60 > cfg.max_minutes:
            break
    return {"pairs": n_pairs, "pair_rule": asdict(dpo),
            "preference_acc_first_quarter": first_acc,
            "preference_acc_last_epoch": float(np.mean(accs[-max(1, len(accs) // max(1, dpo.epochs)):])) if accs else None}

