"""The HTTP contract of /recommend: request bounds, response shape, error body, OpenAPI examples.

Pydantic models only (no I/O), so the bounds are unit-tested and shown in the OpenAPI page exactly as enforced.
Strict types: ``"k": "10"`` or ``"k": true`` is a client bug worth a 422, not a silent cast.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from contracts.limits import (  # user and item ids; the jobs dead-letter longer ones
    DOMAIN_PATTERN,
    MAX_ID_CHARS,
)

MAX_K = 1000
DEFAULT_K = 10  # items a request gets when it names no k
HARD_MAX_CONTEXT = 1000  # the config's max_context is checked in the app, below this hard cap
MAX_INTERESTS = 20  # declared interests per request (serving/interests.py)
HARD_MAX_EXCLUDE = 100_000  # the config's max_exclude is checked in the app, below this hard cap

ItemId = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]

REQUEST_EXAMPLES = {
    "known_user": {
        "summary": "Top 10 for a user",
        "value": {"user_id": "42", "k": 10},
    },
    "exclude_and_domain": {
        "summary": "Exclude items already on screen, in one domain",
        "value": {"user_id": "42", "k": 5, "exclude": ["2858", "260"], "domain": "movie"},
    },
}


class RecommendRequest(BaseModel):
    """POST /recommend body."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [REQUEST_EXAMPLES["known_user"]["value"]]}
    )

    user_id: StrictStr = Field(
        min_length=1, max_length=MAX_ID_CHARS, description="The user id as published in user events."
    )
    k: StrictInt = Field(default=DEFAULT_K, ge=1, le=MAX_K, description="How many items to return.")
    exclude: list[ItemId] = Field(
        default_factory=list,
        max_length=HARD_MAX_EXCLUDE,
        description="Item ids never to return (besides the user's own history).",
    )
    domain: StrictStr | None = Field(
        default=None,
        pattern=DOMAIN_PATTERN,  # it becomes part of a Redis key
        description="Item domain (movie, product, ...): picks the model and rules; default_domain when absent.",
    )
    context: list[ItemId] = Field(
        default_factory=list,
        max_length=HARD_MAX_CONTEXT,
        description="Item ids of this session not yet in the stored state, oldest first (at most max_context); "
        "treated as recent views and never returned.",
    )
    interests: list[StrictStr] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_INTERESTS,
        description="Declared interests (an onboarding form's answer): item categories the domain's catalog knows, "
        "e.g. ML genres. Shape the answer of a user with no state (popularity within them) or a short history "
        "(a bounded boost); an unknown name is a 422 listing the known ones.",
    )

    @field_validator("user_id")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("user_id must not be blank")
        return value


class ScoredItemOut(BaseModel):
    item_id: str
    score: float


class Timings(BaseModel):
    """Milliseconds spent per stage of this request: queue is the wait for a batch, state / generate are
    the batch's, rerank this request's own, total from arrival at the batcher to the answer."""

    queue: float = 0.0
    state: float
    generate: float
    rerank: float
    total: float


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "9f1c2e4b7a0d4d6e8b1f3a5c7e9d0b2a",
                    "experiment": "ugt_vs_popularity",
                    "arm": "treatment",
                    "user_id": "42",
                    "items": [{"item_id": "2858", "score": 3428.0}, {"item_id": "260", "score": 2991.0}],
                    "fallback": False,
                    "fallback_reason": None,
                    "model": "popularity-v1",
                    "batch_size": 4,
                    "timings_ms": {"queue": 0.5, "state": 0.21, "generate": 0.05, "rerank": 0.01, "total": 0.81},
                },
                {
                    "request_id": "0c5d1e2f3a4b4c5d8e6f7a8b9c0d1e2f",
                    "experiment": None,
                    "arm": None,
                    "user_id": "new-user",
                    "items": [{"item_id": "2858", "score": 3428.0}],
                    "fallback": True,
                    "fallback_reason": "unknown_user",
                    "model": "popularity-fallback-v1",
                    "batch_size": 1,
                    "timings_ms": {"queue": 0.1, "state": 0.2, "generate": 0.04, "rerank": 0.01, "total": 0.39},
                },
            ]
        }
    )

    request_id: str = Field(description="This answer's id (a uuid4 in hex); its impression event carries it.")
    experiment: str | None = Field(
        default=None, description="The experiment running on the request's domain, or null when none applies."
    )
    arm: str | None = Field(
        default=None,
        description="The user's arm of that experiment (sticky per experiment and user), or null when the user's "
        "bucket is outside every arm.",
    )
    user_id: str
    items: list[ScoredItemOut]
    fallback: bool = Field(description="True when the answer did not come from the main model.")
    fallback_reason: str | None = Field(
        default=None,
        description="Why the fallback answered: unknown_user, state_unavailable, bad_state, "
        "state_version_mismatch, generator_error, no_known_items, overloaded, timeout.",
    )
    model: str = Field(description="What produced the items: <name>-<version>.")
    batch_size: int = Field(default=1, description="How many requests shared this request's batch.")
    timings_ms: Timings


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a machine-readable code, a sentence for humans, and per-field details for 422."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "invalid_request",
                    "message": "k: Input should be less than or equal to 1000",
                    "errors": [{"field": "k", "message": "Input should be less than or equal to 1000"}],
                }
            ]
        }
    )

    error: str
    message: str
    errors: list[dict[str, str]] = Field(default_factory=list)


class CheckOut(BaseModel):
    ok: bool
    detail: str


class HealthResponse(BaseModel):
    status: str = Field(
        description="ok: every part works; degraded: answering from fallbacks; down: cannot answer."
    )
    model: str
    checks: dict[str, CheckOut]


class SimilarResponse(BaseModel):
    """GET /similar/{item_id}: the items nearest to one item in the similar-items index, best first."""

    item_id: str
    items: list[ScoredItemOut] = Field(description="Nearest items by inner product of the index vectors "
                                       "(collaborative + content halves), never the item itself.")
    model: str = Field(description="The index: similar-<first 8 hex digits of its checkpoint's sha256>.")
