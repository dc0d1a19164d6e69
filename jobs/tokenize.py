"""PyFlink job `tokenize`: events.raw (Avro UserEvent) -> events.tokens (Avro TokenizedEvent) + events.dlq.

    <pyflink>/bin/flink run -py jobs/tokenize.py [--bounded] [--parallelism N] ...   # on the cluster
    python jobs/tokenize.py --local [--bounded] ...                                 # in-process

Wiring only; the logic is jobs/tokenize_logic.py, the operator jobs/operators/tokenize_fn.py.
Top-level imports are stdlib only, because of the guard below.
"""

from __future__ import annotations

import sys

if __name__ == "tokenize":
    # `flink run -py jobs/tokenize.py` puts jobs/ on sys.path and ships this file to the Python workers,
    # so Python's own `import tokenize` (inspect, linecache) would find this file: hand back the stdlib one.
    import importlib.util as _util
    import sysconfig as _sysconfig

    _spec = _util.spec_from_file_location("tokenize", _sysconfig.get_path("stdlib") + "/tokenize.py")
    _stdlib = _util.module_from_spec(_spec)
    sys.modules["tokenize"] = _stdlib
    _spec.loader.exec_module(_stdlib)
    globals().update({k: v for k, v in vars(_stdlib).items() if not k.startswith("__")})
else:
    import argparse

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from infra.settings import get_settings
        from jobs.common import add_common_arguments

        topics = get_settings().topics
        parser.add_argument("--source-topic", default=topics.raw, help="input topic (default: %(default)s)")
        parser.add_argument("--tokens-topic", default=topics.tokens, help="output topic (default: %(default)s)")
        parser.add_argument("--dlq-topic", default=topics.dlq, help="dead-letter topic (default: %(default)s)")
        add_common_arguments(parser, "tokenize")

    def build_pipeline(env, t_env, cfg) -> None:
        """events.raw -> TokenizeFunction -> events.tokens, its side output -> events.dlq."""
        from jobs.common import add_kafka_sink, kafka_source, key_value_type
        from jobs.operators.tokenize_fn import DLQ_TAG, TokenizeFunction

        x = cfg.extra
        raw = kafka_source(t_env, "raw_source", x["source_topic"], cfg)
        tokens = raw.process(
            TokenizeFunction(cfg.registry, x["tokens_topic"], x["dlq_topic"]), output_type=key_value_type()
        ).name("tokenize").uid("tokenize")
        statements = t_env.create_statement_set()
        add_kafka_sink(t_env, statements, tokens, "tokens_sink", x["tokens_topic"], cfg)
        add_kafka_sink(t_env, statements, tokens.get_side_output(DLQ_TAG), "dlq_sink", x["dlq_topic"], cfg)
        statements.attach_as_datastream()

    def main(argv: list[str] | None = None) -> int:
        from jobs.common import run_job

        def options(args: argparse.Namespace) -> dict:
            return {"source_topic": args.source_topic, "tokens_topic": args.tokens_topic, "dlq_topic": args.dlq_topic}

        return run_job("tokenize", __doc__, add_arguments, options, build_pipeline, argv)

    if __name__ == "__main__":
        sys.exit(main())
