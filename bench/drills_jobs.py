"""The failure drills under the nearline jobs (issue #20), each a plain function of a running cluster-profile stack.

Every drill does what a user of `ugt stack up --profile cluster` does: tokenize (exactly-once delivery) and
user_state run on the stack's Flink at the profile's parallelism (2) over topics of their own, and ML-1M events,
renamed for the run, stream into them at a steady rate from streams.producer.EventPublisher. Once user_state has
applied a third of them and completed a checkpoint, the drill breaks one thing:

* ``redis_master_drill``: `kill -9` the Redis Cluster master that holds the run's popularity set (user_state writes
  there on every flush, `--redis-wait-replicas` at its cluster default 1). failover_s: until another node serves
  that slot; recovery_s: until user_state runs again, restored from its checkpoint. The node is started again.
  Meanwhile `ugt serve` answers /recommend for the stream's users (bench/drills_serving.py): fallback_answers
  counts the fallbacks the failure caused, with their reasons and their window from the kill.
* ``taskmanager_drill``: `kill -9` the TaskManager running user_state's first subtask. failover_s: until the
  JobManager has failed the job over; recovery_s: until it runs again on the other TaskManagers, restored from its
  checkpoint. A new TaskManager is started afterwards.
* ``restart_drill``: half the events published, `ugt jobs stop` both jobs (savepoints), `ugt stack down`,
  `ugt stack up` (cluster profile), `ugt jobs submit --from-savepoint` both, then the other half.

Then the online state is compared with the offline fold of the same events (contracts.user_state_rule.fold_events,
what tests/integration/test_user_state_exactly_once.py compares with): lost / doubled = popularity counts below /
above the fold's (each applied event counts its item once), users_differing = users whose `user_recent_events`
row in Feast differs from the fold's. Used by bench/drills.py and tests/integration/test_drills_cluster.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from bench.drills_serving import ServingLoad
from contracts.datasets import load_dataset, user_events
from contracts.redis_keys import applied_key, popularity_key
from contracts.tokenizer import tokenize_event
from contracts.user_state_rule import FEATURE_NAMES, fold_events
from infra import stack as stack_mod
from infra.flink_home import flink_env, flink_pid_dir, pyflink_home
from infra.processes import pid_alive, read_pids, spawn, write_pids
from infra.redis_client import redis_client
from infra.settings import REPO_ROOT, Settings
from infra.stack_cluster import redis_cluster_commands, redis_cluster_healthy
from jobs import cli as jobs_cli
from streams.producer import EventPublisher
from streams.topics import TopicSpec, ensure_pipeline, ensure_topics

MAX_EVENTS = 50  # user_state's window (a small one, so the drills cover its spill to the long-term history)
LATENESS_S = 86_400
CHECKPOINT_MS = 2000
SETTLE_QUIET_S = 90.0  # no progress for this long once the stream ended: what is missing is lost


def wait_until(check, timeout_s: float, what: str, every_s: float = 0.25):
    """check()'s first truthy value, polled; raises TimeoutError naming `what` at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"drill: {what} not within {timeout_s:.0f} s")
        time.sleep(every_s)


def flink_get(s: Settings, path: str) -> dict[str, Any]:
    """GET the stack's Flink REST API ({} while it does not answer, e.g. during a restart)."""
    try:
        response = requests.get(f"{s.flink_rest_url}{path}", timeout=5)
        return response.json() if response.ok else {}
    except (requests.RequestException, ValueError):
        return {}


@dataclass
class JobsRun:
    """One drill's topics, events, offline reference and running jobs."""

    s: Settings
    events: list[dict[str, Any]]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    jids: dict[str, str] = field(default_factory=dict)
    expected_popularity: dict[str, int] = field(default_factory=dict)
    expected_rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def raw(self) -> str:
        return f"drill-{self.run}.raw"

    @property
    def tokens(self) -> str:
        return f"drill-{self.run}.tokens"

    @property
    def dlq(self) -> str:
        return f"drill-{self.run}.dlq"

    @property
    def domain(self) -> str:
        return f"dr{self.run}"

    def job_args(self, job: str) -> list[str]:
        """The drill's own topics, groups and a 2 s checkpoint interval; parallelism and Redis waits as the profile
        sets them (2; `--redis-wait-replicas` 1 on a Redis Cluster)."""
        common = ["--startup", "earliest", "--checkpoint-interval-ms", str(CHECKPOINT_MS),
                  "--group-id", f"drill-{self.run}-{job}", "--dlq-topic", self.dlq]
        if job == "tokenize":
            return [*common, "--delivery", "exactly-once", "--source-topic", self.raw, "--tokens-topic", self.tokens]
        return [*common, "--source-topic", self.tokens, "--max-events", str(MAX_EVENTS),
                "--allowed-lateness-s", str(LATENESS_S), "--flush-ms", "200"]


def ensure_feast_applied(s: Settings) -> None:
    """`feast apply` once, when the registry lacks user_state's view (what a user does once after `stack up`)."""
    from infra.feast_store import open_feature_store

    try:
        open_feature_store(s).get_feature_view("user_recent_events")
    except Exception:
        feast = os.path.join(os.path.dirname(sys.executable), "feast")
        subprocess.run([feast, "-c", str(s.feature_repo), "apply"], check=True, capture_output=True, timeout=300)


def submit(s: Settings, job: str, args: list[str], savepoint: str | None = None) -> str:
    """`ugt jobs submit <job> --detached [--from-savepoint P] -- <args>`, quietly; the job id."""
    command = jobs_cli.job_command(job, args, detached=True, savepoint=savepoint)
    out = subprocess.run(command, env=flink_env(s), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    found = re.search(r"JobID ([0-9a-f]{32})", out.stdout + out.stderr)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"flink run {job} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return found.group(1)


def submit_jobs(run: JobsRun, savepoints: dict[str, str] | None = None) -> None:
    """tokenize and user_state submitted side by side (each `flink run` client is a JVM and a Python of its own:
    ~30 s apart on a 2-core box), then waited for until every vertex runs."""
    savepoints = savepoints or {}
    with ThreadPoolExecutor(2) as pool:
        jids = {job: pool.submit(submit, run.s, job, run.job_args(job), savepoints.get(job))
                for job in ("tokenize", "user_state")}
        run.jids.update({job: future.result() for job, future in jids.items()})
    for job, jid in run.jids.items():
        wait_until(lambda jid=jid: job_running(run.s, jid), 300, f"{job} running")


def job_running(s: Settings, jid: str) -> bool:
    job = flink_get(s, f"/jobs/{jid}")
    vertices = job.get("vertices") or []
    return job.get("state") == "RUNNING" and bool(vertices) and all(v["status"] == "RUNNING" for v in vertices)


def start_run(s: Settings, n_events: int) -> JobsRun:
    """Topics, the renamed events and their offline fold, and both jobs submitted and running."""
    dataset = load_dataset("ml-1m")
    run = JobsRun(s, [])
    run.events = [{**e, "user_id": f"d{run.run}-{e['user_id']}", "event_id": f"d{run.run}-{e['event_id']}",
                   "domain": run.domain} for e in user_events(dataset, limit=n_events)]
    ensure_topics(s, extra=[TopicSpec(run.raw), TopicSpec(run.tokens), TopicSpec(run.dlq, 1)])
    ensure_feast_applied(s)
    token_events = [tokenize_event(e) for e in run.events]
    states, late = fold_events(token_events, MAX_EVENTS, LATENESS_S * 1000)
    late_ids = {t.event_id for t in late}
    run.expected_popularity = dict(Counter(t.item_id for t in token_events if t.event_id not in late_ids))
    run.expected_rows = {u: state.to_feature_row() for u, state in states.items()}
    submit_jobs(run)
    return run


def publish(s: Settings, events: list[dict[str, Any]], topic: str, rate: float) -> None:
    """Publish at about `rate` events/s (acks=all, idempotent), then flush."""
    started = time.monotonic()
    with EventPublisher(s) as publisher:
        for i, event in enumerate(events):
            ahead = i / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
            publisher.publish_user_event(event, topic=topic)
        publisher.flush(timeout_s=180)


def publish_in_background(run: JobsRun, events: list[dict[str, Any]], rate: float) -> threading.Thread:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            publish(run.s, events, run.raw, rate)
        except BaseException as exc:  # noqa: BLE001 - handed to the drill, which raises it
            errors.append(exc)
            raise

    thread = threading.Thread(target=target, name="drill-publish", daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def popularity(run: JobsRun) -> dict[str, int]:
    client = redis_client(run.s)
    return {k.decode(): int(v) for k, v in client.zrange(popularity_key(run.domain), 0, -1, withscores=True)}


def applied(run: JobsRun) -> int:
    try:
        return sum(popularity(run).values())
    except Exception:  # noqa: BLE001 - the cluster is failing over: nothing to count this instant
        return -1


def completed_checkpoints(run: JobsRun, job: str = "user_state") -> int:
    return int(flink_get(run.s, f"/jobs/{run.jids[job]}/checkpoints").get("counts", {}).get("completed", 0))


def wait_mid_stream(run: JobsRun, share: float = 1 / 3, of: int | None = None) -> int:
    """Until user_state has applied `share` of the events (or of `of`) and completed a checkpoint; the count."""
    total = of if of is not None else len(run.events)

    def mid() -> int:
        done = applied(run)
        if done >= sum(run.expected_popularity.values()):
            raise RuntimeError("drill: the stream ended before the failure; lower the publish rate")
        return done if done >= total * share and completed_checkpoints(run) >= 1 else 0

    return wait_until(mid, 600, "user_state mid-stream with a completed checkpoint", every_s=0.5)


def restored_since(s: Settings, jid: str, since_ms: float) -> bool:
    """The job runs again, restored from a checkpoint after `since_ms` (epoch ms)."""
    restored = (flink_get(s, f"/jobs/{jid}/checkpoints").get("latest") or {}).get("restored") or {}
    return restored.get("restore_timestamp", 0) >= since_ms and job_running(s, jid)


def restarts(s: Settings, jid: str) -> int:
    """Failures Flink recorded for the job (each one restarted it)."""
    history = flink_get(s, f"/jobs/{jid}/exceptions").get("exceptionHistory", {})
    return len(history.get("entries", []))


def settle(run: JobsRun) -> int:
    """Wait until every event is applied, or no progress for SETTLE_QUIET_S (a loss); the applied count."""
    total = sum(run.expected_popularity.values())
    last, since = -1, time.monotonic()
    while True:
        value = applied(run)
        if value >= total:
            return value
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since > SETTLE_QUIET_S:
            return value
        time.sleep(1)


def differing_users(run: JobsRun) -> list[str]:
    from infra.feast_store import open_feature_store

    users = sorted(run.expected_rows)
    online = open_feature_store(run.s).get_online_features(
        features=[f"user_recent_events:{f}" for f in FEATURE_NAMES],
        entity_rows=[{"user_id": u} for u in users]).to_dict()
    rows = {u: {"user_id": u, **{f: online[f][i] for f in FEATURE_NAMES}} for i, u in enumerate(users)}
    return [u for u in users if rows[u] != run.expected_rows[u]]


def dead_letters(run: JobsRun) -> int:
    """Records in the run's DLQ topic (committed ones; none expected: every event is valid and on time)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": run.s.kafka_bootstrap, "group.id": f"drill-{uuid.uuid4().hex}",
                         "isolation.level": "read_committed", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(run.dlq, timeout=10).topics[run.dlq].partitions
        ends = [consumer.get_watermark_offsets(TopicPartition(run.dlq, p), timeout=10) for p in partitions]
        count = 0
        for p, (low, high) in zip(partitions, ends, strict=True):
            if high <= low:
                continue
            consumer.assign([TopicPartition(run.dlq, p, low)])
            deadline = time.monotonic() + 30  # transaction markers take offsets too: read until the position
            while time.monotonic() < deadline and consumer.position([TopicPartition(run.dlq, p)])[0].offset < high:
                msg = consumer.poll(0.5)
                count += msg is not None and msg.error() is None
        return count
    finally:
        consumer.close()


def verify(run: JobsRun) -> dict[str, int]:
    """lost / doubled (popularity against the fold) and users_differing (Feast rows against the fold)."""
    settle(run)
    got = popularity(run)
    expected = run.expected_popularity
    lost = sum(max(0, n - got.get(item, 0)) for item, n in expected.items())
    doubled = sum(max(0, n - expected.get(item, 0)) for item, n in got.items())
    deadline = time.monotonic() + 60  # the last confirm flushes land within a flush interval or two
    while (differing := differing_users(run)) and time.monotonic() < deadline:
        time.sleep(2)
    return {"lost": lost, "doubled": doubled, "users": len(run.expected_rows), "users_differing": len(differing),
            "dead_letters": dead_letters(run)}


def finish(run: JobsRun) -> None:
    """Cancel the run's jobs and drop its Redis keys (its topics stay, as any replay's do)."""
    for jid in run.jids.values():
        try:
            requests.patch(f"{run.s.flink_rest_url}/jobs/{jid}", params={"mode": "cancel"}, timeout=5)
        except requests.RequestException:
            pass
    try:
        client = redis_client(run.s)
        for key in [popularity_key(run.domain), *(applied_key(run.domain, u) for u in run.expected_rows)]:
            client.delete(key)
    except Exception:  # noqa: BLE001 - best effort: the keys carry the run id
        pass


def row(drill: str, run: JobsRun, counts: dict[str, int], **timings: Any) -> dict[str, Any]:
    return {"drill": drill, "events": len(run.events), **counts, "fallback_answers": None, **timings}


# ---------------------------------------------------------------------------------------------
# kill -9 a Redis Cluster master
# ---------------------------------------------------------------------------------------------
def slot_owner(s: Settings, slot: int, skip_port: int) -> int | None:
    """The port of the master serving `slot`, as a node other than `skip_port` sees it."""
    import redis

    for port in s.redis_cluster_ports:
        if port == skip_port:
            continue
        try:
            ranges = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).execute_command(
                "CLUSTER SLOTS")
        except redis.RedisError:
            continue
        if isinstance(ranges, dict):  # redis-py's parsed form
            for (start, end), entry in ranges.items():
                if start <= slot <= end:
                    return int(entry["primary"][1])
        else:  # [start, end, [host, port, id], replicas...]
            for entry in ranges:
                if int(entry[0]) <= slot <= int(entry[1]):
                    return int(entry[2][1])
        return None
    return None


def restart_redis_node(s: Settings, port: int) -> None:
    """Start the killed node again from its folder (nodes.conf, AOF): it rejoins as a replica."""
    index = s.redis_cluster_ports.index(port)
    pids = read_pids(s, "redis")
    pids[index] = spawn(redis_cluster_commands(s)[index], s.log_dir / "redis" / f"node-{port}.out")
    write_pids(s, "redis", pids)
    wait_until(lambda: redis_cluster_healthy(s), 120, "the Redis Cluster healthy again", every_s=1)


def redis_master_drill(s: Settings, n_events: int, rate: float, serving_rate: float = 30.0) -> dict[str, Any]:
    """Also serves: `ugt serve` asked for the stream's users from the first applied event until after the dead
    node rejoined (bench/drills_serving.py); its answers are counted against the kill and the failover."""
    run = start_run(s, n_events)
    load = ServingLoad(s, run.domain, sorted(run.expected_rows), rate=serving_rate)
    try:
        load.start_server()
        publisher = publish_in_background(run, run.events, rate)
        wait_until(lambda: applied(run) > 0, 300, "the first event applied")
        load.start_asking()
        at = wait_mid_stream(run)
        client = redis_client(s)
        key = popularity_key(run.domain)
        port = int(client.get_node_from_key(key).port)
        pid = read_pids(s, "redis")[s.redis_cluster_ports.index(port)]
        killed, killed_ms = time.monotonic(), time.time() * 1000
        os.kill(pid, signal.SIGKILL)
        slot = client.keyslot(key)
        wait_until(lambda: (slot_owner(s, slot, port) or port) != port, 120, "a replica promoted")
        failover_s = time.monotonic() - killed
        jid = run.jids["user_state"]
        restarted = wait_until(lambda: restored_since(s, jid, killed_ms) or applied(run) >= sum(run.expected_popularity.values()),
                               300, "user_state restored (or the stream done)")
        recovery_s = time.monotonic() - killed if restored_since(s, jid, killed_ms) else None
        publisher.join()
        if publisher.errors:  # type: ignore[attr-defined]
            raise publisher.errors[0]  # type: ignore[attr-defined]
        rejoin = [time.monotonic() - killed]
        restart_redis_node(s, port)
        rejoin.append(time.monotonic() - killed)
        time.sleep(5)  # serving goes on past the rejoin
        load.stop()
        counts = verify(run)
        return {**row("kill -9 the Redis Cluster master of the popularity slot while user_state writes and "
                      f"`ugt serve` answers (killed at {at} applied; WAIT 1 replica per flush)", run, counts,
                      failover_s=round(failover_s, 2),
                      recovery_s=None if recovery_s is None else round(recovery_s, 2),
                      restarts=restarts(s, jid), restored=bool(restarted)),
                **load.summary(killed, failover_s, rejoin)}
    finally:
        load.stop()
        finish(run)


# ---------------------------------------------------------------------------------------------
# kill -9 a TaskManager
# ---------------------------------------------------------------------------------------------
def taskmanager_pid(s: Settings, jid: str) -> tuple[str, int]:
    """(TaskManager id, pid) of the TaskManager running the first subtask of the job's last vertex."""
    import psutil

    vertex = flink_get(s, f"/jobs/{jid}")["vertices"][-1]["id"]
    subtasks = flink_get(s, f"/jobs/{jid}/vertices/{vertex}").get("subtasks", [])
    tm_id = subtasks[0]["taskmanager-id"]
    data_port = int(flink_get(s, f"/taskmanagers/{tm_id}")["dataPort"])
    for pid in read_pids(s, "flink"):
        try:
            if any(c.laddr.port == data_port and c.status == psutil.CONN_LISTEN
                   for c in psutil.Process(pid).net_connections("tcp")):
                return tm_id, pid
        except psutil.Error:
            continue
    raise RuntimeError(f"drill: no Flink process of this stack listens on the data port {data_port} of {tm_id}")


def start_taskmanager(s: Settings) -> None:
    """`taskmanager.sh start` with the stack's env (what `ugt stack up` runs per TaskManager); its pid recorded."""
    before = set(read_pids(s, "flink"))
    subprocess.run(["bash", str(pyflink_home() / "bin" / "taskmanager.sh"), "start"], env=flink_env(s), check=True,
                   capture_output=True, timeout=120)
    found = {int(x) for f in flink_pid_dir(s).glob("*taskexecutor*.pid") for x in f.read_text().split() if x.isdigit()}
    write_pids(s, "flink", sorted(p for p in before | found if pid_alive(p)))
    wait_until(lambda: (stack_mod.flink_overview(s) or {}).get("taskmanagers", 0) >= s.flink_taskmanagers, 180,
               "the new TaskManager registered", every_s=1)


def taskmanager_drill(s: Settings, n_events: int, rate: float) -> dict[str, Any]:
    run = start_run(s, n_events)
    try:
        publisher = publish_in_background(run, run.events, rate)
        at = wait_mid_stream(run)
        jid = run.jids["user_state"]
        tm_id, pid = taskmanager_pid(s, jid)
        killed, killed_ms = time.monotonic(), time.time() * 1000
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: restarts(s, jid) > 0, 300, "the JobManager failing user_state over")
        failover_s = time.monotonic() - killed
        wait_until(lambda: restored_since(s, jid, killed_ms), 300, "user_state restored on the other TaskManagers")
        recovery_s = time.monotonic() - killed
        publisher.join()
        if publisher.errors:  # type: ignore[attr-defined]
            raise publisher.errors[0]  # type: ignore[attr-defined]
        counts = verify(run)
        start_taskmanager(s)
        return row(f"kill -9 the TaskManager of user_state's first subtask at parallelism {s.job_parallelism} "
                   f"({s.flink_taskmanagers} TaskManagers; killed at {at} applied)", run, counts,
                   failover_s=round(failover_s, 2), recovery_s=round(recovery_s, 2), restarts=restarts(s, jid),
                   restored=True)
    finally:
        finish(run)


# ---------------------------------------------------------------------------------------------
# stop everything, start again
# ---------------------------------------------------------------------------------------------
def restart_drill(s: Settings, n_events: int, rate: float) -> dict[str, Any]:
    """Half published; savepoints, `stack down`, `stack up --profile cluster`, resubmit; the other half."""
    run = start_run(s, n_events)
    half = len(run.events) // 2
    try:
        publish(s, run.events[:half], run.raw, rate)
        at = wait_mid_stream(run, share=1 / 2, of=half)
        t0 = time.monotonic()
        base = s.flink_rest_url
        savepoints = {job: jobs_cli.stop_with_savepoint(base, jid)[0][1] for job, jid in run.jids.items()}
        t_stop = time.monotonic()
        stack_mod.down(settings=s, log=lambda line: None)
        t_down = time.monotonic()
        stack_mod.up(settings=s, log=lambda line: None, after_kafka=ensure_pipeline)
        t_up = time.monotonic()
        submit_jobs(run, savepoints)
        resumed = time.monotonic()
        publish(s, run.events[half:], run.raw, rate)
        counts = verify(run)
        return row(f"stop both jobs with savepoints at {at} of {half} applied, `ugt stack down`, `ugt stack up "
                   "--profile cluster`, resubmit from the savepoints, publish the other half", run, counts,
                   failover_s=None, recovery_s=round(resumed - t0, 2), restarts=0, restored=True,
                   savepoints_s=round(t_stop - t0, 2), down_s=round(t_down - t_stop, 2),
                   up_s=round(t_up - t_down, 2), resubmit_s=round(resumed - t_up, 2))
    finally:
        finish(run)


JOB_DRILLS = {"redis_master": redis_master_drill, "taskmanager": taskmanager_drill, "restart": restart_drill}
