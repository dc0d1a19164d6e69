"""What an engine serves with: device and precision, graphs, the KV cache, the heads and the catalog's growth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.ugt.model import UGT
from models.ugt.runner.slot_cache import ADMISSIONS
from models.ugt.weight_quant import fp8_supported

# none | int8 (CPU dynamic, models/ugt/quantize.py) | fp8, int8_weight (models/ugt/weight_quant.py)
QUANTIZE = ("none", "int8", "fp8", "int8_weight")
# items per retrieval block by device type, both measured: CPU (bench/results/topk_retrieval.json: 4,096 and 16,384
# tie, 65,536 is slower); CUDA one pass (bench/results/topk_retrieval_gpu.json, H100: one pass is as fast as any
# block up to 128 rows at 1M items; blocks of 262,144 win 1.27x only at 512 rows)
RETRIEVAL_BLOCK = {"cpu": 16384, "cuda": 0}


@dataclass
class InferenceConfig:
    """An engine's settings; :meth:`check` refuses at start what the model cannot serve."""

    device: str = "cpu"
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    fused_attention: bool = True  # Triton HSTU attention where it runs (CUDA)
    cuda_graphs: bool = True  # capture prefill/decode per batch bucket (CUDA only)
    batch_buckets: tuple[int, ...] = (1, 8, 32, 128)
    # CUDA: a prefill whose activations (rows x window x d_model) reach this many elements runs eagerly on its own
    # rows instead of replaying the graph of its padded bucket: its kernels outweigh their launches, and 18 misses of
    # an industrial step (window 1,024, d 256: eager from 16 rows) padded to the 32-row graph nearly doubled the
    # step's prefill time (docs/SERVING.md); a small model (ML-1M: 216 x 64) keeps its graphs. 0 = never
    eager_prefill_activations: int = 1 << 22
    # the cached steps (append, decode, ranking) attend to the KV pool in place with a Triton kernel
    # (models/kernels/slot_attention.py) instead of copying each row's window per layer; needs the KV cache and
    # Triton (CUDA, or CPU under TRITON_INTERPRET=1); 8 % faster steps at industrial size on an H100, not yet
    # measured on a small model (docs/SERVING.md), so off by default
    paged_attention: bool = False
    cache_slots: int = 0  # users whose prefix K/V is kept (0 = no KV cache)
    # > 0: the KV pool (every slot + one scratch, each the whole window) fits in this many bytes: fewer slots than
    # cache_slots when they would not fit; LRU evicts when the pool is full. 0 = cache_slots alone decides
    cache_bytes: int = 0
    # "lru": every miss is cached; "second_sight": a new user enters a full pool only on its second miss
    # (models/ugt/runner/slot_cache.py): one-off users do not evict returning ones
    cache_admission: str = "lru"
    beam_size: int = 0  # > 0: also semantic-ID beam search (needs the model's semantic-ID head)
    merge: str = "retrieval"  # "retrieval" (dot-product top-k only) | "rrf" (retrieval + beam, rank-fused; with
    # rank_top > 0 the ranking head orders the union of both lists instead)
    candidate_micro_batch: int = 512  # M-FALCON-style micro-batch of candidates scored at once
    compile: bool = False  # CPU: torch.compile prefill and decode at start (needs a C++ compiler; ~1 min)
    rank_top: int = 0  # > 0: the ranking head reorders this many retrieval candidates (needs heads.ranking + cache)
    new_item_slots: int = 0  # rows reserved for items that arrive after training (:meth:`UGTInference.add_items`)
    # CUDA, merge="rrf": retrieval + constrained beam search + fusion replayed as one CUDA graph per (batch bucket,
    # exclusion width, k) instead of ~150 small kernel launches; recaptured when the catalog or trie changes
    heads_graph: bool = True
    # "int8": the stack's weight matmuls as int8 GEMMs (models/ugt/quantize.py; CPU, fp32 engine, not compiled);
    # "fp8": float8 weights and activations, FP8 GEMMs (models/ugt/weight_quant.py; bf16 engine, H100/H200);
    # "int8_weight": int8 weights dequantized in each matmul (models/ugt/weight_quant.py; any device and dtype)
    quantize: str = "none"
    # exact retrieval ``retrieval_block`` items at a time (models/ugt/runner/blocked_topk.py): the same answer with
    # memory bounded by a (batch, block) score block instead of (batch, items). It runs for a catalog of more than
    # one block and a batch of at least ``retrieval_block_min_batch`` rows (CPU, measured: one pass wins at 1-8 rows,
    # blocks from 32); otherwise (ML-1M: 3,883 items) one pass. None = the device's default (RETRIEVAL_BLOCK);
    # 0 = always one pass. Measured: bench/topk_retrieval.py, docs/SERVING.md "Retrieval at 1M items"
    retrieval_block: int | None = None
    retrieval_block_min_batch: int = 32

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.device(self.device).type == "cuda" else torch.float32
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype]

    def retrieval_block_for(self, batch: int, num_items: int) -> int:
        """Items per retrieval block for ``batch`` rows over ``num_items`` items (0: the plain one-pass path)."""
        block = self.retrieval_block
        if block is None:
            block = RETRIEVAL_BLOCK.get(torch.device(self.device).type, RETRIEVAL_BLOCK["cpu"])
        if 0 < block <= num_items and batch >= self.retrieval_block_min_batch:
            return block
        return 0

    def check(self, model: UGT) -> None:
        """A ValueError at start for settings this model cannot serve."""
        if self.merge not in ("retrieval", "rrf"):
            raise ValueError(f"merge must be 'retrieval' or 'rrf', got {self.merge!r}")
        if (self.beam_size > 0 or self.merge == "rrf") and model.sid_head is None:
            raise ValueError("beam search / rrf merge needs a model with a semantic-ID head")
        if self.rank_top > 0 and model.ranker is None:
            raise ValueError("rank_top > 0 needs a model trained with the ranking head (heads.ranking: true); "
                             "set rank_top to 0 for this checkpoint")
        self.check_quantize()
        if (self.retrieval_block is not None and self.retrieval_block < 0) or self.retrieval_block_min_batch < 0:
            raise ValueError(f"retrieval_block and retrieval_block_min_batch must be >= 0 (retrieval_block 0 = one "
                             f"pass), got {self.retrieval_block} and {self.retrieval_block_min_batch}")
        if self.cache_admission not in ADMISSIONS:
            raise ValueError(f"cache_admission must be one of {list(ADMISSIONS)}, got {self.cache_admission!r}")
        if self.cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0 (0 = no byte budget), got {self.cache_bytes}")
        if self.rank_top > 0 and self.cache_slots <= 0:
            raise ValueError("rank_top > 0 reads each user's history keys/values from the KV cache: "
                             "set cache_slots > 0")
        if self.paged_attention:
            from models.kernels.hstu_attention import triton_status

            usable, why = triton_status(self.device)
            if not usable or self.cache_slots <= 0 or self.compile:
                raise ValueError("paged_attention reads the KV cache with a Triton kernel: it needs cache_slots > 0, "
                                 f"no compile, and Triton ({why or 'available'}); set paged_attention: false")

    def check_quantize(self) -> None:
        """A ValueError at start for a quantization this engine cannot run (unknown name, device, dtype)."""
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize == "none":
            return
        if self.compile:
            raise ValueError(f"quantize {self.quantize} runs uncompiled: set compile false")
        device = torch.device(self.device)
        if self.quantize == "int8" and (device.type != "cpu" or self.torch_dtype() != torch.float32):
            raise ValueError("quantize int8 runs on the CPU engine in fp32, uncompiled (fbgemm int8 GEMMs); on CUDA "
                             "use fp8 or int8_weight")
        if self.quantize == "fp8":
            if self.torch_dtype() != torch.bfloat16:
                raise ValueError("quantize fp8 runs on the bf16 engine (dtype bf16, or auto on CUDA); on the CPU fp32 "
                                 "engine use int8")
            ok, why = fp8_supported(device)
            if not ok:
                raise ValueError(f"quantize fp8: {why}")
