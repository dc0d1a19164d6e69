"""Similar items: faiss over a trained UGT's item vectors (collaborative ID rows + content), built offline.

numpy + faiss on import; torch only when :meth:`ItemTables.from_checkpoint` reads a checkpoint.
"""

from models.similar.index import (
    FORMAT,
    INDEX_KINDS,
    IndexConfig,
    SimilarIndex,
    SimilarIndexError,
    exact_top,
    recall_at_k,
)
from models.similar.vectors import ItemTables, VectorWeights

__all__ = [
    "FORMAT",
    "INDEX_KINDS",
    "IndexConfig",
    "ItemTables",
    "SimilarIndex",
    "SimilarIndexError",
    "VectorWeights",
    "exact_top",
    "recall_at_k",
]
