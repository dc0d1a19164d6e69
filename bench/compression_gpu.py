"""Compressed inference on the GPU: FP8 and INT8 weight-only (models/ugt/weight_quant.py) against bf16, side by side
through the serving engine, on a trained UGT checkpoint (ML-1M on the GPU machine; a tiny ML-100K one in the test).

For each variant (bf16 = the anchor, fp8, int8_weight: ``InferenceConfig.quantize``; bf16_forms, an ablation: bf16
with the quantized variants' Linear forms) one engine on ``--device``
(bf16 activations, CUDA graphs per batch bucket on CUDA, Triton HSTU attention where it runs, no KV cache: every
request a full prefill of the user's history). Quality: test HR@10 / NDCG@10 under the HSTU protocol that
models/eval.py computes (leave-one-out: each user's last event is the target, the rows as ``make_split("test")``
builds them; full ranking over the catalog; the items of the input window masked, eval's ``mask_history=window``)
from the engine's own top 10, with the loss and ratio vs bf16 and the top-10 overlap with bf16. Speed, per batch
size: ``req_s@B`` (whole ``recommend_packed`` calls: pack, H2D, the stack, retrieval top-k, D2H, CUDA-synchronized
since the top 10 come back to the host) and ``stack_ms@B`` (the prefill step alone on a device batch, synchronized);
best of ``--repeats`` rounds in which every variant takes its turn. ``speedup`` = req/s over bf16's at the largest
batch, ``stack_speedup`` the same for the stack alone.

  python -m bench.compression_gpu --checkpoint .ugtdata/quality-ml1m/ugt-stable-s42/last.pt   # CUDA
  python -m bench.compression_gpu --device cpu --checkpoint ckpt.pt --max-users 64 --batches 32 --seconds 0.2
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import print_table, result_path, write_result

PROG = "python -m bench.compression_gpu"
# row name -> InferenceConfig.quantize; bf16_forms (an ablation): bf16 with the quantized variants' Linear forms (the
# u/v/q/k projection as a Linear, the experts as one up GEMM + one down GEMM each), so a gap between fp8 and bf16 can
# be told apart from the one the restructured experts alone make
VARIANTS = {"bf16": "none", "fp8": "fp8", "int8_weight": "int8_weight", "bf16_forms": "none"}
ROW_KEYS = ("ids", "times", "query_times", "ratings", "gaps", "query_gaps", "lengths", "long_ids", "long_times")


def load_pool(checkpoint: Path, dataset: str, max_users: int) -> dict[str, Any]:
    """The trained model (a last.pt's best weights when it holds them), its test rows and targets, and where the
    weights came from."""
    from models.checkpoint import load_checkpoint, long_history_len
    from models.data import make_split

    model, cfg, data, ckpt = load_checkpoint(checkpoint)
    if dataset and cfg.dataset != dataset:
        raise SystemExit(f"--dataset {dataset}: the checkpoint {checkpoint} was trained on {cfg.dataset}")
    if cfg.model != "ugt":
        raise SystemExit(f"{checkpoint} holds a {cfg.model!r} model; the engine serves UGT checkpoints")
    best = (ckpt.get("resume") or {}).get("best_state_dict")
    if best:
        model.load_state_dict(best)
    state = ckpt.get("train_state") or {}
    weights = "the checkpoint's state_dict"
    if "resume" in ckpt:  # a last.pt: its best weights travel apart only when they are not the current ones
        weights = (f"a last.pt's best weights (epoch {state.get('best_epoch')} of {state.get('epoch')})" if best else
                   f"a last.pt whose current weights are its best (epoch {state.get('best_epoch')})")
    split = make_split(data, "test", cfg.max_len, long_history_len(cfg))
    users = len(split.users) if max_users <= 0 else min(max_users, len(split.users))
    batched = split.rows(np.arange(users))
    rows = [{k: batched[k][r : r + 1] for k in ROW_KEYS} for r in range(users)]
    return {"model": model.eval(), "cfg": cfg, "rows": rows, "targets": np.asarray(batched["targets"]),
            "weights": weights, "users_in_split": len(split.users)}


def window_excludes(rows: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """What eval's mask_history=window masks: the items of the request's input window."""
    return [np.unique(r["ids"][0][r["ids"][0] > 0]) for r in rows]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def top10(engine: Any, vectors: np.ndarray, excl: np.ndarray, batch: int) -> np.ndarray:
    """(n, 10) item indices: every request through ``recommend_packed`` in batches of ``batch``."""
    out = []
    for start in range(0, len(vectors), batch):
        out += [t.indices for t in engine.recommend_packed(vectors[start : start + batch], excl[start : start + batch],
                                                           10)]
    return np.stack(out)


def quality(top: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """HR@10 and NDCG@10 of top-10 lists against one target each."""
    hit = top == targets[:, None]
    found = hit.any(axis=1)
    return {"hr@10": float(found.mean()), "ndcg@10": float((found / np.log2(hit.argmax(axis=1) + 2)).mean())}


def batch_of(n: int, batch: int, call: int) -> np.ndarray:
    """The ``call``-th batch of indices, walking the pool round and round."""
    return (call * batch + np.arange(batch)) % n


def engine_rate(engine: Any, vectors: np.ndarray, excl: np.ndarray, batch: int, seconds: float) -> float:
    """Requests/s of back-to-back ``recommend_packed`` calls of ``batch`` requests for about ``seconds``."""
    n = len(vectors)
    for call in range(3):  # warm-up: graphs captured, allocator settled
        idx = batch_of(n, batch, call)
        engine.recommend_packed(vectors[idx], excl[idx], 10)
    sync(engine.device)
    calls, began = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - began < seconds:
        idx = batch_of(n, batch, calls)
        engine.recommend_packed(vectors[idx], excl[idx], 10)  # returns the top 10 on the host: synchronized
        calls += 1
    sync(engine.device)
    return calls * batch / (time.perf_counter() - began)


@torch.inference_mode()  # the engine's graphs were captured at start under inference mode: replay under it too
def stack_ms(engine: Any, vectors: np.ndarray, excl: np.ndarray, batch: int, seconds: float) -> float:
    """Milliseconds per prefill step (the layer stack alone) of one device batch of ``batch`` requests."""
    idx = batch_of(len(vectors), batch, 0)
    host = engine.pack(vectors[idx], excl[idx], [0] * batch, engine.bucket(batch), fresh=True)
    dev = host.to(engine.device)
    for _ in range(3):
        engine.step("prefill", dev)
    sync(engine.device)
    steps, began = 0, time.perf_counter()
    while steps < 5 or time.perf_counter() - began < seconds:
        engine.step("prefill", dev)
        steps += 1
    sync(engine.device)
    return 1e3 * (time.perf_counter() - began) / steps


def stack_megabytes(engine: Any) -> float:
    """MB of the layer stack's weights (parameters and value buffers: the bytes quantization shrinks; integer index
    buffers such as position tables left out)."""
    tensors = [*engine.model.layers.parameters(), *engine.model.layers.buffers()]
    weights = [t for t in tensors if t.dtype not in (torch.int64, torch.int32, torch.bool)]
    return round(sum(t.numel() * t.element_size() for t in weights) / 1e6, 3)


def build_engines(model: Any, args: argparse.Namespace, batches: list[int]) -> dict[str, Any]:
    from models.ugt.inference import InferenceConfig, UGTInference
    from models.ugt.weight_quant import fused_linear_forms

    engines = {}
    for name in args.variants:
        config = InferenceConfig(device=args.device, dtype="bf16", quantize=VARIANTS[name],
                                 batch_buckets=tuple(sorted(batches)), cache_slots=0)
        engines[name] = UGTInference(model, config)
        if name == "bf16_forms":  # before the first batch: the graphs are captured on first use
            fused_linear_forms(engines[name].model, drop_dense=True)
        print(f"[{name}] engine ready on {args.device}", flush=True)
    return engines


def measure(pool: dict[str, Any], args: argparse.Namespace, batches: list[int]) -> list[dict[str, Any]]:
    """One row per variant: quality from the engine's top 10, then the timed rounds."""
    engines = build_engines(pool["model"], args, batches)
    first = next(iter(engines.values()))
    vectors = first.row_vectors(pool["rows"])
    excl = first.exclusion_matrix(window_excludes(pool["rows"]))
    cfg, targets = pool["cfg"], pool["targets"]
    rows, tops = [], {}
    for name, engine in engines.items():
        tops[name] = top10(engine, vectors, excl, max(batches))
        report = engine.quantized.summary() if engine.quantized is not None else {"quantized": 0, "kept": {}}
        rows.append({"config": f"{cfg.name} {name}", "variant": name, "quantize": VARIANTS[name],
                     **quality(tops[name], targets), "quantized_layers": report["quantized"],
                     "kept_layers": report["kept"], "stack_mb": stack_megabytes(engine)})
        print(f"[{name}] test HR@10 {rows[-1]['hr@10']:.4f} over {len(targets)} users", flush=True)
    anchor = rows[0]
    for row in rows:
        row.update({"hr@10_loss": round(anchor["hr@10"] - row["hr@10"], 4),
                    "hr@10_ratio": round(row["hr@10"] / anchor["hr@10"], 4) if anchor["hr@10"] else None,
                    "top10_overlap_vs_bf16": round(float(np.mean((tops[row["variant"]][:, :, None]
                                                                  == tops[anchor["variant"]][:, None, :]).any(2))), 4)})
    rates = {name: dict.fromkeys(batches, 0.0) for name in engines}
    stacks = {name: dict.fromkeys(batches, float("inf")) for name in engines}
    share = args.seconds / args.repeats
    for round_ in range(args.repeats):  # every variant takes its turn in each round; the best round counts
        for name, engine in engines.items():
            for b in batches:
                rates[name][b] = max(rates[name][b], engine_rate(engine, vectors, excl, b, share))
                stacks[name][b] = min(stacks[name][b], stack_ms(engine, vectors, excl, b, share))
        print(f"round {round_ + 1}/{args.repeats} timed", flush=True)
    last = max(batches)
    for row in rows:
        name = row["variant"]
        row.update({f"req_s@{b}": round(rates[name][b], 1) for b in batches})
        row.update({f"stack_ms@{b}": round(stacks[name][b], 3) for b in batches})
        row.update(speedup=round(rates[name][last] / rates[anchor["variant"]][last], 3),
                   stack_speedup=round(stacks[anchor["variant"]][last] / stacks[name][last], 3))
    del engines
    gc.collect()
    return rows


def conditions_of(pool: dict[str, Any], args: argparse.Namespace, batches: list[int]) -> dict[str, Any]:
    cfg = pool["cfg"]
    device = torch.device(args.device)
    gpu = {}
    if device.type == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(device),
               "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device)))}
    return {
        "device": args.device, **gpu, "torch": torch.__version__,
        "checkpoint": str(args.checkpoint), "weights": pool["weights"], "model": cfg.name, "dataset": cfg.dataset,
        "model_config": {k: cfg.model_config.get(k) for k in ("d_model", "num_layers", "num_heads", "dqk", "dv", "moe")},
        "users": len(pool["rows"]), "users_in_test_split": pool["users_in_split"],
        "protocol": "HSTU: leave-one-out test target, full ranking over the catalog, input-window items masked "
                    f"(models/eval.py mask_history=window; the checkpoint's own: {cfg.mask_history}), top 10 from the "
                    "serving engine's retrieval",
        "engine": "models.ugt.inference.UGTInference, bf16 activations, CUDA graphs per batch bucket on CUDA, Triton "
                  "HSTU attention where it runs, no KV cache (every request a full prefill of its history), "
                  f"max_len {cfg.max_len}",
        "fp8": "float8_e4m3fn weights (one scale per output row) and activations (one scale per row, on the fly), "
               "torch._scaled_mm row-wise, bf16 out; layers whose widths are not multiples of 16 stay bf16 "
               "(kept_layers)",
        "int8_weight": "int8 weights, one scale per output row, dequantized to bf16 inside each call, then the bf16 GEMM",
        "quantized": "the layer stack's Linears (u/v/q/k projection, output projection, MoE experts as one fused "
                     "up-projection and one down-projection per expert, router); embeddings, item table, heads "
                     "and attention stay bf16",
        "bf16_forms": "ablation: bf16 with the Linear forms fp8 and int8_weight quantize (no quantization)",
        "stack_mb": "MB of the layer stack's weights (parameters and value buffers, index buffers left out)",
        "batches": batches, "seconds_per_point": args.seconds, "repeats": args.repeats,
        "timing": "req_s: back-to-back recommend_packed calls (host rows to top 10 on the host); stack_ms: the "
                  "prefill step alone on a device batch; CUDA-synchronized, best of the repeats, after 3 warm-up calls",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained UGT checkpoint.pt or last.pt (`ugt train`)")
    p.add_argument("--dataset", default="", help="refuse a checkpoint trained on another dataset (e.g. ml-1m)")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run of the code path)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}; the "
                   "first is the anchor")
    p.add_argument("--batches", default="128,512", help="batch sizes to time (comma-separated)")
    p.add_argument("--max-users", type=int, default=0, help="only the first N test users (0 = all)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per (variant, batch), over all repeats")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds; the best counts")
    p.add_argument("--out", default=str(result_path("compression_gpu")), help="result JSON")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU here (use --device cpu for a smoke run)")
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.repeats < 1 or args.seconds <= 0:
        p.error("--repeats must be >= 1 and --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    began = time.perf_counter()
    pool = load_pool(Path(args.checkpoint), args.dataset, args.max_users)
    print(f"loaded {args.checkpoint} ({pool['weights']}), {len(pool['rows'])} test users "
          f"in {time.perf_counter() - began:.0f} s", flush=True)
    rows = measure(pool, args, batches)
    print_table(rows, ["config", "hr@10", "ndcg@10", "hr@10_loss", "hr@10_ratio", "top10_overlap_vs_bf16",
                       *[f"req_s@{b}" for b in batches], *[f"stack_ms@{b}" for b in batches], "speedup",
                       "stack_speedup", "quantized_layers", "stack_mb"])
    conditions = conditions_of(pool, args, batches)
    conditions["wall_seconds"] = round(time.perf_counter() - began, 1)
    write_result(args.out, "compression_gpu", conditions, {"rows": rows}, argv, PROG)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
