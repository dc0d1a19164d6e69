"""The open-loop HTTP load generator of bench.serving: Poisson arrivals, latency from each request's scheduled time.

Latency is measured from the SCHEDULED send time, so when the server (or the client) falls behind, the queueing
shows in the percentiles instead of silently lowering the load (coordinated omission). The client is a pool
of keep-alive HTTP/1.1 connections on asyncio, in the bench process.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

STAGES = ("queue", "state", "generate", "rerank", "total")  # the server's timings_ms, in its answer


@dataclass
class Sample:
    """One request's outcome: latency from its scheduled send, status, and the server's answer fields."""

    latency_ms: float
    status: int
    timings: dict[str, float] = field(default_factory=dict)
    scheduled_s: float = 0.0  # send time from the start of the load
    batch_size: int = 0
    fallback: bool = False


class Connection:
    """One keep-alive HTTP/1.1 connection; a request at a time (no pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def open_loop(port: int, rate: float, duration_s: float, users: list[str], k: int,
                    connections: int, seed: int, fresh_share: float = 0.0,
                    items: list[str] | None = None) -> tuple[list[Sample], float]:
    """Poisson arrivals at ``rate`` for ``duration_s``; latency from the scheduled time. (samples, wall s).

    A ``fresh_share`` of the requests carry one new session item in ``context`` (drawn from ``items``): that
    user's events differ from what the server saw last, as after a new event, so the model runs the whole
    sequence again (a KV-cache miss) instead of only the last event against the cached prefix.
    """
    rng = random.Random(seed)
    schedule, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        schedule.append(t)
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await Connection.open(port))
    samples: list[Sample] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(scheduled: float, body: bytes) -> None:
        conn = await pool.get()
        try:
            status, body = await conn.post(body)
        except (OSError, asyncio.IncompleteReadError):
            samples.append(Sample((loop.time() - scheduled) * 1000.0, 599, scheduled_s=scheduled - start))
            pool.put_nowait(await Connection.open(port))
            return
        done = loop.time()
        pool.put_nowait(conn)
        sample = Sample((done - scheduled) * 1000.0, status, scheduled_s=scheduled - start)
        if status == 200:
            answer = json.loads(body)
            sample.timings = answer.get("timings_ms") or {}
            sample.batch_size = answer.get("batch_size", 0)
            sample.fallback = bool(answer.get("fallback"))
        samples.append(sample)

    # only the requests still in flight are kept: gathering all of them at the end would walk every finished
    # task of the run while the last responses wait unread (+50 ms on the last requests at 30,000 a run)
    in_flight: set[asyncio.Future] = set()
    for i, offset in enumerate(schedule):
        scheduled = start + offset
        delay = scheduled - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        request: dict[str, Any] = {"user_id": users[i % len(users)], "k": k}
        if items and rng.random() < fresh_share:
            request["context"] = [rng.choice(items)]
        task = asyncio.ensure_future(one(scheduled, json.dumps(request).encode()))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    wall = loop.time() - start
    while not pool.empty():
        pool.get_nowait().close()
    return samples, wall


def pct(values: list[float], q: float) -> float:
    """The q-th percentile by rank (NaN when there are no values)."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100.0 * len(values)))]


def summarize(config: str, rate: float, samples: list[Sample], wall: float) -> dict[str, Any]:
    """One result row: achieved rate, latency percentiles, errors, and the server's per-stage split."""
    lat = [s.latency_ms for s in samples]
    ok = [s for s in samples if s.status == 200]
    row: dict[str, Any] = {
        "config": config,
        "qps": rate,
        "achieved_qps": round(len(samples) / wall, 1),
        "requests": len(samples),
        "p50_ms": round(pct(lat, 50), 3),
        "p99_ms": round(pct(lat, 99), 3),
        "p999_ms": round(pct(lat, 99.9), 3),
        "max_ms": round(max(lat), 3) if lat else float("nan"),
        "non_200": len(samples) - len(ok),
        "fallbacks": sum(s.fallback for s in ok),
    }
    with_timings = [s for s in ok if s.timings]
    if with_timings:
        row["mean_batch"] = round(statistics.fmean(s.batch_size for s in with_timings), 2)
        row["stages_ms"] = {
            stage: {
                "p50": round(pct([s.timings.get(stage, 0.0) for s in with_timings], 50), 3),
                "p99": round(pct([s.timings.get(stage, 0.0) for s in with_timings], 99), 3),
            }
            for stage in STAGES
        }
        # server-side total vs client latency: the rest is HTTP, event loop and the client itself
        row["http_p50_ms"] = round(row["p50_ms"] - row["stages_ms"]["total"]["p50"], 3)
    return row


def paused_gc_open_loop(*args: Any) -> tuple[list[Sample], float]:
    """open_loop with this process's garbage collector off: the client holds the trained model, the dataset and
    thousands of in-flight tasks, and a full collection here stalls every request in flight for 100-400 ms,
    which the percentiles would charge to the server."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        return asyncio.run(open_loop(*args))
    finally:
        gc.enable()
        gc.unfreeze()
