"""`ugt serve`: run the /recommend HTTP service with uvicorn (or snapshot popularity to a JSON file)."""

from __future__ import annotations

import argparse
import logging
import sys

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
        "--workers",
        type=int,
        default=1,
        help="HTTP worker processes (parse, validate, authenticate, answer) sharing ONE engine process that owns "
        "the model, the batching and the rate limit (default: 1: one process, the config's engine)",
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
        if args.port is not None and not 0 < args.port <= 65535:
            raise ConfigError(f"--port must be 1..65535, got {args.port}")
        config = load_config(args.config, overrides={"host": args.host, "port": args.port})
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

    # the event loop (HTTP) and the batch worker thread share the GIL: hand it over every 1 ms, not the
    # default 5 ms, so a CPU-bound batch does not hold requests in the socket buffers for 5 ms at a time
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if not 1 <= args.workers <= 64:
        print(f"ugt serve: --workers must be 1..64, got {args.workers}", file=sys.stderr)
        return 2
    port = config.port or settings.serving_port
    if args.workers > 1:
        return _serve_workers(settings, config, args.workers, port)
    try:
        app = create_app(settings, config)  # also checks the config and model in this process first
    except ConfigError as exc:
        print(f"ugt serve: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=config.host, port=port, log_level=config.log_level, access_log=False)
    return 0


SWITCH_INTERVAL_S = 0.001


def _serve_workers(settings, config, workers: int, port: int) -> int:
    """N HTTP workers and one shared engine, supervised (serving/supervisor.py); the service is composed once here."""
    from serving.compose import compose
    from serving.engine_spawn import on_cpu, wants_spawn
    from serving.supervisor import Supervisor, bind

    try:
        spawn = wants_spawn(config)  # a CUDA model: the engine is spawned and loads it; our copy stays on the CPU
        # checks the config and loads the model once, before any fork
        runtime = compose(settings, on_cpu(config) if spawn else config)
        supervisor = Supervisor(runtime, bind(config.host, port), workers, spawn_config=config if spawn else None)
    except ConfigError as exc:
        print(f"ugt serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ugt serve: cannot listen on {config.host}:{port}: {exc}", file=sys.stderr)
        return 1
    return supervisor.run()


def _snapshot(settings, config, path: str) -> int:
    import redis

    from serving.compose import redis_client
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
