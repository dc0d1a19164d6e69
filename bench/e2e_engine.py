"""Anchor (c), ``generator-engine``: the model-scope engine alone, fed packed rows, with the e2e traffic mix.

``generator-alone`` (bench/e2e_generator.py) builds every request's row in the bench process, one batch at a
time: it measures the single-process pipeline, not the engine. In the served system (``engine_scope: model``) the
HTTP workers build and pack rows in parallel and the engine process only runs the model on their frames. This row
group measures that engine: every request's row is built and packed BEFORE the timed loop (untimed, as the workers
do it in parallel), exactly as a worker does (serving.ugt_generator ``UGTGenerator.gather``, ``row_vectors``,
``exclusion_matrix``, serving.model_wire ``encode_rows``), into the frames the workers would send
(``--engine-frames workers``: request r to worker r % W, each worker's batch sent 1 ms after its first request or
once full, as serving/batcher.py does, but without waiting for its previous frame's answer; ``request``: one frame
per request). The timed loop is the engine process's: the frames sent by now go through a FrameDecoder into
serving.engine_model ``ModelCore`` (the engine's own admission, steps of up to ``--engine-max-rows`` rows across
frames, two steps in flight via ``UGTInference.submit_packed``, answer frames). Open loop: latency = the time its
answer frame is out - the request's scheduled arrival (the workers' batching wait included). Not counted: the
sockets, and the workers' own work (state reads, rows, reranking, HTTP). Before each rate, half a second of its
mix runs unmeasured, so graph captures of new step shapes fall outside the rows.
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
WORKER_WAIT_S = 1e-3  # the workers' batch_max_wait_ms in bench/serving_gpu_e2e.py's ugt_config
WARM_MIX_S = 0.5  # before each rate, this long of its mix, unmeasured: the step shapes of the rate captured first


def worker_frames(times: np.ndarray, workers: int, wait_s: float, max_rows: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Which requests each frame holds, as ``workers`` workers' batchers send them (serving/batcher.py: request r
    to worker r % workers; a batch is sent ``wait_s`` after its first request or once ``max_rows`` are in), and
    when each frame is sent (s), frames in the order sent. ``max_rows=1``: one frame per request, at its arrival."""
    members: list[np.ndarray] = []
    send: list[float] = []
    for w in range(workers):
        mine = np.arange(w, len(times), workers)
        arrived = times[mine]
        at = 0
        while at < len(mine):
            end = min(int(np.searchsorted(arrived, arrived[at] + wait_s, side="right")), at + max_rows)
            end = max(end, at + 1)
            members.append(mine[at:end])
            send.append(float(arrived[end - 1]) if end - at == max_rows else float(arrived[at]) + wait_s)
            at = end
    order = np.argsort(np.asarray(send), kind="stable")
    return [members[f] for f in order], np.asarray(send)[order]


def pack_frames(generator: Any, users: Users, schedule: Any, k: int,
                members: list[np.ndarray]) -> tuple[list[bytes | None], int]:
    """Every frame's bytes (a MODEL frame, its ident the frame's index; None: none of its users has a known item,
    answered by the worker without the engine) and how many requests had no row. Each request's row is built in
    schedule order from the users' states as a worker builds it; the appends' users move on by one event."""
    from serving.generator import GenerationRequest

    engine = generator.engine
    n = len(schedule.times)
    parts: list[tuple | None] = [None] * n  # per request built and not yet framed: (vector, exclusions, key, print)
    frames: list[bytes | None] = [None] * len(members)
    by_last = sorted(range(len(members)), key=lambda f: int(members[f][-1]))
    next_frame = built = 0
    for lo in tqdm(range(0, n, PACK_CHUNK), desc="packing", unit_scale=PACK_CHUNK, mininterval=5, leave=False):
        hi = min(lo + PACK_CHUNK, n)
        requests = []
        for r in range(lo, hi):
            u = int(schedule.users[r])
            view = state_view(users.append_row(u) if schedule.classes[r] == APPEND else users.row(u))
            requests.append(GenerationRequest(view, k, frozenset(view.item_ids), ROUTE))
        batch = generator.gather(requests)
        vectors = engine.row_vectors(batch.rows) if batch.rows else None
        built += len(batch.where)
        for j, i in enumerate(batch.where):
            parts[lo + i] = (vectors[j], batch.excludes[j], batch.keys[j], batch.prints[j])
        while next_frame < len(by_last) and int(members[by_last[next_frame]][-1]) < hi:
            f = by_last[next_frame]
            frames[f] = _frame(engine, f, [parts[r] for r in members[f]], k, len(generator.index_to_item))
            for r in members[f]:
                parts[r] = None
            next_frame += 1
    return frames, n - built


def _frame(engine: Any, ident: int, parts: list[tuple | None], k: int, known: int) -> bytes | None:
    """One worker frame of these requests' rows (serving/remote_model.py ``RemoteModel.recommend_batch``)."""
    from serving.engine_ipc import MODEL, encode
    from serving.model_wire import ModelRows, encode_rows

    built = [p for p in parts if p is not None]
    if not built:
        return None
    rows = ModelRows(ROUTE, k, [p[2] for p in built], [p[3] for p in built], np.stack([p[0] for p in built]),
                     engine.exclusion_matrix([p[1] for p in built]), known)
    return encode(MODEL, ident, 0.0, encode_rows(rows))


def serve_frames(core: Any, times: np.ndarray, members: list[np.ndarray], send: np.ndarray,
                 frames: list[bytes | None]) -> tuple[np.ndarray, int]:
    """The engine loop over ``frames`` arriving at ``send`` (s): per request its latency from its own arrival
    ``times`` (ms; NaN: no row or refused), and how many requests the engine refused."""
    from serving.engine_ipc import MODEL_ANSWER, FrameDecoder

    latency = np.full(len(times), np.nan)
    inbox, answers = FrameDecoder(), FrameDecoder()
    expected = sum(frame is not None for frame in frames)
    done = refused = 0
    i = 0
    t0 = time.perf_counter()
    while done < expected:
        now = time.perf_counter() - t0
        j = int(np.searchsorted(send, now, side="right"))
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
            stamp = time.perf_counter() - t0
            for frame in answers.feed(bytes(out)):
                done += 1
                if frame.kind == MODEL_ANSWER:
                    asked = members[frame.ident]
                    latency[asked] = (stamp - times[asked]) * 1000.0
                else:
                    refused += len(members[frame.ident])
            continue
        until = send[i] - (time.perf_counter() - t0) if i < len(send) else float("inf")
        pause = min(until, wait if wait is not None else float("inf"))
        if pause > 100e-6:
            time.sleep(min(pause - 50e-6, 0.01))
    return latency, refused


def engine_rate(generator: Any, users: Users, schedule: Any, args: Any) -> dict[str, Any]:
    """One schedule: pack (untimed), then the timed engine loop; its row (without the config and rate)."""
    from serving.engine_model import ModelCore

    began = time.perf_counter()
    if args.engine_frames == "request":
        members, send = worker_frames(schedule.times, 1, 0.0, 1)
    else:
        members, send = worker_frames(schedule.times, args.workers, WORKER_WAIT_S, args.batch_max)
    frames, no_row = pack_frames(generator, users, schedule, args.k, members)
    packed_s = time.perf_counter() - began
    sizes: list[int] = []
    core = ModelCore({ROUTE: generator}, max_rows=args.engine_max_rows, queue_max=len(schedule.times) + 1, depth=2,
                     on_batch=sizes.append)
    gc.collect()
    gc.disable()
    try:
        latency, refused = serve_frames(core, schedule.times, members, send, frames)
    finally:
        gc.enable()
    answered = latency[~np.isnan(latency)]
    done_by = float(np.max(schedule.times[~np.isnan(latency)] + answered / 1000.0)) if len(answered) else 0.0
    values = answered.tolist()
    return {"requests": len(latency), "served_qps": round(len(answered) / max(done_by, args.duration), 1),
            "p50_ms": round(pct(values, 50), 2), "p99_ms": round(pct(values, 99), 2),
            "p999_ms": round(pct(values, 99.9), 2), "errors": refused, "fallbacks": no_row,
            "frames": sum(frame is not None for frame in frames),
            "mean_batch": round(float(np.mean(sizes)), 1) if sizes else 0.0, "packed_untimed_s": round(packed_s, 1),
            "planned_mix": {name: int((schedule.classes == c).sum()) for c, name in enumerate(CLASS_NAMES)}}


def engine_rows(checkpoint: str, users: Users, rates: list[float], args: Any) -> list[dict[str, Any]]:
    """Warm the cache on the seen pool (all misses), then one row per rate (stops past saturation), each after
    :data:`WARM_MIX_S` of its own mix, unmeasured: CUDA graphs are captured on a step shape's first use (append
    widths, sub-batch buckets), a one-time cost a long-running engine has paid."""
    from serving.ugt_generator import UGTGenerator

    gc.collect()  # the generator-alone group's model and KV pool, if it ran before, are gone before this one's
    if args.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    generator = UGTGenerator(checkpoint, kv_cache_users=len(users.ids), kv_cache_bytes=args.kv_cache_bytes,
                             kv_cache_admission=args.kv_admission, history_hop=args.history_hop,
                             rank_top=args.rank_top, paged_attention=getattr(args, "paged_attention", False),
                             live_items=0, device=args.device, max_batch=max(args.batch_max, args.engine_max_rows))
    users.reset()
    warm = make_schedule(50_000.0, min(args.warm_users, len(users.ids)) / 50_000.0, (1.0, 0.0, 0.0), 0,
                         len(users.ids), seed=999, popular_last=True)
    engine_rate(generator, users, warm, args)
    users.seen = warm.seen_after
    rows = []
    for n, rate in enumerate(rates):
        shapes = make_schedule(rate, WARM_MIX_S, args.mix_shares, users.seen, len(users.ids), args.seed + 500 + n)
        engine_rate(generator, users, shapes, args)
        users.seen = shapes.seen_after
        schedule = make_schedule(rate, args.duration, args.mix_shares, users.seen, len(users.ids), args.seed + n)
        before = dict(generator.engine.cache.stats()) if generator.engine.cache is not None else {}
        measured = engine_rate(generator, users, schedule, args)
        users.seen = schedule.seen_after
        after = dict(generator.engine.cache.stats()) if generator.engine.cache is not None else {}
        row = {"config": "generator-engine", "offered_qps": rate, **measured}
        for result in ("hit", "append", "miss", "refused"):  # refused (second_sight) are misses too
            row[f"cache_{result}"] = int(after.get(result, 0) - before.get(result, 0))
        # a user asked twice within one step: the later row runs in the scratch slot, not looked up (uncounted)
        counted = row["cache_hit"] + row["cache_append"] + row["cache_miss"]
        row["cache_repeat"] = row["requests"] - row["fallbacks"] - row["errors"] - counted
        rows.append(row)
        if row["p99_ms"] > 1000:
            break
    return rows
