"""Fused HSTU attention in Triton, forward and backward, beside the PyTorch reference.

HSTU's pointwise attention (``models.kernels.reference.hstu_attention``) materialises (B, H, N, N) scores
and weights plus a (B, N, N) relative bias; at history 1,024 that is most of a layer's memory traffic. This
kernel keeps each (BLOCK_M, BLOCK_N) tile in registers: scores = q.k + bias, weights = silu(scores) / norm under the
causal and key-validity masks, out += weights @ v. No softmax means no running max: tiles just add up.

The bias comes one of two ways:
* ``rel=RelBias(...)``: computed inside the kernel from the learned tables (position w_pos[i - j] and
  time-gap bucket w_ts[bucket(query_time_i - time_j)]), so no (B, N, N) tensor exists in the forward.
  The bucket is exact against ``models.kernels.reference.bucketize_time_gaps``: a fast log guesses it and a
  small integer threshold table (built with the reference function itself) corrects the guess by one.
* ``bias=(B, N, N)`` tensor: any precomputed bias (it gets a gradient too).

Backward: two kernels (dK/dV per key block, dQ per query block) recompute the tile; the bias gradient
(summed over heads) is accumulated in fp32 and, for table bias, scattered back onto the two tables.
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter) for tests.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import torch

from models.kernels.reference import bucketize_time_gaps, hstu_attention

# Triton itself is imported with the kernels (``_kernels``), on first use: it reads TRITON_INTERPRET when imported,
# and models.hstu imports this module whether or not a kernel ever runs. The CPU path never needs it.
HAS_TRITON = importlib.util.find_spec("triton") is not None

MAX_DIM = 256  # per-head dims above this would not fit a tile in registers


class RelBias(NamedTuple):
    """HSTU's relative bias as tables: rab[b, i, j] = pos_w[i - j + max_len - 1] + ts_w[bucket(qt[b,i] - t[b,j])]."""

    pos_w: torch.Tensor  # (2 * max_len - 1,)
    ts_w: torch.Tensor  # (num_buckets + 1,)
    times: torch.Tensor  # (B, N) int64 seconds of each key's event
    query_times: torch.Tensor  # (B, N) int64 seconds each query predicts for
    max_len: int


def triton_status(device: torch.device | str) -> tuple[bool, str]:
    """(usable, why not): the fused kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    dev = torch.device(device)
    if dev.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"Triton kernels need a CUDA device or TRITON_INTERPRET=1 (got {dev.type})"


@functools.cache
def bucket_thresholds(num_buckets: int, device: str = "cpu") -> torch.Tensor:
    """thr[b] = the smallest integer |dt| (>= 1) whose reference bucket is >= b; thr[0] = 1, thr[nb + 1] = max.

    Built by binary search through ``models.kernels.reference.bucketize_time_gaps`` itself, so the kernel's
    buckets are the reference's bit for bit (bucket(dt) is non-decreasing in integer dt).
    """
    lo = torch.ones(num_buckets + 1, dtype=torch.int64)
    hi = torch.full((num_buckets + 1,), 1 << 62, dtype=torch.int64)
    target = torch.arange(num_buckets + 1)
    for _ in range(64):
        mid = (lo + hi) // 2
        ok = bucketize_time_gaps(mid, num_buckets) >= target
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    thr = torch.cat([hi, torch.tensor([torch.iinfo(torch.int64).max])])
    thr[0] = 1
    return thr.to(device)


def reference_bucket_bias(rel: RelBias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense bias (B, N, N) fp32, position index (N, N), time buckets (B, N, N)) as the reference builds them."""
    B, N = rel.times.shape
    pos = torch.arange(N, device=rel.times.device)
    pos_index = pos.view(-1, 1) - pos.view(1, -1) + rel.max_len - 1
    buckets = bucketize_time_gaps(rel.query_times.unsqueeze(2) - rel.times.unsqueeze(1), rel.ts_w.numel() - 1)
    bias = rel.pos_w.float()[pos_index].unsqueeze(0) + rel.ts_w.float()[buckets]
    return bias, pos_index, buckets


@functools.lru_cache(maxsize=1)
def _kernels():
    """Import (and so JIT-decorate) the kernels on first use, after TRITON_INTERPRET is settled."""
    from models.kernels import _hstu_triton as k

    return k._fwd, k._bwd_dkdv, k._bwd_dq


def _blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 64x64 tiles on GPU; small tiles keep the CPU interpreter quick."""
    return (64, 64, 4) if device.type == "cuda" else (16, 16, 1)


def _cdiv(n: int, block: int) -> int:
    """Blocks of ``block`` that cover ``n`` (the launch grid)."""
    return -(-n // block)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class _Launch(NamedTuple):
    args: tuple
    meta: dict


def _common(q, k, v, key_valid, norm, bias, rel, prec) -> _Launch:
    """The argument list every kernel shares (pointers, strides, sizes, constexprs)."""
    B, N, H, Dq = q.shape
    Dv = v.shape[-1]
    dev = q.device
    dummy_f = torch.zeros(1, device=dev, dtype=torch.float32)
    dummy_i = torch.zeros(1, device=dev, dtype=torch.int64)
    mode = 2 if rel is not None else (1 if bias is not None else 0)
    if mode == 2:
        times, qtimes = rel.times.contiguous(), rel.query_times.contiguous()
        posw, tsw = rel.pos_w.contiguous(), rel.ts_w.contiguous()
        thr = bucket_thresholds(tsw.numel() - 1, str(dev))
        max_len, nb = rel.max_len, tsw.numel() - 1
    else:
        times = qtimes = torch.zeros(B, N, device=dev, dtype=torch.int64)
        posw, tsw, thr, max_len, nb = dummy_f, dummy_f, dummy_i, 1, 0
    b_t = bias if mode == 1 else dummy_f
    sb = bias.stride() if mode == 1 else (0, 0, 0)
    valid = key_valid.to(torch.int8).contiguous()
    args = (b_t, posw, tsw, thr, times, qtimes, valid)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    meta = dict(DQ=Dq, DV=Dv, BDQ=_pow2(Dq), BDV=_pow2(Dv), BIAS_MODE=mode, PREC=prec)
    return _Launch((args, strides, sb, times.stride(0), valid.stride(0), N, H, 1.0 / norm, max_len, nb), meta)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    ok, why = triton_status(q.device)
    if not ok:
        raise RuntimeError(f"fused HSTU attention unavailable: {why}")
    if q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k must be (B, N, H, dqk) and v (B, N, H, dv); got {q.shape}, {k.shape}, {v.shape}")
    if max(q.shape[-1], v.shape[-1]) > MAX_DIM:
        raise ValueError(f"per-head dims above {MAX_DIM} are not supported by the fused kernel")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")


class _FusedHSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, norm, bias, pos_w, ts_w, times, query_times, max_len):
        rel = RelBias(pos_w, ts_w, times, query_times, max_len) if pos_w is not None else None
        B, N, H, _ = q.shape
        Dv = v.shape[-1]
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        (aux, strides, sb, stb, svalb, *sizes), meta = _common(q, k, v, key_valid, norm, bias, rel, prec)
        o = torch.empty(B, N, H, Dv, device=q.device, dtype=q.dtype)
        BM, BN, warps = _blocks(q.device)
        fwd, _, _ = _kernels()
        fwd[(_cdiv(N, BM), B * H)](q, k, v, o, *aux, *strides, o.stride(0), o.stride(1), o.stride(2), *sb, stb,
                                         svalb, *sizes, **meta, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
        ctx.save_for_backward(q, k, v, key_valid, bias, pos_w, ts_w, times, query_times)
        ctx.norm, ctx.max_len = norm, max_len
        return o.view(B, N, H * Dv)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, key_valid, bias, pos_w, ts_w, times, query_times = ctx.saved_tensors
        rel = RelBias(pos_w, ts_w, times, query_times, ctx.max_len) if pos_w is not None else None
        B, N, H, Dq = q.shape
        Dv = v.shape[-1]
        do = grad.reshape(B, N, H, Dv).contiguous()
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        (aux, strides, sb, stb, svalb, *sizes), meta = _common(q, k, v, key_valid, ctx.norm, bias, rel, prec)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        need_dbias = (bias is not None and ctx.needs_input_grad[5]) or (
            rel is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7]))
        dbias = torch.zeros(B, N, N, device=q.device, dtype=torch.float32) if need_dbias else aux[1]
        BM, BN, warps = _blocks(q.device)
        _, dkdv, dqk = _kernels()
        dkdv[(_cdiv(N, BN), B * H)](q, k, v, do, dk, dv, dbias, *aux, *strides, do.stride(0), do.stride(1),
                                          do.stride(2), *sb, stb, svalb, *sizes, **meta, NEED_DBIAS=need_dbias,
                                          BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
        dqk[(_cdiv(N, BM), B * H)](q, k, v, do, dq, *aux, *strides, do.stride(0), do.stride(1), do.stride(2),
                                         *sb, stb, svalb, *sizes, **meta, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
        g_bias = g_pos = g_ts = None
        if need_dbias and bias is not None:
            g_bias = dbias.to(bias.dtype)
        if need_dbias and rel is not None:
            _, pos_index, buckets = reference_bucket_bias(rel)
            g_pos = torch.zeros(pos_w.numel(), device=q.device, dtype=torch.float32)
            g_pos.index_add_(0, pos_index.reshape(-1), dbias.sum(0).reshape(-1))
            g_ts = torch.zeros(ts_w.numel(), device=q.device, dtype=torch.float32)
            g_ts.index_add_(0, buckets.reshape(-1), dbias.reshape(-1))
            g_pos, g_ts = g_pos.to(pos_w.dtype), g_ts.to(ts_w.dtype)
        return dq, dk, dv, None, None, g_bias, g_pos, g_ts, None, None, None


def fused_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, norm: float,
                         *, bias: torch.Tensor | None = None, rel: RelBias | None = None) -> torch.Tensor:
    """Fused HSTU attention, same contract as ``models.kernels.reference.hstu_attention``: returns (B, N, H * dv).

    Give the bias as tables (``rel``, computed in the kernel) or as a dense (B, N, N) ``bias``, or neither.
    """
    _check(q, k, v)
    if bias is not None and rel is not None:
        raise ValueError("give the bias as a dense tensor or as tables, not both")
    if rel is not None:
        if rel.times.shape != q.shape[:2] or rel.query_times.shape != q.shape[:2]:
            raise ValueError(f"times and query_times must be {tuple(q.shape[:2])}")
        if q.shape[1] > rel.max_len:
            raise ValueError(f"sequence length {q.shape[1]} exceeds the bias table's max_len {rel.max_len}")
        return _FusedHSTUAttention.apply(q, k, v, key_valid, float(norm), None, rel.pos_w, rel.ts_w,
                                         rel.times, rel.query_times, int(rel.max_len))
    return _FusedHSTUAttention.apply(q, k, v, key_valid, float(norm), bias, None, None, None, None, 0)


def reference_hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                             norm: float, *, bias: torch.Tensor | None = None,
                             rel: RelBias | None = None) -> torch.Tensor:
    """The PyTorch reference with the fused function's signature (table bias built as HSTUBlock builds it)."""
    if rel is not None:
        bias, _, _ = reference_bucket_bias(rel)
    return hstu_attention(q, k, v, bias, key_valid, norm)
