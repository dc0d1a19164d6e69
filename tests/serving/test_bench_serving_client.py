"""bench.serving's open-loop client against a tiny local HTTP server: every scheduled request is sent once and
answered, latencies count from the scheduled send time, and a slow server shows up in the percentiles."""

from __future__ import annotations

import asyncio
import json

from bench.serving import open_loop, summarize

ANSWER = json.dumps({"items": [], "timings_ms": {"total": 0.1}, "batch_size": 1, "fallback": False}).encode()


async def _serve(delay_s: float, seen: list[dict]) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                seen.append(json.loads(await reader.readexactly(length)))
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _run(delay_s: float, rate: float, duration_s: float, fresh_share: float = 0.0):
    seen: list[dict] = []

    async def main():
        server, port = await _serve(delay_s, seen)
        async with server:
            return await open_loop(port, rate, duration_s, ["u1", "u2", "u3"], 10, 8, 3, fresh_share, ["i1", "i2"])

    samples, wall = asyncio.run(main())
    return samples, wall, seen


def test_every_scheduled_request_is_sent_once_and_answered():
    samples, wall, seen = _run(0.0, rate=400.0, duration_s=0.5, fresh_share=0.5)
    assert 120 <= len(samples) <= 280  # Poisson count around 200
    assert len(seen) == len(samples)
    assert all(s.status == 200 and s.batch_size == 1 and s.timings == {"total": 0.1} for s in samples)
    assert {body["user_id"] for body in seen} == {"u1", "u2", "u3"}
    with_context = sum("context" in body for body in seen)
    assert 0.25 * len(seen) < with_context < 0.75 * len(seen)  # the fresh share, roughly
    send_times = [s.scheduled_s for s in samples]
    assert min(send_times) >= 0.0 and max(send_times) < 0.5
    row = summarize("local", 400.0, samples, wall)
    assert row["requests"] == len(samples) and row["non_200"] == 0


def test_a_slow_server_shows_in_the_latencies():
    """8 connections, 20 ms per answer: at most 400 answers/s, so 1,000 offered per second must queue, and the queue
    (counted from the scheduled time, not the send) is in the percentiles."""
    samples, wall, _ = _run(0.02, rate=1000.0, duration_s=0.3)
    lat = sorted(s.latency_ms for s in samples)
    assert lat[0] >= 19.0
    assert lat[-1] > 200.0  # ~300 requests through 8 connections at 20 ms each: the last wait ~0.75 s
