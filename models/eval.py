"""Evaluation under the HSTU protocol: full ranking over all items, history masked, leave-one-out targets.

What is masked, exactly: HSTU's ``eval_metrics_v2_from_tensors`` passes ``invalid_ids=past_ids`` -- the
items of the model's input window (the last ``max_len`` events before the target) -- to its top-k, and
nothing else (not padding-only rows, not older history). ``mask_history="window"`` reproduces that and
is the default; "all" masks the whole history, "none" masks nothing. Row 0 (padding) is never a
candidate. The target is never masked (on MovieLens a user rates a movie once, so it is never in history).

Generative retrieval: UGT's semantic-ID head decodes the top ``beam_size`` valid items by constrained beam
search; history items are dropped from the beam list afterwards and the target's rank is its place in
what is left (beyond the list = not retrieved, contributing 0 to HR/NDCG/MRR).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.data import Batchable, SequenceData, iterate_batches
from models.metrics import DEFAULT_KS, accuracy_from_ranks, beyond_accuracy, ranks_from_scores

MASK_MODES = ("window", "all", "none")


def batch_to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def last_states(user: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The state at each row's last real position: (B, N, D) -> (B, D)."""
    index = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, user.shape[-1])
    return user.gather(1, index).squeeze(1)


def history_mask(batch: dict[str, torch.Tensor], data: SequenceData, num_items: int, mode: str,
                 split: str) -> torch.Tensor:
    """(B, V + 1) bool: candidates that may not be recommended (padding + masked history)."""
    if mode not in MASK_MODES:
        raise ValueError(f"mask_history must be one of {MASK_MODES}, got {mode!r}")
    ids = batch["ids"]
    invalid = torch.zeros(ids.shape[0], num_items + 1, dtype=torch.bool, device=ids.device)
    if mode == "window":
        invalid.scatter_(1, ids, True)
    elif mode == "all":
        cut = 2 if split == "valid" else 1
        for r, u in enumerate(batch["users"].tolist()):
            seq = data.items[u][: len(data.items[u]) - cut]
            invalid[r, torch.as_tensor(seq, device=ids.device)] = True
    invalid[:, 0] = True
    return invalid


@torch.no_grad()
def evaluate(model: Any, data: SequenceData, split_data: Batchable, split: str = "test", *,
             device: torch.device | str = "cpu", batch_size: int = 512, ks=DEFAULT_KS, mask_history: str = "window",
             top_k: int = 10, popularity: np.ndarray | None = None, beyond: bool = True,
             generative: bool = False, beam_size: int = 100, amp: bool = False,
             rerank_top: int = 0, new_items: np.ndarray | None = None, quotas: tuple[int, ...] = (1, 2),
             stream: Any = None) -> dict[str, Any]:
    """Accuracy (HR/NDCG@ks, MRR) and, when ``beyond``, list metrics of the top-``top_k`` lists.

    ``model`` is a sequential recommender (forward -> (user states, aux), item_embeddings()) or a
    :class:`models.baselines.popularity.Popularity`.
    ``new_items`` (V + 1 bool) adds ``new_item_quota``: HR/NDCG@10 when each top-10 list keeps ``q`` slots for the
    best-scoring new items (the q best of them plus the 10 - q best of the rest, in score order), per ``quotas``.
    ``stream`` (:class:`models.ugt.stream_items.DailySums`): the items it holds are scored by their stream vectors.
    """
    device = torch.device(device)
    is_neural = isinstance(model, torch.nn.Module)
    if is_neural:
        was_training = model.training
        model.eval()
        table = model.item_embeddings().float()
    num_items = data.num_items
    ranks, tops, gen_ranks, rank_ranks = [], [], [], []
    quota_pos: dict[int, list[torch.Tensor]] = {q: [] for q in quotas} if new_items is not None else {}
    new_t = torch.as_tensor(new_items, device=device) if new_items is not None else None
    rank = rerank_top > 0 and getattr(model, "ranker", None) is not None  # + the target-aware cascade
    for np_batch in iterate_batches(split_data, batch_size, shuffle=False):
        batch = batch_to_device(np_batch, device)
        kept = None
        if is_neural:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                if rank:
                    user, _, kept = model(batch, keep=True)
                else:
                    user, _ = model(batch)
            state = last_states(user.float(), batch["lengths"])
            scores = state @ table.T
            fresh = _freshness(model, state, batch)
            if fresh is not None:
                scores = scores + fresh
            if stream is not None:  # items without an ID row scored by their stream vectors (models/ugt/stream_items)
                scores = stream.rescore(scores, state, table, _request_times(batch))
        else:
            state = None
            scores = model.score(len(batch["lengths"])).to(device)
        invalid = history_mask(batch, data, num_items, mask_history, split)
        ranks.append(ranks_from_scores(scores, batch["targets"], invalid).cpu())
        for q in quota_pos:
            quota_pos[q].append(_quota_positions(scores.float(), invalid, batch["targets"], new_t, 10, q).cpu())
        if rank:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                rank_ranks.append(_reranked_ranks(model, kept, batch, state, table, scores, invalid,
                                                  ranks[-1].to(device), rerank_top).cpu())
        if beyond:
            tops.append(scores.float().masked_fill(invalid, float("-inf")).topk(top_k, dim=1).indices.cpu())
        if generative and state is not None:
            items, _ = model.generate(state, beam_size)
            gen_ranks.append(_list_ranks(items, batch["targets"], invalid).cpu())
    if is_neural and was_training:
        model.train()
    if not ranks:
        raise ValueError(f"the {split} split has no rows: no user of {data.name!r} has the 3 events a leave-one-out "
                         "split needs (or the data holds no user sequences)")
    result: dict[str, Any] = {"split": split, "users": int(sum(len(r) for r in ranks)), "mask_history": mask_history}
    result.update(accuracy_from_ranks(torch.cat(ranks), ks))
    if beyond:
        top = torch.cat(tops).numpy()
        pop = popularity if popularity is not None else data.item_popularity(split)
        vectors = table[: num_items + 1].cpu().numpy() if is_neural else None
        result.update(beyond_accuracy(top, num_items, pop, data.item_genres, vectors))
        result["top_k"] = top_k
    if gen_ranks:
        gr = torch.cat(gen_ranks).numpy().astype(np.float64)
        result["generative"] = _accuracy_truncated(gr, beam_size)
    if quota_pos:
        result["new_item_quota"] = {f"{q}_of_10": _accuracy_truncated(torch.cat(p).numpy().astype(np.float64), 10,
                                                                       ks=(10,)) for q, p in quota_pos.items()}
    if rank_ranks:
        result["target_aware"] = {"rerank_top": rerank_top, **accuracy_from_ranks(torch.cat(rank_ranks), ks)}
    return result


def _freshness(model: Any, state: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The item-age term at each row's request time (the target's time), or None (models/ugt/freshness.py)."""
    if getattr(model, "freshness", None) is None:
        return None
    return model.freshness_scores(state, _request_times(batch))


def _request_times(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) each eval row's request time: the time of the target its last position predicts."""
    lengths = batch["lengths"]
    return batch["query_times"].gather(1, (lengths - 1).clamp(min=0).view(-1, 1)).view(-1)


def _reranked_ranks(model: Any, kept, batch: dict[str, torch.Tensor], state: torch.Tensor, table: torch.Tensor,
                    scores: torch.Tensor, invalid: torch.Tensor, ranks: torch.Tensor, top: int) -> torch.Tensor:
    """Full-ranking ranks after the ranking head reorders the retrieval top ``top`` (the rest keep their order).

    The candidates follow the whole history at the target's time, as a served request would place them.
    """
    from models.ugt.ranking import candidate_logits, prefix_from_layers

    inputs, times, valid = kept
    lengths = batch["lengths"]
    B, N = batch["ids"].shape
    G = valid.shape[1] - N
    cands = scores.float().masked_fill(invalid, float("-inf")).topk(top, dim=1).indices  # (B, top)
    request_time = batch["query_times"].gather(1, (lengths - 1).clamp(min=0).view(B, 1)).view(B)
    prefix = prefix_from_layers(model, inputs, times, valid, G + lengths, request_time)
    logits = candidate_logits(model, prefix, cands, state, table, micro_batch=512)
    hit = cands == batch["targets"].view(B, 1)
    target_logit = logits.masked_fill(~hit, 0.0).sum(1, keepdim=True)
    new_rank = (logits >= target_logit).sum(1)  # ties count against the target, as in ranks_from_scores
    return torch.where(hit.any(1) & (ranks <= top), new_rank.to(ranks.dtype), ranks)


def _quota_positions(scores: torch.Tensor, invalid: torch.Tensor, targets: torch.Tensor, new: torch.Tensor, k: int,
                     q: int) -> torch.Tensor:
    """1-based position of the target in a top-``k`` list that holds the ``q`` best new items and the ``k - q``
    best of the rest, ordered by score; 0 = not in the list."""
    masked = scores.masked_fill(invalid, float("-inf"))
    best_new = masked.masked_fill(~new, float("-inf")).topk(q, dim=1).indices  # (B, q)
    rest = masked.scatter(1, best_new, float("-inf")).topk(k - q, dim=1).indices  # (B, k - q)
    items = torch.cat([best_new, rest], dim=1)
    values = masked.gather(1, items)
    order = values.argsort(dim=1, descending=True)
    items, values = items.gather(1, order), values.gather(1, order)
    hit = (items == targets.view(-1, 1)) & torch.isfinite(values)
    position = torch.arange(1, k + 1, device=scores.device).expand_as(items)
    return torch.where(hit.any(1), (position * hit).sum(1), torch.zeros_like(targets))


def _list_ranks(items: torch.Tensor, targets: torch.Tensor, invalid: torch.Tensor) -> torch.Tensor:
    """1-based rank of the target in each generated list after dropping invalid items; 0 = not in list."""
    bad = invalid.gather(1, items) | (items == 0)
    keep_rank = (~bad).cumsum(1)  # rank among kept items
    hit = (items == targets.view(-1, 1)) & ~bad
    return torch.where(hit.any(1), (keep_rank * hit).sum(1), torch.zeros_like(targets))


def _accuracy_truncated(ranks: np.ndarray, list_len: int, ks=(5, 10, 20, 50)) -> dict[str, float]:
    """HR/NDCG/MRR from list ranks where 0 means 'not retrieved'."""
    found = ranks > 0
    out: dict[str, float] = {"beam_size": float(list_len), "recall_in_beam": float(found.mean())}
    for k in ks:
        hit = found & (ranks <= k)
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0).mean())
    out["mrr"] = float(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0).mean())
    return out


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` (floats to 4 decimals)."""
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)
