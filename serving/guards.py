"""What a request must pass before any work is done for it: body size, JSON shape, API key, rate limit, bounds.

:class:`GuardMiddleware` (pure ASGI) caps the body before it is read and counts every response;
:class:`RequestGuards` holds the per-request rules of the serving config, resolved once at start, and
:meth:`RequestGuards.admit` applies them to one :class:`RecommendCall`. Every refusal is an
:class:`~serving.http_models.ErrorResponse` body, the same shape for every route.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from serving.config import ServingConfig
from serving.http_models import REQUEST_EXAMPLES, ErrorResponse, RecommendRequest
from serving.metrics import ServingMetrics
from serving.ratelimit import RateLimiter

ENDPOINTS = ("/recommend", "/health", "/metrics", "/docs", "/openapi.json", "/similar")


def error_response(
    status: int, error: str, message: str, errors: list[dict[str, str]] | None = None
) -> JSONResponse:
    """An ErrorResponse body with ``status``: every 4xx/5xx the service answers looks like this."""
    body = ErrorResponse(error=error, message=message, errors=errors or [])
    return JSONResponse(status_code=status, content=body.model_dump())


async def validation_error(_request: Request | None, exc: Exception) -> JSONResponse:
    """400 for a body that is not JSON or missing, 422 (with every field's problem) for a wrong one."""
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    for problem in problems:
        if problem.get("type") == "json_invalid":
            detail = (problem.get("ctx") or {}).get("error", "")
            return error_response(400, "bad_json", f"request body is not valid JSON: {detail}".rstrip(": "))
        if tuple(problem.get("loc", ())) == ("body",) and problem.get("type") == "missing":
            return error_response(
                400,
                "missing_body",
                "request body is required: a JSON object like "
                + json.dumps(REQUEST_EXAMPLES["known_user"]["value"]),
            )
    errors = []
    for problem in problems:
        field = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "path")) or "body"
        text = str(problem.get("msg", "invalid"))
        if field == "body" and problem.get("type") in ("model_attributes_type", "model_type"):
            text = "must be a JSON object sent as Content-Type: application/json, like " + json.dumps(
                REQUEST_EXAMPLES["exclude_and_domain"]["value"]
            )
        errors.append({"field": field, "message": text, "type": str(problem.get("type"))})
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return error_response(422, "invalid_request", message, errors)


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


@dataclass(slots=True)
class RecommendCall:
    """One /recommend call as the guards and the pipeline see it: the parsed body and who sent it."""

    request: RecommendRequest
    api_key: str | None
    client_host: str | None


def limit_key(call: RecommendCall) -> str:
    """Whose rate limit a call counts against: its API key, else its client address."""
    return call.api_key or call.client_host or "anonymous"


class RequestGuards:
    """The serving config's per-request rules, resolved once: API keys, rate limit, list bounds, time budget."""

    def __init__(self, config: ServingConfig, metrics: ServingMetrics, limit_here: bool = True):
        """``limit_here=False``: the rate limit is kept elsewhere (the shared engine of `--workers N`, for all
        workers at once), and :meth:`rate_limited` answers its refusals."""
        self.metrics = metrics
        self.api_keys = frozenset(config.api_keys)
        self.rate_limit_rps = config.rate_limit_rps
        self.limiter = (RateLimiter(config.rate_limit_rps, config.rate_limit_burst)
                        if config.rate_limit_rps and limit_here else None)
        self.max_exclude = config.max_exclude
        self.max_context = config.max_context
        self.timeout_s = config.request_timeout_ms / 1000.0

    def refuse(self, kind: str, status: int, message: str, **extra: Any) -> JSONResponse:
        """An error answer, counted in ``ugt_serving_errors_total{kind}``."""
        self.metrics.errors.labels(kind).inc()
        return error_response(status, kind, message, **extra)

    def rate_limited(self, wait_s: float) -> JSONResponse:
        """429 with Retry-After: the key is over ``rate_limit_rps``."""
        response = self.refuse(
            "rate_limited", 429, f"rate limit of {self.rate_limit_rps:g} requests/s exceeded; retry later"
        )
        response.headers["Retry-After"] = RateLimiter.retry_after(wait_s)
        return response

    def overloaded(self, retry_after_s: float) -> JSONResponse:
        """429 with Retry-After: the engine's queue is full (back-pressure, ``overload_response: reject``)."""
        response = self.refuse("overloaded", 429, "the service is at capacity (its engine's queue is full); "
                               "retry later")
        response.headers["Retry-After"] = RateLimiter.retry_after(retry_after_s)
        return response

    def invalid(self, field: str, problem: str) -> JSONResponse:
        """422 for one field of an otherwise well-formed request (e.g. a domain that is not served)."""
        message = f"{field}: {problem}"
        return self.refuse("invalid_request", 422, message, errors=[{"field": field, "message": problem}])

    def admit(self, call: RecommendCall) -> JSONResponse | None:
        """None when the call may go on; else its 401 (API key), 429 (rate limit) or 422 (list bounds)."""
        if self.api_keys and call.api_key not in self.api_keys:
            what = "missing" if call.api_key is None else "unknown"
            return self.refuse("unauthorized", 401, f"X-API-Key header {what}: send one of the service's API keys")
        if self.limiter is not None:
            wait = self.limiter.acquire(limit_key(call))
            if wait > 0:
                return self.rate_limited(wait)
        request = call.request
        for name, values, most in (
            ("exclude", request.exclude, self.max_exclude),
            ("context", request.context, self.max_context),
        ):
            if len(values) > most:
                message = f"{name}: at most {most} items, got {len(values)}"
                return self.refuse("invalid_request", 422, message, errors=[{"field": name, "message": message}])
        return None


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
        path = "/similar" if scope["path"].startswith("/similar/") else scope["path"]
        endpoint = path if path in ENDPOINTS else "other"

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
        return error_response(413, "body_too_large", f"request body is larger than {self.max_body_bytes} bytes")

    def _declared_too_big(self, scope: dict) -> JSONResponse | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    return error_response(
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
