"""EngineProcess: the HTTP process's own forked engine (serving/engine_core.py over a socket pair). Batching, errors,
timeouts, a dying or hung engine forked again, metrics from the engine, and no orphans.

The processes here are real forks; ``run_batch`` functions are plain functions of the batch, whose entries carry
the request fields the HTTP side sent (``entry.item.user_id``) and whose answers are the JSON bytes sent back.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from serving.app import create_app
from serving.batcher import BatcherClosed
from serving.config import ServingConfig
from serving.engine_core import EngineCore, MetricsHub, serve
from serving.engine_ipc import FAILED, EngineRefused, EngineUnavailable
from serving.engine_process import EngineProcess
from serving.fallback import PopularityFallback, PopularityGenerator
from serving.reranker import FilterReranker
from serving.service import Components

FORK = multiprocessing.get_context("fork")
REPO = Path(__file__).resolve().parents[2]


def engine_of(run_batch, *, max_size: int, max_wait_s: float, before: Callable[[], None] | None = None,
              render: Callable[[], bytes] = lambda: b"", **options) -> EngineProcess:
    """An EngineProcess whose child runs ``before()`` then the engine loop around ``run_batch``."""

    def main(sock, restarts):
        if before is not None:
            before()
        core = EngineCore(run_batch, max_size=max_size, max_wait_s=max_wait_s, queue_max=1024)
        serve(core, MetricsHub(render), sock=sock)

    return EngineProcess(main, **options)


def echo(entries):
    return [orjson.dumps(e.item.user_id) for e in entries]


async def ask(engine: EngineProcess, user: str, timeout_s: float | None = None):
    return orjson.loads(await engine.submit({"user_id": user}, timeout_s))


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

    def run_batch(entries):
        gate.wait(5)  # the first batch holds the engine while the rest queue up in its socket
        return [orjson.dumps([int(e.item.user_id) * 10, len(entries), os.getpid()]) for e in entries]

    async def body(engine):
        first = asyncio.ensure_future(ask(engine, "0"))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(ask(engine, str(i))) for i in range(1, 9)]
        await asyncio.sleep(0.1)
        gate.set()
        return await first, await asyncio.gather(*rest), engine.pid

    first, rest, pid = with_engine(engine_of(run_batch, max_size=8, max_wait_s=0.001), body)
    assert first[:2] == [0, 1]
    assert [r[0] for r in rest] == [i * 10 for i in range(1, 9)]
    assert {r[1] for r in rest} == {8}  # eight queued requests: one full batch
    assert first[2] == pid != os.getpid()  # answered in the engine, not here


def test_max_size_splits_batches():
    def run_batch(entries):
        time.sleep(0.05)
        return [orjson.dumps(len(entries))] * len(entries)

    async def body(engine):
        return await asyncio.gather(*[ask(engine, str(i)) for i in range(7)])

    sizes = with_engine(engine_of(run_batch, max_size=3, max_wait_s=0.01), body)
    assert max(sizes) == 3 and sum(1 for s in sizes if s == 3) >= 3


def test_an_error_in_the_batch_reaches_every_request_of_it():
    def run_batch(entries):
        if any(e.item.user_id == "bad" for e in entries):
            raise ValueError("bad item in batch")
        return echo(entries)

    async def body(engine):
        results = await asyncio.gather(ask(engine, "bad"), return_exceptions=True)
        return results, await ask(engine, "good")

    results, good = with_engine(engine_of(run_batch, max_size=4, max_wait_s=0.0), body)
    assert isinstance(results[0], EngineRefused) and results[0].kind == FAILED and "bad item" in str(results[0])
    assert good == "good"  # the engine lives on


def test_a_timed_out_request_does_not_disturb_the_next():
    def run_batch(entries):
        if entries[0].item.user_id == "slow":
            time.sleep(0.5)
        return echo(entries)

    async def body(engine):
        with pytest.raises(TimeoutError):
            await ask(engine, "slow", timeout_s=0.05)
        return await ask(engine, "fast", timeout_s=5)

    assert with_engine(engine_of(run_batch, max_size=1, max_wait_s=0.0), body) == "fast"


async def answer_after_restart(engine: EngineProcess, user: str, within_s: float) -> str:
    """``user``'s answer once the engine answers again (restarted within ``within_s``)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await ask(engine, user, timeout_s=0.5)
        except (TimeoutError, EngineUnavailable):  # still hung, or being restarted
            assert time.monotonic() < deadline, "the engine was not restarted"
            await asyncio.sleep(0.05)


def test_a_dying_engine_fails_its_requests_and_is_forked_again():
    def run_batch(entries):
        if entries[0].item.user_id == "die":
            os._exit(3)
        return echo(entries)

    async def body(engine):
        first_pid = engine.pid
        assert engine.health() == {"ok": True, "detail": f"engine process {first_pid} up, 0 restarts"}
        with pytest.raises(EngineUnavailable, match="exit code 3"):
            await ask(engine, "die", timeout_s=5)
        assert not engine.health()["ok"]  # until the new engine is forked (at most once a second)
        answer = await answer_after_restart(engine, "alive", 10)
        return first_pid, engine.pid, answer, engine.restarts, engine.health()

    engine = engine_of(run_batch, max_size=1, max_wait_s=0.0)
    first_pid, second_pid, answer, restarts, health = with_engine(engine, body)
    assert answer == "alive" and restarts == 1 and second_pid != first_pid
    assert health == {"ok": True, "detail": f"engine process {second_pid} up, 1 restarts"}
    assert engine.health() == {"ok": False, "detail": f"engine process {second_pid} restarting, 1 restarts"}  # closed


def test_an_engine_that_fails_at_start_is_forked_again_at_most_once_a_second():
    def broken(sock, restarts):
        raise RuntimeError("cannot start")

    async def body(engine):
        await asyncio.sleep(0.3)
        with pytest.raises(EngineUnavailable):
            await ask(engine, "u", timeout_s=1)
        await asyncio.sleep(1.5)
        return engine.restarts

    assert 1 <= with_engine(EngineProcess(broken), body) <= 2


def test_the_engine_runs_its_set_up_and_its_metrics_add_up_with_the_http_process():
    def before():
        os.environ["UGT_TEST_ENGINE_FORKED"] = "1"

    def run_batch(entries):
        return [orjson.dumps(os.environ.get("UGT_TEST_ENGINE_FORKED")) for _ in entries]

    def gauge(name: str) -> bytes:
        return f"# HELP {name} pid\n# TYPE {name} gauge\n{name} {os.getpid()}\n".encode()

    async def body(engine):
        return await ask(engine, "u"), await engine.metrics(), engine.pid

    engine = engine_of(run_batch, max_size=1, max_wait_s=0.0, before=before, render=lambda: gauge("engine_pid"),
                       exposition=lambda: gauge("http_pid"))
    flag, metrics, pid = with_engine(engine, body)
    assert flag == "1" and "UGT_TEST_ENGINE_FORKED" not in os.environ
    values = {s.name: s.value for f in text_string_to_metric_families(metrics.decode()) for s in f.samples}
    assert values == {"engine_pid": pid, "http_pid": os.getpid()}


def test_close_stops_the_engine_and_refuses_new_requests():
    engine = engine_of(echo, max_size=1, max_wait_s=0.0)

    async def body(engine):
        return await ask(engine, "1")

    assert with_engine(engine, body) == "1"
    assert not Path(f"/proc/{engine.pid}").exists() or _is_zombie(engine.pid)
    with pytest.raises(BatcherClosed):
        asyncio.run(ask(engine, "2"))


def test_the_engine_exits_when_the_server_process_is_killed():
    """A server killed with SIGKILL must not leave an engine behind (it would hold the port and the memory)."""
    script = textwrap.dedent("""
        import asyncio, os
        from serving.engine_core import EngineCore, MetricsHub, serve
        from serving.engine_process import EngineProcess

        def main(sock, restarts):
            core = EngineCore(lambda entries: [b"7" for _ in entries], max_size=1, max_wait_s=0.0, queue_max=8)
            serve(core, MetricsHub(lambda: b""), sock=sock)

        async def run():
            engine = EngineProcess(main)
            engine.start()
            assert await engine.submit({"user_id": "u"}) == b"7"
            print(engine.pid, flush=True)
            os.kill(os.getpid(), 9)

        asyncio.run(run())
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


def test_bad_batch_settings_are_refused():
    with pytest.raises(ValueError, match="max_size"):
        EngineCore(echo, max_size=0, max_wait_s=0.0, queue_max=1)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_messages_larger_than_the_socket_buffers_pass_both_ways(loop_kind):
    """uvicorn runs on uvloop, which makes watched sockets non-blocking: big batches arrive in pieces and
    big requests leave in pieces; neither may look like a dead engine (a bug this test caught)."""
    def run_batch(entries):
        return [orjson.dumps(e.item.user_id * 2) for e in entries]

    async def main(engine):
        users = [chr(65 + i) * 300_000 for i in range(32)]  # ~10 MB each way, far past the socket buffers
        answers = await asyncio.gather(*[ask(engine, u, timeout_s=30) for u in users])
        return users, answers, engine.restarts

    engine = engine_of(run_batch, max_size=16, max_wait_s=0.005)

    async def run():
        engine.start()
        try:
            return await main(engine)
        finally:
            engine.close()

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        users, answers, restarts = uvloop.run(run())
    else:
        users, answers, restarts = asyncio.run(run())
    assert answers == [u * 2 for u in users] and restarts == 0


def test_a_hung_engine_is_killed_by_the_watchdog_and_forked_again():
    def run_batch(entries):
        if entries[0].item.user_id == "hang":
            time.sleep(60)  # alive, not answering
        return echo(entries)

    async def body(engine):
        first_pid = engine.pid
        with pytest.raises(TimeoutError):  # the request has its own timeout (the HTTP layer's fallback)
            await ask(engine, "hang", timeout_s=0.2)
        answer = await answer_after_restart(engine, "alive", 15)
        return first_pid, engine.pid, answer, engine.restarts

    engine = engine_of(run_batch, max_size=1, max_wait_s=0.0, hang_timeout_s=1.0)
    first_pid, second_pid, answer, restarts = with_engine(engine, body)
    assert answer == "alive" and restarts == 1 and second_pid != first_pid
    assert not Path(f"/proc/{first_pid}").exists() or _is_zombie(first_pid)


def test_an_idle_engine_is_never_killed_by_the_watchdog():
    """Everything answered, then idle for longer than the hang timeout: the same engine, no restart. A request
    whose caller gave up (timeout) but which the engine answered later does not count as unanswered either.
    (A bug that killed every engine idle for 10 s, and so emptied its KV cache, was found by bench.serving.)"""
    def run_batch(entries):
        if entries[0].item.user_id == "slow":
            time.sleep(0.3)
        return echo(entries)

    async def body(engine):
        first_pid = engine.pid
        with pytest.raises(TimeoutError):
            await ask(engine, "slow", timeout_s=0.05)
        answers = [await ask(engine, u, timeout_s=5) for u in ("a", "b")]
        await asyncio.sleep(3.0)  # 3x the hang timeout, 15 watchdog rounds
        answers.append(await ask(engine, "c", timeout_s=5))
        return first_pid, engine.pid, answers, engine.restarts

    engine = engine_of(run_batch, max_size=1, max_wait_s=0.0, hang_timeout_s=1.0)
    first_pid, pid, answers, restarts = with_engine(engine, body)
    assert answers == ["a", "b", "c"] and restarts == 0 and pid == first_pid


class BadJSON:
    def to_json(self) -> bytes:
        raise ValueError("cannot encode")


def test_an_answer_that_cannot_be_encoded_or_sent_fails_alone():
    def run_batch(entries):
        out = {"bad-encoding": BadJSON(), "not-bytes": threading.Lock()}
        return [out.get(e.item.user_id, orjson.dumps(e.item.user_id)) for e in entries]

    async def body(engine):
        return await asyncio.gather(*[ask(engine, u, timeout_s=5) for u in ("ok", "bad-encoding", "not-bytes")],
                                    return_exceptions=True)

    ok, bad, not_bytes = with_engine(engine_of(run_batch, max_size=8, max_wait_s=0.05), body)
    assert ok == "ok"
    assert isinstance(bad, EngineRefused) and bad.kind == FAILED and "cannot encode" in str(bad)
    assert isinstance(not_bytes, EngineRefused) and not_bytes.kind == FAILED and "lock" in str(not_bytes)


def test_the_app_with_engine_process_keeps_the_rate_limit_health_and_metrics_in_the_engine():
    """The app's routes with the forked engine: its answers, /health's engine check, /metrics adding up both
    processes, and the per-key rate limit counted in the engine (as with `--workers N`)."""
    redis = FakeZsetRedis({"ugt:popularity:movie": {f"m{i}": 100 - i for i in range(1, 21)}})
    fallback = PopularityFallback(redis, None, clock=FakeClock())
    parts = Components(FakeStateReader({"u1": view("u1", ["m1"])}), PopularityGenerator(fallback), fallback,
                       FilterReranker())
    config = ServingConfig(engine="process", api_keys=["key-one-1"], rate_limit_rps=0.001, rate_limit_burst=3)
    with TestClient(create_app(config=config, components=parts, client=redis)) as client:
        pid = client.app.state.batcher.pid
        statuses = [client.post("/recommend", json={"user_id": "u1", "k": 2}, headers={"x-api-key": "key-one-1"})
                    for _ in range(4)]
        health = client.get("/health").json()["checks"]["engine"]
        text = client.get("/metrics").text
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert statuses[0].json()["items"][0]["item_id"] == "m2" and not statuses[0].json()["fallback"]
    assert health == {"ok": True, "detail": f"engine process {pid} up, 0 restarts"}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    assert values[("ugt_serving_stage_seconds_count", (("stage", "total"),))] == 3  # observed in the engine
    assert values[("ugt_serving_requests_total", (("endpoint", "/recommend"), ("status", "200")))] == 3  # HTTP
    assert values[("ugt_serving_engine_refused_total", (("reason", "rate_limited"),))] == 1  # the engine's count
