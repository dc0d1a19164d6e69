"""Stage 1 of `ugt train`: the semantic-ID codes of every vocabulary item, loaded from an artifact or built.

Its own module so the trainer (models/train.py) stays one screenful per part; the builder is models.semantic_ids.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from models.data import SequenceData
from models.train_config import TrainConfig


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
        raise ValueError(f"{len(missing)} vocabulary items have no semantic ID in the artifact, e.g. {missing[0]!r}: "
                         "rebuild it over a catalog that holds them (`ugt semantic-ids build`), or train on "
                         "events of the artifact's items only")
    return codes
