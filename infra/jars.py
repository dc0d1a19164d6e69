"""Where the stack's Maven jars live (Kafka, the Flink Kafka connector, the parquet lake's jars) and their resolution.

They are not in any pip package: `ugt stack up` resolves them from Maven Central once (infra/maven/*.xml) into
<cache>/lib/, offline first, so later runs need no network; jobs then find them here.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from infra.settings import REPO_ROOT, Settings, get_settings
from infra.stack_errors import StackError

MAVEN_POMS = REPO_ROOT / "infra" / "maven"
FLINK_KAFKA_CONNECTOR = "flink-sql-connector-kafka-5.0.0-2.2.jar"


def lib_dir(settings: Settings | None = None) -> Path:
    return (settings or get_settings()).cache_dir / "lib"


def kafka_connector_jar(settings: Settings | None = None) -> Path:
    """The shaded Flink Kafka SQL connector; jobs add it with `pipeline.jars` / `env.add_jars`."""
    jar = lib_dir(settings) / "flink-connectors" / FLINK_KAFKA_CONNECTOR
    if not jar.is_file():
        raise StackError(f"{jar} is missing: run `ugt stack up` or `bash infra/install.sh` to resolve the Maven jars")
    return jar


def kafka_connector_jar_url(settings: Settings | None = None) -> str:
    """The connector jar as the file:// URL that `pipeline.jars` expects."""
    return kafka_connector_jar(settings).as_uri()


def parquet_jars(settings: Settings | None = None) -> list[Path]:
    """flink-parquet + Hadoop client jars for the tokenize job's lake sink (infra/maven/flink-parquet.xml)."""
    jars = sorted((lib_dir(settings) / "flink-parquet").glob("*.jar"))
    if not any(j.name.startswith("flink-parquet-") for j in jars):
        raise StackError(f"{lib_dir(settings) / 'flink-parquet'} has no flink-parquet jar: run `ugt stack up` "
                         "(it resolves them from Maven Central) or pass --lake '' to run without the lake")
    return jars


def jars_present(s: Settings) -> bool:
    lib = lib_dir(s)
    return any((lib / "kafka").glob("kafka_2.13-*.jar")) and (lib / "flink-connectors" / FLINK_KAFKA_CONNECTOR).is_file()


def _maven_package(pom: str, what: str, s: Settings, log: Callable[[str], None]) -> None:
    """`mvn package` of one of infra/maven's poms into lib_dir: offline first (after one online run everything
    is in ~/.m2), then online; StackError with Maven's own output when neither works."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(f"mvn not found and {what} are missing: run `bash infra/install.sh`")
    log(f"resolving {what} into {lib_dir(s)} (first time only, ~1 min) ...")
    cmd = [mvn, "-q", "-B", "-f", str(MAVEN_POMS / pom), "package", f"-Dugt.lib={lib_dir(s)}"]
    if subprocess.run([*cmd, "-o"], capture_output=True, text=True).returncode != 0:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"Maven could not resolve {what}:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")


def ensure_jars(s: Settings, log: Callable[[str], None] = print) -> None:
    """Resolve Kafka and the Flink connector from Maven Central once; later runs find them cached."""
    if jars_present(s):
        return
    _maven_package("pom.xml", "the stack's jars", s, log)
    if not jars_present(s):
        raise StackError(f"Maven ran but {lib_dir(s)} still lacks the Kafka or Flink connector jars")


def ensure_parquet_jars(s: Settings, log: Callable[[str], None] = print) -> None:
    """Resolve the lake's parquet jars from Maven Central once (offline first, like ensure_jars)."""
    if any((lib_dir(s) / "flink-parquet").glob("flink-parquet-*.jar")):
        return
    _maven_package("flink-parquet.xml", "the lake's parquet jars", s, log)


JVM_SOURCES = REPO_ROOT / "jobs" / "jvm"


TOKENIZE_JVM_LIBRARIES = ("avro-", "jedis-", "bcprov-")  # infra/maven/tokenize-jvm.xml's direct dependencies


def tokenize_jvm_dependency_jars(s: Settings | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Avro (+ Jackson), Jedis (+ commons-pool2, gson, org.json) and BouncyCastle for the tokenize job's JVM
    engine (infra/maven/tokenize-jvm.xml), resolved once; a cache from before a library was added resolves again."""
    s = s or get_settings()
    folder = lib_dir(s) / "tokenize-jvm"

    def missing() -> list[str]:
        return [prefix for prefix in TOKENIZE_JVM_LIBRARIES if not any(folder.glob(f"{prefix}*.jar"))]

    if missing():
        _maven_package("tokenize-jvm.xml", "the tokenize JVM engine's jars (Avro, Jedis, BouncyCastle)", s, log)
    if missing():
        raise StackError(f"Maven ran but {folder} still lacks the {', '.join(missing())} jar(s)")
    return sorted(folder.glob("*.jar"))


def tokenize_jvm_jars(s: Settings | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """The tokenize job's `--engine sql` jars: jobs/jvm/ compiled (javac, once per source version, named by a
    hash of the sources) first, then its dependencies (Avro, Jedis, BouncyCastle); all of them go on `pipeline.jars`."""
    import hashlib
    import os
    import tempfile

    s = s or get_settings()
    deps = tokenize_jvm_dependency_jars(s, log)
    sources = sorted(JVM_SOURCES.rglob("*.java"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    jar = lib_dir(s) / "ugt-jvm" / f"ugt-tokenize-{digest}.jar"
    if jar.is_file():
        return [jar, *deps]
    javac, jar_tool = shutil.which("javac"), shutil.which("jar")
    if javac is None or jar_tool is None:
        raise StackError("javac/jar not found: the tokenize job's --engine sql compiles jobs/jvm/ (needs a JDK 17+)")
    import pyflink

    classpath = [*sorted((Path(pyflink.__file__).parent / "lib").glob("*.jar")), *deps]
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as classes:
        done = subprocess.run([javac, "-nowarn", "--release", "17", "-d", classes,
                               "-cp", ":".join(map(str, classpath)), *map(str, sources)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"javac failed on {JVM_SOURCES}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        partial = jar.parent / f".{jar.name}.{os.getpid()}.tmp"  # jobs starting at once each build their own
        subprocess.run([jar_tool, "cf", str(partial), "-C", classes, "."], check=True)
        partial.replace(jar)
    log(f"compiled {len(sources)} sources of {JVM_SOURCES} into {jar}")
    return [jar, *deps]
