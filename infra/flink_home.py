"""The Flink that ships inside the apache-flink pip package, pointed at this stack: bin/, conf, lib/ and env.

Flink's scripts and `flink run` read FLINK_CONF_DIR, FLINK_LIB_DIR, ...: `flink_env()` gives them this stack's
var/flink/conf (rendered from infra/flink/config.yaml by `write_flink_conf`) and var/flink/lib (the package's
jars plus the stack's Maven jars), so `ugt jobs submit`, the cluster and the tests all talk to one cluster.
"""

from __future__ import annotations

import getpass
import os
import shutil
import sys
from pathlib import Path
from string import Template

from infra.jars import FLINK_KAFKA_CONNECTOR, lib_dir
from infra.settings import REPO_ROOT, Settings, get_settings

FLINK_CONFIG_TEMPLATE = REPO_ROOT / "infra" / "flink" / "config.yaml"


def pyflink_home() -> Path:
    """The Flink distribution inside the apache-flink package (bin/, lib/, opt/, conf/)."""
    import pyflink

    return Path(pyflink.__file__).resolve().parent


def flink_bin() -> Path:
    """`<pyflink>/bin/flink`: run it with `flink_env()` so it talks to this stack's cluster."""
    return pyflink_home() / "bin" / "flink"


def flink_conf_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).var_dir / "flink" / "conf"


def flink_pid_dir(s: Settings) -> Path:
    """Where Flink's daemon scripts write their pid files (var/run/flink)."""
    return s.var_dir / "run" / "flink"


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
        FLINK_PID_DIR=str(flink_pid_dir(s)),
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

    return str(yaml.safe_load(FLINK_CONFIG_TEMPLATE.read_text())["env"]["java"]["opts"]["all"])


def write_flink_conf(s: Settings) -> Path:
    """Render infra/flink/config.yaml into var/flink/conf (plus Flink's own log4j files)."""
    conf = flink_conf_dir(s)
    conf.mkdir(parents=True, exist_ok=True)
    dirs = {k: s.var_dir / "flink" / k for k in ("checkpoints", "savepoints", "tmp")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    text = Template(FLINK_CONFIG_TEMPLATE.read_text()).substitute(
        log_dir=s.log_dir / "flink", pid_dir=flink_pid_dir(s), rpc_port=s.flink_rpc_port,
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
