"""The engine wire and engine of `--workers N` and engine: process: frames, admission (global rate limit, bounded
queue), batching, metrics hub, and a real engine process over a Unix socket answering an EngineClient, then dying
mid-request."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.batcher import DynamicBatcher, Overloaded
from serving.engine_core import EngineCore, MetricsHub, answer_frame, serve
from serving.engine_ipc import (
    ANSWER,
    BUSY,
    FAILED,
    HEADER,
    MAX_PAYLOAD,
    NO_POPULARITY,
    RATE_LIMITED,
    REQUEST,
    UNKNOWN_DOMAIN,
    EngineClient,
    EngineRefused,
    EngineUnavailable,
    FrameDecoder,
    FrameError,
    RateLimited,
    encode,
    request_payload,
)
from serving.fallback import NoPopularity
from serving.metrics import ServingMetrics, merge_expositions
from serving.ratelimit import RateLimiter
from serving.service import UnknownDomain

FORK = multiprocessing.get_context("fork")


def request_frame(ident: int, user: str, key: str | None = None, arrived: float = 0.0):
    data = encode(REQUEST, ident, arrived, request_payload({"user_id": user, "k": 3, "exclude": [], "domain": None,
                                                            "context": []}, key))
    (frame,) = FrameDecoder().feed(data)
    return frame


def test_frames_survive_any_split_of_the_stream():
    frames = [encode(ANSWER, i, i / 2, b"x" * i) for i in range(20)]
    stream = b"".join(frames)
    decoder = FrameDecoder()
    got = []
    for cut in range(0, len(stream), 7):  # 7-byte pieces cut headers and payloads anywhere
        got += decoder.feed(stream[cut : cut + 7])
    assert [(f.kind, f.ident, f.number, f.payload) for f in got] == [(ANSWER, i, i / 2, b"x" * i) for i in range(20)]
    assert decoder.buffer == bytearray()


def test_a_frame_announcing_too_much_is_refused():
    with pytest.raises(FrameError, match="over the"):
        FrameDecoder().feed(HEADER.pack(MAX_PAYLOAD + 1, ANSWER, 1, 0.0))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def echo_batch(entries):
    return [orjson.dumps({"user": e.item.user_id, "size": len(entries)}) for e in entries]


def test_the_rate_limit_of_a_key_holds_across_worker_connections():
    clock = Clock()
    core = EngineCore(echo_batch, max_size=8, max_wait_s=0.01, queue_max=100,
                      limiter=RateLimiter(rate=1.0, burst=2, clock=clock), clock=clock)
    assert core.admit(1, request_frame(1, "a", key="k1")) is None  # worker 1
    assert core.admit(2, request_frame(1, "b", key="k1")) is None  # worker 2, same key
    refused = FrameDecoder().feed(core.admit(1, request_frame(2, "c", key="k1")))[0]
    assert (refused.kind, refused.ident) == (RATE_LIMITED, 2) and refused.number == pytest.approx(1.0)
    assert core.admit(2, request_frame(3, "d", key="k2")) is None  # another key has its own bucket
    clock.now += 1.0
    assert core.admit(2, request_frame(4, "e", key="k1")) is None  # refilled after a second


def test_a_full_queue_refuses_at_once_and_a_full_batch_runs_without_waiting():
    clock = Clock()
    depths: list[int] = []
    core = EngineCore(echo_batch, max_size=2, max_wait_s=1.0, queue_max=3, clock=clock, on_queue=depths.append)
    for ident in range(3):
        assert core.admit(ident % 2, request_frame(ident, f"u{ident}", arrived=clock.now)) is None
    busy = FrameDecoder().feed(core.admit(0, request_frame(9, "late")))[0]
    assert (busy.kind, busy.ident, busy.number) == (BUSY, 9, 1.0)
    assert core.due_in() == 0.0  # two waiting = a full batch
    answers = core.run_due()
    assert sorted(answers) == [0, 1]  # one write per worker connection
    (first,) = FrameDecoder().feed(bytes(answers[0]))
    assert (first.kind, first.ident, orjson.loads(first.payload)) == (ANSWER, 0, {"user": "u0", "size": 2})
    assert core.due_in() == pytest.approx(1.0)  # one left: it waits for company up to max_wait
    assert core.run_due() == {}
    clock.now += 1.0
    (last,) = FrameDecoder().feed(bytes(core.run_due()[0]))
    assert orjson.loads(last.payload) == {"user": "u2", "size": 1}
    assert core.due_in() is None and depths[-1] == 0


def test_refusals_travel_as_their_own_kinds():
    def kind(result, error=None):
        return FrameDecoder().feed(answer_frame(5, result, error))[0].kind

    assert kind(UnknownDomain("nope")) == UNKNOWN_DOMAIN
    assert kind(NoPopularity("empty")) == NO_POPULARITY
    assert kind(None, RuntimeError("bug")) == FAILED
    assert kind(b'{"ok": 1}') == ANSWER


def parsed(text: bytes) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_the_hub_adds_up_workers_keeps_the_dead_ones_counts_and_does_not_sum_gauges():
    engine, one, two = ServingMetrics(), ServingMetrics(), ServingMetrics()
    engine.engine_queue.set(7)
    one.engine_queue.set(100)  # a gauge another process also reports: not added
    one.requests.labels("/recommend", "200").inc(3)
    two.requests.labels("/recommend", "200").inc(4)
    hub = MetricsHub(engine.render)
    hub.update(11, one.render())
    hub.update(12, two.render())
    ok = ("ugt_serving_requests_total", (("endpoint", "/recommend"), ("status", "200")))
    assert parsed(hub.render())[ok] == 7
    assert parsed(hub.render())[("ugt_serving_engine_queue", ())] == 7  # the engine's, first
    hub.retire(11)  # worker 11 died: its 3 stay in the total
    hub.update(13, ServingMetrics().render())  # its replacement starts from zero
    assert parsed(hub.render())[ok] == 7
    assert parsed(merge_expositions(hub.render()))[ok] == 7  # a fixed point


def test_a_bounded_batcher_refuses_past_its_queue():
    batcher = DynamicBatcher(lambda entries: [e.item for e in entries], max_size=1, max_wait_s=0.0, max_queue=0)

    async def main():
        with pytest.raises(Overloaded):
            await batcher.submit(1)

    asyncio.run(main())


def _engine(path: str, parent: int) -> None:
    def run_batch(entries):
        if any(e.item.user_id == "hang" for e in entries):
            time.sleep(30)
        if any(e.item.user_id == "nowhere" for e in entries):
            return [UnknownDomain("domain 'x' is not served") for _ in entries]
        return [orjson.dumps({"user": e.item.user_id, "pid": os.getpid()}) for e in entries]

    core = EngineCore(run_batch, max_size=16, max_wait_s=0.001, queue_max=64,
                      limiter=RateLimiter(rate=0.001, burst=3))
    serve(core, MetricsHub(lambda: b""), path=path, parent_pid=parent)


def test_a_client_is_answered_by_a_real_engine_and_gets_engine_unavailable_when_it_dies(tmp_path):
    path = str(tmp_path / "engine.sock")
    engine = FORK.Process(target=_engine, args=(path, os.getpid()), daemon=True)
    engine.start()
    fields = {"user_id": "u1", "k": 3, "exclude": [], "domain": None, "context": []}

    async def main():
        client = EngineClient(path)
        client.start()
        deadline = time.monotonic() + 10
        while not client.connected:
            assert time.monotonic() < deadline, "the client did not connect"
            await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(client.submit(fields | {"user_id": f"u{i}"}, 5.0) for i in range(3)))
        with pytest.raises(RateLimited):  # burst 3: the fourth of the one key is refused
            await client.submit(fields, 5.0, limit_key="anonymous")
        with pytest.raises(EngineRefused):
            await client.submit(fields | {"user_id": "nowhere"}, 5.0, limit_key="other")
        hung = asyncio.ensure_future(client.submit(fields | {"user_id": "hang"}, 10.0, limit_key="third"))
        await asyncio.sleep(0.3)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineUnavailable):
            await hung
        client.close()
        return answers

    answers = asyncio.run(main())
    assert [orjson.loads(a)["user"] for a in answers] == ["u0", "u1", "u2"]
    assert {orjson.loads(a)["pid"] for a in answers} == {engine.pid}
    engine.join(5)
