"""The /recommend pipeline without HTTP: route -> state -> generate -> rerank, per batch of requests.

:meth:`RecommendService.run_batch` answers a batch the dynamic batcher (serving/batcher.py) collected: one
state read for the whole batch, one generator call per domain in it (``recommend_batch`` when the generator
has it), then the reranker per request. Every way the main path can fail ends in a named fallback reason
(counted in metrics and returned in the response); only "no popularity anywhere"
(:class:`serving.fallback.NoPopularity`) escapes, as a 503, or as :class:`UnknownDomain` (422) when the
domain is neither routed nor known to any popularity source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from contracts.user_state_rule import STATE_VERSION
from serving.answers import (  # noqa: F401 (CONTEXT_ACTION re-exported)
    CONTEXT_ACTION,
    Answer,
    generate_all,
    request_ids,
    rounded_ms,
    with_context,
)
from serving.batcher import Queued
from serving.config import DomainConfig, ServingConfig, routes
from serving.experiments import Assignment, Experiments
from serving.fallback import NoPopularity, PopularityFallback
from serving.generator import (
    NO_KNOWN_ITEMS,
    GenerationRequest,
    Generator,
    NoModelAnswer,
    ScoredItem,
)
from serving.http_models import RecommendRequest, RecommendResponse
from serving.interests import InterestRanker
from serving.metrics import ARM_OUTCOMES, STAGES, ServingMetrics, observe_many
from serving.reranker import Reranker
from serving.similar import SimilarItems, merge_by_rank
from serving.user_state_reader import BadState, StateUnavailable, UserStateReader, UserStateView, read_many

log = logging.getLogger(__name__)

# Fallback reasons (the `reason` label of ugt_serving_fallbacks_total and the response's fallback_reason).
UNKNOWN_USER = "unknown_user"
STATE_UNAVAILABLE = "state_unavailable"
BAD_STATE = "bad_state"
STATE_VERSION_MISMATCH = "state_version_mismatch"
GENERATOR_ERROR = "generator_error"
OVERLOADED = "overloaded"  # queued longer than queue_timeout_ms: shed before any work
TIMEOUT = "timeout"  # no answer within request_timeout_ms (set by the HTTP layer)
ENGINE_UNAVAILABLE = "engine_unavailable"  # engine: process, and the engine process died mid-request (restarted)

LOG_EVERY_S = 10.0
PER_REQUEST_STAGES = ("queue", "rerank", "total")  # state and generate are observed once per batch


class ImpressionSink(Protocol):
    """Where served lists go as impressions (serving/impressions.py); ``offer`` must never block or raise."""

    def offer(self, answer: Answer) -> None: ...


class UnknownDomain(ValueError):
    """The request's domain is not served (not in the config's ``domains``, or, without them, no popularity
    source knows it); the client's error: the HTTP layer answers 422 on ``field``."""

    field = "domain"


class UnknownInterests(UnknownDomain):
    """The request's ``interests`` name categories the domain's catalog does not know (422)."""

    field = "interests"


@dataclass
class Components:
    """The parts a RecommendService is built from; tests pass fakes, build_components the real ones.

    ``generators`` / ``rerankers`` map a domain to its own model / rules (the router); a domain without
    an entry uses ``generator`` / ``reranker``.
    """

    state_reader: UserStateReader
    generator: Generator
    fallback: PopularityFallback
    reranker: Reranker
    generators: dict[str, Generator] = field(default_factory=dict)
    rerankers: dict[str, Reranker] = field(default_factory=dict)
    # (domain, experiment, arm) -> the arm's own model / rules; an arm without an entry uses its domain's
    arm_generators: dict[tuple[str, str, str], Generator] = field(default_factory=dict)
    arm_rerankers: dict[tuple[str, str, str], Reranker] = field(default_factory=dict)
    similar: SimilarItems | None = None  # the similar-items index (GET /similar; similar_candidates)
    interests: InterestRanker | None = None  # declared interests (serving/interests.py); None: not served


@dataclass
class _Job:
    """One request inside a batch: what it asks, and what the pipeline found so far."""

    request: RecommendRequest
    domain: str
    queued_s: float
    state: UserStateView | None = None
    reason: str | None = None
    candidates: list[ScoredItem] | None = None
    model: str = ""
    error: NoPopularity | None = None
    assignment: Assignment | None = None
    request_id: str = ""  # set by RecommendService._job (request_ids: a uuid4 in hex)
    seen: frozenset[str] | None = None  # _seen's answer, for the state it was built from
    seen_of: UserStateView | None = None

    @property
    def arm_key(self) -> tuple[str, str, str] | None:
        a = self.assignment
        return (self.domain, a.experiment, a.arm) if a is not None else None


def _answer(job: _Job, items: list[ScoredItem], size: int, stages: dict[str, float]) -> Answer:
    timings = {stage: rounded_ms(seconds) for stage, seconds in stages.items()}
    a = job.assignment
    return Answer(job.request.user_id, items, job.reason, job.model, size, timings, job.request_id,
                  a.experiment if a else None, a.arm if a else None, job.domain)


class RecommendService:
    def __init__(self, config: ServingConfig, components: Components, metrics: ServingMetrics):
        self.config = config
        self.parts = components
        self.routes: dict[str, DomainConfig] = routes(config)
        self.open_domains = not config.domains  # no router configured: every domain, one model
        self.experiments = Experiments(config)
        self._deadline_s = config.request_timeout_ms / 1000.0
        self.impressions: ImpressionSink | None = None  # compose sets it when config.impressions is on
        default = self.generator_for(config.default_domain)
        self.model_name = f"{default.name}-{default.version}"
        self._last_log: dict[str, tuple[float, int]] = {}
        self.use_metrics(metrics)

    def use_metrics(self, metrics: ServingMetrics) -> None:
        """Record into ``metrics`` from now on (a forked engine process starts its own series from zero)."""
        self.metrics = metrics
        # labelled children looked up once: .labels() costs more than the observation itself
        self._stage_hist = {stage: metrics.stage_seconds.labels(stage) for stage in STAGES}
        self._fallback_counts: dict[str, object] = {}  # reason -> its fallbacks_total child
        arms = [(exp.name, arm.name) for exp in self.config.experiments for arm in exp.arms]
        metrics.watch_arms(arms)
        self._arm_series = {
            key: (metrics.arm_latency.labels(*key), {o: metrics.arm_requests.labels(*key, o) for o in ARM_OUTCOMES})
            for key in arms
        }
        sources: dict[str, object] = {}  # source -> its popularity_source_total child, looked up once

        def count_source(source: str) -> None:
            child = sources.get(source)
            if child is None:
                child = sources[source] = metrics.popularity_source.labels(source)
            child.inc()  # type: ignore[attr-defined]

        self.parts.fallback.observer = count_source
        if getattr(self.impressions, "metrics", None) is not None:
            self.impressions.metrics = metrics  # type: ignore[union-attr]

    def _count_fallback(self, reason: str) -> None:
        child = self._fallback_counts.get(reason)
        if child is None:
            child = self._fallback_counts[reason] = self.metrics.fallbacks.labels(reason)
        child.inc()  # type: ignore[attr-defined]

    def _observe_arm(self, job: _Job, outcome: str, seconds: float | None = None) -> None:
        """Count the request in its arm (outcome model / fallback / error) and its latency; no arm, nothing."""
        a = job.assignment
        if a is None:
            return
        series = self._arm_series.get((a.experiment, a.arm))
        if series is None:  # an arm outside the config (cannot happen: assignments come from it); never a 5xx
            return
        latency, outcomes = series
        outcomes[outcome].inc()
        if seconds is not None:
            latency.observe(seconds)

    # -- routing ---------------------------------------------------------------------------------------
    def domain_of(self, request: RecommendRequest) -> str:
        """The request's domain; UnknownDomain when the router does not serve it."""
        domain = request.domain or self.config.default_domain
        if not self.open_domains and domain not in self.routes:
            raise UnknownDomain(f"domain {domain!r} is not served; served domains: {sorted(self.routes)}")
        if request.interests:
            if self.parts.interests is None:
                raise UnknownInterests("interests are not served here (no item metadata configured)")
            unknown = self.parts.interests.unknown(domain, request.interests)
            if unknown:
                raise UnknownInterests(unknown)
        return domain

    def generator_for(self, domain: str) -> Generator:
        return self.parts.generators.get(domain, self.parts.generator)

    def reranker_for(self, domain: str) -> Reranker:
        return self.parts.rerankers.get(domain, self.parts.reranker)

    def _job(self, request: RecommendRequest, queued_s: float, reason: str | None = None,
             request_id: str | None = None) -> _Job:
        """A request's job with its id and its arm decided, once: the arm's model and rules answer it."""
        domain = request.domain or self.config.default_domain
        job = _Job(request, domain, queued_s, reason=reason, request_id=request_id or request_ids(1)[0])
        if self.experiments:
            job.assignment = self.experiments.assign(domain, request.user_id)
        return job

    def _generator_of(self, job: _Job) -> Generator:
        key = job.arm_key
        if key is not None and key in self.parts.arm_generators:
            return self.parts.arm_generators[key]
        return self.generator_for(job.domain)

    def _reranker_of(self, job: _Job) -> Reranker:
        key = job.arm_key
        if key is not None and key in self.parts.arm_rerankers:
            return self.parts.arm_rerankers[key]
        return self.reranker_for(job.domain)

    # -- logging ---------------------------------------------------------------------------------------
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

    # -- stages ----------------------------------------------------------------------------------------
    def _read_states(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        reader = self.parts.state_reader
        self.metrics.state_users.inc(len(jobs))
        # one pipelined round trip for the batch when the reader reads many at once, else one per user
        self.metrics.state_round_trips.inc(1 if callable(getattr(reader, "read_many", None)) else len(jobs))
        try:
            results = read_many(reader, [job.request.user_id for job in jobs])
        except StateUnavailable as exc:
            self._log_sometimes(logging.WARNING, STATE_UNAVAILABLE, "user state unavailable: %s", exc)
            results = [STATE_UNAVAILABLE] * len(jobs)
        except BadState as exc:  # a reader without read_many raised for one user of a batch of one
            self._log_sometimes(logging.ERROR, BAD_STATE, "unusable user state: %s", exc)
            results = [exc] * len(jobs)
        except Exception as exc:  # an unexpected store error must not become a 5xx
            self._log_sometimes(logging.ERROR, "state_error", "user state read failed: %r", exc, exc_info=True)
            results = [STATE_UNAVAILABLE] * len(jobs)
        now_ms = int(time.time() * 1000)
        for job, result in zip(jobs, results, strict=True):
            if result == STATE_UNAVAILABLE:
                job.reason = STATE_UNAVAILABLE
                continue
            if isinstance(result, BadState):
                self._log_sometimes(logging.ERROR, BAD_STATE, "unusable user state: %s", result)
                job.reason = BAD_STATE
                continue
            if result is not None and result.state_version != STATE_VERSION:
                self._log_sometimes(
                    logging.ERROR,
                    STATE_VERSION_MISMATCH,
                    "user %r has state_version %d, this service reads %d (contracts.user_state_rule.STATE_VERSION)",
                    job.request.user_id,
                    result.state_version,
                    STATE_VERSION,
                )
                job.reason = STATE_VERSION_MISMATCH
                continue
            state = with_context(result, job.request.user_id, job.request.context, now_ms)
            job.state = state
            job.reason = UNKNOWN_USER if state is None else None

    def _candidates_wanted(self, job: _Job) -> int:
        pool = getattr(self._reranker_of(job), "pool", 1)
        if job.request.interests and self.parts.interests is not None:  # room for the interests' boost
            pool = max(pool, self.parts.interests.pool)
        return min(job.request.k * max(1, pool), job.request.k + 1000)

    def _seen(self, job: _Job) -> frozenset[str]:
        """The items a request must not get: its exclude list and its history (built once per request)."""
        if job.seen is None or job.seen_of is not job.state:
            seen = set(job.request.exclude)
            if job.state is not None:  # the history alone: the view's own set (kept with a kept view)
                seen = seen.union(job.state.item_ids) if seen else job.state.history()
            job.seen, job.seen_of = frozenset(seen), job.state
        return job.seen

    def _generate(self, jobs: list[_Job]) -> None:
        by_model: dict[tuple[str, int], list[_Job]] = {}  # one call per (domain, model): arms split a domain
        for job in jobs:
            if job.state is not None:
                by_model.setdefault((job.domain, id(self._generator_of(job))), []).append(job)
        for (domain, _), group in by_model.items():
            generator = self._generator_of(group[0])
            try:
                requests = [GenerationRequest(job.state, self._candidates_wanted(job), self._seen(job), domain)  # type: ignore[arg-type]
                            for job in group]
                answers = generate_all(generator, requests)
            except NoPopularity as exc:  # the popularity model has nothing for this domain: nor has the fallback
                for job in group:
                    job.error = exc
                continue
            model = f"{generator.name}-{generator.version}"
            for job, answer in zip(group, answers, strict=True):
                if isinstance(answer, NoModelAnswer):
                    log.debug("generator cannot answer user %r: %s", job.request.user_id, answer)
                    job.reason = answer.reason
                elif isinstance(answer, Exception):
                    self._log_sometimes(
                        logging.ERROR, GENERATOR_ERROR, "generator failed: %r", answer, exc_info=False
                    )
                    job.reason = GENERATOR_ERROR
                else:
                    job.candidates = answer
                    job.model = model

    def _add_similar(self, jobs: list[_Job]) -> None:
        """First sessions (fewer than similar_max_events events): the neighbours of the user's last items merged
        with the model's list by rank, or alone when the model knows none of the user's items."""
        similar, wanted = self.parts.similar, self.config.similar_candidates
        if similar is None or not wanted:
            return
        for job in jobs:
            state = job.state
            if state is None or len(state.item_ids) >= self.config.similar_max_events:
                continue
            if job.candidates is None and job.reason != NO_KNOWN_ITEMS:
                continue  # the state or the model failed: the fallback's answer, as without this source
            try:
                found = similar.candidates(state.item_ids, wanted, self._seen(job))
            except Exception as exc:  # an index fault must not fail the request: the model's answer stands
                self._log_sometimes(logging.ERROR, "similar_error", "similar items failed: %r", exc)
                continue
            if not found:
                continue
            if job.candidates is None:
                job.candidates, job.reason = found, None
                job.model = f"{similar.name}-{similar.version}"
                self.metrics.similar_answers.labels("alone").inc()
            else:
                job.candidates = merge_by_rank(job.candidates, found, self._candidates_wanted(job) + wanted)
                job.model = f"{job.model}+{similar.name}"
                self.metrics.similar_answers.labels("merged").inc()

    def _no_answer(self, domain: str, exc: NoPopularity) -> NoPopularity | UnknownDomain:
        """Nothing to answer with: the client's error (UnknownDomain, 422) when the domain is neither routed nor
        known to any popularity source that answered, else the server's (NoPopularity, 503)."""
        if exc.settled and domain not in self.routes:
            known = sorted(set(self.routes) | set(self.parts.fallback.known_domains()))
            return UnknownDomain(f"domain {domain!r} is not served; served domains: {known}")
        return exc

    def _fall_back(self, job: _Job) -> None:
        """Popularity; within the request's declared interests when it names them (serving/interests.py)."""
        fallback, interests, wanted = self.parts.fallback, job.request.interests, self._candidates_wanted(job)
        try:
            if interests and self.parts.interests is not None:
                job.candidates = self.parts.interests.popular_in(job.domain, interests, wanted, self._seen(job))
                self.metrics.interest_answers.labels("popular").inc()
            else:
                job.candidates = fallback.recommend(job.domain, wanted, self._seen(job)).items
        except NoPopularity as exc:
            job.error = exc
            return
        job.model = f"{fallback.name}-{fallback.version}" + ("+interests" if interests else "")

    # -- the pipeline ----------------------------------------------------------------------------------
    def run_batch(self, entries: Sequence[Queued[RecommendRequest]]) -> list[Answer | NoPopularity | UnknownDomain]:
        """Answers for a batch, in order: a response, or for a request nothing can answer NoPopularity (503), or
        UnknownDomain (422) when its domain is neither routed nor known to popularity."""
        start = time.perf_counter()
        jobs = [self._job(entry.item, start - entry.arrived, request_id=rid)
                for entry, rid in zip(entries, request_ids(len(entries)), strict=True)]
        shed_after = self.config.queue_timeout_ms / 1000.0
        live = []
        for job in jobs:
            if job.queued_s > shed_after:
                job.reason = OVERLOADED
            else:
                live.append(job)
        self._read_states(live)
        after_state = time.perf_counter()
        self._generate(live)
        self._add_similar(live)
        for job in jobs:
            if job.candidates is None and job.error is None:
                self._fall_back(job)
        after_generate = time.perf_counter()
        out: list[Answer | NoPopularity | UnknownDomain] = []
        size = len(jobs)
        observed: dict[str, list[float]] = {stage: [] for stage in PER_REQUEST_STAGES}
        for job in jobs:
            if job.error is not None:
                error = self._no_answer(job.domain, job.error)
                if isinstance(error, NoPopularity):  # an unknown domain is counted by the HTTP layer's 422
                    self.metrics.errors.labels("no_popularity").inc()
                    self._observe_arm(job, "error")
                out.append(error)
                continue
            rerank_start = time.perf_counter()
            items = self._rerank(job)
            rerank_s = time.perf_counter() - rerank_start
            stages = {
                "queue": job.queued_s,
                "state": after_state - start,
                "generate": after_generate - after_state,
                "rerank": rerank_s,
                "total": job.queued_s + (time.perf_counter() - start),
            }
            for stage in PER_REQUEST_STAGES:
                observed[stage].append(stages[stage])
            if job.reason is not None:
                self._count_fallback(job.reason)
            answer = _answer(job, items, size, stages)
            # past request_timeout_ms the HTTP side has already answered with the timeout fallback (and published
            # and counted that): this answer is never seen, so it is no impression and not the arm's answer
            if stages["total"] < self._deadline_s:
                self._observe_arm(job, "fallback" if job.reason is not None else "model", stages["total"])
                answer = self._published(answer)
            out.append(answer)
        for stage, values in observed.items():  # each request's value, added to the buckets once per batch
            observe_many(self._stage_hist[stage], values)
        if jobs:  # state and generate are the batch's: observed once per batch
            self._stage_hist["state"].observe(after_state - start)
            self._stage_hist["generate"].observe(after_generate - after_state)
        return out

    def _rerank(self, job: _Job) -> list[ScoredItem]:
        """The reranker's answer, with live items from the candidates explored into it when the domain sets
        ``fresh_slots`` and the model answered (serving/reranker.py, FreshExplorer); counted in /metrics."""
        reranker, candidates, k = self._reranker_of(job), job.candidates or [], job.request.k
        shaper, interests = self.parts.interests, job.request.interests
        if shaper and interests and job.reason is None and job.state and len(job.state.item_ids) < shaper.max_events:
            candidates = shaper.shaped(candidates, interests, len(job.state.item_ids))  # a short history's boost
            job.model = f"{job.model}+interests"
            self.metrics.interest_answers.labels("boosted").inc()
        items = reranker.rerank(candidates, k, self._seen(job))
        explorer = getattr(reranker, "fresh", None)
        fresh_of = getattr(self._generator_of(job), "fresh_items", None)
        if explorer is None or fresh_of is None or job.reason is not None or job.state is None:
            return items
        fresh = fresh_of(c.item_id for c in candidates)
        s = job.state
        key = f"{job.request.user_id}|{job.domain}|{k}|{s.event_count}|{s.last_event_time}"  # same state, same draw
        pool = reranker.allowed([c for c in candidates if c.item_id in fresh])
        items, placed = explorer.explore(items, pool, k, self._seen(job), fresh, key)
        if placed:
            self.metrics.fresh_answers.labels("explored").inc()
            self.metrics.fresh_explored.inc(placed)
        elif any(item.item_id in fresh for item in items):
            self.metrics.fresh_answers.labels("scored").inc()
        return items

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """One request as a batch of one (no batcher); raises NoPopularity or UnknownDomain when nothing can answer."""
        self.domain_of(request)
        answer = self.run_batch([Queued(request, time.perf_counter(), None, None)])[0]  # type: ignore[arg-type]
        if isinstance(answer, (NoPopularity, UnknownDomain)):
            raise answer
        return answer.to_response()

    def fallback_answer(self, request: RecommendRequest, reason: str, waited_s: float) -> Answer:
        """The popularity answer given when the pipeline ran out of time (no state: history is not excluded);
        raises NoPopularity or UnknownDomain as :meth:`run_batch` answers them."""
        job = self._job(request, waited_s, reason=reason)
        start = time.perf_counter()
        self._fall_back(job)
        if job.error is not None:
            error = self._no_answer(job.domain, job.error)
            if isinstance(error, NoPopularity):
                self._observe_arm(job, "error")
            raise error
        items = self._reranker_of(job).rerank(job.candidates or [], request.k, self._seen(job))
        self._count_fallback(reason)
        took = time.perf_counter() - start
        stages = {"queue": waited_s, "state": 0.0, "generate": took, "rerank": 0.0, "total": waited_s + took}
        self._observe_arm(job, "fallback", stages["total"])
        return self._published(_answer(job, items, 1, stages))

    def _published(self, answer: Answer) -> Answer:
        """The answer, its impression handed to the sink (never blocks: a full buffer drops and counts)."""
        if self.impressions is not None:
            self.impressions.offer(answer)
        return answer
