"""The /recommend pipeline without HTTP: state -> generate -> rerank, degrading to the popularity fallback.

Every way the main path can fail ends in a named fallback reason (counted in metrics and returned in the
response); only "no popularity anywhere" (:class:`serving.fallback.NoPopularity`) escapes, as a 503.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from serving.config import ServingConfig
from serving.fallback import NoPopularity, PopularityFallback
from serving.generator import Generator, ScoredItem
from serving.metrics import ServingMetrics
from serving.reranker import Reranker
from serving.schemas import RecommendRequest, RecommendResponse, ScoredItemOut, Timings
from serving.state import BadState, StateUnavailable, UserStateReader, UserStateView

log = logging.getLogger(__name__)

# Fallback reasons (the `reason` label of ugt_serving_fallbacks_total and the response's fallback_reason).
UNKNOWN_USER = "unknown_user"
STATE_UNAVAILABLE = "state_unavailable"
BAD_STATE = "bad_state"
GENERATOR_ERROR = "generator_error"


@dataclass
class Components:
    """The parts a RecommendService is built from; tests pass fakes, build_components the real ones."""

    state_reader: UserStateReader
    generator: Generator
    fallback: PopularityFallback
    reranker: Reranker


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class RecommendService:
    def __init__(self, config: ServingConfig, components: Components, metrics: ServingMetrics):
        self.config = config
        self.parts = components
        self.metrics = metrics
        self.model_name = f"{components.generator.name}-{components.generator.version}"
        components.fallback.observer = lambda source: metrics.popularity_source.labels(source).inc()

    def _read_state(self, user_id: str) -> tuple[UserStateView | None, str | None]:
        try:
            state = self.parts.state_reader.read(user_id)
        except StateUnavailable as exc:
            log.warning("user state unavailable, answering with the fallback: %s", exc)
            return None, STATE_UNAVAILABLE
        except BadState as exc:
            log.error("unusable user state, answering with the fallback: %s", exc)
            return None, BAD_STATE
        except Exception:  # an unexpected store error must not become a 5xx
            log.exception("user state read failed, answering with the fallback")
            return None, STATE_UNAVAILABLE
        return state, None if state is not None else UNKNOWN_USER

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """Raises NoPopularity when neither the model nor any popularity source can answer."""
        start = time.perf_counter()
        domain = request.domain or self.config.default_domain
        k = request.k
        state, reason = self._read_state(request.user_id)
        seen = set(request.exclude)
        if state is not None:
            seen.update(state.item_ids)
        after_state = time.perf_counter()

        candidates: list[ScoredItem] | None = None
        model = self.model_name
        if state is not None:
            try:
                candidates = self.parts.generator.recommend(state, k, seen, domain=domain)
            except NoPopularity:
                raise  # the popularity model has nothing for the domain: neither has the fallback (503)
            except Exception:
                log.exception("generator %s failed, answering with the fallback", self.model_name)
                reason = GENERATOR_ERROR
        if candidates is None:
            candidates = self.parts.fallback.recommend(domain, k, seen).items
            model = f"{self.parts.fallback.name}-{self.parts.fallback.version}"
        after_generate = time.perf_counter()

        items = self.parts.reranker.rerank(candidates, k, seen)
        end = time.perf_counter()

        stages = {
            "state": after_state - start,
            "generate": after_generate - after_state,
            "rerank": end - after_generate,
            "total": end - start,
        }
        for stage, seconds in stages.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        if reason is not None:
            self.metrics.fallbacks.labels(reason).inc()
        return RecommendResponse(
            user_id=request.user_id,
            items=[ScoredItemOut(item_id=i.item_id, score=i.score) for i in items],
            fallback=reason is not None,
            fallback_reason=reason,
            model=model,
            timings_ms=Timings(**{stage: _ms(seconds) for stage, seconds in stages.items()}),
        )
