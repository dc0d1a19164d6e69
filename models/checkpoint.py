"""Checkpoints: what `ugt train` writes, and the model rebuilt from the file alone.

A checkpoint holds the whole training config, the model config, the vocabulary and the item metadata, so eval
and serving load one with :func:`load_checkpoint` without importing the trainer (models/train.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contracts.tokenizer import TokenVocab
from models.baselines.popularity import Popularity
from models.baselines.sasrec import SASRec, SASRecConfig
from models.data import SequenceData, build_sequences, limit_users
from models.hstu import HSTU, HSTUConfig
from models.train_config import TrainConfig
from models.ugt.model import UGT, UGTConfig

LAKE_PREFIX = "lake:"  # TrainConfig.dataset of a model trained with `ugt train --lake <path>`


def load_data(cfg: TrainConfig, data: SequenceData | None = None) -> SequenceData:
    """The run's sequences: ``data`` when given (the lake), else the config's dataset (a name such as ml-1m, or a
    folder in the generic format); either way cut to the config's ``max_users``."""
    if data is None:
        from contracts.datasets import load_dataset

        data = build_sequences(load_dataset(cfg.dataset), cfg.tie_order)
    return limit_users(data, cfg.max_users)


def long_history_len(cfg: TrainConfig) -> int:
    if cfg.model != "ugt":
        return 0
    ms = (cfg.model_config or {}).get("multiscale", {}) or {}
    groups = ms.get("long_groups", UGTConfig().multiscale.long_groups)
    return int(ms.get("max_long", UGTConfig().multiscale.max_long)) if groups > 0 else 0


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
    log = None
    if config.freshness.recent_days > 0 and data.items:  # every event of the data: the stream's item counts
        log = (np.concatenate(data.items), np.concatenate(data.times))
    return UGT(config, data.item_genres, data.item_year_bucket, codes, codebook_sizes, data.item_release_year, log)


def model_config_dict(model: Any) -> dict[str, Any]:
    c = model.config
    return c.to_dict() if hasattr(c, "to_dict") else asdict(c)


def save_checkpoint(path: Path, model: Any, cfg: TrainConfig, data: SequenceData, optimizer: Any, state: dict,
                    codes: np.ndarray | None, codebook_sizes: list[int], extra: dict | None = None) -> None:
    """``extra``: more top-level entries (the trainer's resume state in last.pt, models/train.py)."""
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
            **(extra or {}),
        },
        path,
    )


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
