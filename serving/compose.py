"""The composition root: the serving config in, every running part out (Redis, Feast, popularity, models,
rerankers, the service and its batch runner).

:func:`compose` is the one place that reads :class:`~infra.settings.Settings` and the
:class:`~serving.config.ServingConfig` to build things; it fails at once (ConfigError) when a part cannot be
built. Tests pass ``components=`` with fakes and get the same wiring around them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from infra.redis_client import redis_from_url
from infra.settings import Settings
from serving.batcher import DynamicBatcher
from serving.config import ConfigError, DomainConfig, ServingConfig, routes
from serving.engine_core import EngineCore, MetricsHub, serve
from serving.engine_model import serve_model
from serving.engine_process import EngineProcess
from serving.experiments import Experiments
from serving.fallback import PopularityFallback, PopularityGenerator, load_popularity_file
from serving.generator import Generator
from serving.http_models import DEFAULT_K
from serving.impressions import ImpressionPublisher
from serving.interests import InterestRanker
from serving.metrics import ServingMetrics
from serving.ratelimit import RateLimiter
from serving.reranker import FilterReranker, FreshExplorer, Reranker, RuleReranker
from serving.service import Components, RecommendService
from serving.similar import SimilarItems
from serving.user_state_reader import UserStateReader, read_many

log = logging.getLogger(__name__)

WARMUP_USER = "__ugt_serving_warmup__"


def redis_client(settings: Settings, config: ServingConfig) -> redis.Redis:
    """Serving's own Redis client, with timeouts so a hung Redis costs one timeout, not a hung request."""
    timeout = config.redis_timeout_ms / 1000.0
    return redis_from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)


def build_components(settings: Settings, config: ServingConfig, client: redis.Redis) -> Components:
    """The real parts named by the config; raises ConfigError with what is wrong."""
    fallback = _popularity(config, client)
    reader = _state_reader(settings, config, client)
    loaded: dict[tuple[str, str, str], Generator] = {}
    generators = _generators(config, fallback, settings, loaded)
    rerankers = _rerankers(config, client, settings)
    arm_routes = Experiments(config).routes()
    default = routes(config)[config.default_domain]
    similar = _similar(config, settings) if config.similar_index else None
    return Components(
        state_reader=reader,
        generator=generators[default.name],
        fallback=fallback,
        reranker=rerankers[default.name],
        generators=generators if config.domains else {},
        rerankers=rerankers if config.domains else {},
        arm_generators=_generators(config, fallback, settings, loaded, arm_routes),
        arm_rerankers=_rerankers(config, client, settings, arm_routes),
        similar=similar,
        interests=_interests(fallback, client, settings),
    )


def _interests(fallback: PopularityFallback, client: redis.Redis, settings: Settings) -> InterestRanker | None:
    """Declared interests (request field ``interests``): categories from Feast's item_metadata view in Redis;
    None (a request naming interests gets a 422 saying so) when the feature repo cannot be read."""
    from serving.items import ItemCatalog

    try:
        return InterestRanker(fallback, ItemCatalog.from_repo(client, settings.feature_repo))
    except (OSError, ValueError) as exc:
        log.warning("declared interests not served: the feature repo's layout cannot be read (%s)", exc)
        return None


def _similar(config: ServingConfig, settings: Settings) -> SimilarItems:
    """The similar-items index the config names; a missing or corrupt folder is a ConfigError."""
    from models.similar import SimilarIndexError

    try:
        similar = SimilarItems.load(config.similar_index, live_items=config.live_items,
                                    redis_factory=_feed_client(settings), sid_version=config.sid_version)
    except SimilarIndexError as exc:
        raise ConfigError(f"similar_index: {exc}") from exc
    log.info("similar items: %d items from %s%s", similar.size, config.similar_index,
             " (new items join from the item job's feed)" if similar.live is not None else "")
    return similar


def _popularity(config: ServingConfig, client: redis.Redis) -> PopularityFallback:
    file_items = {}
    if config.popularity_file:
        try:
            file_items = load_popularity_file(config.popularity_file)
        except ValueError as exc:
            raise ConfigError(f"popularity_file: {exc}") from exc
    return PopularityFallback(
        client,
        file_items,
        key_prefix=config.popularity_key_prefix,
        cache_size=config.popularity_cache_size,
        refresh_interval_s=config.popularity_refresh_s,
    )


def _state_reader(settings: Settings, config: ServingConfig, client: redis.Redis) -> UserStateReader:
    """The Feast SDK reader, or the direct read of Feast's Redis layout (``state_reader``)."""
    if config.state_reader == "feast":
        from infra.feast_store import open_feature_store
        from serving.user_state_reader import FeastStateReader

        try:
            return FeastStateReader(open_feature_store(settings), config.feature_service, client)
        except Exception as exc:  # Feast raises many types for an unapplied or broken repo
            raise ConfigError(
                f"cannot open Feast feature service {config.feature_service!r} from {settings.feature_repo} "
                f"(has `feast -c feature_repo apply` run?): {exc}"
            ) from exc
    from infra.feast_store import FeastRedisLayout
    from serving.user_state_reader import RedisStateReader

    try:
        layout = FeastRedisLayout.from_repo(settings.feature_repo)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"state_reader redis: cannot use {settings.feature_repo}: {exc}") from exc
    return RedisStateReader(client, layout, config.feature_view)


def _generators(config: ServingConfig, fallback: PopularityFallback, settings: Settings | None = None,
                loaded: dict[tuple[str, str, str], Generator] | None = None,
                by_key: Mapping[Any, DomainConfig] | None = None) -> dict[Any, Generator]:
    """The model per route (the router's domains, or ``by_key``: the experiment arms); a checkpoint several
    routes name is loaded once (``loaded`` is shared across calls)."""
    loaded = {} if loaded is None else loaded
    by_key = routes(config) if by_key is None else by_key
    out: dict[Any, Generator] = {}
    if config.torch_threads and any(r.generator == "ugt" for r in by_key.values()):
        import torch

        torch.set_num_threads(config.torch_threads)  # process-wide: once, before any model loads
    for name, route in by_key.items():
        key = (route.generator, route.generator_version, route.checkpoint)
        if key not in loaded:
            if route.generator == "ugt":
                where = f"experiments.{name[1]}.arms.{name[2]}" if isinstance(name, tuple) else name
                loaded[key] = _load_ugt(where, route, config, settings)
            else:
                loaded[key] = PopularityGenerator(fallback, version=route.generator_version)
        out[name] = loaded[key]
    return out


def _load_ugt(name: str, route: DomainConfig, config: ServingConfig, settings: Settings | None) -> Generator:
    """One domain's trained model; a bad checkpoint is a ConfigError naming the config key."""
    from serving.ugt_generator import CheckpointError, UGTGenerator

    began = time.perf_counter()
    if config.torch_compile:
        log.info("loading %s and compiling its CPU steps (torch_compile: true; ~30-70 s, less when "
                 "inductor's disk cache is warm)", route.checkpoint)
    try:
        generator = UGTGenerator(route.checkpoint, kv_cache_users=config.kv_cache_users,
                                 kv_cache_bytes=config.kv_cache_bytes, kv_cache_admission=config.kv_cache_admission,
                                 history_hop=config.history_hop, paged_attention=config.paged_attention,
                                 compile_cpu=config.torch_compile, quantize=config.quantize, rank_top=config.rank_top,
                                 beam_size=config.beam_size, live_items=config.live_items,
                                 redis_factory=_feed_client(settings) if settings else None,
                                 sid_version=config.sid_version, device=config.device,
                                 max_batch=max(config.batch_max_size, config.engine_max_rows
                                               if config.engine_scope == "model" else 0))
    except CheckpointError as exc:
        where = (f"{name}.checkpoint" if name.startswith("experiments.")
                 else f"domains.{name}.checkpoint" if config.domains else "checkpoint")
        raise ConfigError(f"{where}: {exc}") from exc
    if generator.engine.config.rank_top > 0:
        log.info("%s: the ranking head reorders retrieval's top %d", route.checkpoint,
                 generator.engine.config.rank_top)
    if config.torch_compile:
        log.info("%s ready in %.1f s", route.checkpoint, time.perf_counter() - began)
    return generator


def _feed_client(settings: Settings) -> Callable[[], redis.Redis]:
    """Redis clients for a live catalog's feed thread: its own connection, with room for XREAD BLOCK (1 s)."""
    return lambda: redis_from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)


def _rerankers(config: ServingConfig, client: redis.Redis, settings: Settings,
               by_key: Mapping[Any, DomainConfig] | None = None) -> dict[Any, Reranker]:
    """The rules per route (the router's domains, or ``by_key``: the experiment arms); item categories come
    from Feast's item_metadata view in Redis."""
    out: dict[Any, Reranker] = {}
    catalog = None
    for name, route in (routes(config) if by_key is None else by_key).items():
        if not route.rerank.active:  # no rule: the generator's order, explored in k * pool when fresh_slots > 0
            fresh = FreshExplorer(route.rerank.fresh_slots, route.rerank.fresh_rate) if route.rerank.fresh_slots else None
            out[name] = FilterReranker(route.rerank.pool if fresh else 1, fresh)
            continue
        if catalog is None:
            from serving.items import ItemCatalog

            catalog = ItemCatalog.from_repo(client, settings.feature_repo)
        out[name] = RuleReranker(route.rerank, catalog)
    return out


def served_generators(components: Components, config: ServingConfig) -> dict[str, Generator]:
    """The model of each served domain (the default domain's alone without a router), and of each experiment
    arm with its own (keyed ``domain/experiment/arm``)."""
    own = components.generators or {config.default_domain: components.generator}
    arms = {"/".join(key): gen for key, gen in components.arm_generators.items()}
    return {**own, **arms}


def keep_states(reader: Any, served: dict[str, Generator]) -> None:
    """A Redis state reader keeps as many users' decoded states as the UGT models keep rows (0 without one): an
    unchanged state is then not decoded again, a grown one only in its new events (serving/user_state_reader.py)."""
    rows = max((getattr(getattr(gen, "local", gen), "prepared_capacity", 0) for gen in served.values()), default=0)
    if isinstance(getattr(reader, "recent_users", None), int):
        reader.recent_users = max(reader.recent_users, rows)


def domains_on_gpu(by_domain: dict[str, Generator]) -> list[str]:
    """The domains whose model runs on CUDA, which does not survive a fork into an engine process."""
    return sorted(domain for domain, gen in by_domain.items()
                  if getattr(getattr(getattr(gen, "engine", None), "device", None), "type", "cpu") == "cuda")


def pick_engine(config: ServingConfig, by_domain: dict[str, Generator]) -> str:
    """``thread`` or ``process`` for the config's ``engine``; a model on the GPU cannot be forked."""
    on_gpu = domains_on_gpu(by_domain)
    engine = config.engine if config.engine != "auto" else ("thread" if on_gpu else "process")
    if engine == "process" and on_gpu:
        raise ConfigError(
            f"engine: process forks the loaded model into the engine process, and CUDA does not survive a fork "
            f"(domains {on_gpu} run on the GPU): set engine: thread or auto (the GPU's kernels release the GIL)"
        )
    return engine


def start_background(live: dict[str, Any]) -> None:
    """Start each generator's background work (a live catalog's feed thread) in this process, once per model."""
    for gen in {id(g): g for g in live.values()}.values():
        gen.start_background()


def kv_caches(components: Components, config: ServingConfig) -> dict[str, object]:
    """The KV cache of each domain whose model has one (their hits and misses are Prometheus series)."""
    return {domain: gen.engine.cache for domain, gen in served_generators(components, config).items()
            if getattr(getattr(gen, "engine", None), "cache", None) is not None}


def engine_main(runtime: Runtime, restarts: int, *, path: str | None = None, sock: socket.socket | None = None,
                parent_pid: int | None = None) -> None:
    """In a forked engine process (``engine: process`` or `--workers N`): fresh metrics, the live catalogs' feed
    threads, then :func:`serving.engine_core.serve` on the socket pair ``sock`` or the Unix socket ``path``."""
    config = runtime.config
    metrics = ServingMetrics()
    metrics.watch_kv_caches(kv_caches(runtime.components, config))
    metrics.watch_live_items(runtime.live)
    if restarts:
        metrics.engine_restarts.inc(restarts)  # the engine alone counts them: added up across processes once
    runtime.service.use_metrics(metrics)
    start_background(runtime.live)  # the feed threads run where the models serve
    if runtime.components.similar is not None and config.similar_candidates:
        runtime.components.similar.start_background()  # the candidate source's copy of the index
    capture_graphs_at_start(runtime.components, config)
    if config.engine_scope == "model" and path is not None:  # `--workers N`: the workers run the pipeline
        from serving.remote_model import model_routes

        serve_model(model_routes(served_generators(runtime.components, config)), config, metrics,
                    MetricsHub(metrics.render), path=path, parent_pid=parent_pid)
        return
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst) if config.rate_limit_rps else None
    refused = {reason: metrics.engine_refused.labels(reason) for reason in ("queue_full", "rate_limited")}
    core = EngineCore(runtime.service.run_batch, max_size=config.batch_max_size,
                      max_wait_s=config.batch_max_wait_ms / 1000.0, queue_max=config.engine_queue_max,
                      limiter=limiter, on_queue=metrics.engine_queue.set, on_batch=metrics.batch_size.observe,
                      on_refused=lambda reason: refused[reason].inc())
    serve(core, MetricsHub(metrics.render), path=path, sock=sock, parent_pid=parent_pid)


def capture_graphs_at_start(components: Components, config: ServingConfig) -> None:
    """Every CUDA graph the engine's UGT models can need, captured before the first request (none on CPU)."""
    from models.ugt.runner.warmup import capture_graphs

    ks = sorted({DEFAULT_K, DEFAULT_K * config.rerank.pool})
    for domain, generator in served_generators(components, config).items():
        engine = getattr(generator, "engine", None)
        if engine is None or not getattr(engine, "graphs_on", False):
            continue
        started = time.perf_counter()
        count = capture_graphs(engine, ks, engine.N + engine.E)
        log.info("%s: %d CUDA graphs captured at start in %.1f s (k %s)", domain, count,
                 time.perf_counter() - started, ks)


def build_batcher(runtime: Runtime) -> DynamicBatcher | EngineProcess:
    """The pipeline's runner: a thread beside the event loop, or the forked engine process (docs/SERVING.md)."""
    config = runtime.config
    if runtime.engine == "thread":
        return DynamicBatcher(runtime.service.run_batch, max_size=config.batch_max_size,
                              max_wait_s=config.batch_max_wait_ms / 1000.0,
                              on_batch=runtime.metrics.batch_size.observe, max_queue=config.engine_queue_max)

    def in_engine(sock: socket.socket, restarts: int) -> None:  # in each forked engine, its parent the HTTP process
        engine_main(runtime, restarts, sock=sock, parent_pid=os.getppid())

    return EngineProcess(in_engine, hang_timeout_s=config.engine_hang_timeout_ms / 1000.0,
                         exposition=runtime.metrics.render)


def model_pipeline(worker: Runtime, path: str) -> DynamicBatcher:
    """A `--workers N` worker's own batcher (engine_scope: model): its UGT models sent to the engine at ``path``."""
    from serving.remote_model import ModelChannel, use_remote_models

    config = worker.config
    channel = ModelChannel(path, timeout_s=config.engine_hang_timeout_ms / 1000.0)
    served = served_generators(worker.components, config)
    if not use_remote_models(worker.components, served, channel, prepared_users=config.kv_cache_users):
        log.warning("engine_scope: model, but no domain serves a UGT model: the engine has nothing to run")
    keep_states(worker.components.state_reader, served)  # the UGT generators (or what now wraps them) keep rows
    return DynamicBatcher(worker.service.run_batch, max_size=config.batch_max_size,
                          max_wait_s=config.batch_max_wait_ms / 1000.0,
                          on_batch=worker.metrics.batch_size.observe, max_queue=config.engine_queue_max)


def warm_up(parts: Components) -> None:
    """One state read at start: the Feast SDK's first call (registry, lazy imports) can take seconds, which
    would otherwise land on the first requests and run them into request_timeout_ms."""
    started = time.perf_counter()
    try:
        read_many(parts.state_reader, [WARMUP_USER])
    except Exception as exc:  # an unreachable store is reported by /health and answered by fallbacks
        log.warning("state reader warm-up failed: %s", exc)
        return
    log.info("state reader warm-up took %.1f ms", 1000 * (time.perf_counter() - started))


@dataclass
class Runtime:
    """Everything one app serves with, built once by :func:`compose` and handed to the routes."""

    settings: Settings
    config: ServingConfig
    client: redis.Redis | None  # None when the components were injected without one
    components: Components
    metrics: ServingMetrics
    service: RecommendService
    engine: str  # thread | process | shared (a `--workers N` worker: serving/supervisor.py)
    batcher: Any  # DynamicBatcher | serving.engine_ipc.EngineConnection (EngineProcess, or a worker's EngineClient)
    live: dict[str, Any]  # domain -> generator with a live catalog (its feed thread starts with the app)
    pipeline: Any = None  # engine_scope: model: a worker's own DynamicBatcher (its engine runs only the model)


def compose(settings: Settings, config: ServingConfig, components: Components | None = None,
            client: redis.Redis | None = None, batcher: bool = True) -> Runtime:
    """Build (or take) the components, pick the engine, and wire the service, metrics and batch runner
    (``batcher=False``: none, for a spawned engine process, which runs :func:`engine_main` itself)."""
    if client is None and components is None:
        client = redis_client(settings, config)
    if components is None:
        assert client is not None
        components = build_components(settings, config, client)
    served = served_generators(components, config)
    engine = pick_engine(config, served)
    keep_states(components.state_reader, served)
    metrics = ServingMetrics()
    live = {domain: gen for domain, gen in served.items() if getattr(gen, "live", None) is not None}
    if engine == "thread":  # else the engine process watches them (engine_main): they serve there
        metrics.watch_kv_caches(kv_caches(components, config))
        metrics.watch_live_items(live)
    service = RecommendService(config, components, metrics)
    if components.similar is not None:
        metrics.watch_similar(components.similar)
    if config.impressions:
        service.impressions = ImpressionPublisher(settings, metrics, config.impression_buffer,
                                                  config.impression_timeout_ms)
    log.info("serving config: %s (engine: %s)", asdict(config), engine)
    if client is not None:
        try:
            client.ping()  # opens the first pooled connection now rather than in the first request
        except (redis.RedisError, OSError) as exc:
            log.warning("Redis at %s does not answer (%s): answering from fallbacks until it does",
                        settings.redis_url, exc)
        warm_up(components)
    log.info("model %s, state reader %s, Redis %s", service.model_name, components.state_reader.name,
             settings.redis_url)
    runtime = Runtime(settings, config, client, components, metrics, service, engine, None, live)
    if batcher:
        runtime.batcher = build_batcher(runtime)
    return runtime
