"""What a served batch hands back: a :class:`TopK` per request, through a :class:`Pending` while in flight."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TopK:
    """One request's answer: item indices (best first) and their scores."""

    indices: np.ndarray
    scores: np.ndarray


class Pending:
    """A batch in flight (``UGTInference.submit_packed``): its top-k on the way to host memory."""

    def __init__(self, n: int, k: int, values: torch.Tensor | None, indices: torch.Tensor | None,
                 counts: torch.Tensor | None, done: torch.cuda.Event | None):
        self.n, self.k = n, k
        self.values, self.indices, self.counts, self.done = values, indices, counts, done

    @classmethod
    def empty(cls) -> Pending:
        return cls(0, 0, None, None, None, None)

    @classmethod
    def to_host(cls, n: int, k: int, values: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> Pending:
        """Queue the D2H copies into fresh pinned blocks (CUDA) and mark their end; on CPU nothing to wait for."""
        if values.device.type != "cuda":
            return cls(n, k, values, indices, counts, None)
        out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (values, indices, counts)]
        for dst, src in zip(out, (values, indices, counts), strict=True):
            dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(n, k, *out, done)

    def ready(self) -> bool:
        """True once result() would not wait."""
        return self.done is None or self.done.query()

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for the batch (only this one: later batches keep running): (valid counts (n,), indices (n, k),
        scores (n, k)), row b's answer the first counts[b] of its indices and scores."""
        if self.n == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32)
        if self.done is not None:
            self.done.synchronize()
        values = self.values.numpy().copy()  # copies: the pinned blocks go back to the allocator
        indices = self.indices.numpy().copy()
        counts = self.counts.numpy()
        m = np.minimum(np.minimum(self.k, counts), np.isfinite(values).sum(1))
        return m, indices, values

    def result(self) -> list[TopK]:
        """:meth:`arrays` split into one TopK per row."""
        m, indices, values = self.arrays()
        return [TopK(indices[b, : m[b]], values[b, : m[b]]) for b in range(self.n)]
