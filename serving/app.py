"""The /recommend service as an ASGI app: the composition root (serving/compose.py) builds the parts, the
guards (serving/guards.py) and routes (serving/routes.py) answer; the pipeline lives in service.py.

``create_app(settings, config)`` builds the real parts (Redis, Feast, popularity) and fails at once when
they cannot be built; tests pass ``components=`` with fakes instead.
"""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from infra.settings import Settings, get_settings
from serving.compose import Runtime, compose, start_background
from serving.config import ServingConfig
from serving.guards import GuardMiddleware, validation_error
from serving.routes import add_routes
from serving.service import Components


class UGTApp(FastAPI):
    """FastAPI with a direct lane for the hot route.

    ``POST /recommend`` is answered by a bare ASGI handler (:class:`serving.recommend_lane.RecommendLane`, which
    caps the body and counts the response itself) before Starlette's middleware stack and router: those layers
    (error and telemetry middleware, routing, the request/response wrappers) cost more CPU per request than
    uvicorn's own protocol (bench/http_floor.py), on the one event loop that every request shares. Everything else (health, metrics, docs, the OpenAPI spec, which still
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


def _lifespan(runtime: Runtime):
    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # everything built so far (model, item tables, imports) lives as long as the process: keep it out of
        # the collector's full passes, which otherwise walk it all and pause requests for tens of ms (and, with
        # engine: process, frozen before the fork so the engine shares those pages instead of copying them)
        gc.collect()
        gc.freeze()
        if runtime.engine == "thread":
            start_background(runtime.live)
        runtime.batcher.start()
        if runtime.pipeline is not None:
            runtime.pipeline.start()
        if runtime.components.similar is not None:  # /similar answers here, whatever the engine (after its fork)
            runtime.components.similar.start_background()
        yield
        if runtime.pipeline is not None:
            runtime.pipeline.close()
        runtime.batcher.close()

    return lifespan


def create_app(
    settings: Settings | None = None,
    config: ServingConfig | None = None,
    *,
    components: Components | None = None,
    client: redis.Redis | None = None,
) -> FastAPI:
    """The /recommend service. Builds Redis / Feast / popularity parts unless ``components`` is given."""
    return app_for(compose(settings or get_settings(), config or ServingConfig(), components, client))


def app_for(runtime: Runtime) -> FastAPI:
    """The ASGI app around a composed runtime (a `--workers N` worker wraps the parent's, with its engine client)."""
    app = UGTApp(
        title="UGT recommend",
        version="0.1.0",
        description="Recommendations from the user's streaming state; degrades to a popularity fallback, "
        "marked in the response, instead of failing.",
        lifespan=_lifespan(runtime),
    )
    app.state.service = runtime.service
    app.state.metrics = runtime.metrics
    app.state.batcher = runtime.batcher
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(GuardMiddleware, max_body_bytes=runtime.config.max_body_bytes, metrics=runtime.metrics)
    recommend = add_routes(app, runtime)
    app.fast_routes = {("POST", "/recommend"): recommend.asgi}
    return app
