"""Fused HSTU attention (Triton) against the PyTorch reference, forward and backward.

On a GPU the kernels run compiled; on CPU they run under Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernels are first built). Without triton the tests skip with the reason; the reference never does.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from models.hstu import HSTUBlock, bucketize_time_gaps  # noqa: E402
from models.kernels.hstu_attention import (  # noqa: E402
    RelBias,
    bucket_thresholds,
    fused_hstu_attention,
    reference_hstu_attention,
    triton_status,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
USABLE, WHY = triton_status(DEVICE)
needs_triton = pytest.mark.skipif(not USABLE, reason=f"fused kernel not runnable here: {WHY}")


def inputs(B=2, N=37, H=2, dqk=16, dv=24, dtype=torch.float32, seed=0, max_len=40, buckets=128):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, N, H, dqk, generator=g) for _ in range(2))
    v = torch.randn(B, N, H, dv, generator=g)
    lengths = torch.tensor([N, N - 9])[:B]
    valid = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    valid[0, 3] = False  # a hole among the keys (UGT's empty long-term groups)
    times = torch.cumsum(torch.randint(0, 200_000, (B, N), generator=g), 1) + 1_000_000_000
    query_times = torch.cat([times[:, 1:], times[:, -1:] + 77], 1)
    rel = RelBias(torch.randn(2 * max_len - 1, generator=g) * 0.3, torch.randn(buckets + 1, generator=g) * 0.3,
                  times, query_times, max_len)
    move = {"device": DEVICE}
    rel = RelBias(rel.pos_w.to(**move), rel.ts_w.to(**move), times.to(**move), query_times.to(**move), max_len)
    return (q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), valid.to(DEVICE), rel)


def test_bucket_thresholds_reproduce_the_reference_buckets():
    thr = bucket_thresholds(128)
    dt = torch.cat([torch.arange(1, 5000), torch.randint(1, 1 << 40, (20000,)), thr[1:-1], thr[1:-1] - 1])
    ref = bucketize_time_gaps(dt, 128)
    via_thr = (dt.unsqueeze(1) >= thr[1:-1].unsqueeze(0)).sum(1)
    assert torch.equal(ref, via_thr)


@needs_triton
@pytest.mark.parametrize("mode", ["tables", "dense", "none"])
def test_forward_matches_reference(mode):
    q, k, v, valid, rel = inputs()
    kw = {"rel": rel} if mode == "tables" else {}
    if mode == "dense":
        kw = {"bias": torch.randn(q.shape[0], q.shape[1], q.shape[1], device=DEVICE)}
    got = fused_hstu_attention(q, k, v, valid, 40.0, **kw)
    want = reference_hstu_attention(q, k, v, valid, 40.0, **kw)
    assert got.shape == want.shape == (2, 37, 2 * 24)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("mode", ["tables", "dense"])
def test_backward_matches_reference(mode):
    q, k, v, valid, rel = inputs(N=33, H=2, dqk=16, dv=16, seed=1)
    dense = torch.randn(q.shape[0], 33, 33, device=DEVICE)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if mode == "tables":
            tables = [rel.pos_w.clone().requires_grad_(), rel.ts_w.clone().requires_grad_()]
            kw = {"rel": RelBias(*tables, rel.times, rel.query_times, rel.max_len)}
        else:
            tables = [dense.clone().requires_grad_()]
            kw = {"bias": tables[0]}
        out = fn(*leaves, valid, 40.0, **kw)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        return [t.grad for t in leaves + tables]

    for got, want in zip(grads(fused_hstu_attention), grads(reference_hstu_attention), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="Triton's CPU interpreter does not compute bf16 tiles correctly")
def test_bf16_forward_close_to_fp32_reference():
    q, k, v, valid, rel = inputs(N=48, dqk=32, dv=32, seed=2, max_len=48)
    got = fused_hstu_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), valid, 48.0, rel=rel)
    want = reference_hstu_attention(q, k, v, valid, 48.0, rel=rel)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


@needs_triton
def test_hstu_block_fused_flag_matches_the_eager_block():
    torch.manual_seed(3)
    block = HSTUBlock(32, 2, 16, 16, 0.0, 40).to(DEVICE).eval()
    q, _, _, valid, rel = inputs(N=40, seed=3)
    x = torch.randn(2, 40, 32, device=DEVICE)
    want = block(x, rel.times, rel.query_times, valid)
    block.fused = True
    got = block(x, rel.times, rel.query_times, valid)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_reference_runs_without_triton_and_bad_shapes_fail_clearly():
    q, k, v, valid, rel = inputs(N=8)
    out = reference_hstu_attention(q.cpu(), k.cpu(), v.cpu(), valid.cpu(), 8.0)
    assert out.shape == (2, 8, 48)
    if USABLE:
        with pytest.raises(ValueError, match="q, k must be"):
            fused_hstu_attention(q, k[:, :, :1], v, valid, 8.0)
        with pytest.raises(ValueError, match="not both"):
            fused_hstu_attention(q, k, v, valid, 8.0, bias=torch.zeros(2, 8, 8, device=DEVICE), rel=rel)
