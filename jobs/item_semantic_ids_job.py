"""PyFlink job `item_semantic_ids`: items.catalog (Avro ItemEvent) -> semantic IDs -> decode index + Feast item_metadata.

    <pyflink>/bin/flink run -py jobs/item_semantic_ids_job.py --artifact runs/sid/ml1m [--bounded] ...   # on the cluster
    python jobs/item_semantic_ids_job.py --local --artifact runs/sid/ml1m [--bounded] ...               # in-process
    <pyflink>/bin/flink run -py jobs/item_semantic_ids_job.py      # the artifact of the active version (ugt:sid:active)

At start it makes its artifact the active version if none is; then every batch is assigned under the version
active at that moment, so `ugt semantic-ids backfill --artifact NEW` reaches it without a restart.

Wiring only; the logic is jobs/item_semantic_ids_logic.py, the operators jobs/operators/item_sid_fn.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("ugt.jobs.item_semantic_ids_job")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from contracts.redis_keys import ACTIVE_KEY
    from infra.settings import get_settings
    from jobs.common import add_common_arguments

    s = get_settings()
    parser.add_argument("--artifact", default=None,
                        help="semantic-ID artifact folder (manifest.json + arrays.npz; `ugt semantic-ids build`); "
                        "default: the one registered for the active version (ugt:sid:active, set by an earlier "
                        "run or a backfill)")
    parser.add_argument("--source-topic", default=s.topics.items, help="input topic (default: %(default)s)")
    parser.add_argument("--dlq-topic", default=s.topics.dlq, help="dead-letter topic (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="encode once this many items are queued (default: %(default)s)")
    parser.add_argument("--flush-ms", type=int, default=200,
                        help="... or once the oldest queued item waited this long (default: %(default)s)")
    parser.add_argument("--active-key", default=ACTIVE_KEY,
                        help="Redis key of the active-version pointer the job sets (if unset) and follows; tests "
                        "use their own (default: %(default)s)")
    parser.add_argument("--feature-repo", default=str(s.feature_repo), help="Feast repo (default: %(default)s)")
    add_common_arguments(parser, "item_semantic_ids")


def check_artifact(path: str) -> str:
    """The artifact's absolute path once it loads (checksum verified); JobSetupError saying why if not."""
    from pathlib import Path

    from jobs.common import JobSetupError
    from jobs.item_semantic_ids_logic import artifact_version
    from models.semantic_ids.artifact import ArtifactError, SemanticIdArtifact

    folder = Path(path).resolve()
    if not folder.exists():
        raise JobSetupError(f"--artifact {path}: no such file or folder; build one with `ugt semantic-ids build`")
    try:
        artifact = SemanticIdArtifact.load(folder)
        version = artifact_version(folder)
    except (ArtifactError, ValueError) as exc:
        raise JobSetupError(f"--artifact {path}: {exc}") from exc
    log.info("semantic-ID artifact %s: version %s, %d items, codebook sizes %s", folder, version,
             len(artifact.item_ids), artifact.codebook_sizes)
    return str(folder if folder.is_dir() else folder.parent)


def active_artifact(redis_url: str, active_key: str) -> str:
    """The artifact folder of the active version (what `--artifact` defaults to); JobSetupError if there is none."""
    import redis

    from contracts.redis_keys import active_version, artifact_path_of
    from infra.redis_client import redis_from_url
    from jobs.common import JobSetupError

    try:
        client = redis_from_url(redis_url)
        version = active_version(client, active_key)
        path = artifact_path_of(client, version) if version else None
    except redis.RedisError as exc:
        raise JobSetupError(f"no --artifact given and Redis at {redis_url} is unreachable ({exc})") from exc
    if path is None:
        raise JobSetupError(f"no --artifact given and no artifact is registered for the active version "
                            f"({active_key} = {version}); pass --artifact (build one with `ugt semantic-ids build`)")
    return path


def build_pipeline(env, t_env, cfg) -> None:
    """items.catalog -> decode -> key_by(item_id) -> ItemSidFunction (writes Redis + Feast); bad records -> DLQ."""
    from pyflink.common import Types

    from jobs.common import add_kafka_sink, kafka_source, key_value_type
    from jobs.operators.item_sid_fn import DLQ_TAG, DecodeItemsFunction, ItemSidFunction, keyed_item_type

    x = cfg.extra
    raw = kafka_source(t_env, "items_source", x["source_topic"], cfg)
    items = raw.process(DecodeItemsFunction(cfg.registry, x["dlq_topic"]), output_type=keyed_item_type()) \
        .name("decode-items").uid("decode-items")
    overflowed = items.key_by(lambda row: row[0], key_type=Types.STRING()) \
        .process(ItemSidFunction(x["artifact"], cfg.registry, cfg.redis, x["feature_repo"], x["dlq_topic"],
                                 x["batch_size"], x["flush_ms"], x["active_key"]),
                 output_type=key_value_type()) \
        .name("item-sid").uid("item-sid")
    statements = t_env.create_statement_set()
    add_kafka_sink(t_env, statements, items.get_side_output(DLQ_TAG).union(overflowed), "dlq_sink",
                   x["dlq_topic"], cfg)
    statements.attach_as_datastream()


def main(argv: list[str] | None = None) -> int:
    from jobs.common import JobSetupError, run_job

    def options(args: argparse.Namespace) -> dict:
        if args.batch_size < 1 or args.flush_ms < 1:
            raise JobSetupError("--batch-size and --flush-ms must be >= 1")
        artifact = args.artifact or active_artifact(args.redis, args.active_key)
        return {"artifact": check_artifact(artifact), "source_topic": args.source_topic,
                "dlq_topic": args.dlq_topic, "batch_size": args.batch_size, "flush_ms": args.flush_ms,
                "feature_repo": args.feature_repo, "active_key": args.active_key}

    return run_job("item_semantic_ids", __doc__, add_arguments, options, build_pipeline, argv)


if __name__ == "__main__":
    sys.exit(main())
