"""Prometheus metrics of the service, in a registry per app (so tests and several apps never collide)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

# Sub-millisecond resolution: the state fetch target is 0.3 ms p99, the request target 20 ms p99.
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
STAGES = ("queue", "state", "generate", "rerank", "total")
# How an experiment arm's /recommend request ended (the `outcome` label of ugt_serving_arm_requests_total).
ARM_OUTCOMES = ("model", "fallback", "error")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingMetrics:
    """Names (all prefixed ``ugt_serving_``): requests_total, stage_seconds, batch_size, fallbacks_total,
    errors_total, popularity_source_total, arm_latency_seconds, arm_requests_total, impressions_published_total, impressions_dropped_total,
    kv_cache_lookups_total, kv_cache_bytes, engine_restarts_total, and for UGT models that
    follow new items: live_items, live_items_rejected_total, live_items_feed_errors_total, live_item_delay_seconds."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ugt_serving_requests_total",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "ugt_serving_stage_seconds",
            "Seconds per /recommend stage (queue, state, generate, rerank, total).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "ugt_serving_fallbacks_total",
            "/recommend answers given by the fallback, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.popularity_source = Counter(
            "ugt_serving_popularity_source_total",
            "Where popularity lists came from: redis, redis_stale (Redis failing) or file.",
            ["source"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ugt_serving_batch_size",
            "Requests per batch of the dynamic batcher.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "ugt_serving_errors_total",
            "/recommend requests answered with an error, by kind (no_popularity, internal, unauthorized, "
            "rate_limited, overloaded, unknown_domain, invalid_request).",
            ["kind"],
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "ugt_serving_engine_restarts",
            "Engine processes forked again after one died (engine: process).",
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "ugt_serving_worker_restarts",
            "HTTP worker processes started again after one died (`ugt serve --workers N`).",
            registry=self.registry,
        )
        self.engine_queue = Gauge(
            "ugt_serving_engine_queue",
            "Requests waiting in the shared engine (`--workers N`); past engine_queue_max they are refused at once.",
            registry=self.registry,
        )
        self.engine_refused = Counter(
            "ugt_serving_engine_refused",
            "Requests the shared engine refused on arrival, by reason (queue_full, rate_limited).",
            ["reason"],
            registry=self.registry,
        )
        self.state_round_trips = Counter(
            "ugt_serving_state_round_trips",
            "Round trips to the state store (one per batch with a batched reader; one per user without).",
            registry=self.registry,
        )
        self.state_users = Counter(
            "ugt_serving_state_users",
            "Users whose state was read (divided by state_round_trips: users per round trip).",
            registry=self.registry,
        )
        self._impression_metrics()
        self._arm_metrics()
        self._similar_metrics()
        self._fresh_metrics()
        self._interest_metrics()
        for stage in STAGES:  # expose every series from the start, so dashboards see zeros rather than gaps
            self.stage_seconds.labels(stage)

    def _similar_metrics(self) -> None:
        """The similar-items source's share in /recommend answers (serving/similar.py)."""
        self.similar_answers = Counter(
            "ugt_serving_similar_answers",
            "/recommend answers the similar-items source took part in, by how (merged, alone).",
            ["how"],
            registry=self.registry,
        )

    def _interest_metrics(self) -> None:
        """Declared interests (request field ``interests``, serving/interests.py): how often they shaped an answer."""
        self.interest_answers = Counter(
            "ugt_serving_interest_answers",
            "/recommend answers shaped by the request's declared interests, by how: popular (popularity within "
            "them, no state) or boosted (the model's candidates of a short history).",
            ["how"],
            registry=self.registry,
        )
        for how in ("popular", "boosted"):
            self.interest_answers.labels(how)

    def _fresh_metrics(self) -> None:
        """Fresh-item exploration (rerank key fresh_slots): how many answers carried a live item, and how."""
        self.fresh_answers = Counter(
            "ugt_serving_fresh_answers",
            "/recommend answers of domains with fresh_slots that carried a live item (added after training): "
            "scored (on the generator's score alone) or explored (placed by the bounded exploration).",
            ["how"],
            registry=self.registry,
        )
        self.fresh_explored = Counter(
            "ugt_serving_fresh_explored_items",
            "Live items placed into /recommend answers by the bounded exploration (rerank key fresh_slots).",
            registry=self.registry,
        )
        for how in ("scored", "explored"):
            self.fresh_answers.labels(how)

    def _arm_metrics(self) -> None:
        """Per experiment arm, so a readout can set an arm's latency and failures beside its CTR (impressions carry
        neither, and a failed request has none): one series per configured arm, cardinality arms x outcomes."""
        self.arm_latency = Histogram(
            "ugt_serving_arm_latency_seconds",
            "Seconds per /recommend answer of an experiment arm (stage total, the timeout fallback's included).",
            ["experiment", "arm"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.arm_requests = Counter(
            "ugt_serving_arm_requests",
            "/recommend requests of an experiment arm by outcome: model (the arm's own answer), fallback (any "
            "fallback reason), error (nothing to answer with, a 503).",
            ["experiment", "arm", "outcome"],
            registry=self.registry,
        )

    def watch_arms(self, arms: list[tuple[str, str]]) -> None:
        """Expose every (experiment, arm) series from the start: a dashboard and the readout see zeros, not gaps."""
        for experiment, arm in arms:
            self.arm_latency.labels(experiment, arm)
            for outcome in ARM_OUTCOMES:
                self.arm_requests.labels(experiment, arm, outcome)

    def _impression_metrics(self) -> None:
        """The impression publisher's counters (serving/impressions.py), every reason exposed from the start."""
        self.impressions_published = Counter(
            "ugt_serving_impressions_published",
            "Impressions (served lists) Kafka confirmed on Topics.impressions (impressions: true).",
            registry=self.registry,
        )
        self.impressions_dropped = Counter(
            "ugt_serving_impressions_dropped",
            "Impressions not published, by reason (buffer_full, kafka_error, registry_error, encode_error); "
            "never a failed request.",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("buffer_full", "kafka_error", "registry_error", "encode_error"):
            self.impressions_dropped.labels(reason)

    def watch_similar(self, similar: object) -> None:
        """The similar-items index's size, read at scrape time (it grows as new items arrive)."""
        gauge = Gauge("ugt_serving_similar_items", "Items in the similar-items index (trained + arrived since).",
                      registry=self.registry)
        gauge.set_function(lambda: float(similar.size))  # type: ignore[attr-defined]

    def watch_kv_caches(self, caches: dict[str, object]) -> None:
        """Expose each UGT generator's prefix-cache hits, appends, misses and bytes (read at scrape time, by domain)."""
        self.registry.register(_KVCacheCollector(caches))

    def watch_live_items(self, generators: dict[str, object]) -> None:
        """Expose each UGT generator's live catalog (serving/live_items.py), read at scrape time, by domain."""
        if generators:
            self.registry.register(_LiveItemsCollector(generators))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _KVCacheCollector:
    """ugt_serving_kv_cache_lookups_total{domain, result=hit|append|miss} and ugt_serving_kv_cache_bytes{domain,
    state=used|reserved} from models.ugt.runner.slot_cache.PrefixCache."""

    def __init__(self, caches: dict[str, object]):
        self.caches = caches

    def collect(self):
        family = CounterMetricFamily("ugt_serving_kv_cache_lookups", "UGT prefix (KV) cache lookups per request row: "
                                     "hit = only the last event ran through the layers, append = only the events "
                                     "after the cached prefix, miss = the whole history.", labels=["domain", "result"])
        size = GaugeMetricFamily("ugt_serving_kv_cache_bytes", "UGT KV cache bytes: used = cached users' slots, "
                                 "reserved = the whole pool (kv_cache_bytes caps it).", labels=["domain", "state"])
        for domain, cache in self.caches.items():
            family.add_metric([domain, "hit"], getattr(cache, "hits", 0))
            family.add_metric([domain, "append"], getattr(cache, "appends", 0))
            family.add_metric([domain, "miss"], getattr(cache, "misses", 0))
            size.add_metric([domain, "used"], getattr(cache, "bytes_used", 0))
            size.add_metric([domain, "reserved"], getattr(cache, "bytes_reserved", 0))
        yield family
        yield size


class _LiveItemsCollector:
    """The live catalogs' LiveStats as Prometheus families (counters and the delay histogram are additive across
    engine processes, like every other series here)."""

    def __init__(self, generators: dict[str, object]):
        self.generators = generators

    def collect(self):
        from serving.live_items import DELAY_BUCKETS

        items = GaugeMetricFamily("ugt_serving_live_items", "Items served that arrived after training (from the "
                                  "item_semantic_ids feed), by domain and semantic-ID version.",
                                  labels=["domain", "version", "state"])  # state: following, superseded, mismatch, full
        rejected = CounterMetricFamily("ugt_serving_live_items_rejected", "Feed entries not served, by reason "
                                       "(known, duplicate_code, code_out_of_range, bad_entry, full).",
                                       labels=["domain", "reason"])
        errors = CounterMetricFamily("ugt_serving_live_items_feed_errors", "Failed reads of the new-item feed "
                                     "(Redis down or slow); the catalog keeps what it has and retries.",
                                     labels=["domain"])
        delay = HistogramMetricFamily("ugt_serving_live_item_delay_seconds", "Seconds from the item job announcing "
                                      "a new item to the generator serving it.", labels=["domain"])
        for domain, gen in self.generators.items():
            stats = gen.live.stats  # type: ignore[attr-defined]
            items.add_metric([domain, stats.version, stats.state], stats.items)
            for reason, count in sorted(stats.rejected.items()):
                rejected.add_metric([domain, reason], count)
            errors.add_metric([domain], stats.feed_errors)
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, DELAY_BUCKETS), "+Inf"], stats.delay_buckets, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            delay.add_metric([domain], buckets, stats.delay_sum)
        yield from (items, rejected, errors, delay)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every v (a child with its labels set), with the same sum and bucket counts, in
    one increment per bucket touched: the pipeline observes a batch's per-request stages together, where a Python
    loop over the buckets and two locks per value cost more than the value is worth."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # a prometheus_client without these internals
        for value in values:
            histogram.observe(value)
        return
    if not values:
        return
    for index, count in Tally(bisect_left(bounds, value) for value in values).items():
        buckets[index].inc(count)  # observe() counts a value in the first bucket whose bound is >= it
    total.inc(sum(values))


def _escape(value: str, quote: bool) -> str:
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quote else value


def merge_expositions(*texts: bytes) -> bytes:
    """One exposition with every process's samples added up (counters and histograms are additive).

    ``engine: process`` and ``--workers N`` keep the pipeline's series in the engine process and the HTTP ones in
    the server processes; a scrape must see one set of series. A gauge is a level, not a count: it is never
    summed, the first exposition that has the sample gives it (pass the engine's first). ``*_created`` samples
    are dropped (a sum of start times means nothing); families keep the order they first appear in.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name.endswith("_created"):  # the parser's own family for a counter's _created lines
                continue
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sample.labels.items()))
                if family.type == "gauge":
                    samples.setdefault(key, sample.value)
                else:
                    samples[key] = samples.get(key, 0.0) + sample.value
    lines = []
    for name, (kind, doc, samples) in families.items():
        name = f"{name}_total" if kind == "counter" else name  # the text format names a counter by its sample
        lines.append(f"# HELP {name} {_escape(doc, quote=False)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples.items():
            label_text = ",".join(f'{k}="{_escape(v, quote=True)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{label_text}}} {floatToGoString(value)}" if labels
                         else f"{sample_name} {floatToGoString(value)}")
    return ("\n".join(lines) + "\n").encode()
