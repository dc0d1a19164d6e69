"""The local stack: Kafka (KRaft), the Schema Registry, Redis and a Flink standalone cluster.

`up()` is idempotent: a service whose health check already passes is left alone, the others are
started (all spawned first, then awaited together, so a cold start costs the slowest service, not
the sum) and health-checked with a timeout; a failure names the log file and shows its tail.
`down()` stops what this stack started (SIGTERM, then SIGKILL). Pids live in var/run/, every log
under var/log/<service>/. Ports and folders come from infra/settings.py (UGT_* variables).

This module is the services and their life cycle; what they stand on has its own modules: infra/jars.py
(the Maven jars), infra/flink_home.py (Flink's bin, conf, lib and env) and infra/processes.py (pids, spawn, stop).
"""

from __future__ import annotations

import base64
import fcntl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from string import Template

from infra.flink_home import flink_env, flink_pid_dir, pyflink_home, write_flink_conf
from infra.jars import ensure_jars, ensure_parquet_jars
from infra.processes import (
    log_tail,
    owned_pids,
    pid_alive,
    pid_file,
    port_open,
    read_pids,
    reap_children,
    run_dir,
    spawn,
    terminate,
    write_pids,
)
from infra.redis_conf import redis_server_args
from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack_cluster import (
    format_kafka_storage,
    kafka_cluster_service,
    kafka_jvm,
    redis_cluster_service,
)
from infra.stack_errors import StackError
from infra.stack_service import Service

KAFKA_TEMPLATES = REPO_ROOT / "infra" / "kafka"
SERVICES = ("kafka", "registry", "redis", "flink")
# seconds from the start of `up` (generous: a 2-core box shared with builds and tests can be 10x loaded)
START_TIMEOUT_S = {"kafka": 120.0, "registry": 60.0, "redis": 60.0, "flink": 180.0}


# ---------------------------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------------------------
def new_cluster_id() -> str:
    """A Kafka cluster id like `kafka-storage random-uuid`: 16 random bytes, url-safe base64 without
    padding, never starting with '-' (Kafka's Uuid rule, so it cannot be mistaken for a flag)."""
    cid = "-"
    while cid.startswith("-"):
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    return cid


def write_kafka_conf(s: Settings) -> Path:
    """Render infra/kafka/server.properties into var/kafka/server.properties."""
    data = s.var_dir / "kafka"
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    template = Template((KAFKA_TEMPLATES / "server.properties").read_text())
    props.write_text(
        template.substitute(kafka_port=s.kafka_port, controller_port=s.kafka_controller_port, data_dir=data / "data")
    )
    return props


def _kafka(s: Settings) -> Service:
    data = s.var_dir / "kafka"
    log_dir = s.log_dir / "kafka"

    def healthy() -> bool:
        if not port_open(s.kafka_port):
            return False
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": f"localhost:{s.kafka_port}"}).list_topics(timeout=2)
            return True
        except Exception:
            return False

    def start() -> list[int]:
        props = write_kafka_conf(s)
        cluster_file = data / "cluster.id"
        if not cluster_file.exists():
            cluster_file.write_text(new_cluster_id() + "\n")
        log_dir.mkdir(parents=True, exist_ok=True)
        jvm = kafka_jvm(s, log_dir)
        format_kafka_storage(jvm, cluster_file.read_text().strip(), props, data / "data")
        return [spawn([*jvm, "kafka.Kafka", str(props)], log_dir / "kafka.out")]

    return Service("kafka", s.kafka_port, lambda: log_dir / "server.log", healthy, start)


def _registry(s: Settings) -> Service:
    log = s.log_dir / "registry" / "registry.log"

    def healthy() -> bool:
        import requests

        try:
            return requests.get(f"http://localhost:{s.registry_port}/apis/ccompat/v7/subjects", timeout=1).ok
        except requests.RequestException:
            return False

    def start() -> list[int]:
        cmd = [sys.executable, "-m", "infra.schema_registry", "--port", str(s.registry_port),
               "--data", str(s.var_dir / "registry" / "registry.json")]
        return [spawn(cmd, log, cwd=REPO_ROOT)]

    return Service("registry", s.registry_port, lambda: log, healthy, start)


def _redis(s: Settings) -> Service:
    log = s.log_dir / "redis" / "redis.log"

    def healthy() -> bool:
        import redis

        try:
            return bool(redis.Redis(port=s.redis_port, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def start() -> list[int]:
        data = s.var_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = redis_server_args(s.redis_port, data, log, s.redis_appendfsync)
        return [spawn(cmd, s.log_dir / "redis" / "redis.out")]

    return Service("redis", s.redis_port, lambda: log, healthy, start)


def flink_overview(s: Settings, timeout_s: float = 1.0) -> dict | None:
    import requests

    try:
        r = requests.get(f"http://localhost:{s.flink_rest_port}/overview", timeout=timeout_s)
        return r.json() if r.ok else None
    except (requests.RequestException, ValueError):
        return None


def _flink(s: Settings) -> Service:
    log_dir = s.log_dir / "flink"

    def healthy() -> bool:
        overview = flink_overview(s)
        return bool(overview and overview.get("taskmanagers", 0) >= max(1, s.flink_taskmanagers))

    def start() -> list[int]:
        write_flink_conf(s)
        env = flink_env(s)
        pid_dir = Path(env["FLINK_PID_DIR"])
        pid_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)  # the daemon scripts redirect into it and die if it is missing
        for stale in pid_dir.glob("*.pid"):
            stale.unlink()
        bin_dir = pyflink_home() / "bin"
        # the daemons at once: each script spends ~2 s computing JVM memory flags. The TaskManagers start one
        # script each (`taskmanager.sh start` appends its pid to the shared pid file: run them one after another)
        def script(daemon: str) -> subprocess.Popen:
            return subprocess.Popen(["bash", str(bin_dir / f"{daemon}.sh"), "start"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        jobmanager = script("jobmanager")
        done = []
        for _ in range(max(1, s.flink_taskmanagers)):
            tm = script("taskmanager")
            done.append((tm, tm.communicate(timeout=120)[0]))
        done.insert(0, (jobmanager, jobmanager.communicate(timeout=120)[0]))
        outputs = [out for _, out in done]
        for p, out in done:
            if p.returncode != 0:
                raise StackError(f"Flink start script failed (exit {p.returncode}):\n{out}")
        pids = [int(x) for f in sorted(pid_dir.glob("*.pid")) for x in f.read_text().split() if x.isdigit()]
        if len(pids) < 1 + max(1, s.flink_taskmanagers):
            raise StackError(f"Flink scripts wrote {len(pids)} pids to {pid_dir}, want 1 JobManager + "
                             f"{s.flink_taskmanagers} TaskManagers:\n" + "\n".join(outputs))
        return pids

    def find_log() -> Path:
        # the JobManager log is the first place to look; its name carries user, index and host
        logs = sorted(log_dir.glob("flink-*-standalonesession-*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1] if logs else log_dir / "flink-<user>-standalonesession-<n>-<host>.log"

    return Service("flink", s.flink_rest_port, find_log, healthy, start)


def services(s: Settings | None = None, only: Iterable[str] | None = None) -> list[Service]:
    s = s or get_settings()
    chosen = list(only) if only else list(SERVICES)
    unknown = [n for n in chosen if n not in SERVICES]
    if unknown:
        raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    makers = {"kafka": _kafka, "registry": _registry, "redis": _redis, "flink": _flink}
    if s.cluster:  # the cluster profile's replicated Kafka and Redis (infra/stack_cluster.py)
        makers.update(kafka=lambda s: kafka_cluster_service(s, new_cluster_id), redis=redis_cluster_service)
    return [makers[n](s) for n in SERVICES if n in chosen]


# ---------------------------------------------------------------------------------------------
# up / down / status
# ---------------------------------------------------------------------------------------------
def _wait_all_healthy(
    pending: list[Service], s: Settings, t0: float, starting: dict[str, Future[list[int]]],
    log: Callable[[str], None],
) -> Iterator[tuple[str, float]]:
    """Poll every service until healthy; yields (name, seconds since t0) as each gets there.
    `starting` holds the start calls still running (Flink's scripts take a while): a service is polled
    once its start returned. A service that fails to start, exits, or misses its START_TIMEOUT_S raises
    with its log's tail."""
    pending = list(pending)
    while pending:
        for svc in list(pending):
            future = starting.get(svc.name)
            if future is not None and not future.done():
                pass
            elif future is not None and not read_pids(s, svc.name):
                pids = future.result()  # re-raises a failed start
                write_pids(s, svc.name, pids)
                log(f"{svc.name:9s} starting (pid {' '.join(map(str, pids))}, log {svc.log})")
            elif svc.healthy():
                pending.remove(svc)
                yield svc.name, time.monotonic() - t0
                continue
            else:
                pids = read_pids(s, svc.name)
                if pids and not any(pid_alive(p) for p in pids):
                    reap_children()
                    raise StackError(f"{svc.name} exited during start-up; see {svc.log}\n{log_tail(svc.log)}")
            if time.monotonic() - t0 > START_TIMEOUT_S[svc.name]:
                raise StackError(
                    f"{svc.name} did not become healthy on port {svc.port} within {START_TIMEOUT_S[svc.name]:.0f} s; "
                    f"see {svc.log} (`ugt stack down --only {svc.name}` then `up` restarts it)\n{log_tail(svc.log)}"
                )
        time.sleep(0.25)


@contextmanager
def _exclusive(s: Settings, log: Callable[[str], None]) -> Iterator[None]:
    """One `up`/`down` at a time per var/ (two test sessions starting the stack at once must not race)."""
    run_dir(s).mkdir(parents=True, exist_ok=True)
    with open(run_dir(s) / "stack.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another `ugt stack up/down` is running on this var/: waiting for it ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def up(only: Iterable[str] | None = None, settings: Settings | None = None,
       log: Callable[[str], None] = print,
       after_kafka: Callable[[Settings], Mapping[str, str]] | None = None) -> dict[str, float]:
    """Start what is not already healthy; returns seconds until each service was healthy (0 = was up).

    ``after_kafka`` runs once Kafka and the registry are healthy (the callers pass
    ``streams.topics.ensure_pipeline``: topics and schema subjects belong to the streams layer above this one).
    """
    s = settings or get_settings()
    with _exclusive(s, log):
        return _up(s, only, log, after_kafka)


def _up(s: Settings, only: Iterable[str] | None, log: Callable[[str], None],
        after_kafka: Callable[[Settings], Mapping[str, str]] | None) -> dict[str, float]:
    t0 = time.monotonic()
    chosen = services(s, only)
    s.log_dir.mkdir(parents=True, exist_ok=True)
    if any(svc.name in ("kafka", "flink") for svc in chosen):
        ensure_jars(s, log)  # Kafka's jars, and the connector jar Flink jobs load
    if any(svc.name == "flink" for svc in chosen):
        ensure_parquet_jars(s, log)  # the tokenize job's parquet lake sink
    started: list[Service] = []
    to_start: list[Service] = []
    took: dict[str, float] = {}
    for svc in chosen:
        if svc.healthy():
            took[svc.name] = 0.0
            log(f"{svc.name:9s} already healthy on port {svc.port}")
        elif owned_pids(s, svc.name):
            log(f"{svc.name:9s} process running but not healthy yet: waiting for it")
            started.append(svc)
        elif port_open(svc.port):
            raise StackError(
                f"port {svc.port} is taken by a process that is not a healthy {svc.name}: free it or set its "
                f"UGT_* port variable (infra/settings.py)"
            )
        else:
            pid_file(s, svc.name).unlink(missing_ok=True)  # stale pids of a crashed run
            to_start.append(svc)
    # Flink is the slowest (its scripts run six short JVMs before the daemons): start it first, and
    # every service on its own thread, so the cold start costs the slowest service, not the sum.
    to_start.sort(key=lambda svc: svc.name != "flink")
    pool = ThreadPoolExecutor(max_workers=max(1, len(to_start)))
    starting = {svc.name: pool.submit(svc.start) for svc in to_start}
    try:
        for name, seconds in _wait_all_healthy(started + to_start, s, t0, starting, log):
            took[name] = seconds
            log(f"{name:9s} healthy after {seconds:.1f} s")
    finally:
        pool.shutdown(wait=True)
        for name, future in starting.items():  # record every pid we spawned, even after a failure
            if future.exception() is None and not read_pids(s, name):
                write_pids(s, name, future.result())
    if after_kafka is not None and any(svc.name == "kafka" for svc in chosen):
        try:
            topics = after_kafka(s)
        except Exception as exc:  # TopicError, RegistryError: say which step failed
            raise StackError(f"could not create the pipeline's topics or schema subjects: {exc}") from exc
        log("topics    " + ", ".join(f"{t} ({state})" for t, state in topics.items()))
    took["total"] = time.monotonic() - t0
    return took


def down(only: Iterable[str] | None = None, settings: Settings | None = None,
         log: Callable[[str], None] = print, grace_s: float = 20.0) -> None:
    """Stop the services this stack started (pids in var/run/), in reverse start order."""
    s = settings or get_settings()
    with _exclusive(s, log):
        _down(s, only, log, grace_s)


def _down(s: Settings, only: Iterable[str] | None, log: Callable[[str], None], grace_s: float) -> None:
    for svc in reversed(services(s, only)):
        pids = owned_pids(s, svc.name)
        if not pids:
            note = " (but something healthy answers on its port: not ours, left alone)" if svc.healthy() else ""
            log(f"{svc.name:9s} not running{note}")
        else:
            killed = terminate(pids, grace_s)
            log(f"{svc.name:9s} stopped (pid {' '.join(map(str, pids))}{', killed after grace' if killed else ''})")
        pid_file(s, svc.name).unlink(missing_ok=True)
        if svc.name == "flink":
            for f in flink_pid_dir(s).glob("*.pid"):
                f.unlink()
    reap_children()


def status(only: Iterable[str] | None = None, settings: Settings | None = None) -> list[dict[str, object]]:
    s = settings or get_settings()
    return [svc.status(s) for svc in services(s, only)]
