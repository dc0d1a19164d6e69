"""The quality benchmark's row matrix: every row is one `ugt train` of a frozen config under a named recipe.

A row names its model, recipe, variant, tie order and seed; its overrides (``sets``) turn the frozen config
(models/configs/<model>_ml1m.yaml) into that row. Two recipes, so the baselines are compared fairly:

* ``paper``: the config as its paper runs it (baselines: sampled softmax, 128 negatives, each user's last window);
* ``ugt``: UGT's recipe (full softmax, every window of each history, UGT's max_epochs and patience with early
  stopping on validation), applied to the baselines.

UGT itself always trains with its recipe; its variants are the ablations (one switch each) and DPO (stage 3).
The ``tiny`` matrix is the same pipeline at CPU size on ML-100K, for the CI test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = "models/configs"
LABELS = {"sasrec": "SASRec", "hstu": "HSTU", "hstu_large": "HSTU-large", "ugt": "UGT", "popularity": "Popularity"}
BASELINES = ("sasrec", "hstu", "hstu_large")
SEEDS = (42, 43, 44)  # 42 is every config's seed; the first seed of each multi-seed group
TIE_ORDERS = ("stable", "hstu")  # stable: the primary table; hstu: HSTU's preprocessing, for the papers
# The fair baseline run over all seeds beside UGT (the previous table's strongest, HSTU-large); the report checks
# on the single-seed rows that it is still the strongest and says so when it is not.
STRONGEST_BASELINE = ("hstu_large", "ugt")
# UGT's variants: one switch each against the UGT row (DPO off), same recipe, budget and seeds.
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "no_sid": ("without semantic IDs (item ID only, no next-semantic-ID head, no contrastive loss)",
               ["model_config.embedding.item_repr=id", "model_config.heads.semantic_id=false",
                "contrastive_weight=0", "semantic_ids={}"]),
    "no_side": ("without side features (rating, genres, decade)",
                ["model_config.embedding.use_rating=false", "model_config.embedding.use_genres=false",
                 "model_config.embedding.use_year=false"]),
    "no_long": ("without long-term tokens (only the 200 recent events)", ["model_config.multiscale.long_groups=0"]),
    "dense_ffn": ("dense FFN instead of MoE", ["model_config.moe.dense=true"]),
    "layernorm": ("one LayerNorm instead of GLN", ["model_config.gln.grouped=false"]),
    "dpo": ("with DPO (stage 3)", ["dpo.enabled=true"]),
}
# Minutes each row took alone on an H100 (2026-11 runs; the plan's estimate; ugt-recipe baselines scaled by the
# 1.5x more targets of every window). Rows sharing a GPU take longer each.
MINUTES = {("sasrec", "paper"): 4.5, ("hstu", "paper"): 5.0, ("hstu_large", "paper"): 11.0,
           ("sasrec", "ugt"): 7.0, ("hstu", "ugt"): 7.5, ("hstu_large", "ugt"): 15.0,
           ("ugt", "ugt"): 6.0, ("popularity", "paper"): 0.3}
# last.pt per model on ML-1M (4 x float32 parameters: 1.14 M for UGT, 0.31 M for HSTU-large, 0.24 M others)
RESUME_MIB = {"ugt": 18.0, "hstu_large": 5.0, "hstu": 4.0, "sasrec": 4.0, "popularity": 0.0}
# CPU size (the CI test): ML-100K, the first 150 users, windows of 50, 3 epochs; models shrunk to seconds.
TINY_SETS = ["dataset=ml-100k", "max_users=150", "max_len=50", "max_epochs=3", "patience=3", "batch_size=64",
             "eval_batch_size=256", "compile=false"]
TINY_MODELS = {
    "sasrec": ["model_config.embedding_dim=16", "model_config.ffn_hidden_dim=16", "model_config.num_blocks=1"],
    "hstu": ["model_config.embedding_dim=16", "model_config.dqk=16", "model_config.dv=16",
             "model_config.num_blocks=1"],
    "ugt": ["model_config.d_model=16", "model_config.num_layers=1", "model_config.dqk=8", "model_config.dv=8",
            "model_config.moe.d_ff=16", "model_config.multiscale.max_long=32", "model_config.heads.beam_size=10",
            "dpo.epochs=1"],
    "popularity": [],
}
TINY_SEMANTIC_IDS = {  # structured features only (no text encoder on a CI box), a small quantizer
    "quantizer": "rqkmeans", "codebook_sizes": [16, 16], "dedup_size": 256, "compare_baseline": False,
    "encoders": [{"type": "structured", "weight": 1.0, "multi_hot": ["genres"], "hash_dim": 16}],
    "fusion": {"center": True, "projection": "none", "projection_dim": 0}, "seed": 0,
}


@dataclass(frozen=True)
class Row:
    """One run of the matrix; ``name`` is its folder under the runs directory."""

    model: str  # sasrec | hstu | hstu_large | ugt | popularity
    recipe: str  # paper | ugt
    variant: str  # "" (the model as configured) or an ABLATIONS key
    tie_order: str
    seed: int
    config: str
    sets: tuple[str, ...] = field(default=())
    minutes: float = 0.0
    resume_mib: float = 0.0  # its last.pt: weights, Adam moments and the best weights (what a call carries on)

    @property
    def name(self) -> str:
        variant = f"+{self.variant}" if self.variant else ""
        recipe = f"-{self.recipe}" if self.model in BASELINES else ""  # UGT has one recipe, popularity none
        return f"{self.model}{variant}{recipe}-{self.tie_order}-s{self.seed}"

    @property
    def label(self) -> str:
        recipe = "" if self.model in ("ugt", "popularity") else f" ({self.recipe} recipe)"
        variant = f" {ABLATIONS[self.variant][0]}" if self.variant else ""
        return f"{LABELS[self.model]}{recipe}{variant}"

    @property
    def group(self) -> str:
        """Rows that differ only by seed share a group (the table's mean ± std)."""
        return self.name.rsplit("-s", 1)[0]


def ugt_budget() -> list[str]:
    """UGT's recipe as overrides for a baseline: full softmax, every window, UGT's epochs and patience."""
    ugt = yaml.safe_load((REPO / CONFIGS / "ugt_ml1m.yaml").read_text())
    return ["num_negatives=0", "train_windows=all", f"max_epochs={ugt['max_epochs']}", f"patience={ugt['patience']}"]


def _row(model: str, recipe: str, variant: str, ties: str, seed: int, semantic_ids: str | None,
         tiny: bool) -> Row:
    sets = [f"tie_order={ties}", f"seed={seed}"]
    if model in BASELINES and recipe == "ugt":
        sets += ugt_budget()
    if model == "ugt":
        sets.append("dpo.enabled=false")  # the UGT row; the dpo variant turns it back on
        if semantic_ids:
            sets.append(f"semantic_ids={{artifact: {semantic_ids}}}")
    if variant:
        sets += ABLATIONS[variant][1]
    if tiny:
        sets = [*sets, *TINY_SETS, *TINY_MODELS[model.replace("_large", "")]]  # last: they win
    minutes = MINUTES.get((model, recipe), 6.0) + (1.5 if variant == "dpo" else 0.0)
    return Row(model, recipe, variant, ties, seed, f"{CONFIGS}/{model}_ml1m.yaml", tuple(sets), minutes,
               0.0 if tiny else RESUME_MIB[model])


def matrix(semantic_ids: str | None, tiny: bool = False) -> list[Row]:
    """Every row of the table, primary (stable ties) first; ``semantic_ids`` is the staged artifact UGT reads."""
    if tiny:  # the pipeline at CPU size: a baseline in both recipes, UGT with and without DPO, popularity
        return [_row(m, r, v, "stable", 42, semantic_ids, True)
                for m, r, v in (("sasrec", "paper", ""), ("sasrec", "ugt", ""), ("ugt", "ugt", ""),
                                ("ugt", "ugt", "dpo"), ("popularity", "paper", ""))]
    rows: list[Row] = []
    for ties in TIE_ORDERS:
        for model in BASELINES:
            for recipe in ("paper", "ugt"):
                seeds = SEEDS if (model, recipe) == STRONGEST_BASELINE else SEEDS[:1]
                rows += [_row(model, recipe, "", ties, s, semantic_ids, False) for s in seeds]
        rows += [_row("ugt", "ugt", "", ties, s, semantic_ids, False) for s in SEEDS]
        rows.append(_row("popularity", "paper", "", ties, 42, semantic_ids, False))
    # DPO on the same seeds as the UGT rows (the decision), the ablations once, all on the primary tie order
    rows += [_row("ugt", "ugt", "dpo", "stable", s, semantic_ids, False) for s in SEEDS]
    rows += [_row("ugt", "ugt", v, "stable", 42, semantic_ids, False) for v in ABLATIONS if v != "dpo"]
    return rows


def select(rows: list[Row], only: str = "", rows_from: str = "") -> list[Row]:
    """The rows named in ``only`` (comma list of names or name prefixes such as ``ugt+`` or ``sasrec-paper``)
    and in the file ``rows_from`` (one per line, # comments); all rows when both are empty."""
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    if rows_from:
        for line in Path(rows_from).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                wanted.append(line)
    if not wanted:
        return rows
    chosen = [r for r in rows if any(r.name == w or r.name.startswith(w) for w in wanted)]
    unknown = [w for w in wanted if not any(r.name == w or r.name.startswith(w) for r in rows)]
    if unknown:
        raise SystemExit(f"no row matches {unknown}; `python -m bench.ml1m_quality plan` lists them")
    return chosen


def row_config(row: Row) -> dict[str, Any]:
    """The row's effective training config (frozen config + overrides): what the plan shows and the report cites."""
    from models.train_config import load_config

    overrides = {key: yaml.safe_load(value) for key, _, value in (s.partition("=") for s in row.sets)}
    cfg = load_config(REPO / row.config, overrides)  # as `ugt train --set` reads them
    return {"max_epochs": cfg.max_epochs, "patience": cfg.patience, "num_negatives": cfg.num_negatives,
            "train_windows": cfg.train_windows, "dataset": cfg.dataset, "dpo": bool((cfg.dpo or {}).get("enabled"))}
