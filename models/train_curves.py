"""The training curves (loss, validation HR@10 / NDCG@10 per epoch) `ugt train` draws into curves.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
