"""FP8 and INT8 weights for the GPU engine (``InferenceConfig.quantize = "fp8" | "int8_weight"``): the stack's
Linear layers with 8-bit weights, behind the same inference interface, in pure torch (torchao is not on the GPU
machine and new wheels must be carried there).

* ``fp8`` (H100/H200, and CPU for tests): each weight float8_e4m3fn with one fp32 scale per output row; each
  activation row quantized on the fly to e4m3 with its own scale (amax / 448); one ``torch._scaled_mm`` per layer
  (row-wise scaling, bf16 out, bias inside the GEMM), so the matmul itself runs on the FP8 tensor cores. The GEMM
  needs both dimensions of the weight to be multiples of 16: a layer whose are not (the MoE router, 4 outputs)
  stays bf16, and :class:`QuantizedLayers` says which and why. Each layer is also run once at start on a small
  probe; one the device's ``_scaled_mm`` refuses stays bf16 with the error as its reason, rather than failing
  the first request.
* ``int8_weight`` (any device, any engine dtype): int8 weights with one scale per output row, dequantized into the
  activations' dtype inside each call (two small kernels over the weight), then the usual GEMM. It halves the
  weights' bytes (vs bf16); it does not make the GEMM cheaper. Why not ``torch._weight_int8pack_mm``: its CUDA
  kernel is a naive one-thread-per-output fp32 loop (fp32 activations only), slower than dequantize-then-GEMM.

The HSTU block's u/v/q/k projection is a raw weight matrix and the MoE experts are batched einsums; both get a
Linear form first: ``uvqk_proj`` (what :func:`models.ugt.steps.attn_inputs` uses when present) and
:class:`FusedExperts` (one up-projection GEMM for all experts, one down-projection per expert; what
:meth:`models.ugt.moe.MoEFeedForward.forward` uses when present). Only ``model.layers`` changes: the item table
(retrieval's dot products, computed once at start), the embeddings, the semantic-ID head and the attention
itself keep the engine's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.ugt.model import UGT
from models.ugt.quantize import as_linear

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
SCHEMES = ("fp8", "int8_weight")
PROBE_ROWS = 16


def _row_scales(w: torch.Tensor, top: float) -> torch.Tensor:
    """(N, 1) fp32 scales mapping each row's largest magnitude to ``top`` (all-zero rows get a tiny scale)."""
    return w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / top


class Fp8Linear(nn.Module):
    """``x @ W.T + b`` with W in float8_e4m3fn (per-row scales) and x quantized per row on the fly."""

    def __init__(self, linear: nn.Linear, bias_in_gemm: bool = True):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = _row_scales(w, FP8_MAX)
        quantized = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        self.register_buffer("weight_t", quantized.t())  # (K, N), column-major: what _scaled_mm wants
        self.register_buffer("scale_b", scale.t().contiguous())  # (1, N)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.bias_in_gemm = bias_in_gemm
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        # four passes over the activations: the row amax (abs and max in one reduction), the scaling (bf16 * fp32
        # promotes to fp32 in the same kernel), the clamp (fp32 rounding may land a hair above 448), the cast
        amax = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True).float().clamp_(min=1e-12)
        scale_a = amax / FP8_MAX  # (M, 1)
        quantized = torch.mul(rows, FP8_MAX / amax).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        inside = self.bias if self.bias_in_gemm else None
        out = torch._scaled_mm(quantized, self.weight_t, scale_a, self.scale_b, bias=inside, out_dtype=x.dtype)
        if self.bias is not None and not self.bias_in_gemm:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)


class Int8WeightLinear(nn.Module):
    """``x @ W.T + b`` with W stored int8 (per-row scales), dequantized into x's dtype inside each call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = _row_scales(w, INT8_MAX)
        self.register_buffer("weight_int8", torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))  # (N, 1)
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)
        return F.linear(x, weight, self.bias.to(x.dtype) if self.bias is not None else None)


class FusedExperts(nn.Module):
    """The MoE experts as Linears: one up-projection for all experts (E * d_ff outputs), one down-projection per
    expert; ``(B, L, D) -> (B, L, E, D)``, what the experts' einsums compute (inference: no dropout)."""

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
        super().__init__()
        experts, d_model, d_ff = w1.shape
        self.d_ff = d_ff
        self.up = as_linear(w1.permute(0, 2, 1).reshape(experts * d_ff, d_model), b1.reshape(-1))
        self.down = nn.ModuleList(as_linear(w2[e].T, b2[e]) for e in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x))
        f = self.d_ff
        return torch.stack([down(h[..., e * f : (e + 1) * f]) for e, down in enumerate(self.down)], dim=2)


@dataclass
class QuantizedLayers:
    """What :func:`quantize_weights` did: the Linears it quantized and those it kept (name -> why)."""

    scheme: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"scheme": self.scheme, "quantized": len(self.quantized), "kept": dict(self.kept)}


def _fp8_or_reason(name: str, linear: nn.Linear) -> tuple[nn.Module | None, str]:
    """An :class:`Fp8Linear` of ``linear`` that ran the probe, or (None, why the layer stays as it is)."""
    n, k = linear.out_features, linear.in_features
    if n % 16 or k % 16:
        return None, f"fp8 GEMM needs in/out features multiples of 16, this layer is {k} -> {n}"
    if linear.weight.dtype != torch.bfloat16:
        return None, f"fp8 GEMM writes bf16, the engine runs {linear.weight.dtype}"
    probe = torch.randn(PROBE_ROWS, k, device=linear.weight.device, dtype=linear.weight.dtype)
    errors = []
    for bias_in_gemm in (True, False):
        layer = Fp8Linear(linear, bias_in_gemm)
        try:
            layer(probe)
            return layer, ""
        except (RuntimeError, TypeError, ValueError) as exc:  # this device's _scaled_mm refuses the layout or bias
            errors.append(str(exc).splitlines()[0])
            if linear.bias is None:
                break
    return None, f"torch._scaled_mm refused {name}: {'; '.join(errors)}"


@torch.no_grad()
def fused_linear_forms(model: UGT, drop_dense: bool = False) -> UGT:
    """Give each block's u/v/q/k projection a Linear form and each MoE's experts :class:`FusedExperts`, in place
    (same outputs). ``drop_dense``: delete the raw matrices they copy, which only training's forward reads (the
    engine's steps use the forms), so the quantized stack does not also carry its bf16 weights."""
    for layer in model.layers:
        block = layer.attn
        block.uvqk_proj = as_linear(block.uvqk.T, None)
        ffn = layer.ffn
        ffn.experts = FusedExperts(ffn.w1, ffn.b1, ffn.w2, ffn.b2)
        if drop_dense:
            del block.uvqk, ffn.w1, ffn.b1, ffn.w2, ffn.b2
    return model


@torch.no_grad()
def quantize_weights(model: UGT, scheme: str) -> QuantizedLayers:
    """``model``'s stack (eval, on its serving device and dtype) with 8-bit Linear weights, in place."""
    if scheme not in SCHEMES:
        raise ValueError(f"weight quantization scheme must be one of {SCHEMES}, got {scheme!r}")
    fused_linear_forms(model, drop_dense=True)
    report = QuantizedLayers(scheme)
    targets = [(f"layers.{name}", module) for name, module in model.layers.named_modules()
               if isinstance(module, nn.Linear)]
    for name, linear in targets:
        if scheme == "int8_weight":
            replacement, why = Int8WeightLinear(linear), ""
        else:
            replacement, why = _fp8_or_reason(name, linear)
        if replacement is None:
            report.kept[name] = why
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = replacement
        else:
            setattr(parent, child, replacement)
        report.quantized.append(name)
    return report


@functools.cache
def _cpu_fp8_refusal() -> str:
    """Why this torch build's CPU ``_scaled_mm`` refuses an e4m3 GEMM of :class:`Fp8Linear`'s form, per-row scales
    on both operands ("" when it runs one): older releases have no CPU kernel for it. On the GPU machine's torch
    2.11 a probe with one scale per tensor passed while every layer's per-row GEMM then failed (4 tests of
    tests/models/test_weight_quant.py), so the probe takes the layers' form."""
    a = torch.ones(16, 16, dtype=torch.float8_e4m3fn)
    rows, cols = torch.ones(16, 1, dtype=torch.float32), torch.ones(1, 16, dtype=torch.float32)
    try:
        torch._scaled_mm(a, a.t(), rows, cols, out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        return str(exc).splitlines()[0]
    return ""


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    """Whether this device runs FP8 GEMMs (CUDA compute capability >= 8.9: Ada, Hopper; CPU: torch's reference
    kernel, where this torch build has one)."""
    if device.type == "cpu":
        refusal = _cpu_fp8_refusal()
        if refusal:
            return False, (f"fp8 on CPU needs torch's CPU _scaled_mm, which torch {torch.__version__} refuses "
                           f"({refusal}); serve with quantize int8_weight or none, or on an H100/H200")
        return True, ""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"fp8 needs a CUDA GPU of compute capability >= 8.9 (H100/H200), not {device}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, (f"fp8 needs compute capability >= 8.9 (H100/H200, L4, RTX 40xx); this GPU is {major}.{minor}: "
                       f"serve with quantize int8_weight or none")
    return True, ""
