"""Anchor (c) of bench/serving_gpu_e2e.py: the generator alone, with the same traffic mix, in this process.

The served model (serving/ugt_generator.py ``UGTGenerator``, on the GPU, with the same KV cache settings as the
service) answers the same kind of schedule (bench/e2e_load.py) without HTTP, IPC or Redis: the users' states
come from memory. Open loop: each step takes every request that has arrived (up to ``batch_max``) as one
batch; latency = completion - scheduled arrival, so queueing behind a busy GPU counts.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.e2e_load import APPEND, make_schedule
from bench.e2e_users import Users
from bench.http_load import pct


def state_view(row: dict[str, Any]):
    from serving.user_state_reader import UserStateView

    return UserStateView(user_id=row["user_id"], item_ids=tuple(row["recent_item_ids"]),
                         action_tokens=tuple(row["recent_action_tokens"]),
                         rating_tokens=tuple(row["recent_rating_tokens"]),
                         event_times=tuple(row["recent_event_times"]), event_count=row["event_count"],
                         last_event_time=row["last_event_time"], state_version=row["state_version"])


def _serve(generator: Any, users: Users, schedule, batch_max: int, k: int) -> tuple[np.ndarray, list[int]]:
    from serving.generator import GenerationRequest

    n = len(schedule.times)
    latency = np.zeros(n)
    sizes: list[int] = []
    i = 0
    t0 = time.perf_counter()
    while i < n:
        now = time.perf_counter() - t0
        if schedule.times[i] > now:
            time.sleep(max(0.0, schedule.times[i] - now - 50e-6))
            continue
        j = min(int(np.searchsorted(schedule.times, now, side="right")), i + batch_max)
        requests = []
        for r in range(i, j):
            u = int(schedule.users[r])
            row = users.append_row(u) if schedule.classes[r] == APPEND else users.row(u)
            view = state_view(row)
            requests.append(GenerationRequest(view, k, frozenset(view.item_ids), "movie"))
        generator.recommend_batch(requests)
        latency[i:j] = (time.perf_counter() - t0 - schedule.times[i:j]) * 1000.0
        sizes.append(j - i)
        i = j
    return latency, sizes


def generator_rows(checkpoint: str, users: Users, rates: list[float], args: Any) -> list[dict[str, Any]]:
    """Warm the cache on the seen pool, then one row per rate (stops past saturation)."""
    import gc

    from serving.ugt_generator import UGTGenerator

    generator = UGTGenerator(checkpoint, kv_cache_users=len(users.ids), kv_cache_bytes=args.kv_cache_bytes,
                             kv_cache_admission=args.kv_admission, history_hop=args.history_hop,
                             rank_top=args.rank_top, paged_attention=getattr(args, "paged_attention", False),
                             live_items=0, device=args.device)
    users.reset()
    warm = make_schedule(50_000.0, min(args.warm_users, len(users.ids)) / 50_000.0, (1.0, 0.0, 0.0), 0,
                         len(users.ids), seed=999, popular_last=True)
    _serve(generator, users, warm, args.batch_max, args.k)
    users.seen = warm.seen_after
    rows = []
    for n, rate in enumerate(rates):
        schedule = make_schedule(rate, args.duration, args.mix_shares, users.seen, len(users.ids), args.seed + n)
        before = dict(generator.engine.cache.stats()) if generator.engine.cache is not None else {}
        gc.collect()
        gc.disable()
        try:
            latency, sizes = _serve(generator, users, schedule, args.batch_max, args.k)
        finally:
            gc.enable()
        users.seen = schedule.seen_after
        after = dict(generator.engine.cache.stats()) if generator.engine.cache is not None else {}
        done_by = float(schedule.times[-1] + latency[-1] / 1000.0)
        row = {"config": "generator-alone", "offered_qps": rate, "requests": len(latency),
               "served_qps": round(len(latency) / max(done_by, args.duration), 1),
               "p50_ms": round(pct(latency.tolist(), 50), 2), "p99_ms": round(pct(latency.tolist(), 99), 2),
               "p999_ms": round(pct(latency.tolist(), 99.9), 2), "errors": 0, "fallbacks": 0,
               "mean_batch": round(float(np.mean(sizes)), 1)}
        for result in ("hit", "append", "miss", "refused"):  # refused (second_sight) are misses too
            row[f"cache_{result}"] = int(after.get(result, 0) - before.get(result, 0))
        rows.append(row)
        if row["p99_ms"] > 1000:
            break
    return rows
