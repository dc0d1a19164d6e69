"""Output heads: next-item retrieval (dot product) and next-semantic-ID generation (constrained beam search).

- Retrieval: the user state is L2-normalised and scored against every item's output vector; top-k by
  dot product (exact; faiss can serve the same vectors at scale).
- Generation (TIGER / OneRec): the semantic ID of the next item is decoded level by level, each level's
  logits conditioned on the user state plus the embeddings of the codes chosen so far. Beam search is
  constrained by a prefix trie of the catalog's IDs, so every finished beam is a real item (thanks to the
  semantic-ID dedup level, each full ID names exactly one item).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class HeadsConfig:
    semantic_id: bool = True  # train / use the next-semantic-ID head (needs semantic IDs)
    sid_loss_weight: float = 0.5  # weight of its cross-entropy in stage 2
    beam_size: int = 100  # beams kept per level at generation time
    # target-aware ranking head (models.ugt.ranking): candidates attend to the history, M-FALCON style
    ranking: bool = False
    ranking_loss_weight: float = 1.0
    ranking_backbone_grad: bool = False  # False: the ranking loss trains the head only, never the shared layers
    ranking_candidates: int = 64  # training list: the model's own retrieval top list at the cut (history masked)
    rank_top: int = 100  # retrieval candidates the ranker reorders (evaluation; serving has its own key)


def _checked_codes(codes: np.ndarray, codebook_sizes: list[int]) -> np.ndarray:
    """``codes`` as an int64 (n, L) array of distinct IDs within their codebooks, or a ValueError saying why not."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] != len(codebook_sizes):
        raise ValueError(f"codes must be [num_items, {len(codebook_sizes)}], got {codes.shape}")
    if (codes < 0).any() or (codes >= np.asarray(codebook_sizes)).any():
        raise ValueError("codes out of their codebook ranges")
    if len(np.unique(codes, axis=0)) != len(codes):
        raise ValueError("semantic IDs are not unique (missing dedup level?)")
    return codes


@dataclass
class TrieEdit:
    """What :meth:`PrefixTrie.add` wrote: per level (rows, codes, child ids), then leaf nodes and their items."""

    levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    leaf_nodes: torch.Tensor
    leaf_items: torch.Tensor


class PrefixTrie:
    """The set of valid semantic IDs as per-level transition tables (vectorised lookups, no Python per beam).

    Node ids at level l are the distinct prefixes of length l (level 0: the root, node 0).
    ``allowed[l]`` (nodes_l, K_l) says which codes extend a prefix; ``child[l]`` (nodes_l, K_l) gives the
    node at level l + 1 (-1 if none); ``leaf_item`` maps a full-length node to its item index.
    """

    def __init__(self, codes: np.ndarray, codebook_sizes: list[int], item_index: np.ndarray | None = None):
        codes = _checked_codes(codes, codebook_sizes)
        self.codebook_sizes = list(codebook_sizes)
        self.num_levels = L = len(codebook_sizes)
        index = np.arange(1, len(codes) + 1) if item_index is None else np.asarray(item_index, np.int64)
        node = np.zeros(len(codes), dtype=np.int64)  # every item starts at the root
        num_nodes = 1
        self.allowed: list[torch.Tensor] = []
        self.child: list[torch.Tensor] = []
        for level in range(L):
            K = codebook_sizes[level]
            key = node * K + codes[:, level]
            uniq, next_node = np.unique(key, return_inverse=True)
            allowed = np.zeros((num_nodes, K), dtype=bool)
            child = np.full((num_nodes, K), -1, dtype=np.int64)
            allowed[uniq // K, uniq % K] = True
            child[uniq // K, uniq % K] = np.arange(len(uniq))
            self.allowed.append(torch.as_tensor(allowed))
            self.child.append(torch.as_tensor(child))
            node, num_nodes = next_node.reshape(-1), len(uniq)
        leaf = np.zeros(num_nodes, dtype=np.int64)
        leaf[node] = index
        self.leaf_item = torch.as_tensor(leaf)

    # ---- growing in place (the live catalog) ----------------------------------------------------------
    # A rebuild sorts every code and allocates every table again: seconds at a million items, and on a GPU a copy
    # of all the tables. Instead the catalog's trie keeps spare rows; a new item fills at most one per level, and
    # what it wrote (a TrieEdit) is replayed on the engine's copy in place, where CUDA graphs keep pointing.

    def used_nodes(self) -> list[int]:
        """Rows in use per level (level 0: the root), then leaves; spare rows follow them."""
        if not hasattr(self, "_used"):
            self._used = [1] + [int((c >= 0).sum()) for c in self.child]
        return self._used

    def _empty_like(self) -> PrefixTrie:
        out = PrefixTrie.__new__(PrefixTrie)
        out.codebook_sizes, out.num_levels = list(self.codebook_sizes), self.num_levels
        out.allowed, out.child = [], []
        return out

    def with_room(self, items: int) -> PrefixTrie:
        """A copy with spare rows for ``items`` more items (at most one new node per level each)."""
        used = self.used_nodes()
        out = self._empty_like()
        for level, (allowed, child) in enumerate(zip(self.allowed, self.child, strict=True)):
            rows = used[level] + (items if level else 0)
            grown_allowed = torch.zeros((rows, allowed.shape[1]), dtype=torch.bool)
            grown_child = torch.full((rows, child.shape[1]), -1, dtype=torch.int64)
            grown_allowed[: used[level]] = allowed[: used[level]].cpu()
            grown_child[: used[level]] = child[: used[level]].cpu()
            out.allowed.append(grown_allowed)
            out.child.append(grown_child)
        out.leaf_item = torch.zeros(used[-1] + items, dtype=torch.int64)
        out.leaf_item[: used[-1]] = self.leaf_item[: used[-1]].cpu()
        out._used = list(used)
        return out

    def clone(self) -> PrefixTrie:
        """A copy of every table, spare rows included (the engine's own, to replay later edits on)."""
        out = self._empty_like()
        out.allowed = [a.clone() for a in self.allowed]
        out.child = [c.clone() for c in self.child]
        out.leaf_item = self.leaf_item.clone()
        out._used = list(self.used_nodes())
        return out

    def add(self, codes: np.ndarray, item_index: np.ndarray) -> TrieEdit:
        """Insert ``codes`` (m, L) for items ``item_index`` (m,) in place (CPU tables); returns what was written."""
        if self.leaf_item.device.type != "cpu":
            raise ValueError("add() grows the CPU trie; replay its edits on a device copy with apply()")
        codes = _checked_codes(codes, self.codebook_sizes)
        index = np.asarray(item_index, dtype=np.int64)
        if len(index) != len(codes):
            raise ValueError(f"one item index per code: {len(codes)} codes, {len(index)} indices")
        L, used = self.num_levels, self.used_nodes()
        capacity = [1] + [len(a) for a in self.allowed[1:]] + [len(self.leaf_item)]
        node = np.zeros(len(codes), dtype=np.int64)
        plan = []
        for level in range(L):  # plan every level first: a failed insert changes nothing
            child = self.child[level].numpy()
            nxt = child[node, codes[:, level]].copy()
            new = nxt < 0
            if level == L - 1 and not new.all():
                raise ValueError("semantic IDs are not unique: some are in the trie already")
            K = self.codebook_sizes[level]
            uniq, inverse = np.unique(node[new] * K + codes[new, level], return_inverse=True)
            if used[level + 1] + len(uniq) > capacity[level + 1]:
                raise ValueError(f"the trie has no room left at level {level + 1}: build it with_room() for more items")
            ids = used[level + 1] + np.arange(len(uniq))
            nxt[new] = ids[inverse.reshape(-1)]
            plan.append((uniq // K, uniq % K, ids))
            node = nxt
        edit = TrieEdit(levels=[tuple(torch.as_tensor(a) for a in p) for p in plan],
                        leaf_nodes=torch.as_tensor(node), leaf_items=torch.as_tensor(index))
        self.apply(edit)
        return edit

    def apply(self, edit: TrieEdit) -> None:
        """Write an edit from :meth:`add` (of a trie with the same rows) into these tables, wherever they live.

        Leaves first, then the levels from the deepest up, so a reader between two writes never finds a path to
        a node whose subtree is not written yet.
        """
        used = self.used_nodes()
        device = self.leaf_item.device
        self.leaf_item[edit.leaf_nodes.to(device)] = edit.leaf_items.to(device)
        for level in reversed(range(self.num_levels)):
            rows, cols, ids = (t.to(device) for t in edit.levels[level])
            self.child[level][rows, cols] = ids
            self.allowed[level][rows, cols] = True
        self._used = [used[0]] + [u + len(ids) for u, (_, _, ids) in zip(used[1:], edit.levels, strict=True)]

    def to(self, device: torch.device) -> PrefixTrie:
        self.allowed = [a.to(device) for a in self.allowed]
        self.child = [c.to(device) for c in self.child]
        self.leaf_item = self.leaf_item.to(device)
        return self


class SemanticIDHead(nn.Module):
    """Autoregressive head over semantic-ID levels: logits_l = W_l LN(h + sum_{j<l} E_j[c_j])."""

    def __init__(self, d_model: int, codebook_sizes: list[int]):
        super().__init__()
        self.codebook_sizes = list(codebook_sizes)
        self.code_emb = nn.ModuleList(nn.Embedding(k, d_model) for k in codebook_sizes[:-1])
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in codebook_sizes)
        self.out = nn.ModuleList(nn.Linear(d_model, k) for k in codebook_sizes)

    def level_logits(self, h: torch.Tensor, prefix_sum: torch.Tensor, level: int) -> torch.Tensor:
        return self.out[level](self.norms[level](h + prefix_sum)).float()

    def loss(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy summed over levels; h (M, D), codes (M, L)."""
        total = h.new_zeros((), dtype=torch.float32)
        prefix = torch.zeros_like(h)
        for level in range(len(self.codebook_sizes)):
            total = total + F.cross_entropy(self.level_logits(h, prefix, level), codes[:, level])
            if level < len(self.code_emb):
                prefix = prefix + self.code_emb[level](codes[:, level])
        return total

    def log_prob(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """log p(codes | h) for (M, L) codes: the generative score of given items."""
        total = h.new_zeros(h.shape[0], dtype=torch.float32)
        prefix = torch.zeros_like(h)
        for level in range(len(self.codebook_sizes)):
            logp = F.log_softmax(self.level_logits(h, prefix, level), dim=-1)
            total = total + logp.gather(1, codes[:, level : level + 1]).squeeze(1)
            if level < len(self.code_emb):
                prefix = prefix + self.code_emb[level](codes[:, level])
        return total

    @torch.no_grad()
    def beam_search(self, h: torch.Tensor, trie: PrefixTrie, beam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``beam_size`` valid items per row of h (B, D): (item indices (B, K), log-probs (B, K)).

        Rows where fewer valid items exist than beams are padded with item 0 and -inf.
        """
        B, D = h.shape
        device = h.device
        node = torch.zeros(B, 1, dtype=torch.long, device=device)
        score = torch.zeros(B, 1, dtype=torch.float32, device=device)
        prefix = torch.zeros(B, 1, D, dtype=h.dtype, device=device)
        for level, K in enumerate(self.codebook_sizes):
            beams = node.shape[1]
            hh = h.unsqueeze(1).expand(B, beams, D)
            logp = F.log_softmax(self.level_logits(hh, prefix, level), dim=-1)  # (B, beams, K)
            allowed = trie.allowed[level][node.clamp(min=0)] & (node >= 0).unsqueeze(-1)
            total = torch.where(allowed, score.unsqueeze(-1) + logp, torch.full_like(logp, float("-inf")))
            k = min(beam_size, beams * K)
            score, flat = total.view(B, -1).topk(k, dim=1)
            parent, code = flat // K, flat % K
            next_node = trie.child[level][node.gather(1, parent).clamp(min=0), code]
            node = torch.where(torch.isfinite(score), next_node, torch.full_like(next_node, -1))
            if level < len(self.code_emb):
                prefix = prefix.gather(1, parent.unsqueeze(-1).expand(B, k, D)) + self.code_emb[level](code)
        items = torch.where(node >= 0, trie.leaf_item[node.clamp(min=0)], torch.zeros_like(node))
        return items, score


def retrieve_top_k(user: torch.Tensor, item_table: torch.Tensor, k: int,
                   invalid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dot-product top-k over all items (row 0 = padding is never returned)."""
    scores = user.float() @ item_table.float().T
    scores[:, 0] = float("-inf")
    if invalid is not None:
        scores = scores.masked_fill(invalid, float("-inf"))
    top = scores.topk(k, dim=1)
    return top.indices, top.values
