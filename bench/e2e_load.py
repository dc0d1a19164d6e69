"""The traffic of bench/serving_gpu_e2e.py: a request schedule with a KV-cache mix, the HTTP load processes that
send it, and the state-writer processes that stream new events into Redis ahead of the requests that follow them.

The schedule (made once, in the bench process) is Poisson arrivals at the offered rate; each request is a
*miss* (a user never requested before), a *hit* (a user seen before, no new event since) or an *append* (a user
seen before who has a new event since their last request), drawn with the mix's shares. Seen users are drawn
Zipf-like (s = 1: the i-th seen user with weight 1/i). An append's new event is written to the user's state in
Redis ``lead_s`` before the request is sent, by writer processes (the stream, as the user_state job would),
in Feast's layout (bench/state_bytes.py). The server's own KV-cache counters, read from /metrics, say what
the mix turned out to be (a hot user asked twice within ``lead_s`` sees both events at once).

The HTTP clients are open-loop: latency is measured from each request's SCHEDULED time (coordinated omission
shows as latency, not as a lower load). Each process sends every P-th request over its own pool of keep-alive
HTTP/1.1 connections (asyncio protocols, one request in flight per connection, more connections opened on demand).
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

MISS, HIT, APPEND = 0, 1, 2
CLASS_NAMES = ("miss", "hit", "append")
# what the forked load and writer processes read instead of receiving it pickled (hundreds of MB at high rates):
# set by :func:`share` in the bench process just before it forks them
_SHARED: dict[str, Any] = {}


def share(**values: Any) -> None:
    _SHARED.clear()
    _SHARED.update(values)


@dataclass
class Schedule:
    """Who asks when: ``times`` (s from the start), ``users`` (index into the bench's user list), ``classes``."""

    times: np.ndarray
    users: np.ndarray
    classes: np.ndarray
    seen_after: int  # users requested at least once after this schedule (the next schedule's seen pool)


def make_schedule(rate: float, duration_s: float, mix: tuple[float, float, float], seen: int, total_users: int,
                  seed: int, popular_last: bool = False) -> Schedule:
    """Poisson arrivals; ``mix`` = (miss, hit, append) shares; users 0..seen-1 have been requested before.

    A miss takes the next never-requested user (the schedule stops asking for misses when none is left).
    ``popular_last``: the misses' users in reverse order, the most popular (lowest index) last. A warm-up asks
    that way, so a KV pool smaller than the warmed set ends up holding the popular users, as a server that has
    been running does (in index order an LRU pool would keep the least popular)."""
    rng = np.random.default_rng(seed)
    n = int(rate * duration_s)
    times = np.cumsum(rng.exponential(1.0 / rate, size=n))
    classes = rng.choice(3, size=n, p=np.asarray(mix) / sum(mix))
    users = np.empty(n, dtype=np.int64)
    fresh = seen
    u = rng.random(n)
    for i in range(n):
        if classes[i] == MISS and fresh < total_users:
            users[i] = fresh
            fresh += 1
        else:
            if classes[i] == MISS:
                classes[i] = HIT  # no unseen user left
            users[i] = int((fresh if fresh else 1) ** u[i]) - 1  # Zipf-like (s = 1) over the seen users
    if popular_last:
        misses = classes == MISS
        users[misses] = users[misses][::-1]
    return Schedule(times, users, classes, fresh)


# -- the HTTP client -----------------------------------------------------------------------------------------
class _Client(asyncio.Protocol):
    """One keep-alive connection, one request at a time: ``send`` returns a future of (status, fallback)."""

    def __init__(self, pool: deque):
        self.pool = pool
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, payload: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((int(head[9:12]), b'"fallback":true' in body))

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((599, False))
        self.transport = None


def _request(user: str, k: int) -> bytes:
    body = b'{"user_id":"' + user.encode() + b'","k":' + str(k).encode() + b"}"
    return (b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


async def _send_all(port: int, start_at: float, times: np.ndarray, bodies: list[bytes], max_connections: int,
                    latency: np.ndarray, status: np.ndarray, fallback: np.ndarray) -> None:
    loop = asyncio.get_running_loop()
    idle: deque[_Client] = deque()
    opened = 0
    waiting: deque[asyncio.Future] = deque()  # requests waiting for a connection (all are open)

    async def connection() -> _Client:
        nonlocal opened
        while idle:
            client = idle.pop()
            if client.transport is not None:
                return client
            opened -= 1
        if opened < max_connections:
            opened += 1
            _, client = await loop.create_connection(lambda: _Client(idle), "127.0.0.1", port)
            return client
        ready = loop.create_future()
        waiting.append(ready)
        return await ready

    def release(client: _Client) -> None:
        if client.transport is None:
            nonlocal opened
            opened -= 1
            return
        if waiting:
            waiting.popleft().set_result(client)
        else:
            idle.append(client)

    offset = start_at - time.time()  # the processes share a wall-clock start; the loop's clock is monotonic
    t0 = loop.time() + offset

    async def one(i: int) -> None:
        scheduled = t0 + times[i]
        client = await connection()
        code, fell_back = await client.send(bodies[i])
        latency[i] = (loop.time() - scheduled) * 1000.0
        status[i], fallback[i] = code, fell_back
        release(client)

    pending: set[asyncio.Task] = set()
    for i in range(len(times)):
        delay = t0 + times[i] - loop.time()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    for client in idle:
        if client.transport is not None:
            client.transport.close()


def run_load(port: int, start_at: float, part: int, parts: int, k: int, max_connections: int) -> dict[str, Any]:
    """Load process ``part`` of ``parts``: send every parts-th request of the shared schedule at its time; latency
    (ms from schedule), status, fallback flags, and the process's CPU seconds."""
    schedule, users = _SHARED["schedule"], _SHARED["users"]
    times = schedule.times[part::parts]
    user_ids = [users.ids[int(u)] for u in schedule.users[part::parts]]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bodies = [_request(u, k) for u in user_ids]
    n = len(times)
    latency, status, fallback = np.zeros(n), np.zeros(n, np.int16), np.zeros(n, bool)
    gc.collect()
    gc.disable()  # a collection here would stall every request in flight and be charged to the server
    before = resource.getrusage(resource.RUSAGE_SELF)
    asyncio.run(_send_all(port, start_at, times, bodies, max_connections, latency, status, fallback))
    after = resource.getrusage(resource.RUSAGE_SELF)
    gc.enable()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"latency_ms": latency, "status": status, "fallback": fallback, "cpu_s": cpu, "pid": os.getpid()}


# -- the state writers ---------------------------------------------------------------------------------------
def run_writer(redis_port: int, start_at: float, part: int, parts: int, lead_s: float,
               batch_window_s: float = 0.002) -> dict[str, Any]:
    """Writer ``part`` of ``parts``: for each append request of the users it owns (user index % parts), write the
    user's state with one more event at the request's time - ``lead_s``, pipelined per window."""
    import redis

    from bench.state_bytes import StateWriter
    from infra.feast_store import FeastRedisLayout

    schedule, users = _SHARED["schedule"], _SHARED["users"]
    mine = np.flatnonzero((schedule.classes == APPEND) & (schedule.users % parts == part))
    times, owners = schedule.times[mine], schedule.users[mine]
    writer = StateWriter(redis.Redis(port=redis_port), FeastRedisLayout("ugt"))
    late = 0
    i, n = 0, len(times)
    before = resource.getrusage(resource.RUSAGE_SELF)
    while i < n:
        now = time.time() - start_at
        due = times[i] - lead_s
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        j = int(np.searchsorted(times, now + lead_s + batch_window_s, side="right"))
        late += int(np.sum(times[i:j] < now))  # already past its request's time: that request may miss it
        writer.write([users.append_row(int(u)) for u in owners[i:j]], datetime.now(timezone.utc))
        i = j
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"writes": n, "late": late,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
