"""INT8 weights for the CPU engine (``InferenceConfig.quantize = "int8"``): every weight matmul of the UGT stack as an
int8 GEMM (fbgemm / x86), behind the same inference interface.

Why torch.ao and not torchao: torchao (its ``int8_weight_only``) is not in infra/requirements.lock, and the pinned
torch still ships ``torch.ao.quantization.quantize_dynamic`` (deprecated toward torchao, working on CPU): int8
weights per output channel, activations quantized per batch on the fly, so the matmul itself runs in int8 -- a
weight-only scheme that dequantizes the weights before an fp32 matmul saves memory but no CPU time.

The quantizer only knows ``nn.Linear``. The HSTU block's fused u/v/q/k projection is a raw weight matrix and the
MoE experts are batched einsums, so :func:`quantize_int8` first gives each an ``nn.Linear`` form (the same function:
``uvqk_proj(x) == x @ uvqk``; :class:`ExpertLinears` is the experts' two layers per expert), which
:func:`models.ugt.steps.attn_inputs` and :meth:`models.ugt.moe.MoEFeedForward.forward` use when present. The item
table (retrieval's dot products), the embeddings and the attention itself stay fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from models.ugt.model import UGT


def as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` computing ``x @ weight.T + bias`` (weight: (out, in))."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class ExpertLinears(nn.Module):
    """The MoE experts as one (up, down) pair of linears per expert: ``(B, L, D) -> (B, L, E, D)``, what the
    experts' einsums compute (inference: no dropout)."""

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
        super().__init__()
        experts = w1.shape[0]
        self.up = nn.ModuleList(as_linear(w1[e].T, b1[e]) for e in range(experts))
        self.down = nn.ModuleList(as_linear(w2[e].T, b2[e]) for e in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([down(F.gelu(up(x))) for up, down in zip(self.up, self.down, strict=True)], dim=2)


@torch.no_grad()
def linear_forms(model: UGT) -> UGT:
    """Give each block's u/v/q/k projection and each MoE's experts an ``nn.Linear`` form, in place (same outputs)."""
    for layer in model.layers:
        block = layer.attn
        block.uvqk_proj = as_linear(block.uvqk.T, None)
        ffn = layer.ffn
        ffn.experts = ExpertLinears(ffn.w1, ffn.b1, ffn.w2, ffn.b2)
    return model


@torch.no_grad()
def quantize_int8(model: UGT) -> UGT:
    """``model`` (fp32, CPU, eval) with its stack's weight matmuls in int8, in place; returns it."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 quantization runs on the CPU engine (fbgemm); serve with device cpu")
    linear_forms(model)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch 2.15 points at torchao, which the lock does not have (see above)
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model
