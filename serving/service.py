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
from serving.generator import Generator, NoModelAnswer, ScoredItem
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

LOG_EVERY_S = 10.0


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
        self._last_log: dict[str, tuple[float, int]] = {}
        components.fallback.observer = lambda source: metrics.popularity_source.labels(source).inc()

    def _log_sometimes(
        self, level: int, kind: str, message: str, *args: object, exc_info: bool = False
    ) -> None:
        """Log a recurring failure at most once per LOG_EVERY_S per kind (an outage must not flood the log)."""
        now = time.monotonic()
        last, suppressed = self._last_log.get(kind, (float("-inf"), 0))
        if now - last < LOG_EVERY_S:
            self._last_log[kind] = (last, suppressed + 1)
            return
        self._last_log[kind] = (now, 0)
        note = f" (+{suppressed} like it since the last report)" if suppressed else ""
        log.log(level, message + ", answering with the fallback" + note, *args, exc_info=exc_info)

    def _read_state(self, user_id: str) -> tuple[UserStateView | None, str | None]:
        try:
            state = self.parts.state_reader.read(user_id)
        except StateUnavailable as exc:
            self._log_sometimes(logging.WARNING, STATE_UNAVAILABLE, "user state unavailable: %s", exc)
            return None, STATE_UNAVAILABLE
        except BadState as exc:
            self._log_sometimes(logging.ERROR, BAD_STATE, "unusable user state: %s", exc)
            return None, BAD_STATE
        except Exception as exc:  # an unexpected store error must not become a 5xx
            self._log_sometimes(
                logging.ERROR, "state_error", "user state read failed: %r", exc, exc_info=True
            )
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
            except NoModelAnswer as exc:
                log.debug("generator cannot answer user %r: %s", request.user_id, exc)
                reason = exc.reason
            except NoPopularity:
                raise  # the popularity model has nothing for the domain: neither has the fallback (503)
            except Exception as exc:
                self._log_sometimes(
                    logging.ERROR, GENERATOR_ERROR, "generator failed: %r", exc, exc_info=True
                )
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
