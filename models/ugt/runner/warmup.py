"""Capture the CUDA graphs a served batch needs before the first request, as vLLM does at engine start.

A graph is captured on the first batch of its :class:`.graphs.BatchDescriptor` (kind, batch bucket, exclusion width,
k, suffix width). Left to the traffic, every new shape stalls the engine's one thread for the capture (two warm-up
runs and the capture itself), and under load the first seconds of a fresh engine answered with p99s of 600 ms
(bench/results/serving_gpu_e2e.json at f9f79f8). :func:`capture_graphs` runs every step once per bucket on dummy
rows written to the scratch slot, so neither the KV cache's entries nor its counters change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from models.ugt.inference import UGTInference

MIN_EXCLUSION_WIDTH = 8  # the heads pad exclusions to a power of two at least this wide (head_runner.heads)


def exclusion_widths(max_exclusions: int) -> list[int]:
    """The padded exclusion widths a batch can have up to ``max_exclusions`` items: 8, 16, ... (powers of two)."""
    top = max(MIN_EXCLUSION_WIDTH, 1 << max(max_exclusions - 1, 0).bit_length())
    widths, width = [], MIN_EXCLUSION_WIDTH
    while width <= top:
        widths.append(width)
        width *= 2
    return widths


def dummy_rows(engine: UGTInference, n: int, length: int = 2) -> np.ndarray:
    """(n, W) packed rows of ``length`` events of item 1 (any served id does): shapes are all a graph sees."""
    layout = engine.layout
    rows = np.zeros((n, layout.width), dtype=np.int64)
    rows[:, :length] = 1
    rows[:, 6 * layout.N] = length
    return rows


@torch.inference_mode()
def capture_graphs(engine: UGTInference, ks: Sequence[int], max_exclusions: int,
                   suffixes: Sequence[int] = (2, 4)) -> int:
    """Run each step at every batch bucket (prefill; with the KV cache decode, compact decode and append at each
    of ``suffixes``; the heads at every exclusion width and each k in ``ks``); the number of graphs captured.

    Without graphs (CPU, ``cuda_graphs: false``) it runs nothing and returns 0.
    """
    if not engine.graphs_on:
        return 0
    before = len(engine.graphs)
    layout, stack = engine.layout, engine.stack
    scratch = engine.cache.scratch if engine.cache is not None else layout.scratch_slot
    widths = exclusion_widths(max_exclusions)
    for size in engine.dispatcher.buckets:
        rows = dummy_rows(engine, size)
        slots = [scratch] * size
        for width in widths:
            excl = np.zeros((size, width), dtype=np.int64)
            dev = layout.pack(rows, excl, slots, size, fresh=True).to(engine.device, non_blocking=True)
            user = stack.run("prefill", dev)
            for k in ks:
                engine.heads.top_k(dev, False, user, layout.exclusions(dev), k, size)
            if width != widths[0]:
                continue  # the stack's graphs do not depend on the exclusion width
            if engine.cache is None:
                continue
            stack.run("decode", dev)
            compact = layout.pack_compact(rows, excl, slots, size).to(engine.device, non_blocking=True)
            stack.run("decode_compact", compact)
            starts = torch.zeros(size, dtype=torch.int64, device=engine.device)
            for suffix in suffixes:
                stack.run_append(dev, starts, suffix)
            if engine.config.rank_top > 0:  # the ranking head has a graph per layout (full, compact)
                for k in ks:
                    engine.heads.top_k(compact, True, user, layout.exclusions(compact, True), k, size)
    torch.cuda.synchronize(engine.device)
    return len(engine.graphs) - before
