"""DynamicBatcher: concurrent submits share a batch, a lone request waits at most max_wait, errors reach everyone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.batcher import BatcherClosed, DynamicBatcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_submits_are_batched_together():
    gate = threading.Event()
    batches: list[list[int]] = []

    def process(entries):
        gate.wait(5)  # the first batch holds the worker while the rest queue up
        batches.append([e.item for e in entries])
        return [e.item * 10 for e in entries]

    batcher = DynamicBatcher(process, max_size=8, max_wait_s=0.001)

    async def main():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 9)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(main())
    batcher.close()
    assert first == 0 and rest == [i * 10 for i in range(1, 9)]
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7, 8]]  # 8 queued requests: one full batch, in order


def test_max_size_splits_batches():
    gate = threading.Event()
    sizes: list[int] = []

    def process(entries):
        gate.wait(5)
        return [e.item for e in entries]

    batcher = DynamicBatcher(process, max_size=3, max_wait_s=0.0, on_batch=sizes.append)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(7)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks)

    assert run(main()) == list(range(7))
    batcher.close()
    assert max(sizes) == 3 and sum(sizes) == 7


def test_a_lone_request_waits_at_most_max_wait():
    batcher = DynamicBatcher(lambda entries: [e.item for e in entries], max_size=64, max_wait_s=0.02)

    async def main():
        started = time.perf_counter()
        await batcher.submit(1)
        return time.perf_counter() - started

    took = run(main())
    batcher.close()
    assert 0.015 <= took < 0.5


def test_a_failing_batch_fails_each_of_its_requests_and_the_worker_goes_on():
    calls = []

    def process(entries):
        calls.append(len(entries))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [e.item for e in entries]

    batcher = DynamicBatcher(process, max_size=4, max_wait_s=0.0)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(1)
        return await batcher.submit(2)

    assert run(main()) == 2
    batcher.close()


def test_wrong_result_count_is_an_error_not_a_hang():
    batcher = DynamicBatcher(lambda entries: [], max_size=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        run(batcher.submit(1))
    batcher.close()


def test_closed_batcher_refuses_and_bad_bounds_are_rejected():
    batcher = DynamicBatcher(lambda entries: [e.item for e in entries], max_size=1, max_wait_s=0.0)
    batcher.close()
    with pytest.raises(BatcherClosed):
        run(batcher.submit(1))
    with pytest.raises(ValueError):
        DynamicBatcher(lambda e: e, max_size=0, max_wait_s=0.0)


def test_deadlines_expire_in_order_with_one_timer_and_drop_the_answered():
    from serving.batcher import Deadlines

    async def body():
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(loop)
        answered, late = loop.create_future(), loop.create_future()
        assert deadlines.add(answered, 0.05) is None and deadlines.add(late, 0.05) is None
        first_timer = deadlines.timer
        answered.set_result("on time")
        early = loop.create_future()
        own = deadlines.add(early, 0.001)  # before the last deadline: its own timer, not the queue's
        assert own is not None and deadlines.timer is first_timer and len(deadlines.waiting) == 2
        await asyncio.sleep(0.02)
        assert isinstance(early.exception(), TimeoutError) and not late.done()
        await asyncio.sleep(0.08)
        assert isinstance(late.exception(), TimeoutError)
        assert answered.result() == "on time" and not deadlines.waiting and deadlines.timer is None

    run(body())


def test_a_request_past_its_timeout_gets_timeout_error_and_the_next_ones_still_answer():
    gate = threading.Event()

    def process(entries):
        gate.wait(5)
        return [e.item for e in entries]

    batcher = DynamicBatcher(process, max_size=1, max_wait_s=0.0)

    async def body():
        slow = asyncio.ensure_future(batcher.submit(1, timeout_s=0.05))
        with pytest.raises(TimeoutError):
            await slow
        gate.set()
        return await batcher.submit(2, timeout_s=5.0)

    try:
        assert run(body()) == 2
    finally:
        batcher.close()
