"""CUDA graphs: each step captured once per :class:`BatchDescriptor` and replayed.

A served batch is hundreds of small kernels; replaying a captured graph launches them all at once. A graph
fixes its shapes, so batches are padded up to a bucket (e.g. 1, 8, 32, 128) and everything else that shapes
a step (its kind, candidates per row, exclusion width, k, the catalog it was captured over) is in the key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class BatchDescriptor:
    """What one captured graph serves: a step ``kind`` at a padded ``batch`` size and the shapes it fixes."""

    kind: str  # "prefill" | "decode" | "decode_compact" | "append" | "rank" | "rank_compact" | "heads"
    batch: int
    candidates: int = 0  # rank: candidates per row
    excl_width: int = 0  # heads: exclusion columns (a power of two)
    k: int = 0  # heads: items returned per row
    catalog: tuple[int, int] = (0, 0)  # heads: (items served, id of the trie) when captured
    suffix: int = 0  # append: suffix tokens per row (a power of two)


class CapturedGraph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    static_in: tuple[torch.Tensor, ...]
    static_out: object  # a tensor or a tuple of tensors, as the step returns


def capture(fn: Callable, *inputs: torch.Tensor) -> CapturedGraph:
    """``fn`` captured on static copies of ``inputs`` (after two warm-up runs on a side stream)."""
    static_in = tuple(t.clone() for t in inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_in)
    return CapturedGraph(graph, static_in, static_out)


def replay(captured: CapturedGraph, *inputs: torch.Tensor):
    """Copy ``inputs`` into a captured graph's static inputs, replay it; its static output."""
    for dst, src in zip(captured.static_in, inputs, strict=True):
        dst.copy_(src)
    captured.graph.replay()
    return captured.static_out


def bucket_size(n: int, buckets: Sequence[int], padded: bool, minimum: int = 1) -> int:
    """The smallest of ``buckets`` >= n when ``padded`` (n itself past the largest), else n; never below minimum."""
    if padded:
        for size in sorted(buckets):
            if size >= n:
                return max(size, minimum)
    return max(n, minimum)


class GraphDispatcher:
    """Runs steps through graphs captured per :class:`BatchDescriptor` when ``enabled``, else eagerly."""

    def __init__(self, enabled: bool, buckets: Sequence[int]):
        self.enabled = enabled
        self.buckets = tuple(buckets)
        self.graphs: dict[BatchDescriptor, CapturedGraph] = {}

    def bucket(self, n: int, minimum: int = 1) -> int:
        """The padded batch size of ``n`` rows (n itself when graphs are off)."""
        return bucket_size(n, self.buckets, self.enabled, minimum)

    def run(self, key: BatchDescriptor, fn: Callable, *inputs: torch.Tensor):
        """``fn(*inputs)``: the graph of ``key`` replayed (captured on first use), or eager when off.

        Labelled ``step:<kind>`` for torch.profiler (bench/engine_profile.py --kernels: GPU time per step kind)."""
        with torch.profiler.record_function(f"step:{key.kind}"):
            if not self.enabled:
                return fn(*inputs)
            captured = self.graphs.get(key)
            if captured is None:
                captured = self.graphs[key] = capture(fn, *inputs)
            return replay(captured, *inputs)

    def drop(self, stale: Callable[[BatchDescriptor], bool]) -> None:
        """Forget the graphs whose key is ``stale`` (their memory goes back when nothing replays them)."""
        for key in [key for key in self.graphs if stale(key)]:
            del self.graphs[key]
