"""HSTU attention of new queries against K/V cached in the slot pool, read in place (a paged attention).

The cached steps of serving (an append's suffix, a decode's last event, ranking's candidates) attend to a user's
cached prefix. Done with PyTorch ops, each step copies every row's whole window of keys and values out of the pool
per layer and materialises the (rows, heads, queries, window) scores and bias: at the industrial size (window 1,024)
those copies and elementwise passes were most of the ranking step (docs/SERVING.md). This kernel reads each row's
keys and values from its slot in the pool, adds the relative position and time-gap bias from the layer's tables by
index, and keeps each (queries, keys) tile in registers, as the prefill's fused kernel
(:mod:`models.kernels.hstu_attention`) does for whole sequences.

The indices are (B, S, T) tensors of any strides: an expanded (B, 1, T) row (stride 0 along S) serves every
candidate of a row without a copy. Forward only (serving). Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from models.kernels.hstu_attention import triton_status


def reference_slot_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                             mask: torch.Tensor, pos_index: torch.Tensor, buckets: torch.Tensor, pos_w: torch.Tensor,
                             ts_w: torch.Tensor, norm: float) -> torch.Tensor:
    """The same attention in PyTorch ops (the copies and the materialised bias): (B, S, H * dv).

    q (B, S, H, dqk); k_pool, v_pool (R, H, T, d); slots (B,); mask, pos_index, buckets (B, S, T).
    """
    kc, vc = k_pool.index_select(0, slots), v_pool.index_select(0, slots)  # (B, H, T, d)
    return rows_attention(q, kc, vc, mask, pos_index, buckets, pos_w, ts_w, norm)


def rows_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor, pos_index: torch.Tensor,
                   buckets: torch.Tensor, pos_w: torch.Tensor, ts_w: torch.Tensor, norm: float) -> torch.Tensor:
    """HSTU attention of S queries per row, each at its own position, against the rows' own keys/values:
    (B, S, H * dv). q (B, S, H, dqk); kc, vc (B, H, T, d); mask, pos_index, buckets (B, S, T): the query rows of
    :func:`models.kernels.reference.hstu_attention`'s masked, biased weights."""
    B, S, _ = mask.shape
    scores = torch.matmul(q.transpose(1, 2), kc.transpose(-1, -2))  # (B, H, S, T)
    bias = (pos_w[pos_index] + ts_w[buckets]).unsqueeze(1)
    w = F.silu(scores + bias.to(scores.dtype)) / float(norm)
    w = w * mask.unsqueeze(1).to(w.dtype)
    return torch.matmul(w, vc).transpose(1, 2).reshape(B, S, -1)


@functools.lru_cache(maxsize=1)
def _kernel():
    """Import (and so JIT-decorate) the kernel on first use, after TRITON_INTERPRET is settled."""
    from models.kernels import _slot_triton

    return _slot_triton._slot_fwd


def slot_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                   mask: torch.Tensor, pos_index: torch.Tensor, buckets: torch.Tensor, pos_w: torch.Tensor,
                   ts_w: torch.Tensor, norm: float) -> torch.Tensor:
    """:func:`reference_slot_attention` in one Triton kernel, the pool read in place: (B, S, H * dv)."""
    ok, why = triton_status(q.device)
    if not ok:
        raise RuntimeError(f"slot attention kernel unavailable: {why}")
    B, S, H, DQ = q.shape
    R, Hk, T, DV = v_pool.shape
    if k_pool.shape[:3] != (R, H, T) or Hk != H or k_pool.shape[-1] != DQ:
        raise ValueError(f"pools must be (R, {H}, T, d) with keys of {DQ} dims; got {tuple(k_pool.shape)}, "
                         f"{tuple(v_pool.shape)}")
    for name, t in (("mask", mask), ("pos_index", pos_index), ("buckets", buckets)):
        if t.shape != (B, S, T):
            raise ValueError(f"{name} must be (B, S, T) = {(B, S, T)}, got {tuple(t.shape)}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q and the pools must be contiguous in their last dim")
    out = torch.empty(B, S, H, DV, device=q.device, dtype=q.dtype)
    # a bool mask read as bytes: an expanded (stride-0) ranking mask stays a view (.to would materialise it)
    mask8 = mask.view(torch.int8) if mask.dtype == torch.bool else mask.to(torch.int8)
    cuda = q.device.type == "cuda"
    block_s, block_t, warps = (16, 64, 4) if cuda else (16, 16, 1)
    grid = (-(-S // block_s), B * H)
    _kernel()[grid](
        q, k_pool, v_pool, out, slots, mask8, pos_index, buckets, pos_w, ts_w,
        *q.stride()[:3], *k_pool.stride()[:3], *v_pool.stride()[:3], *out.stride()[:3],
        slots.stride(0), *mask8.stride(), *pos_index.stride(), *buckets.stride(),
        S, T, H, 1.0 / float(norm),
        DQ=DQ, DV=DV, BDQ=max(16, 1 << (DQ - 1).bit_length()), BDV=max(16, 1 << (DV - 1).bit_length()),
        PREC="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_S=block_s, BLOCK_T=block_t, num_warps=warps)
    return out.view(B, S, H * DV)
