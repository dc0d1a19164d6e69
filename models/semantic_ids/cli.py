"""`ugt semantic-ids`: build a semantic-ID artifact for a dataset, or report on one.

    ugt semantic-ids build --dataset ml-1m --config models/configs/semantic_ids_ml1m.yaml --out runs/sid/ml1m
    ugt semantic-ids report runs/sid/ml1m
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    build = sub.add_parser(
        "build",
        help="encode a dataset's items, train the quantizer, dedup, save the artifact + report",
        description="Build semantic IDs for every catalog item of a dataset and save a versioned artifact "
        "(manifest.json + arrays.npz) plus report.json / report.png in --out.",
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="ml-1m or ml-100k (fetched and cached by streams.datasets)")
    source.add_argument("--items", help="a generic-format dataset folder/file (streams.datasets.load_generic)")
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
    if args.dataset:
        from streams.datasets import load_dataset

        items, name = load_dataset(args.dataset).items, args.dataset
    else:
        from streams.datasets import load_generic

        items, name = load_generic(args.items).items, Path(args.items).stem
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


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _build(args) if args.action == "build" else _report(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"ugt semantic-ids {args.action}: {exc}", file=sys.stderr)
        return 2
