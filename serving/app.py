"""The HTTP layer: FastAPI routes, request bounds, error bodies, metrics; the pipeline lives in service.py.

``create_app(settings, config)`` builds the real parts (Redis, Feast, popularity) and fails at once when
they cannot be built; tests pass ``components=`` with fakes instead.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from infra.settings import Settings, get_settings
from serving.batcher import DynamicBatcher
from serving.config import ConfigError, ServingConfig, routes
from serving.engine_process import EngineProcess, EngineUnavailable
from serving.fallback import NoPopularity, PopularityFallback, load_popularity_file
from serving.generator import Generator, PopularityGenerator
from serving.http_models import (
    REQUEST_EXAMPLES,
    ErrorResponse,
    HealthResponse,
    RecommendRequest,
    RecommendResponse,
)
from serving.metrics import ServingMetrics, merge_expositions
from serving.ratelimit import RateLimiter
from serving.reranker import FilterReranker, Reranker, RuleReranker
from serving.service import (
    ENGINE_UNAVAILABLE,
    TIMEOUT,
    Answer,
    Components,
    RecommendService,
    UnknownDomain,
)
from serving.user_state_reader import read_many

log = logging.getLogger(__name__)

ENDPOINTS = ("/recommend", "/health", "/metrics", "/docs", "/openapi.json")


def redis_client(settings: Settings, config: ServingConfig) -> redis.Redis:
    """Serving's own Redis client, with timeouts so a hung Redis costs one timeout, not a hung request."""
    timeout = config.redis_timeout_ms / 1000.0
    return redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)


def build_components(settings: Settings, config: ServingConfig, client: redis.Redis) -> Components:
    """The real parts named by the config; raises ConfigError with what is wrong."""
    file_items = {}
    if config.popularity_file:
        try:
            file_items = load_popularity_file(config.popularity_file)
        except ValueError as exc:
            raise ConfigError(f"popularity_file: {exc}") from exc
    fallback = PopularityFallback(
        client,
        file_items,
        key_prefix=config.popularity_key_prefix,
        cache_size=config.popularity_cache_size,
        refresh_interval_s=config.popularity_refresh_s,
    )
    if config.state_reader == "feast":
        from infra.feast_store import open_feature_store
        from serving.user_state_reader import FeastStateReader

        try:
            reader = FeastStateReader(open_feature_store(settings), config.feature_service, client)
        except Exception as exc:  # Feast raises many types for an unapplied or broken repo
            raise ConfigError(
                f"cannot open Feast feature service {config.feature_service!r} from {settings.feature_repo} "
                f"(has `feast -c feature_repo apply` run?): {exc}"
            ) from exc
    else:
        from infra.feast_store import FeastRedisLayout
        from serving.user_state_reader import RedisStateReader

        try:
            layout = FeastRedisLayout.from_repo(settings.feature_repo)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"state_reader redis: cannot use {settings.feature_repo}: {exc}") from exc
        reader = RedisStateReader(client, layout, config.feature_view)
    generators = _generators(config, fallback, settings)
    rerankers = _rerankers(config, client)
    default = routes(config)[config.default_domain]
    return Components(
        state_reader=reader,
        generator=generators[default.name],
        fallback=fallback,
        reranker=rerankers[default.name],
        generators=generators if config.domains else {},
        rerankers=rerankers if config.domains else {},
    )


def _generators(config: ServingConfig, fallback: PopularityFallback,
                settings: Settings | None = None) -> dict[str, Generator]:
    """The router's model per domain; a checkpoint several domains name is loaded once."""
    loaded: dict[tuple[str, str, str], Generator] = {}
    out: dict[str, Generator] = {}
    if config.torch_threads and any(r.generator == "ugt" for r in routes(config).values()):
        import torch

        torch.set_num_threads(config.torch_threads)  # process-wide: once, before any model loads
    for name, route in routes(config).items():
        key = (route.generator, route.generator_version, route.checkpoint)
        if key not in loaded:
            if route.generator == "ugt":
                from serving.ugt_generator import CheckpointError, UGTGenerator

                began = time.perf_counter()
                if config.torch_compile:
                    log.info("loading %s and compiling its CPU steps (torch_compile: true; ~30-70 s, less when "
                                "inductor's disk cache is warm)", route.checkpoint)
                try:
                    loaded[key] = UGTGenerator(route.checkpoint, kv_cache_users=config.kv_cache_users,
                                               compile_cpu=config.torch_compile, rank_top=config.rank_top,
                                               beam_size=config.beam_size, live_items=config.live_items,
                                               redis_factory=_feed_client(settings) if settings else None,
                                               sid_version=config.sid_version)
                    if loaded[key].engine.config.rank_top > 0:
                        log.info("%s: the ranking head reorders retrieval's top %d", route.checkpoint,
                                 loaded[key].engine.config.rank_top)
                    if config.torch_compile:
                        log.info("%s ready in %.1f s", route.checkpoint, time.perf_counter() - began)
                except CheckpointError as exc:
                    where = f"domains.{name}.checkpoint" if config.domains else "checkpoint"
                    raise ConfigError(f"{where}: {exc}") from exc
            else:
                loaded[key] = PopularityGenerator(fallback, version=route.generator_version)
        out[name] = loaded[key]
    return out


def _feed_client(settings: Settings):
    """Redis clients for a live catalog's feed thread: its own connection, with room for XREAD BLOCK (1 s)."""
    return lambda: redis.Redis.from_url(settings.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)


def _rerankers(config: ServingConfig, client: redis.Redis) -> dict[str, Reranker]:
    """The router's rules per domain; item categories come from Feast's item_metadata view in Redis."""
    out: dict[str, Reranker] = {}
    catalog = None
    for name, route in routes(config).items():
        if not route.rerank.active:
            out[name] = FilterReranker()
            continue
        if catalog is None:
            from serving.items import ItemCatalog

            catalog = ItemCatalog.from_repo(client, get_settings().feature_repo)
        out[name] = RuleReranker(route.rerank, catalog)
    return out


def _error(
    status: int, error: str, message: str, errors: list[dict[str, str]] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=error, message=message, errors=errors or [])
    return JSONResponse(status_code=status, content=body.model_dump())


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """400 for a body that is not JSON or missing, 422 (with every field's problem) for a wrong one."""
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    for problem in problems:
        if problem.get("type") == "json_invalid":
            detail = (problem.get("ctx") or {}).get("error", "")
            return _error(400, "bad_json", f"request body is not valid JSON: {detail}".rstrip(": "))
        if tuple(problem.get("loc", ())) == ("body",) and problem.get("type") == "missing":
            return _error(
                400,
                "missing_body",
                "request body is required: a JSON object like "
                + json.dumps(REQUEST_EXAMPLES["known_user"]["value"]),
            )
    errors = []
    for problem in problems:
        field = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        text = str(problem.get("msg", "invalid"))
        if field == "body" and problem.get("type") in ("model_attributes_type", "model_type"):
            text = "must be a JSON object sent as Content-Type: application/json, like " + json.dumps(
                REQUEST_EXAMPLES["exclude_and_domain"]["value"]
            )
        errors.append({"field": field, "message": text, "type": str(problem.get("type"))})
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return _error(422, "invalid_request", message, errors)


WARMUP_USER = "__ugt_serving_warmup__"


def _warm_up(parts: Components) -> None:
    """One state read at start: the Feast SDK's first call (registry, lazy imports) can take seconds, which
    would otherwise land on the first requests and run them into request_timeout_ms."""
    started = time.perf_counter()
    try:
        read_many(parts.state_reader, [WARMUP_USER])
    except Exception as exc:  # an unreachable store is reported by /health and answered by fallbacks
        log.warning("state reader warm-up failed: %s", exc)
        return
    log.info("state reader warm-up took %.1f ms", 1000 * (time.perf_counter() - started))


def parse_request(body: bytes) -> RecommendRequest:
    """The validated request, parsed straight from the bytes by pydantic (no json.loads + dict pass).

    Raises RequestValidationError shaped like FastAPI's own (locations under "body"), so the one
    error handler answers 400 / 422 the same way for every route.
    """
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return RecommendRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(problems) from None


class GuardMiddleware:
    """Pure ASGI: caps request bodies (413) before parsing and counts every response by endpoint and status."""

    def __init__(self, app: Any, max_body_bytes: int, metrics: ServingMetrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            too_big = self._declared_too_big(scope)
            if too_big is not None:
                await too_big(scope, receive, counting_send)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, over = await self._read_body(receive)
                if over:
                    await self._too_large()(scope, receive, counting_send)
                    return
                receive = self._replay(body, receive)
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _too_large(self) -> JSONResponse:
        return _error(413, "body_too_large", f"request body is larger than {self.max_body_bytes} bytes")

    def _declared_too_big(self, scope: dict) -> JSONResponse | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    return _error(
                        400, "bad_content_length", f"Content-Length is not a number: {value[:32]!r}"
                    )
                if int(value) > self.max_body_bytes:
                    return self._too_large()
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False  # client went away; the app sees an empty body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    @staticmethod
    def _replay(body: bytes, receive: Any) -> Any:
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as Starlette expects

        return replay


class UGTApp(FastAPI):
    """FastAPI with a direct lane for the hot route.

    ``POST /recommend`` is answered by a plain ASGI handler (wrapped in :class:`GuardMiddleware`) before
    Starlette's middleware stack and router: those layers (error and telemetry middleware, routing, the
    request/response wrappers) cost as much CPU per request as the whole model path, on the one event loop
    that every request shares. Everything else (health, metrics, docs, the OpenAPI spec, which still
    documents /recommend through the FastAPI route) goes through FastAPI as usual.
    """

    fast_routes: dict[tuple[str, str], Any]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            handler = self.fast_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def start_background(live: dict[str, Any]) -> None:
    """Start each generator's background work (a live catalog's feed thread) in this process, once per model."""
    for gen in {id(g): g for g in live.values()}.values():
        gen.start_background()


def _batcher(engine: str, config: ServingConfig, service: RecommendService, metrics: ServingMetrics,
             kv_caches: dict[str, object], live: dict[str, Any]) -> DynamicBatcher | EngineProcess:
    """The pipeline's runner: a thread beside the event loop, or the forked engine process (docs/SERVING.md)."""
    if engine == "thread":
        return DynamicBatcher(service.run_batch, max_size=config.batch_max_size,
                              max_wait_s=config.batch_max_wait_ms / 1000.0, on_batch=metrics.batch_size.observe)

    def engine_metrics() -> None:  # in each forked engine: its own series, from zero, added up at scrape
        fresh = ServingMetrics()
        fresh.watch_kv_caches(kv_caches)
        fresh.watch_live_items(live)
        service.use_metrics(fresh)
        start_background(live)  # the feed threads run where the models serve

    return EngineProcess(
        service.run_batch,
        max_size=config.batch_max_size,
        max_wait_s=config.batch_max_wait_ms / 1000.0,
        on_batch=lambda size: service.metrics.batch_size.observe(size),
        encode=lambda answer: answer.to_json() if isinstance(answer, Answer) else answer,
        render_metrics=lambda: service.metrics.render(),
        after_fork=engine_metrics,
        on_restart=metrics.engine_restarts.inc,
        hang_timeout_s=config.engine_hang_timeout_ms / 1000.0,
    )


def create_app(
    settings: Settings | None = None,
    config: ServingConfig | None = None,
    *,
    components: Components | None = None,
    client: redis.Redis | None = None,
) -> FastAPI:
    """The /recommend service. Builds Redis / Feast / popularity parts unless ``components`` is given."""
    settings = settings or get_settings()
    config = config or ServingConfig()
    if client is None and components is None:
        client = redis_client(settings, config)
    if components is None:
        assert client is not None
        components = build_components(settings, config, client)
    metrics = ServingMetrics()
    by_domain = components.generators or {config.default_domain: components.generator}
    on_gpu = sorted(domain for domain, gen in by_domain.items()
                    if getattr(getattr(getattr(gen, "engine", None), "device", None), "type", "cpu") == "cuda")
    engine = config.engine if config.engine != "auto" else ("thread" if on_gpu else "process")
    if engine == "process" and on_gpu:
        raise ConfigError(
            f"engine: process forks the loaded model into the engine process, and CUDA does not survive a fork "
            f"(domains {on_gpu} run on the GPU): set engine: thread or auto (the GPU's kernels release the GIL)"
        )
    kv_caches = {domain: gen.engine.cache for domain, gen in by_domain.items()
                 if getattr(getattr(gen, "engine", None), "cache", None) is not None}
    metrics.watch_kv_caches(kv_caches)
    live = {domain: gen for domain, gen in by_domain.items() if getattr(gen, "live", None) is not None}
    service = RecommendService(config, components, metrics)
    log.info("serving config: %s (engine: %s)", asdict(config), engine)
    if client is not None:
        try:
            client.ping()  # opens the first pooled connection now rather than in the first request
        except (redis.RedisError, OSError) as exc:
            log.warning(
                "Redis at %s does not answer (%s): answering from fallbacks until it does",
                settings.redis_url,
                exc,
            )
        _warm_up(components)
    log.info(
        "model %s, state reader %s, Redis %s",
        service.model_name,
        components.state_reader.name,
        settings.redis_url,
    )

    if engine == "thread":
        metrics.watch_live_items(live)
    batcher = _batcher(engine, config, service, metrics, kv_caches, live)
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst) if config.rate_limit_rps else None
    api_keys = frozenset(config.api_keys)
    request_timeout_s = config.request_timeout_ms / 1000.0

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # everything built so far (model, item tables, imports) lives as long as the process: keep it out of
        # the collector's full passes, which otherwise walk it all and pause requests for tens of ms (and, with
        # engine: process, frozen before the fork so the engine shares those pages instead of copying them)
        gc.collect()
        gc.freeze()
        if engine == "thread":
            start_background(live)
        batcher.start()
        yield
        batcher.close()

    app = UGTApp(
        title="UGT recommend",
        version="0.1.0",
        description="Recommendations from the user's streaming state; degrades to a popularity fallback, "
        "marked in the response, instead of failing.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.batcher = batcher
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(GuardMiddleware, max_body_bytes=config.max_body_bytes, metrics=metrics)
    error_responses: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorResponse, "description": "Body is not JSON, or missing."},
        401: {"model": ErrorResponse, "description": "Missing or unknown X-API-Key (when api_keys are set)."},
        413: {"model": ErrorResponse, "description": f"Body larger than {config.max_body_bytes} bytes."},
        422: {
            "model": ErrorResponse,
            "description": "A field is missing, of the wrong type or out of bounds, or the domain is not served.",
        },
        429: {"model": ErrorResponse, "description": "Rate limit of the API key exceeded; see Retry-After."},
        503: {
            "model": ErrorResponse,
            "description": "Neither the model nor any popularity source can answer.",
        },
    }

    def refuse(kind: str, status: int, message: str, **extra: Any) -> JSONResponse:
        metrics.errors.labels(kind).inc()
        return _error(status, kind, message, **extra)

    # The body is parsed in the handler (parse_request), not by FastAPI's dependency machinery, which cost
    # about as much CPU per request as the whole pipeline; the spec still documents it (see openapi() below).
    request_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/RecommendRequest"},
                "examples": REQUEST_EXAMPLES,
            }
        },
    }
    key_header = {
        "name": "x-api-key",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "Required when the service has api_keys.",
    }

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=error_responses,
        openapi_extra={"requestBody": request_body, "parameters": [key_header]},
    )
    async def recommend(http: Request) -> Response:
        """Top-k items for a user: state -> generator -> reranker, or the popularity fallback (marked)."""
        client_host = http.client.host if http.client else None
        return await answer_recommend(await http.body(), http.headers.get("x-api-key"), client_host)

    async def answer_recommend(body: bytes, x_api_key: str | None, client_host: str | None) -> Response:
        try:
            request = parse_request(body)
        except RequestValidationError as exc:
            return await _validation_error(None, exc)  # type: ignore[arg-type]
        if api_keys and x_api_key not in api_keys:
            what = "missing" if x_api_key is None else "unknown"
            return refuse("unauthorized", 401, f"X-API-Key header {what}: send one of the service's API keys")
        if limiter is not None:
            who = x_api_key or client_host or "anonymous"
            wait = limiter.acquire(who)
            if wait > 0:
                response = refuse(
                    "rate_limited", 429, f"rate limit of {config.rate_limit_rps:g} requests/s exceeded; retry later"
                )
                response.headers["Retry-After"] = RateLimiter.retry_after(wait)
                return response
        for name, values, most in (
            ("exclude", request.exclude, config.max_exclude),
            ("context", request.context, config.max_context),
        ):
            if len(values) > most:
                message = f"{name}: at most {most} items, got {len(values)}"
                return refuse("invalid_request", 422, message, errors=[{"field": name, "message": message}])
        try:
            service.domain_of(request)
        except UnknownDomain as exc:
            return refuse("invalid_request", 422, f"domain: {exc}", errors=[{"field": "domain", "message": str(exc)}])
        started = time.perf_counter()
        try:
            answer = await batcher.submit(request, request_timeout_s)
        except (TimeoutError, EngineUnavailable) as exc:
            reason = TIMEOUT if isinstance(exc, TimeoutError) else ENGINE_UNAVAILABLE
            try:
                answer = await asyncio.to_thread(
                    service.fallback_answer, request, reason, time.perf_counter() - started
                )
            except NoPopularity as no_popularity:
                answer = no_popularity
        except Exception:  # the batch itself failed (a bug): still never a bare 500 without a body
            log.exception("batch failed")
            return refuse("internal", 500, "internal error while answering; see the service log")
        if isinstance(answer, NoPopularity):
            return _error(503, "no_recommendations", f"no recommendations available: {answer}")
        if isinstance(answer, bytes):  # engine: process serializes in the engine
            return Response(content=answer, media_type="application/json")
        # serialized once here: FastAPI would validate the model again and walk it with jsonable_encoder
        return Response(content=answer.to_json(), media_type="application/json")

    async def recommend_asgi(scope: dict, receive: Any, send: Any) -> None:
        """The direct lane (see UGTApp): GuardMiddleware has capped the body and replays it in one message."""
        message = await receive()
        client = scope.get("client")
        try:
            response = await answer_recommend(message.get("body", b""), _header(scope, b"x-api-key"),
                                              client[0] if client else None)
        except Exception:  # as ServerErrorMiddleware would: a JSON 500, never a dropped connection
            log.exception("recommend failed")
            response = refuse("internal", 500, "internal error while answering; see the service log")
        await response(scope, receive, send)

    app.fast_routes = {
        ("POST", "/recommend"): GuardMiddleware(recommend_asgi, max_body_bytes=config.max_body_bytes, metrics=metrics)
    }

    def openapi() -> dict[str, Any]:
        """FastAPI's spec plus the RecommendRequest schema the /recommend body refers to."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas["RecommendRequest"] = RecommendRequest.model_json_schema()
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    def health() -> Any:
        """ok: Redis, the state store and popularity all work; degraded: answering from fallbacks; down (503)."""
        checks = _health_checks(client, components, config)
        if isinstance(batcher, EngineProcess):
            checks["engine"] = batcher.health()
        if not checks["popularity"]["ok"]:
            status_text, code = "down", 503
        elif all(c["ok"] for c in checks.values()):
            status_text, code = "ok", 200
        else:
            status_text, code = "degraded", 200
        body = HealthResponse(status=status_text, model=service.model_name, checks=checks)
        return JSONResponse(status_code=code, content=body.model_dump())

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition (ugt_serving_* series; with engine: process, both processes' added up)."""
        if isinstance(batcher, EngineProcess):
            body = merge_expositions(metrics.render(), await batcher.metrics())
        else:
            body = metrics.render()
        return Response(content=body, media_type=metrics.content_type)

    return app


def _health_checks(client: redis.Redis | None, parts: Components, config: ServingConfig) -> dict[str, dict]:
    checks: dict[str, dict] = {}
    if client is None:
        checks["redis"] = {"ok": False, "detail": "no Redis client (components injected)"}
    else:
        started = time.perf_counter()
        try:
            client.ping()
            checks["redis"] = {"ok": True, "detail": f"PING {1000 * (time.perf_counter() - started):.2f} ms"}
        except (redis.RedisError, OSError) as exc:
            checks["redis"] = {"ok": False, "detail": f"unreachable: {exc}"}
    try:
        checks["state"] = {"ok": True, "detail": f"{parts.state_reader.name}: {parts.state_reader.check()}"}
    except Exception as exc:
        checks["state"] = {"ok": False, "detail": f"{parts.state_reader.name}: {exc}"}
    try:
        ranked, source = parts.fallback.ranking(config.default_domain)
        checks["popularity"] = {
            "ok": True,
            "detail": f"{len(ranked)} items for domain {config.default_domain!r} from {source}",
        }
    except NoPopularity as exc:
        checks["popularity"] = {"ok": False, "detail": str(exc)}
    return checks
