"""The served catalog: the item output table retrieval and ranking read, and its growth while serving.

Rows past the trained items are reserved (``new_item_slots``) for items that arrive after training; they are
zero until :meth:`ItemCatalog.add_items` writes them in place, so CUDA graphs and compiled steps stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.ugt.heads import PrefixTrie, TrieEdit
from models.ugt.model import UGT


class ItemCatalog:
    """``table`` (capacity + 1, D) L2-normalised in the model dtype; items 1..``num_items`` are served."""

    def __init__(self, model: UGT, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        with torch.inference_mode():
            self.table = model.item_embeddings().to(dtype)
        self.num_items = model.embed.num_items  # items served now: the trained ones, then add_items'

    @property
    def capacity(self) -> int:
        """The most items this catalog can serve: the trained ones plus the reserved rows."""
        return self.model.embed.capacity

    @property
    def version(self) -> tuple[int, int]:
        """(items served, id of the served trie): what a graph over the whole catalog was captured for."""
        return self.num_items, id(self.model.trie)

    @torch.inference_mode()
    def add_items(self, codes: np.ndarray | None, genres: np.ndarray, years: np.ndarray,
                  trie: PrefixTrie | None = None, trie_edits: Sequence[TrieEdit] = ()) -> np.ndarray:
        """Serve ``n`` items that arrived after training; returns their indices (num_items + 1 ...).

        Each new item is embedded from its semantic-ID ``codes`` (n, L) and metadata (``genres`` (n, G) genre
        indices, ``years`` (n,) decade buckets), with no ID row: retrieval scores it, the ranking head can rank
        it, and ``trie`` (the prefix trie over every served item, built by the caller off this thread) lets the
        beam search generate it; ``trie_edits`` (from :meth:`PrefixTrie.add`) are then written into the served
        trie in place.
        """
        n = len(years)
        start = self.num_items + 1
        if self.num_items + n > self.capacity:
            raise ValueError(f"the engine serves {self.num_items:,} items and has room for {self.capacity:,}: "
                             "raise new_item_slots, or retrain so the new items get trained rows")
        device = self.table.device
        ids = torch.arange(start, start + n, device=device)
        self.model.embed.set_items(ids, codes, genres, years)
        self.table[ids] = self.model.embed.output_vectors(ids).to(self.dtype)
        if trie is not None and self.model.sid_head is not None:
            self.model.trie = trie.to(device)
        if trie_edits and self.model.sid_head is not None and self.model.trie is not None:
            for edit in trie_edits:
                self.model.trie.apply(edit)
        self.num_items += n
        return ids.cpu().numpy()
