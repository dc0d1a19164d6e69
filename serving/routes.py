"""The HTTP routes: POST /recommend (guards -> batcher -> answer or error body), /health, /metrics, the spec.

:class:`RecommendRoute` answers /recommend both through FastAPI (where the OpenAPI spec documents it) and
through the direct ASGI lane of :class:`serving.app.UGTApp`; :func:`add_routes` registers everything on the app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import redis
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from serving.batcher import Overloaded
from serving.compose import Runtime
from serving.config import ServingConfig
from serving.engine_ipc import (
    NO_POPULARITY,
    UNKNOWN_DOMAIN,
    EngineConnection,
    EngineRefused,
    EngineUnavailable,
    RateLimited,
)
from serving.fallback import NoPopularity
from serving.guards import (
    RecommendCall,
    RequestGuards,
    error_response,
    limit_key,
    parse_request,
    validation_error,
)
from serving.http_models import (
    MAX_K,
    REQUEST_EXAMPLES,
    ErrorResponse,
    HealthResponse,
    RecommendRequest,
    RecommendResponse,
    SimilarResponse,
)
from serving.recommend_lane import RecommendLane
from serving.service import ENGINE_UNAVAILABLE, OVERLOADED, TIMEOUT, Answer, Components, UnknownDomain
from serving.similar import UnknownItem

log = logging.getLogger(__name__)

# The body is parsed in the handler (parse_request), not by FastAPI's dependency machinery, which cost
# about as much CPU per request as the whole pipeline; the spec still documents it (see add_openapi).
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {"$ref": "#/components/schemas/RecommendRequest"},
            "examples": REQUEST_EXAMPLES,
        }
    },
}
KEY_HEADER = {
    "name": "x-api-key",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "Required when the service has api_keys.",
}


def error_responses(max_body_bytes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of /recommend, as the spec documents them."""
    return {
        400: {"model": ErrorResponse, "description": "Body is not JSON, or missing."},
        401: {"model": ErrorResponse, "description": "Missing or unknown X-API-Key (when api_keys are set)."},
        413: {"model": ErrorResponse, "description": f"Body larger than {max_body_bytes} bytes."},
        422: {
            "model": ErrorResponse,
            "description": "A field is missing, of the wrong type or out of bounds, or the domain is not served.",
        },
        429: {"model": ErrorResponse, "description": "Rate limit of the API key exceeded, or the engine's queue is full "
                                   "(overload_response: reject); see Retry-After."},
        503: {
            "model": ErrorResponse,
            "description": "Neither the model nor any popularity source can answer.",
        },
    }


class RecommendRoute:
    """POST /recommend: parse, guard, route the domain, run the pipeline within the time budget, answer."""

    def __init__(self, runtime: Runtime):
        self.service = runtime.service
        self.batcher = runtime.pipeline or runtime.batcher
        # the engine runs in another process (engine: process, or a `--workers N` worker's shared engine): the
        # request travels as its fields, the answer comes back as JSON bytes, the rate limit is kept there
        self.remote = isinstance(self.batcher, EngineConnection)
        # engine_scope: model: this worker runs the pipeline, the shared engine keeps the rate limit (ADMIT)
        self.engine = runtime.batcher if runtime.pipeline is not None and runtime.config.rate_limit_rps else None
        self.overload_fallback = runtime.config.overload_response == "fallback"
        self.guards = RequestGuards(runtime.config, runtime.metrics,
                                    limit_here=not isinstance(runtime.batcher, EngineConnection))
        self.asgi = RecommendLane(self.answer, self.internal_error, runtime.config.max_body_bytes, runtime.metrics)

    def internal_error(self) -> Response:
        return self.guards.refuse("internal", 500, "internal error while answering; see the service log")

    async def answer(self, body: bytes, api_key: str | None, client_host: str | None) -> bytes | Response:
        """The 200 answer's JSON bytes, or the error response; never an exception: every failure is an
        ErrorResponse body."""
        try:
            call = RecommendCall(parse_request(body), api_key, client_host)
        except RequestValidationError as exc:
            return await validation_error(None, exc)
        refused = self.guards.admit(call)
        if refused is not None:
            return refused
        try:
            self.service.domain_of(call.request)
        except UnknownDomain as exc:  # or UnknownInterests: its field is "interests"
            return self.guards.invalid(exc.field, str(exc))
        try:
            answer = await self._run(call)
        except RateLimited as exc:  # counted by the engine process for every HTTP process
            return self.guards.rate_limited(exc.wait_s)
        except Overloaded as exc:  # back-pressure: refused at once, never queued to time out
            return self.guards.overloaded(exc.retry_after_s)
        except Exception:  # the batch itself failed (a bug): still never a bare 500 without a body
            log.exception("batch failed")
            return self.internal_error()
        return self._respond(answer)

    async def _run(self, call: RecommendCall) -> Answer | bytes | NoPopularity | UnknownDomain:
        """The pipeline's answer; past the time budget, or with the engine gone, the popularity answer."""
        started = time.perf_counter()
        try:
            if self.remote:
                return await self._run_remote(call)
            if self.engine is not None:
                await self._admit(call)
            return await self.batcher.submit(call.request, self.guards.timeout_s)
        except (TimeoutError, EngineUnavailable, Overloaded) as exc:
            if isinstance(exc, Overloaded) and not self.overload_fallback:
                raise
            reason = {TimeoutError: TIMEOUT, Overloaded: OVERLOADED}.get(type(exc), ENGINE_UNAVAILABLE)
            try:
                return await asyncio.to_thread(
                    self.service.fallback_answer, call.request, reason, time.perf_counter() - started
                )
            except (NoPopularity, UnknownDomain) as no_answer:
                return no_answer

    async def _admit(self, call: RecommendCall) -> None:
        """The shared engine's rate limit (RateLimited when over); without an answer in time, the request passes."""
        try:
            await self.engine.admit(limit_key(call), self.guards.timeout_s)
        except (TimeoutError, EngineUnavailable):
            pass

    async def _run_remote(self, call: RecommendCall) -> bytes | NoPopularity | UnknownDomain:
        """The engine process's answer body; its refusals as the in-process service raises them."""
        try:
            return await self.batcher.submit(call.request.model_dump(), self.guards.timeout_s, limit_key(call))
        except EngineRefused as exc:
            if exc.kind == UNKNOWN_DOMAIN:
                return UnknownDomain(str(exc))
            if exc.kind == NO_POPULARITY:
                return NoPopularity(str(exc))
            raise

    def _respond(self, answer: Answer | bytes | NoPopularity | UnknownDomain) -> bytes | Response:
        if isinstance(answer, bytes):  # an engine process serializes in the engine
            return answer
        if isinstance(answer, UnknownDomain):  # no route and no popular items: the client's domain is wrong
            return self.guards.invalid("domain", str(answer))
        if isinstance(answer, NoPopularity):
            return error_response(503, "no_recommendations", f"no recommendations available: {answer}")
        # serialized once here: FastAPI would validate the model again and walk it with jsonable_encoder
        return answer.to_json()


def add_routes(app: FastAPI, runtime: Runtime) -> RecommendRoute:
    """Register /recommend, /health, /metrics and the spec; returns /recommend's handler for the direct lane."""
    route = RecommendRoute(runtime)
    batcher, metrics = runtime.batcher, runtime.metrics

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=error_responses(runtime.config.max_body_bytes),
        openapi_extra={"requestBody": REQUEST_BODY, "parameters": [KEY_HEADER]},
    )
    async def recommend(http: Request) -> Response:
        """Top-k items for a user: state -> generator -> reranker, or the popularity fallback (marked)."""
        client_host = http.client.host if http.client else None
        answer = await route.answer(await http.body(), http.headers.get("x-api-key"), client_host)
        return Response(content=answer, media_type="application/json") if isinstance(answer, bytes) else answer

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    def health() -> Any:
        """ok: Redis, the state store and popularity all work; degraded: answering from fallbacks; down (503)."""
        checks = health_checks(runtime.client, runtime.components, runtime.config)
        if isinstance(batcher, EngineConnection):
            checks["engine"] = batcher.health()
        if not checks["popularity"]["ok"]:
            status_text, code = "down", 503
        elif all(c["ok"] for c in checks.values()):
            status_text, code = "ok", 200
        else:
            status_text, code = "degraded", 200
        body = HealthResponse(status=status_text, model=runtime.service.model_name, checks=checks)
        return JSONResponse(status_code=code, content=body.model_dump())

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition (ugt_serving_* series; with an engine process, every process's added up)."""
        if isinstance(batcher, EngineConnection):  # this process's, the engine's (and other workers'), by the engine
            body = await batcher.metrics() or metrics.render()
        else:
            body = metrics.render()
        return Response(content=body, media_type=metrics.content_type)

    add_similar_route(app, runtime, route.guards)
    add_openapi(app)
    return route


def add_similar_route(app: FastAPI, runtime: Runtime, guards: RequestGuards) -> None:
    """GET /similar/{item_id}?k=N: 404 for an item the index does not hold (or no index), 422 for a bad k."""
    similar = runtime.components.similar
    errors = {401: {"model": ErrorResponse, "description": "Missing or unknown X-API-Key (when api_keys are set)."},
              404: {"model": ErrorResponse, "description": "The item is not in the index, or no index is served."},
              422: {"model": ErrorResponse, "description": "k is not a whole number in 1..1000."},
              429: {"model": ErrorResponse, "description": "Rate limit of the API key exceeded; see Retry-After."}}

    @app.get("/similar/{item_id}", response_model=SimilarResponse, responses=errors,
             openapi_extra={"parameters": [KEY_HEADER]})
    def similar_items(http: Request, item_id: str = Path(description="An item id of the catalog."),
                      k: int = Query(10, ge=1, le=MAX_K, description="How many items to return.")) -> Response:
        """The k items nearest to an item in the similar-items index (serving key similar_index)."""
        key = http.headers.get("x-api-key")
        if guards.api_keys and key not in guards.api_keys:
            what = "missing" if key is None else "unknown"
            return guards.refuse("unauthorized", 401, f"X-API-Key header {what}: send one of the service's API keys")
        if guards.limiter is not None:
            wait = guards.limiter.acquire(key or (http.client.host if http.client else None) or "anonymous")
            if wait > 0:
                return guards.rate_limited(wait)
        if similar is None:
            return guards.refuse("not_found", 404, "similar items are not served here: set the serving key "
                                 "similar_index to a `ugt similar build` folder")
        try:
            items = similar.neighbours(item_id, k)
        except UnknownItem as exc:
            return guards.refuse("not_found", 404, str(exc))
        body = {"item_id": item_id, "items": [{"item_id": i.item_id, "score": i.score} for i in items],
                "model": f"{similar.name}-{similar.version}"}
        return Response(content=orjson.dumps(body), media_type="application/json")


def add_openapi(app: FastAPI) -> None:
    """FastAPI's spec plus the RecommendRequest schema the /recommend body refers to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas["RecommendRequest"] = RecommendRequest.model_json_schema()
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def health_checks(client: redis.Redis | None, parts: Components, config: ServingConfig) -> dict[str, dict]:
    """Redis, the state store and the default domain's popularity, each ok or not with a detail."""
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
