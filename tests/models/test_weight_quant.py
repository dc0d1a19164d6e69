"""FP8 and INT8 weight-only inference (models/ugt/weight_quant.py) behind the engine: each quantized Linear stays
close to the layer it replaces, the Linear forms compute what the model does, an int8_weight / fp8 engine ranks as
the unquantized one does on a small trained UGT, and a variant the engine cannot run fails at start.

FP8 runs here through torch's CPU ``_scaled_mm``; the CUDA test (graphs, H100/H200) runs on the GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.ugt.inference import InferenceConfig, UGTInference
from models.ugt.weight_quant import (
    Fp8Linear,
    FusedExperts,
    Int8WeightLinear,
    fp8_supported,
    fused_linear_forms,
)
from tests.models import test_quantize

# test_quantize's trained UGT: every Linear but the 2-expert router is a multiple of 16 wide, as FP8 needs
served = test_quantize.served

MAX_LEN = 16
# relative error (Frobenius) of one layer's output: e4m3 keeps 3 mantissa bits on both operands (measured ~0.035);
# int8 weights alone, 127 levels per row (measured ~0.005)
FP8_LAYER_ERROR, INT8_LAYER_ERROR = 0.06, 0.012
TOP10_OVERLAP = 0.8  # int8_weight: the weights' rounding may swap near-ties at the end of a list
FP8_TOP10_OVERLAP = 0.7  # fp8 also rounds every activation row; measured 0.9+ on this model
CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
CPU_FP8, CPU_FP8_WHY = fp8_supported(torch.device("cpu"))  # torch 2.11 (the GPU machine's) has no CPU e4m3 GEMM
needs_cpu_fp8 = pytest.mark.skipif(not CPU_FP8, reason=CPU_FP8_WHY)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("bias", [True, False])
def test_quantized_linears_stay_close_to_the_layer(bias):
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    want = layer(x)
    for fp8 in (Fp8Linear(layer), Fp8Linear(layer, bias_in_gemm=False)) if CPU_FP8 else ():
        got = fp8(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert _relative_error(got, want) < FP8_LAYER_ERROR
    got = Int8WeightLinear(layer)(x)
    assert got.dtype == torch.bfloat16 and _relative_error(got, want) < INT8_LAYER_ERROR
    layer32 = nn.Linear(64, 96, bias=bias)  # int8_weight also serves the fp32 CPU engine
    x32 = torch.randn(7, 64)
    assert _relative_error(Int8WeightLinear(layer32)(x32), layer32(x32)) < INT8_LAYER_ERROR


@needs_cpu_fp8
def test_fp8_linear_takes_a_zero_row_and_strided_input():
    layer = nn.Linear(32, 16).to(torch.bfloat16)
    h = torch.randn(4, 64, dtype=torch.bfloat16)
    h[1] = 0  # an all-zero row (padding) must not divide by zero
    got = Fp8Linear(layer)(h[:, 16:48])  # a slice of a wider tensor, as FusedExperts passes each expert
    assert torch.isfinite(got.float()).all()
    assert _relative_error(got, layer(h[:, 16:48])) < FP8_LAYER_ERROR


def test_fused_linear_forms_compute_what_the_model_does(served):
    model, rows, excludes = served
    plain = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    formed = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    fused_linear_forms(formed.model)
    assert isinstance(formed.model.layers[0].ffn.experts, FusedExperts)
    vectors = plain.row_vectors(rows)
    users = []
    for engine in (plain, formed):
        host = engine.pack(vectors, engine.exclusion_matrix(excludes), [0] * len(rows), len(rows), fresh=True)
        users.append(engine.users(host, ["miss"] * len(rows))[0])
    assert torch.allclose(users[0], users[1], atol=1e-5)


def _top10(engine: UGTInference, rows, excludes) -> list[np.ndarray]:
    return [t.indices for t in engine.recommend(rows, excludes, 10)]


def _overlap(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / 10 for x, y in zip(a, b, strict=True)]))


def test_int8_weight_ranks_as_fp32_does(served):
    model, rows, excludes = served
    fp32 = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    int8 = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", quantize="int8_weight", cache_slots=8))
    assert isinstance(int8.model.layers[0].attn.o, Int8WeightLinear)
    assert not hasattr(int8.model.layers[0].attn, "uvqk") and not hasattr(int8.model.layers[0].ffn, "w1")
    assert int8.quantized.kept == {} and len(int8.quantized.quantized) == 2 * (3 + 2 + 1)  # uvqk, o, up, 2 down, gate
    assert _overlap(_top10(fp32, rows, excludes), _top10(int8, rows, excludes)) >= TOP10_OVERLAP
    for top, seen in zip(_top10(int8, rows, excludes), excludes, strict=True):  # the KV cache path, history excluded
        assert len(top) == 10 and not set(top.tolist()) & set(seen.tolist())


@needs_cpu_fp8
def test_fp8_ranks_as_bf16_does_and_keeps_the_narrow_router(served):
    model, rows, excludes = served
    bf16 = UGTInference(model, InferenceConfig(device="cpu", dtype="bf16"))
    fp8 = UGTInference(model, InferenceConfig(device="cpu", dtype="bf16", quantize="fp8", cache_slots=8))
    assert isinstance(fp8.model.layers[1].attn.uvqk_proj, Fp8Linear)
    assert isinstance(fp8.model.layers[1].ffn.experts.down[1], Fp8Linear)
    assert set(fp8.quantized.kept) == {"layers.0.ffn.gate", "layers.1.ffn.gate"}  # 32 -> 2: not a multiple of 16
    assert "multiples of 16" in fp8.quantized.kept["layers.0.ffn.gate"]
    assert isinstance(fp8.model.layers[0].ffn.gate, nn.Linear)
    assert _overlap(_top10(bf16, rows, excludes), _top10(fp8, rows, excludes)) >= FP8_TOP10_OVERLAP
    for top, seen in zip(_top10(fp8, rows, excludes), excludes, strict=True):  # again from the KV cache (decode)
        assert len(top) == 10 and not set(top.tolist()) & set(seen.tolist())


def test_a_variant_the_engine_cannot_run_fails_at_start(served):
    model = served[0]
    with pytest.raises(ValueError, match=r"quantize must be one of \['none', 'int8', 'fp8', 'int8_weight'\], got 'fp4'"):
        UGTInference(model, InferenceConfig(quantize="fp4"))
    with pytest.raises(ValueError, match="fp8 runs on the bf16 engine"):
        UGTInference(model, InferenceConfig(device="cpu", quantize="fp8"))  # auto on CPU = fp32
    with pytest.raises(ValueError, match="runs uncompiled"):
        UGTInference(model, InferenceConfig(device="cpu", dtype="bf16", quantize="fp8", compile=True))
    with pytest.raises(ValueError, match="on CUDA use fp8 or int8_weight"):
        InferenceConfig(device="cuda", quantize="int8").check(model)
    if not CPU_FP8:  # a torch with no CPU e4m3 GEMM refuses fp8 at start rather than keeping every layer bf16
        with pytest.raises(ValueError, match="CPU _scaled_mm"):
            UGTInference(model, InferenceConfig(device="cpu", dtype="bf16", quantize="fp8"))


@pytest.mark.skipif(not CUDA_FP8, reason="FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 (H100/H200)")
@pytest.mark.parametrize("quantize", ["fp8", "int8_weight"])
def test_cuda_quantized_engine_ranks_as_bf16_with_graphs(served, quantize):
    model, rows, excludes = served
    bf16 = UGTInference(model, InferenceConfig(device="cuda", batch_buckets=(8, 64)))
    engine = UGTInference(model, InferenceConfig(device="cuda", quantize=quantize, batch_buckets=(8, 64)))
    kept = {name for name in engine.quantized.kept if not name.endswith(".gate")}
    assert kept == set(), engine.quantized.kept  # every layer of 16-multiple width runs quantized on this GPU
    assert _overlap(_top10(bf16, rows, excludes), _top10(engine, rows, excludes)) >= FP8_TOP10_OVERLAP
    assert engine.graphs, "the quantized prefill is captured in a CUDA graph"
