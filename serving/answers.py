"""What the pipeline answers: :class:`Answer` (serialized straight to JSON on the hot path) and the request's
session items folded into the user's state (:func:`with_context`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from contracts.tokenizer import ACTION_TOKEN
from contracts.user_state_rule import STATE_VERSION
from serving.fallback import NoPopularity
from serving.generator import GenerationRequest, Generator, NoModelAnswer, ScoredItem, has_batch
from serving.http_models import RecommendResponse
from serving.user_state_reader import UserStateView

CONTEXT_ACTION = ACTION_TOKEN["VIEW"]  # session items in `context` count as views without a rating


# uuid.uuid4()'s version (4) and variant (RFC 4122) bits, as uuid.UUID(bytes=..., version=4) sets them
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def request_ids(n: int) -> list[str]:
    """``n`` request ids, each what ``uuid.uuid4().hex`` gives, from one read of the OS's random bytes (uuid4
    reads them per id, which cost more than the rest of a request's bookkeeping)."""
    raw = os.urandom(16 * n)
    return [f"{(int.from_bytes(raw[i:i + 16], 'big') & _UUID4_CLEAR) | _UUID4_SET:032x}" for i in range(0, 16 * n, 16)]


def rounded_ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@dataclass(slots=True)
class Answer:
    """One request's answer as the pipeline made it; serialized straight to JSON on the hot path.

    Building a validated pydantic RecommendResponse per request cost more than the state read;
    :meth:`to_response` gives one (same fields, validated) where an object is wanted.
    """

    user_id: str
    items: list[ScoredItem]
    reason: str | None
    model: str
    batch_size: int
    timings_ms: dict[str, float]
    request_id: str = ""
    experiment: str | None = None
    arm: str | None = None
    domain: str = ""

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id,
            "experiment": self.experiment,
            "arm": self.arm,
            "user_id": self.user_id,
            "items": [{"item_id": i.item_id, "score": float(i.score)} for i in self.items],
            "fallback": self.reason is not None,
            "fallback_reason": self.reason,
            "model": self.model,
            "batch_size": self.batch_size,
            "timings_ms": self.timings_ms,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    def to_response(self) -> RecommendResponse:
        return RecommendResponse.model_validate(self.to_dict())


def with_context(state: UserStateView | None, user_id: str, context: Sequence[str], now_ms: int) -> UserStateView | None:
    """The state with the request's session items appended (newest last); a state from them alone if none."""
    items = [item for item in context if not state or item not in state.item_ids[-len(context):]]
    if not items:
        return state
    base = state or UserStateView(user_id, (), (), (), (), 0, 0, STATE_VERSION)
    n = len(items)
    last = max(now_ms, base.last_event_time)
    return UserStateView(
        user_id=user_id,
        item_ids=base.item_ids + tuple(items),
        action_tokens=base.action_tokens + (CONTEXT_ACTION,) * n,
        rating_tokens=base.rating_tokens + (0,) * n,
        event_times=base.event_times + (last,) * n,
        event_count=base.event_count + n,
        last_event_time=last,
        state_version=base.state_version,
    )


def generate_all(generator: Generator,
                 requests: list[GenerationRequest]) -> list[list[ScoredItem] | NoModelAnswer | Exception]:
    """One domain's (and model's) answers, in order: one ``recommend_batch`` call when the generator has it (a
    batch of one too: the engine path has the KV cache and CUDA graphs), else ``recommend`` per request. A
    failure is that request's answer (the whole batch's when the batch call fails); NoPopularity escapes."""
    if has_batch(generator):
        try:
            answers = list(generator.recommend_batch(requests))  # type: ignore[attr-defined]
            if len(answers) != len(requests):
                raise RuntimeError(f"recommend_batch gave {len(answers)} answers for {len(requests)}")
            return answers
        except NoPopularity:
            raise
        except Exception as exc:
            return [exc] * len(requests)
    out: list[list[ScoredItem] | NoModelAnswer | Exception] = []
    for r in requests:
        try:
            out.append(generator.recommend(r.state, r.k, r.exclude, domain=r.domain))
        except NoPopularity:
            raise
        except Exception as exc:
            out.append(exc)
    return out
