"""The local stack: Kafka (KRaft), the Schema Registry, Redis and a Flink standalone cluster.

`up()` is idempotent: a service whose health check already passes is left alone, the others are
started (all spawned first, then awaited together, so a cold start costs the slowest service, not
the sum) and health-checked with a timeout; a failure names the log file and shows its tail.
`down()` stops what this stack started (SIGTERM, then SIGKILL). Pids live in var/run/, every log
under var/log/<service>/. Ports and folders come from infra/settings.py (UGT_* variables).
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template

from infra.settings import REPO_ROOT, Settings, get_settings

INFRA = REPO_ROOT / "infra"
SERVICES = ("kafka", "registry", "redis", "flink")
# topic -> partitions (replication factor 1: one broker)
FLINK_KAFKA_CONNECTOR = "flink-sql-connector-kafka-5.0.0-2.2.jar"
# seconds from the start of `up` (generous: a 2-core box shared with builds and tests can be 10x loaded)
START_TIMEOUT_S = {"kafka": 120.0, "registry": 60.0, "redis": 30.0, "flink": 180.0}


class StackError(RuntimeError):
    """A service could not be prepared, started or stopped; the message says where to look."""


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
def lib_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).cache_dir / "lib"


def kafka_connector_jar(settings: Settings | None = None) -> Path:
    """The shaded Flink Kafka SQL connector; jobs add it with `pipeline.jars` / `env.add_jars`."""
    jar = lib_dir(settings) / "flink-connectors" / FLINK_KAFKA_CONNECTOR
    if not jar.is_file():
        raise StackError(f"{jar} is missing: run `ugt stack up` or `bash infra/install.sh` to resolve the Maven jars")
    return jar


def parquet_jars(settings: Settings | None = None) -> list[Path]:
    """flink-parquet + Hadoop client jars for the tokenize job's lake sink (infra/maven/flink-parquet.xml)."""
    jars = sorted((lib_dir(settings) / "flink-parquet").glob("*.jar"))
    if not any(j.name.startswith("flink-parquet-") for j in jars):
        raise StackError(f"{lib_dir(settings) / 'flink-parquet'} has no flink-parquet jar: run `ugt stack up` "
                         "(it resolves them from Maven Central) or pass --lake '' to run without the lake")
    return jars


def ensure_parquet_jars(s: Settings, log: Callable[[str], None] = print) -> None:
    """Resolve the lake's parquet jars from Maven Central once (offline first, like ensure_jars)."""
    if any((lib_dir(s) / "flink-parquet").glob("flink-parquet-*.jar")):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("mvn not found and the lake's parquet jars are missing: run `bash infra/install.sh`")
    log(f"resolving the parquet lake jars into {lib_dir(s) / 'flink-parquet'} (first time only) ...")
    cmd = [mvn, "-q", "-B", "-f", str(INFRA / "maven" / "flink-parquet.xml"), "package", f"-Dugt.lib={lib_dir(s)}"]
    if subprocess.run([*cmd, "-o"], capture_output=True, text=True).returncode != 0:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"Maven could not resolve the parquet jars:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")


def kafka_connector_jar_url(settings: Settings | None = None) -> str:
    """The connector jar as the file:// URL that `pipeline.jars` expects."""
    return kafka_connector_jar(settings).as_uri()


def pyflink_home() -> Path:
    """The Flink distribution inside the apache-flink package (bin/, lib/, opt/, conf/)."""
    import pyflink

    return Path(pyflink.__file__).resolve().parent


def flink_bin() -> Path:
    """`<pyflink>/bin/flink`: run it with `flink_env()` so it talks to this stack's cluster."""
    return pyflink_home() / "bin" / "flink"


def flink_conf_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).var_dir / "flink" / "conf"


def flink_lib_dir(settings: Settings | None = None) -> Path:
    """The cluster's lib/: the package's lib/*.jar, opt/flink-python, the Kafka connector and the parquet jars,
    linked under var/flink/lib.

    The pip package keeps flink-python in opt/. On the cluster classpath it loads pemja once per
    TaskManager JVM, which `python.execution-mode: thread` needs (shipping the jar with each job fails
    on Java 17 for the second thread-mode job on a TaskManager).
    """
    s = settings or get_settings()
    lib = s.var_dir / "flink" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    home = pyflink_home()
    wanted = {jar.name: jar for jar in (home / "lib").glob("*.jar")}
    wanted.update({jar.name: jar for jar in (home / "opt").glob("flink-python-*.jar")})
    # the Kafka SQL connector once per TaskManager JVM (jobs then skip shipping it: jobs.common.cluster_has_connector)
    connector = lib_dir(s) / "flink-connectors" / FLINK_KAFKA_CONNECTOR
    if connector.is_file():
        wanted[connector.name] = connector
    # ... and the parquet lake's jars (flink-parquet, Hadoop's shaded client): jobs.lake.cluster_has_parquet
    wanted.update({jar.name: jar for jar in (lib_dir(s) / "flink-parquet").glob("*.jar")})
    for link in lib.iterdir():
        if link.name not in wanted or not link.exists():
            link.unlink()
    for name, jar in wanted.items():
        if not (lib / name).exists():
            (lib / name).symlink_to(jar)
    return lib


def flink_env(settings: Settings | None = None) -> dict[str, str]:
    """Environment for Flink's scripts and `flink run`: this stack's conf, lib, logs and the venv's python."""
    s = settings or get_settings()
    env = dict(os.environ)
    env.update(
        FLINK_HOME=str(pyflink_home()),
        FLINK_LIB_DIR=str(flink_lib_dir(s)),
        FLINK_CONF_DIR=str(flink_conf_dir(s)),
        FLINK_LOG_DIR=str(s.log_dir / "flink"),
        FLINK_PID_DIR=str(s.var_dir / "run" / "flink"),
        FLINK_IDENT_STRING=os.environ.get("USER") or getpass.getuser(),  # names pid and log files
        PYFLINK_CLIENT_EXECUTABLE=sys.executable,
        # given here, config.sh skips two JVM launches per script (reading env.java.opts.all and
        # probing the Java version): with ~10 launches per cold start that is seconds on 2 cores
        FLINK_ENV_JAVA_OPTS=" ".join(filter(None, ["-XX:+IgnoreUnrecognizedVMOptions", _flink_java_opts(),
                                                   os.environ.get("UGT_FLINK_JAVA_OPTS", "")])),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _flink_java_opts() -> str:
    """`env.java.opts.all` of infra/flink/config.yaml (the Java 17 module flags Flink needs)."""
    import yaml

    return str(yaml.safe_load((INFRA / "flink" / "config.yaml").read_text())["env"]["java"]["opts"]["all"])


def _run_dir(s: Settings) -> Path:
    return s.var_dir / "run"


def _pid_file(s: Settings, name: str) -> Path:
    return _run_dir(s) / f"{name}.pid"


# ---------------------------------------------------------------------------------------------
# small process helpers
# ---------------------------------------------------------------------------------------------
def port_open(port: int, host: str = "localhost", timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our exited child, not yet reaped) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def read_pids(s: Settings, name: str) -> list[int]:
    path = _pid_file(s, name)
    if not path.exists():
        return []
    return [int(x) for x in path.read_text().split() if x.strip().isdigit()]


def _is_ours(s: Settings, name: str, pid: int, args: list[str]) -> bool:
    """Is this process the stack's `name`, started from this var/? (by its arguments or, for
    redis-server, which rewrites its title, by its working directory var/redis)."""
    exe = os.path.basename(args[0]) if args else ""
    joined = " ".join(args)
    if name == "kafka":
        return exe.startswith("java") and str(s.var_dir / "kafka" / "server.properties") in joined
    if name == "registry":
        return "infra.schema_registry" in joined and str(s.var_dir / "registry" / "registry.json") in joined
    if name == "flink":
        return exe.startswith("java") and str(flink_conf_dir(s)) in joined
    if name == "redis":
        try:
            return exe.startswith("redis-server") and os.readlink(f"/proc/{pid}/cwd") == str(s.var_dir / "redis")
        except OSError:
            return False
    return False


def owned_pids(s: Settings, name: str) -> list[int]:
    """Live pids of `name` started from this var/: the pid file, plus a /proc scan for orphans
    (a pid file lost to a crash or an interrupted `up` must not leave a process nobody can stop)."""
    pids = {p for p in read_pids(s, name) if pid_alive(p)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
        if _is_ours(s, name, int(entry.name), args) and pid_alive(int(entry.name)):
            pids.add(int(entry.name))
    return sorted(pids)


def _write_pids(s: Settings, name: str, pids: Iterable[int]) -> None:
    _run_dir(s).mkdir(parents=True, exist_ok=True)
    _pid_file(s, name).write_text("".join(f"{p}\n" for p in pids))


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start a long-running process detached from us (own session), stdout+stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=cwd, start_new_session=True,
        )
    return proc.pid


def _tail(path: Path, lines: int = 12) -> str:
    """What to show from a failed service's log: its last error lines if it has any, else its tail
    (the tail of a Java log is usually the bottom of a stack trace, which says little)."""
    if not path.is_file():
        return f"    ({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    errors = [line for line in text if re.search(r"\b(ERROR|FATAL)\b|^\S*(Exception|Error)\b", line)]
    shown = errors[-lines // 2:] if errors else text[-lines:]
    return "\n".join("    " + line[:400] for line in shown)


def _terminate(pids: list[int], grace_s: float) -> list[int]:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; returns the pids that had to be killed."""
    alive = [p for p in pids if pid_alive(p)]
    for p in alive:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in alive):
        _reap()
        time.sleep(0.1)
    killed = [p for p in alive if pid_alive(p)]
    for p in killed:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return killed


def _reap() -> None:
    """Collect exited children (when `up` and `down` run in one process, e.g. the tests)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def java() -> str:
    home = os.environ.get("JAVA_HOME")
    exe = Path(home) / "bin" / "java" if home else shutil.which("java")
    if not exe or not Path(exe).exists():
        raise StackError("java not found: install Java 17 (bash infra/install.sh) or set JAVA_HOME")
    return str(exe)


# ---------------------------------------------------------------------------------------------
# Maven jars
# ---------------------------------------------------------------------------------------------
def jars_present(s: Settings) -> bool:
    lib = lib_dir(s)
    return any((lib / "kafka").glob("kafka_2.13-*.jar")) and (lib / "flink-connectors" / FLINK_KAFKA_CONNECTOR).is_file()


def ensure_jars(s: Settings, log: Callable[[str], None] = print) -> None:
    """Resolve Kafka and the Flink connector from Maven Central once; later runs find them cached."""
    if jars_present(s):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("mvn not found and the stack's jars are missing: run `bash infra/install.sh`")
    log(f"resolving Maven artifacts into {lib_dir(s)} (first time only, ~1 min) ...")
    cmd = [mvn, "-q", "-B", "-f", str(INFRA / "maven" / "pom.xml"), "package", f"-Dugt.lib={lib_dir(s)}"]
    # offline first: after one online run everything is in ~/.m2
    if subprocess.run([*cmd, "-o"], capture_output=True, text=True).returncode != 0:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"Maven could not resolve the stack's jars:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    if not jars_present(s):
        raise StackError(f"Maven ran but {lib_dir(s)} still lacks the Kafka or Flink connector jars")


# ---------------------------------------------------------------------------------------------
# services
# ---------------------------------------------------------------------------------------------
@dataclass
class Service:
    """One part of the stack: how to tell it is healthy, how to start it, where it logs."""

    name: str
    port: int
    find_log: Callable[[], Path]  # the main log file (Flink's name carries user and host)
    healthy: Callable[[], bool]
    start: Callable[[], list[int]]  # spawns and returns the pids to record

    @property
    def log(self) -> Path:
        return self.find_log()

    def status(self, s: Settings) -> dict[str, object]:
        pids = owned_pids(s, self.name)
        return {"service": self.name, "port": self.port, "pid": pids, "healthy": self.healthy(), "log": self.log}


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
    template = Template((INFRA / "kafka" / "server.properties").read_text())
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
        cp = f"{lib_dir(s) / 'kafka'}/*"
        props = write_kafka_conf(s)
        cluster_file = data / "cluster.id"
        if not cluster_file.exists():
            cluster_file.write_text(new_cluster_id() + "\n")
        jvm = [java(), "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true", f"-Dkafka.logs.dir={log_dir}",
               f"-Dlog4j2.configurationFile={INFRA / 'kafka' / 'log4j2.properties'}", "-cp", cp]
        if not (data / "data" / "meta.properties").exists():
            log_dir.mkdir(parents=True, exist_ok=True)
            fmt = subprocess.run(
                [*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_file.read_text().strip(),
                 "-c", str(props), "--ignore-formatted"],
                capture_output=True, text=True,
            )
            if fmt.returncode != 0:
                raise StackError(f"kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        return [_spawn([*jvm, "kafka.Kafka", str(props)], log_dir / "kafka.out")]

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
        return [_spawn(cmd, log, cwd=REPO_ROOT)]

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
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError("redis-server not found: run `bash infra/install.sh` (apt-get install redis-server)")
        data = s.var_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "--port", str(s.redis_port), "--bind", "127.0.0.1", "-::1", "--dir", str(data),
               "--logfile", str(log), "--daemonize", "no", "--save", "60 1000", "--appendonly", "no",
               "--protected-mode", "yes"]
        return [_spawn(cmd, s.log_dir / "redis" / "redis.out")]

    return Service("redis", s.redis_port, lambda: log, healthy, start)


def write_flink_conf(s: Settings) -> Path:
    """Render infra/flink/config.yaml into var/flink/conf (plus Flink's own log4j files)."""
    conf = flink_conf_dir(s)
    conf.mkdir(parents=True, exist_ok=True)
    dirs = {k: s.var_dir / "flink" / k for k in ("checkpoints", "savepoints", "tmp")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    text = Template((INFRA / "flink" / "config.yaml").read_text()).substitute(
        log_dir=s.log_dir / "flink", pid_dir=_run_dir(s) / "flink", rpc_port=s.flink_rpc_port,
        rest_port=s.flink_rest_port, tmp_dir=dirs["tmp"], checkpoints_dir=dirs["checkpoints"],
        savepoints_dir=dirs["savepoints"], python=sys.executable,
        metrics_ports=f"{s.flink_metrics_ports[0]}-{s.flink_metrics_ports[-1]}",
    )
    (conf / "config.yaml").write_text(text)
    shipped = pyflink_home() / "conf"
    for f in shipped.iterdir():
        if f.name.startswith(("log4j", "logback")):
            shutil.copyfile(f, conf / f.name)
    (conf / "masters").write_text(f"localhost:{s.flink_rest_port}\n")
    (conf / "workers").write_text("localhost\n")
    return conf


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
                _write_pids(s, svc.name, pids)
                log(f"{svc.name:9s} starting (pid {' '.join(map(str, pids))}, log {svc.log})")
            elif svc.healthy():
                pending.remove(svc)
                yield svc.name, time.monotonic() - t0
                continue
            else:
                pids = read_pids(s, svc.name)
                if pids and not any(pid_alive(p) for p in pids):
                    _reap()
                    raise StackError(f"{svc.name} exited during start-up; see {svc.log}\n{_tail(svc.log)}")
            if time.monotonic() - t0 > START_TIMEOUT_S[svc.name]:
                raise StackError(
                    f"{svc.name} did not become healthy on port {svc.port} within {START_TIMEOUT_S[svc.name]:.0f} s; "
                    f"see {svc.log} (`ugt stack down --only {svc.name}` then `up` restarts it)\n{_tail(svc.log)}"
                )
        time.sleep(0.25)


@contextmanager
def _exclusive(s: Settings, log: Callable[[str], None]) -> Iterator[None]:
    """One `up`/`down` at a time per var/ (two test sessions starting the stack at once must not race)."""
    _run_dir(s).mkdir(parents=True, exist_ok=True)
    with open(_run_dir(s) / "stack.lock", "w") as handle:
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
            _pid_file(s, svc.name).unlink(missing_ok=True)  # stale pids of a crashed run
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
                _write_pids(s, name, future.result())
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
            killed = _terminate(pids, grace_s)
            log(f"{svc.name:9s} stopped (pid {' '.join(map(str, pids))}{', killed after grace' if killed else ''})")
        _pid_file(s, svc.name).unlink(missing_ok=True)
        if svc.name == "flink":
            for f in (_run_dir(s) / "flink").glob("*.pid"):
                f.unlink()
    _reap()


def status(only: Iterable[str] | None = None, settings: Settings | None = None) -> list[dict[str, object]]:
    s = settings or get_settings()
    return [svc.status(s) for svc in services(s, only)]
