"""Helper of test_tokenize_metrics: the tokenize job, unbounded, on an in-process mini-cluster with the
Prometheus reporter of infra/flink/config.yaml (port from argv). Run in its own process, so the reporter jar
(on the FLINK_LIB_DIR the test prepares) is on the classpath when PyFlink starts its JVM.

    python tests/integration/tokenize_metrics_job.py PORT -- <tokenize job options>
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import yaml  # noqa: E402

from infra.settings import REPO_ROOT  # noqa: E402


def flat(prefix: str, tree: object) -> dict[str, str]:
    """Nested YAML -> Flink's dotted keys."""
    if not isinstance(tree, dict):
        return {prefix: str(tree)}
    out: dict[str, str] = {}
    for key, value in tree.items():
        out.update(flat(f"{prefix}.{key}" if prefix else str(key), value))
    return out


def reporter_options(port: int) -> dict[str, str]:
    """The `metrics:` section of the cluster's config template, with this port."""
    template = yaml.safe_load((REPO_ROOT / "infra" / "flink" / "config.yaml").read_text())
    options = flat("metrics", template["metrics"])
    options["metrics.reporter.prom.port"] = str(port)
    return options


def main(argv: list[str]) -> int:
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    import jobs.tokenize_job as tokenize_job
    from jobs.common import config_from_args, flink_configuration

    port, job_args = int(argv[0]), argv[2:] if argv[1:2] == ["--"] else argv[1:]
    parser = tokenize_job.argparse.ArgumentParser()
    tokenize_job.add_arguments(parser)
    args = parser.parse_args(["--local", *job_args])
    cfg = config_from_args(args, "tokenize", **tokenize_job.job_options(args))
    configuration = Configuration()
    for key, value in {**flink_configuration(cfg), **reporter_options(port)}.items():
        configuration.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(configuration)
    t_env = StreamTableEnvironment.create(env)
    tokenize_job.build_pipeline(env, t_env, cfg)
    env.execute("tokenize-metrics-test")  # unbounded: runs until the test stops this process
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
