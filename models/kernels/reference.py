"""HSTU attention in plain PyTorch: the reference the fused kernel is checked against, and the CPU path.

Lives below ``models.hstu`` (which builds its blocks on it) so the kernels can use it without importing the
model: the dependency goes one way, models.hstu -> models.kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bucketize_time_gaps(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """HSTU's log bucket of |dt| seconds: floor(ln(max(|dt|, 1)) / 0.301), clamped to [0, num_buckets]."""
    return (torch.log(dt.abs().clamp(min=1).float()) / 0.301).long().clamp(0, num_buckets)


def hstu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   key_valid: torch.Tensor, norm: float) -> torch.Tensor:
    """PyTorch reference of HSTU's pointwise aggregated attention.

    q, k: (B, N, H, dqk); v: (B, N, H, dv); bias: (B, N, N) or None; key_valid: (B, N) bool.
    Returns (B, N, H * dv). Causal: position i aggregates keys j <= i only.
    """
    B, N, H, _ = q.shape
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k)  # (B, H, N, N)
    if bias is not None:
        scores = scores + bias.unsqueeze(1).to(scores.dtype)
    weights = F.silu(scores) / norm
    causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    mask = causal.view(1, 1, N, N) & key_valid.view(B, 1, 1, N)
    weights = weights * mask.to(weights.dtype)
    return torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(B, N, -1)
