"""Anchor (c), ``generator-engine``: the model-scope engine alone, fed packed rows, with the e2e traffic mix.

``generator-alone`` (bench/e2e_generator.py) builds every request's row in the bench process, one batch at a
time: it measures the single-process pipeline, not the engine. In the served system (``engine_scope: model``) the
HTTP workers build and pack rows in parallel and the engine process only runs the model on their frames. This row
group measures that engine: every request's row is built and packed BEFORE the timed loop (untimed, as the workers
do it in parallel), exactly as a worker does (serving.ugt_generator ``UGTGenerator.gather``, ``row_vectors``,
``exclusion_matrix``, serving.model_wire ``encode_rows``: one MODEL frame per request). The timed loop is the
engine process's: the frames that have arrived by each request's scheduled time go through a FrameDecoder into
serving.engine_model ``ModelCore`` (the engine's own admission, steps of up to ``--engine-max-rows`` rows across
frames, two steps in flight via ``UGTInference.submit_packed``, answer frames). Open loop: latency = the time its
answer frame is out - its scheduled arrival. Not counted: the sockets, and the workers' own work.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.e2e_generator import state_view
from bench.e2e_load import APPEND, CLASS_NAMES, make_schedule
from bench.e2e_users import Users
from bench.http_load import pct

ROUTE = "movie"
PACK_CHUNK = 512  # requests gathered at once while packing (in schedule order, so appends see their own event)


def pack_frames(generator: Any, users: Users, schedule: Any, k: int) -> list[bytes | None]:
    """Every request's MODEL frame (None: no known item, answered by the worker without the engine), built in
    schedule order from the users' states as a worker builds it; advances the appends' users by one event."""
    from serving.engine_ipc import MODEL, encode
    from serving.generator import GenerationRequest
    from serving.model_wire import ModelRows, encode_rows

    engine = generator.engine
    known = len(generator.index_to_item)
    n = len(schedule.times)
    frames: list[bytes | None] = [None] * n
    for lo in tqdm(range(0, n, PACK_CHUNK), desc="packing", unit_scale=PACK_CHUNK, mininterval=5, leave=False):
        requests = []
        for r in range(lo, min(lo + PACK_CHUNK, n)):
            u = int(schedule.users[r])
            view = state_view(users.append_row(u) if schedule.classes[r] == APPEND else users.row(u))
            requests.append(GenerationRequest(view, k, frozenset(view.item_ids), ROUTE))
        batch = generator.gather(requests)
        if not batch.rows:
            continue
        vectors = engine.row_vectors(batch.rows)
        for j, i in enumerate(batch.where):
            rows = ModelRows(ROUTE, batch.k, [batch.keys[j]], [batch.prints[j]], vectors[j : j + 1],
                             engine.exclusion_matrix([batch.excludes[j]]), known)
            frames[lo + i] = encode(MODEL, lo + i, 0.0, encode_rows(rows))
    return frames


def serve_frames(core: Any, times: np.ndarray, frames: list[bytes | None]) -> tuple[np.ndarray, int]:
    """The engine loop over ``frames`` arriving at ``times`` (s): per request its latency (ms; NaN: no frame or
    refused), and how many were refused."""
    from serving.engine_ipc import MODEL_ANSWER, FrameDecoder

    n = len(times)
    latency = np.full(n, np.nan)
    inbox, answers = FrameDecoder(), FrameDecoder()
    expected = sum(frame is not None for frame in frames)
    done = refused = 0
    i = 0
    t0 = time.perf_counter()
    while done < expected:
        now = time.perf_counter() - t0
        j = int(np.searchsorted(times, now, side="right"))
        out = bytearray()
        if j > i:
            for frame in inbox.feed(b"".join(f for f in frames[i:j] if f is not None)):
                refusal = core.admit(0, frame)
                if refusal is not None:
                    out.extend(refusal)
            i = j
        wait = core.due_in()
        if wait == 0.0:
            out.extend(core.run_due().get(0, b""))
        if out:
            stamp = (time.perf_counter() - t0) * 1000.0
            for frame in answers.feed(bytes(out)):
                done += 1
                if frame.kind == MODEL_ANSWER:
                    latency[frame.ident] = stamp - times[frame.ident] * 1000.0
                else:
                    refused += 1
            continue
        until = times[i] - (time.perf_counter() - t0) if i < n else float("inf")
        pause = min(until, wait if wait is not None else float("inf"))
        if pause > 100e-6:
            time.sleep(min(pause - 50e-6, 0.01))
    return latency, refused


def engine_rate(generator: Any, users: Users, schedule: Any, args: Any) -> dict[str, Any]:
    """One schedule: pack (untimed), then the timed engine loop; its row (without the config and rate)."""
    from serving.engine_model import ModelCore

    began = time.perf_counter()
    frames = pack_frames(generator, users, schedule, args.k)
    packed_s = time.perf_counter() - began
    sizes: list[int] = []
    core = ModelCore({ROUTE: generator}, max_rows=args.engine_max_rows, queue_max=len(frames) + 1, depth=2,
                     on_batch=sizes.append)
    gc.collect()
    gc.disable()
    try:
        latency, refused = serve_frames(core, schedule.times, frames)
    finally:
        gc.enable()
    answered = latency[~np.isnan(latency)]
    done_by = float(np.max(schedule.times[~np.isnan(latency)] + answered / 1000.0)) if len(answered) else 0.0
    values = answered.tolist()
    return {"requests": len(latency), "served_qps": round(len(answered) / max(done_by, args.duration), 1),
            "p50_ms": round(pct(values, 50), 2), "p99_ms": round(pct(values, 99), 2),
            "p999_ms": round(pct(values, 99.9), 2), "errors": refused,
            "fallbacks": sum(frame is None for frame in frames),
            "mean_batch": round(float(np.mean(sizes)), 1) if sizes else 0.0, "packed_untimed_s": round(packed_s, 1),
            "planned_mix": {name: int((schedule.classes == c).sum()) for c, name in enumerate(CLASS_NAMES)}}


def engine_rows(checkpoint: str, users: Users, rates: list[float], args: Any) -> list[dict[str, Any]]:
    """Warm the cache on the seen pool (all misses), then one row per rate (stops past saturation)."""
    from serving.ugt_generator import UGTGenerator

    gc.collect()  # the generator-alone group's model and KV pool, if it ran before, are gone before this one's
    generator = UGTGenerator(checkpoint, kv_cache_users=len(users.ids), kv_cache_bytes=args.kv_cache_bytes,
                             live_items=0, device=args.device, max_batch=max(args.batch_max, args.engine_max_rows))
    users.reset()
    warm = make_schedule(50_000.0, min(args.warm_users, len(users.ids)) / 50_000.0, (1.0, 0.0, 0.0), 0,
                         len(users.ids), seed=999)
    engine_rate(generator, users, warm, args)
    users.seen = warm.seen_after
    rows = []
    for n, rate in enumerate(rates):
        schedule = make_schedule(rate, args.duration, args.mix_shares, users.seen, len(users.ids), args.seed + n)
        before = dict(generator.engine.cache.stats()) if generator.engine.cache is not None else {}
        measured = engine_rate(generator, users, schedule, args)
        users.seen = schedule.seen_after
        after = dict(generator.engine.cache.stats()) if generator.engine.cache is not None else {}
        row = {"config": "generator-engine", "offered_qps": rate, **measured}
        for result in ("hit", "append", "miss"):
            row[f"cache_{result}"] = int(after.get(result, 0) - before.get(result, 0))
        # a user asked twice within one step: the later row runs in the scratch slot, not looked up (uncounted)
        counted = row["cache_hit"] + row["cache_append"] + row["cache_miss"]
        row["cache_repeat"] = row["requests"] - row["fallbacks"] - row["errors"] - counted
        rows.append(row)
        if row["p99_ms"] > 1000:
            break
    return rows
