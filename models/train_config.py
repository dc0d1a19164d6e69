"""The training run's config: what `ugt train` reads from YAML, and what every checkpoint carries.

Its own module so the trainer, eval and serving (which rebuild a model from a checkpoint's config, see
models/checkpoint.py) share it without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

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
    dataset: str = "ml-1m"  # ml-1m | ml-100k | a folder in the generic format (contracts.datasets.load_generic)
    tie_order: str = "hstu"  # hstu | stable (models.data)
    model: str = "ugt"  # sasrec | hstu | ugt | popularity
    model_config: dict = field(default_factory=dict)  # fields of the model's config dataclass
    seed: int = 42
    max_len: int = 200
    batch_size: int = 128  # the global batch of one optimizer step, at any world size (models/distributed.py)
    grad_accum: int = 1  # micro-batches per optimizer step on each rank (batch_size / (world size * grad_accum) rows)
    distributed: str = "ddp"  # under torchrun: ddp (replicated weights) | fsdp (FSDP2 fully_shard, sharded weights)
    shard_items: bool = False  # under torchrun (ddp): the item ID table row-wise across ranks (models/sharded_items.py)
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
    distill: dict = field(default_factory=dict)  # {} | models.distill.DistillConfig fields (teacher, weight, ...)
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
        self.dataset = str(self.dataset)
        if not self.dataset.startswith("lake:"):
            from contracts.datasets import is_dataset_folder

            if is_dataset_folder(self.dataset):  # a generic-format folder: absolute, so eval finds it from anywhere
                self.dataset = str(Path(self.dataset).expanduser().resolve())
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.max_len < 2 or self.batch_size < 1 or self.max_epochs < 0 or self.eval_every < 1:
            raise ValueError("max_len >= 2, batch_size >= 1, max_epochs >= 0 and eval_every >= 1 are required")
        if self.grad_accum < 1 or self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"grad_accum >= 1 and distributed ddp|fsdp are required, got {self.grad_accum} and "
                             f"{self.distributed!r}")

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
