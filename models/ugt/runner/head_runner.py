"""The heads over the users' states: retrieval, the constrained beam search, their merge, and target-aware ranking.

* Retrieval (:mod:`.retrieval`): exact dot-product top-k over the item table, history and exclusions masked; in
  blocks of items (:mod:`.blocked_topk`) for a large catalog.
* With ``merge="rrf"`` the semantic-ID beam search (:mod:`.beam`) runs too and the two lists are fused by
  reciprocal rank (:mod:`.merge`). On CUDA with ``heads_graph`` all of it is one captured graph per (batch
  bucket, exclusion width, k, catalog) instead of ~150 small kernel launches.
* With ``rank_top > 0`` the model's ranking head (:mod:`models.ugt.ranking`) reorders retrieval's top list (and
  the beam's items with ``merge="rrf"``): every candidate attends to the user's history read from the KV cache
  and to itself, M-FALCON style; one CUDA graph per batch bucket on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ugt.ranking import candidate_logits
from models.ugt.runner.batch import BatchLayout
from models.ugt.runner.beam import generate, union_candidates
from models.ugt.runner.catalog import ItemCatalog
from models.ugt.runner.config import InferenceConfig
from models.ugt.runner.graphs import BatchDescriptor, GraphDispatcher
from models.ugt.runner.merge import rrf_merge
from models.ugt.runner.retrieval import retrieve, score_candidates
from models.ugt.runner.stack import StackRunner

HeadOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (scores, items, valid counts) per row


class HeadRunner:
    """Answers a batch of user states with (scores, items, valid counts), as the engine's config asks."""

    def __init__(self, config: InferenceConfig, catalog: ItemCatalog, layout: BatchLayout, stack: StackRunner,
                 dispatcher: GraphDispatcher, dtype: torch.dtype):
        self.config, self.catalog, self.layout, self.stack = config, catalog, layout, stack
        self.dispatcher, self.dtype = dispatcher, dtype
        self.model = stack.model

    # ---- the single heads --------------------------------------------------------------------------

    def retrieve(self, user: torch.Tensor, excl: torch.Tensor, k: int) -> HeadOutput:
        """Top-k (scores, indices) over the served items with padding and exclusions masked, + valid counts; in
        blocks of items for a large catalog and batch (the same answer, memory bounded by a block)."""
        num_items = self.catalog.num_items
        block = self.config.retrieval_block_for(user.shape[0], num_items)  # shapes only: fixed in a captured graph
        return retrieve(user, excl, self.catalog.table, num_items, k, block)

    def generate(self, user: torch.Tensor, excl: torch.Tensor, beam: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained semantic-ID beam search: (items (B, beam), log-probs), excluded items dropped (-inf)."""
        return generate(self.model, user, excl, beam, self.dtype)

    def rrf(self, user: torch.Tensor, excl: torch.Tensor, ret_idx: torch.Tensor, k: int):
        """The beam search's list fused with retrieval's ``ret_idx`` by reciprocal rank: (fused scores, items)."""
        gen_idx, gen_logp = self.generate(user, excl, max(self.config.beam_size, k))
        return rrf_merge(ret_idx, gen_idx, gen_logp, self.catalog.num_items, k)

    def score_candidates(self, user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of given candidate items (B, C) against the users' states, in micro-batches of C."""
        return score_candidates(user, candidates, self.catalog.table, self.config.candidate_micro_batch)

    def rank(self, dev: torch.Tensor, compact: bool, cands: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """(B, C) target-aware logits of candidate items for the rows of a device batch (M-FALCON micro-batches).

        The history's keys/values come from the KV cache (a miss was just prefilled into its slot); the last
        event is run again at this request's time, then every candidate attends to the history and itself.
        """
        _, prefix = self.stack.decode_steps(*self.layout.last_events(dev, compact), keep=True)
        return candidate_logits(self.model, prefix, cands, user, self.catalog.table, self.config.candidate_micro_batch)

    # ---- a batch's answer --------------------------------------------------------------------------

    def top_k(self, dev: torch.Tensor, compact: bool, user: torch.Tensor, excl: torch.Tensor, k: int,
              n: int) -> HeadOutput:
        """The first ``n`` rows' answers of a padded batch: ranked, merged or retrieved as configured."""
        if self.config.rank_top > 0:  # on the padded batch: one captured graph per bucket
            values, indices, counts = self.ranked(dev, compact, user, excl, k)
            return values[:n], indices[:n], counts[:n]
        return self.heads(user, excl, k, n)

    def heads(self, user: torch.Tensor, excl: torch.Tensor, k: int, n: int) -> HeadOutput:
        """Retrieval, and with ``merge="rrf"`` the beam search and the fusion, for the first ``n`` rows.

        On CUDA with ``heads_graph`` the rrf path is one captured graph per (batch bucket, exclusion width rounded up
        to a power of two, k). Its key also holds the catalog size and the trie, which ``add_items`` changes, so
        a grown catalog is captured again on its first batch (the stale graphs are dropped then).
        """
        if not (self.dispatcher.enabled and self.config.heads_graph and self.config.merge == "rrf"):
            return self.retrieve_merged(user[:n], excl[:n], k)
        width = max(8, 1 << (excl.shape[1] - 1).bit_length())
        if width > excl.shape[1]:  # index 0 is the padding item, masked anyway
            excl = F.pad(excl, (0, width - excl.shape[1]))
        catalog = self.catalog.version
        key = BatchDescriptor("heads", user.shape[0], excl_width=width, k=k, catalog=catalog)
        if key not in self.dispatcher.graphs:
            self.dispatcher.drop(lambda g: g.kind == "heads" and g.catalog != catalog)
        values, indices, counts = self.dispatcher.run(key, lambda u, x: self.retrieve_merged(u, x, k), user, excl)
        return values[:n], indices[:n], counts[:n]

    def retrieve_merged(self, user: torch.Tensor, excl: torch.Tensor, k: int) -> HeadOutput:
        """Retrieval's top k, fused with the beam search's list when ``merge="rrf"``: (scores, items, counts)."""
        values, indices, counts = self.retrieve(user, excl, k)
        if self.config.merge == "rrf":
            values, indices = self.rrf(user, excl, indices, k)
        return values, indices, counts

    def ranked(self, dev: torch.Tensor, compact: bool, user: torch.Tensor, excl: torch.Tensor, k: int) -> HeadOutput:
        """Retrieval's top ``rank_top`` (with ``merge="rrf"``: and the beam search's items) reordered by the ranking
        head: (logits, items, valid counts) of the top k."""
        values, cands, counts = self.retrieve(user, excl, max(k, self.config.rank_top))
        invalid = torch.isinf(values)
        if self.config.merge == "rrf":  # rank the union: a beam item retrieval also found is dropped (item 0)
            beam_items, beam_logp = self.generate(user, excl, max(self.config.beam_size, k))
            cands, invalid = union_candidates(cands, invalid, beam_items, beam_logp)
        logits = self._rank_run(dev, compact, cands, user).masked_fill(invalid, float("-inf"))
        top = logits.topk(min(k, cands.shape[1]), dim=1)
        return top.values, cands.gather(1, top.indices), counts

    def _rank_run(self, dev: torch.Tensor, compact: bool, cands: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """:meth:`rank`, through a CUDA graph captured per (layout, batch, candidates) when graphs are on."""
        dev = self.layout.stack_columns(dev, compact)  # the exclusions are not read
        key = BatchDescriptor("rank_compact" if compact else "rank", dev.shape[0], candidates=cands.shape[1])
        return self.dispatcher.run(key, lambda d, c, u: self.rank(d, compact, c, u), dev, cands, user)
