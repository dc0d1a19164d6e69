"""`ugt serve`: run the /recommend HTTP service with uvicorn (or snapshot popularity to a JSON file)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from infra.settings import get_settings
from serving.config import DEFAULT_CONFIG_PATH, ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG_PATH),
        help="serving YAML config (default: %(default)s); UGT_SERVING_<KEY> env vars override it",
    )
    parser.add_argument("--host", default=None, help="listen address (default: the config's host)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="listen port (default: the config's port, else UGT_SERVING_PORT / 8000)",
    )
    parser.add_argument(
        "--snapshot-popularity",
        metavar="PATH",
        default=None,
        help="write every ugt:popularity:<domain> set in Redis to PATH as a popularity file "
        "(the config's popularity_file fallback) and exit",
    )


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    try:
        config = load_config(args.config)
        if args.host is not None:
            config = replace(config, host=args.host)
        if args.port is not None:
            if not 0 < args.port <= 65535:
                raise ConfigError(f"--port must be 1..65535, got {args.port}")
            config = replace(config, port=args.port)
    except ConfigError as exc:
        print(f"ugt serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper() if config.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.snapshot_popularity:
        return _snapshot(settings, config, args.snapshot_popularity)

    import uvicorn

    from serving.app import create_app

    try:
        app = create_app(settings, config)
    except ConfigError as exc:
        print(f"ugt serve: {exc}", file=sys.stderr)
        return 2
    port = config.port or settings.serving_port
    uvicorn.run(app, host=config.host, port=port, log_level=config.log_level, access_log=False)
    return 0


def _snapshot(settings, config, path: str) -> int:
    import redis

    from serving.app import redis_client
    from serving.fallback import PopularityFallback, write_popularity_file

    fallback = PopularityFallback(
        redis_client(settings, config),
        key_prefix=config.popularity_key_prefix,
        cache_size=config.popularity_cache_size,
    )
    try:
        ranked = fallback.snapshot()
    except (redis.RedisError, OSError) as exc:
        print(f"ugt serve: cannot read popularity from {settings.redis_url}: {exc}", file=sys.stderr)
        return 1
    if not ranked:
        print(
            f"ugt serve: no {config.popularity_key_prefix}* sets in {settings.redis_url}; nothing written",
            file=sys.stderr,
        )
        return 1
    write_popularity_file(path, ranked)
    summary = ", ".join(f"{domain}: {len(items)}" for domain, items in sorted(ranked.items()))
    print(f"wrote {path} ({summary} items)")
    return 0
