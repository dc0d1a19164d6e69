"""EngineProcess: the batcher in a forked process. Batching, errors, timeouts, a dying engine, and no orphans.

The processes here are real forks; ``process`` functions are plain functions of the batch.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from serving.batcher import BatcherClosed
from serving.engine_process import EngineProcess, EngineUnavailable, FrameReader, frame

FORK = multiprocessing.get_context("fork")
REPO = Path(__file__).resolve().parents[2]


def with_engine(engine: EngineProcess, body):
    """Run ``body(engine)`` on an event loop with the engine started, and close it after."""

    async def main():
        engine.start()
        try:
            return await body(engine)
        finally:
            engine.close()

    return asyncio.run(main())


def test_requests_queued_while_the_engine_is_busy_share_one_batch():
    gate = FORK.Event()

    def process(entries):
        gate.wait(5)  # the first batch holds the engine while the rest queue up in its socket
        return [(e.item * 10, len(entries), os.getpid()) for e in entries]

    async def body(engine):
        first = asyncio.ensure_future(engine.submit(0))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(engine.submit(i)) for i in range(1, 9)]
        await asyncio.sleep(0.1)
        gate.set()
        return await first, await asyncio.gather(*rest), engine.pid

    first, rest, pid = with_engine(EngineProcess(process, max_size=8, max_wait_s=0.001), body)
    assert first[:2] == (0, 1)
    assert [r[0] for r in rest] == [i * 10 for i in range(1, 9)]
    assert {r[1] for r in rest} == {8}  # eight queued requests: one full batch
    assert first[2] == pid != os.getpid()  # answered in the engine, not here


def test_max_size_splits_batches_and_encode_runs_in_the_engine():
    def process(entries):
        time.sleep(0.05)
        return [len(entries)] * len(entries)

    async def body(engine):
        return await asyncio.gather(*[engine.submit(i) for i in range(7)])

    engine = EngineProcess(process, max_size=3, max_wait_s=0.01, encode=lambda size: f"{size}@{os.getpid()}")
    answers = with_engine(engine, body)
    sizes = [int(a.split("@")[0]) for a in answers]
    assert max(sizes) == 3 and sum(1 for s in sizes if s == 3) >= 3
    assert all(a.split("@")[1] != str(os.getpid()) for a in answers)


def test_an_error_in_process_reaches_every_request_of_its_batch():
    def process(entries):
        if any(e.item == "bad" for e in entries):
            raise ValueError("bad item in batch")
        return [e.item for e in entries]

    async def body(engine):
        results = await asyncio.gather(engine.submit("bad"), return_exceptions=True)
        return results, await engine.submit("good")

    results, good = with_engine(EngineProcess(process, max_size=4, max_wait_s=0.0), body)
    assert isinstance(results[0], ValueError) and "bad item" in str(results[0])
    assert good == "good"  # the engine lives on


def test_a_timed_out_request_does_not_disturb_the_next():
    def process(entries):
        if entries[0].item == "slow":
            time.sleep(0.5)
        return [e.item for e in entries]

    async def body(engine):
        with pytest.raises(TimeoutError):
            await engine.submit("slow", timeout_s=0.05)
        return await engine.submit("fast", timeout_s=5)

    assert with_engine(EngineProcess(process, max_size=1, max_wait_s=0.0), body) == "fast"


async def answer_after_restart(engine: EngineProcess, item: str, within_s: float) -> str:
    """``item``'s answer once the engine answers again (restarted within ``within_s``)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await engine.submit(item, timeout_s=0.5)
        except (TimeoutError, EngineUnavailable):  # still hung, or being restarted
            assert time.monotonic() < deadline, "the engine was not restarted"
            await asyncio.sleep(0.05)


def test_a_dying_engine_fails_its_requests_and_is_forked_again():
    def process(entries):
        if entries[0].item == "die":
            os._exit(3)
        return [e.item for e in entries]

    async def body(engine):
        first_pid = engine.pid
        with pytest.raises(EngineUnavailable, match="exit code 3"):
            await engine.submit("die", timeout_s=5)
        answer = await answer_after_restart(engine, "alive", 10)  # within RESTART_MIN_INTERVAL_S of the start
        return first_pid, engine.pid, answer, engine.restarts

    engine = EngineProcess(process, max_size=1, max_wait_s=0.0)
    first_pid, second_pid, answer, restarts = with_engine(engine, body)
    assert answer == "alive" and restarts == 1 and second_pid != first_pid
    assert engine.health() == {"ok": False, "detail": f"engine process {second_pid} restarting, 1 restarts"}  # closed


def test_after_fork_and_metrics_run_in_the_engine():
    def after_fork():
        os.environ["UGT_TEST_ENGINE_FORKED"] = "1"

    def process(entries):
        return [os.environ.get("UGT_TEST_ENGINE_FORKED") for _ in entries]

    async def body(engine):
        return await engine.submit(None), await engine.metrics(), engine.pid

    engine = EngineProcess(process, max_size=1, max_wait_s=0.0, after_fork=after_fork,
                           render_metrics=lambda: f"engine_pid {os.getpid()}\n".encode())
    flag, metrics, pid = with_engine(engine, body)
    assert flag == "1" and "UGT_TEST_ENGINE_FORKED" not in os.environ
    assert metrics == f"engine_pid {pid}\n".encode()


def test_close_stops_the_engine_and_refuses_new_requests():
    engine = EngineProcess(lambda entries: [e.item for e in entries], max_size=1, max_wait_s=0.0)

    async def body(engine):
        return await engine.submit(1)

    assert with_engine(engine, body) == 1
    assert not Path(f"/proc/{engine.pid}").exists() or _is_zombie(engine.pid)
    with pytest.raises(BatcherClosed):
        asyncio.run(engine.submit(2))


def test_the_engine_exits_when_the_server_process_is_killed():
    """A server killed with SIGKILL must not leave an engine behind (it would hold the port and the memory)."""
    script = textwrap.dedent("""
        import asyncio, os, sys
        from serving.engine_process import EngineProcess

        async def main():
            engine = EngineProcess(lambda entries: [e.item for e in entries], max_size=1, max_wait_s=0.0)
            engine.start()
            assert await engine.submit(7) == 7
            print(engine.pid, flush=True)
            os.kill(os.getpid(), 9)

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=os.environ | {"PYTHONPATH": str(REPO)})
    assert out.returncode == -9, out.stderr
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and not _is_zombie(pid):
        assert time.monotonic() < deadline, f"engine {pid} outlived its server"
        time.sleep(0.05)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_size"):
        EngineProcess(lambda entries: [], max_size=0, max_wait_s=0.0)


def test_frames_split_anywhere_are_put_back_together():
    messages = [frame(("a", i, b"x" * (i * 1000))) for i in range(5)]
    stream = b"".join(messages)
    reader, out = FrameReader(), []
    for i in range(0, len(stream), 7):  # in 7-byte pieces
        out += reader.feed(stream[i : i + 7])
    assert [pickle.loads(m) for m in out] == [("a", i, b"x" * (i * 1000)) for i in range(5)]
    assert reader.buffer == bytearray()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_messages_larger_than_the_socket_buffers_pass_both_ways(loop_kind):
    """uvicorn runs on uvloop, which makes watched sockets non-blocking: big batches arrive in pieces and
    big requests leave in pieces; neither may look like a dead engine (a bug this test caught)."""
    def process(entries):
        return [e.item * 2 for e in entries]

    async def body(engine):
        payloads = [bytes([i]) * 300_000 for i in range(32)]  # ~10 MB each way, far past the socket buffers
        return payloads, await asyncio.gather(*[engine.submit(p, timeout_s=30) for p in payloads]), engine.restarts

    engine = EngineProcess(process, max_size=16, max_wait_s=0.005)

    async def main():
        engine.start()
        try:
            return await body(engine)
        finally:
            engine.close()

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        payloads, answers, restarts = uvloop.run(main())
    else:
        payloads, answers, restarts = asyncio.run(main())
    assert answers == [p * 2 for p in payloads] and restarts == 0


def test_a_hung_engine_is_killed_by_the_watchdog_and_forked_again():
    def process(entries):
        if entries[0].item == "hang":
            time.sleep(60)  # alive, not answering
        return [e.item for e in entries]

    async def body(engine):
        first_pid = engine.pid
        with pytest.raises(TimeoutError):  # the request has its own timeout (the HTTP layer's fallback)
            await engine.submit("hang", timeout_s=0.2)
        answer = await answer_after_restart(engine, "alive", 15)
        return first_pid, engine.pid, answer, engine.restarts

    engine = EngineProcess(process, max_size=1, max_wait_s=0.0, hang_timeout_s=1.0)
    first_pid, second_pid, answer, restarts = with_engine(engine, body)
    assert answer == "alive" and restarts == 1 and second_pid != first_pid
    assert not Path(f"/proc/{first_pid}").exists() or _is_zombie(first_pid)


def test_an_idle_engine_is_never_killed_by_the_watchdog():
    """Everything answered, then idle for longer than the hang timeout: the same engine, no restart. A request
    whose caller gave up (timeout) but which the engine answered later does not count as unanswered either.
    (A bug that killed every engine idle for 10 s, and so emptied its KV cache, was found by bench.serving.)"""
    def process(entries):
        if entries[0].item == "slow":
            time.sleep(0.3)
        return [e.item for e in entries]

    async def body(engine):
        first_pid = engine.pid
        with pytest.raises(TimeoutError):
            await engine.submit("slow", timeout_s=0.05)
        answers = [await engine.submit(i, timeout_s=5) for i in ("a", "b")]
        await asyncio.sleep(3.0)  # 3x the hang timeout, 6 watchdog rounds
        answers.append(await engine.submit("c", timeout_s=5))
        return first_pid, engine.pid, answers, engine.restarts

    engine = EngineProcess(process, max_size=1, max_wait_s=0.0, hang_timeout_s=1.0)
    first_pid, pid, answers, restarts = with_engine(engine, body)
    assert answers == ["a", "b", "c"] and restarts == 0 and pid == first_pid


def test_an_answer_that_cannot_be_encoded_or_sent_fails_alone():
    import threading

    def process(entries):
        return [threading.Lock() if e.item == "unpicklable" else e.item for e in entries]

    def encode(result):
        if result == "bad-encoding":
            raise ValueError("cannot encode")
        return result

    async def body(engine):
        return await asyncio.gather(*[engine.submit(i, timeout_s=5) for i in ("ok", "bad-encoding", "unpicklable")],
                                    return_exceptions=True)

    ok, bad, unpicklable = with_engine(EngineProcess(process, max_size=8, max_wait_s=0.05, encode=encode), body)
    assert ok == "ok"
    assert isinstance(bad, ValueError) and "cannot encode" in str(bad)
    assert isinstance(unpicklable, RuntimeError) and "cannot be sent" in str(unpicklable)
