"""POST /recommend as one bare ASGI callable: the body capped and read, the call answered, the response counted.

:class:`serving.app.UGTApp` hands ``POST /recommend`` straight to a :class:`RecommendLane`, before Starlette's
middleware, router and request/response objects. ``bench/http_floor.py`` measured why: a trivial endpoint costs
uvicorn + a bare ASGI callable ~0.44-0.47x the worker CPU of the same endpoint on FastAPI, and Starlette's route
~0.61x. The lane does what :class:`serving.guards.GuardMiddleware` does for every other route (Content-Length
check, 413 past ``max_body_bytes``, ``ugt_serving_requests_total{endpoint, status}``), without its per-request
closures and body replay, and sends a 200 answer's bytes as two ASGI messages (the headers Starlette's
``Response`` would send: content-length, content-type). Errors keep their ``JSONResponse`` bodies.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response

from serving.guards import error_response
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

ENDPOINT = "/recommend"
JSON_TYPE = (b"content-type", b"application/json")

# (body, api_key, client_host) -> the answer: the 200 body's JSON bytes, or an error Response
Answerer = Callable[[bytes, str | None, str | None], Awaitable[bytes | Response]]
Refuser = Callable[[], Response]


class RecommendLane:
    """The direct ASGI lane of POST /recommend around ``answer`` (serving/routes.py's RecommendRoute.answer)."""

    def __init__(self, answer: Answerer, internal_error: Refuser, max_body_bytes: int, metrics: ServingMetrics):
        self.answer = answer
        self.internal_error = internal_error  # the JSON 500 when answering raised (counted by the guards)
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self._counted: dict[int, Any] = {}  # status -> its requests_total child (.labels() per request costs)

    def count(self, status: int) -> None:
        child = self._counted.get(status)
        if child is None:
            child = self._counted[status] = self.metrics.requests.labels(ENDPOINT, str(status))
        child.inc()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        status = 500
        try:
            answer = await self._respond(scope, receive)
            if isinstance(answer, bytes):
                status = 200
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-length", str(len(answer)).encode()), JSON_TYPE]})
                await send({"type": "http.response.body", "body": answer})
            else:
                status = answer.status_code
                await answer(scope, receive, send)
        finally:
            self.count(status)

    async def _respond(self, scope: dict, receive: Any) -> bytes | Response:
        """The answer to the call in ``scope``: the header checks, then the body, then the route's answer."""
        api_key = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    return error_response(400, "bad_content_length", f"Content-Length is not a number: {value[:32]!r}")
                if int(value) > self.max_body_bytes:
                    return self._too_large()
            elif name == b"x-api-key" and api_key is None:
                api_key = value.decode("latin-1")
        body = await self._read_body(receive)
        if body is None:
            return self._too_large()
        client = scope.get("client")
        try:
            return await self.answer(body, api_key, client[0] if client else None)
        except Exception:  # as ServerErrorMiddleware would: a JSON 500, never a dropped connection
            log.exception("recommend failed")
            return self.internal_error()

    def _too_large(self) -> Response:
        return error_response(413, "body_too_large", f"request body is larger than {self.max_body_bytes} bytes")

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body (what arrived, when the client went away); None past ``max_body_bytes``."""
        message = await receive()
        body = message.get("body", b"") if message["type"] == "http.request" else b""
        if len(body) > self.max_body_bytes:
            return None
        if message["type"] != "http.request" or not message.get("more_body", False):
            return body
        chunks, size = [body], len(body)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # client went away; the route sees the body so far
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
