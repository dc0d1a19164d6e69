"""Serving configuration: frozen pydantic dataclasses read from a YAML file, then ``UGT_SERVING_*`` env overrides.

Everything is validated at start: a typo or a bad value stops ``ugt serve`` with a message naming the key. Bounds
live on the fields (checked also for configs built in code); what spans several keys is ``_cross_checks``. A
relative path resolves against the folder of the YAML file that wrote it, else against the working directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from contracts.limits import DOMAIN_PATTERN

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "default.yaml"
ENV_PREFIX = "UGT_SERVING_"

StateReader = Literal["feast", "redis"]  # Feast SDK get_online_features | direct read of Feast's Redis hashes
# the batcher: a thread of the server, a forked process, auto = process unless a model runs on CUDA (no fork)
Engine = Literal["auto", "thread", "process"]
Admission = Literal["lru", "second_sight"]  # models/ugt/runner/slot_cache.py
Quantize = Literal["none", "int8", "fp8", "int8_weight"]  # models/ugt/quantize.py, models/ugt/weight_quant.py
# a request the engine's full queue refuses: 429 + Retry-After (reject), or the popularity answer marked "overloaded"
Overload = Literal["reject", "fallback"]
Generator = Literal["popularity", "ugt"]  # ugt: serving/ugt_generator.py, needs `checkpoint`
Device = Literal["auto", "cpu", "cuda"]  # where UGT models run: auto = CUDA when torch sees a GPU, else CPU
EngineStart = Literal["auto", "fork", "spawn"]  # `--workers N`'s engine: fork, spawn, auto = spawn for a CUDA model
EngineScope = Literal["pipeline", "model"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
STATE_READERS: tuple[str, ...] = get_args(StateReader)
ENGINES: tuple[str, ...] = get_args(Engine)
GENERATORS: tuple[str, ...] = get_args(Generator)
PATH_KEYS = ("checkpoint", "popularity_file", "similar_index")  # relative to where they were written (module docstring)


class ConfigError(ValueError):
    """A serving config that cannot start; the message lists every problem found."""


def _not_bool(value: Any) -> Any:
    """YAML's `true` is not a number (pydantic would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _none_is_empty(value: Any) -> Any:
    return "" if value is None else value


def _none_is_nothing(value: Any) -> Any:
    """An empty YAML key (``api_keys:``) means the default, as an empty list or mapping would."""
    return () if value is None else value


def _pairs(value: Any) -> Any:
    """A YAML mapping ``{category: value}`` is kept as hashable ``((category, value), ...)``."""
    if value is None:
        return ()
    return tuple(value.items()) if isinstance(value, Mapping) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Int = Annotated[int, BeforeValidator(_not_bool)]
Strings = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_none_is_nothing)]
ApiKeys = Annotated[tuple[Annotated[str, Field(min_length=8)], ...], BeforeValidator(_none_is_nothing)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Text = Annotated[str, BeforeValidator(_none_is_empty)]
NonEmpty = Annotated[str, Field(min_length=1), BeforeValidator(_none_is_empty)]
DomainName = Annotated[str, Field(pattern=DOMAIN_PATTERN)]
Boosts = Annotated[tuple[tuple[str, Annotated[Float, Field(gt=0, le=1000)]], ...], BeforeValidator(_pairs)]
Caps = Annotated[tuple[tuple[str, Annotated[Int, Field(ge=0, le=1000)]], ...], BeforeValidator(_pairs)]
# extra="forbid": a misspelt key is an error; numbers written where text is expected (version: 2) are text
STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


@dataclass(frozen=True, config=STRICT)
class RerankConfig:
    """Business rules, diversity and fresh-item exploration for one domain (serving/reranker.py); all off by default.
    Categories come from the Feast ``item_metadata`` view (``categories``, e.g. ML genres)."""

    diversity: Float = Field(0.0, ge=0, lt=1)  # MMR weight of diversity in [0, 1): 0 = keep the generator's order
    pool: Int = Field(3, ge=1, le=20)  # the generator is asked for k * pool candidates when any rule is on
    # filters: items in any of these categories are never returned
    drop_categories: Strings = ()
    boosts: Boosts = ()  # category -> score multiplier in (0, 1000]
    caps: Caps = ()  # category -> at most this many items per answer
    fresh_slots: Int = Field(0, ge=0, le=10)  # at most this many (and k // 2) slots for live items in the pool
    fresh_rate: Float = Field(1.0, ge=0, le=1)  # the share of answers (drawn per user and state) that explore

    @property
    def active(self) -> bool:
        return bool(self.diversity or self.drop_categories or self.boosts or self.caps)


@dataclass(frozen=True, config=STRICT)
class DomainConfig:
    """What the router picks for a request's ``domain``: the model and the reranking rules."""

    name: DomainName
    generator: Generator = "popularity"
    generator_version: NonEmpty = "v1"
    checkpoint: Text = ""
    rerank: RerankConfig = Field(default_factory=RerankConfig)


BUCKETS = 10_000  # users hash to this many buckets per experiment; a share is a whole number of them


def _mapping_to_named(value: Any) -> Any:
    """YAML's ``{name: {...}}`` as ``[{name, ...}]``, in the order written (arm order lays out the buckets)."""
    if not isinstance(value, Mapping):
        return _none_is_nothing(value)
    return [{**(raw or {}), "name": str(name)} if isinstance(raw, Mapping | None) else raw
            for name, raw in value.items()]


@dataclass(frozen=True, config=STRICT)
class ArmConfig:
    """One arm of an experiment: its traffic share and what serves it (unset keys: the domain's route).

    A ``holdout`` arm is served by the domain's own route and may not name a model: the users kept out.
    """

    name: DomainName
    share: Float = Field(ge=0, le=1)  # of all users; a multiple of 1/BUCKETS (0.0001)
    holdout: bool = False
    generator: Generator | None = None
    generator_version: Annotated[str, Field(min_length=1)] | None = None
    checkpoint: Text = ""
    rerank: RerankConfig | None = None

    @property
    def buckets(self) -> int:
        return round(self.share * BUCKETS)

    @model_validator(mode="after")
    def _check(self) -> ArmConfig:
        if abs(self.share * BUCKETS - self.buckets) > 1e-6:
            raise ValueError(f"share must be a multiple of {1 / BUCKETS:g} ({BUCKETS} buckets), got {self.share}")
        if self.holdout and (self.generator or self.generator_version or self.checkpoint or self.rerank):
            raise ValueError("a holdout arm is served by the domain's own route: it names no generator, "
                             "generator_version, checkpoint or rerank")
        return self


@dataclass(frozen=True, config=STRICT)
class ExperimentConfig:
    """A named experiment: on the requests of ``domains`` (default: default_domain), users hash to arms.

    Arms own contiguous bucket ranges laid out in the order written; buckets past the last arm are not in the
    experiment. docs/SERVING.md "Experiments and impressions" states what a change of shares moves.
    """

    name: DomainName
    arms: Annotated[tuple[ArmConfig, ...], BeforeValidator(_mapping_to_named)]
    domains: Strings = ()

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if not names:
            raise ValueError("an experiment needs at least one arm")
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        total = sum(a.buckets for a in self.arms)
        if total > BUCKETS:
            raise ValueError(f"arm shares add up to {total / BUCKETS:g}, more than 1")
        return self


@dataclass(frozen=True, config=STRICT)
class ServingConfig:
    host: NonEmpty = "127.0.0.1"  # where `ugt serve` listens
    port: Int = Field(0, ge=0, le=65535)  # 0 = Settings.serving_port (UGT_SERVING_PORT)
    generator: Generator = "popularity"  # the main model
    generator_version: NonEmpty = "v1"  # reported in every response as "<generator>-<version>" (ugt: from the checkpoint)
    checkpoint: Text = ""  # generator ugt: a `ugt train` checkpoint.pt (relative: see the module docstring)
    state_reader: StateReader = "redis"  # how user state is fetched (bench/state_fetch.py)
    feature_view: NonEmpty = "user_recent_events"  # the Feast view holding contracts.user_state_rule.FEATURE_NAMES
    feature_service: NonEmpty = "recommend_v1"  # what the Feast SDK reader asks for
    default_domain: DomainName = "movie"  # used when a request names no domain (schemas/user_event.avsc default)
    popularity_key_prefix: NonEmpty = "ugt:popularity:"  # Redis ZSET per domain, kept by the user_state job
    popularity_file: Text = ""  # JSON fallback when Redis is down; "" = none (relative: see the module docstring)
    popularity_refresh_s: Float = Field(1.0, gt=0, le=3600)  # the ZSET is re-read at most this often per domain
    # top items cached per domain: must cover k + history + exclude (_cross_checks)
    popularity_cache_size: Int = 2500
    redis_timeout_ms: Int = Field(200, ge=1, le=60_000)  # socket connect/read timeout of serving's own Redis client
    max_body_bytes: Int = Field(65536, ge=1024, le=16 * 1024 * 1024)  # larger request bodies get 413
    max_exclude: Int = Field(1000, ge=0, le=100_000)  # longest accepted `exclude` list
    max_history: Int = Field(200, ge=0, le=100_000)  # user-state events assumed at most (contracts.user_state_rule)
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = "info"  # uvicorn / logging level
    max_context: Int = Field(50, ge=0, le=1000)  # longest accepted `context` list (session items not yet stored)
    api_keys: ApiKeys = ()  # accepted X-API-Key values; empty = no authentication
    rate_limit_rps: Float = Field(0.0, ge=0, le=1e6)  # per API key (or client address without keys); 0 = no limit
    rate_limit_burst: Int = Field(50, ge=1, le=1_000_000)  # token-bucket depth of the rate limit
    batch_max_size: Int = Field(64, ge=1, le=4096)  # the dynamic batcher's largest batch (serving/batcher.py)
    kv_cache_users: Int = Field(10000, ge=0, le=10_000_000)  # users whose prefix K/V each UGT model keeps (0 = none)
    # > 0: each UGT generator's KV pool (slots of the whole window) fits in this many bytes, fewer than
    kv_cache_bytes: Int = Field(0, ge=0, le=1 << 40)  # kv_cache_users when they would not; 0 = no byte budget
    kv_cache_admission: Admission = "lru"  # second_sight: a new user enters a full pool on its second miss only
    # > 0: the model's window starts on a multiple of this many events (models.data.window_start), so a user with a
    history_hop: Int = Field(0, ge=0, le=100_000)  # full window appends to their KV prefix; 0 = slide per event
    # the cached steps read the KV pool in place (models/kernels/slot_attention.py; CUDA + Triton, kv_cache_users > 0)
    paged_attention: bool = False
    # PyTorch CPU threads per serving process. 1: a served batch is a few hundred small ops, too small to split,
    # and idle OpenMP workers spin on the cores the event loop needs (measured: docs/SERVING.md). 0 = torch's default
    torch_threads: Int = Field(1, ge=0, le=256)
    # true: each UGT model served on CPU runs torch.compile'd prefill/decode steps (inductor, C++ wrapper), compiled
    # at start-up (~30-70 s; inductor's disk cache makes restarts faster). Needs a C++ compiler. No effect on CUDA
    torch_compile: bool = False
    # int8: each UGT model on CPU runs its stack's weight matmuls as int8 GEMMs (models/ugt/quantize.py), not with
    # torch_compile. fp8 (CUDA, H100/H200) / int8_weight (any device): 8-bit weights (models/ugt/weight_quant.py).
    # What a device cannot run stops the start with the reason (docs/TRAINING.md). none = the trained weights
    quantize: Quantize = "none"
    # target-aware ranking (models/ugt/ranking.py): the checkpoint's ranking head reorders this many retrieval
    # candidates, each attending to the user's cached history. -1 = the checkpoint's heads.rank_top when it was
    # trained with a ranking head, else off; 0 = off; > 0 needs a ranking head and kv_cache_users > 0
    rank_top: Int = Field(-1, ge=-1, le=10_000)
    # > 0: semantic-ID beam search with this many beams (constrained by the checkpoint's prefix trie) beside
    # retrieval; the two lists are merged by reciprocal rank, or ordered together by the ranking head (rank_top).
    # Needs a checkpoint with a semantic-ID head. 0 = retrieval only
    beam_size: Int = Field(0, ge=0, le=10_000)
    # new items served without a retrain (serving/live_items.py): each UGT generator follows the item_semantic_ids job's
    # feed, room for this many items that arrive after training (0 = off; an ID-only checkpoint says it cannot)
    live_items: Int = Field(10000, ge=0, le=10_000_000)
    # the semantic-ID version whose feed to follow; "" = the checkpoint's (from `ugt train`), else the active one.
    # Either way the version's codes must match the checkpoint's
    sid_version: Text = ""
    similar_index: Text = ""  # a `ugt similar build` folder: GET /similar/{item_id} and the source below; "" = off
    # /recommend: merge this many neighbours of the user's last items into the model's list for users with fewer
    # than similar_max_events events (a first session); 0 = off. Needs similar_index
    similar_candidates: Int = Field(0, ge=0, le=10_000)
    similar_max_events: Int = Field(3, ge=1, le=100_000)
    batch_max_wait_ms: Float = Field(1.0, ge=0, le=1000)  # how long the first request of a batch waits for company
    # thread: the batcher is a thread beside the event loop (one GIL); process: the built service is forked into
    # an engine process with its own GIL, and the server process only does HTTP (serving/engine_process.py);
    # auto (the shipped configs): process on CPU, thread when a model runs on CUDA
    engine: Engine = "thread"
    # where UGT models run (auto: CUDA when there is a GPU). With `ugt serve --workers N` a CUDA model's engine is
    # started as a fresh process (spawned: CUDA does not survive a fork) that loads the model itself
    device: Device = "auto"
    engine_start: EngineStart = "auto"  # --workers N: fork or spawn the shared engine (serving/engine_spawn.py)
    # --workers N: the shared engine runs every request's whole pipeline, or (model) only the UGT model on rows the
    # workers pack; they run the rest themselves and scale with cores (serving/engine_model.py)
    engine_scope: EngineScope = "pipeline"
    engine_max_rows: Int = Field(128, ge=1, le=4096)  # engine_scope: model: rows per model step across workers
    # an engine process that answers nothing this long while asked is restarted
    engine_hang_timeout_ms: Float = Field(10000.0, ge=100, le=600_000)
    # requests waiting in the engine at most (back-pressure): past it a request is refused at once, as overload_response
    # says, instead of joining a queue that cannot drain in time
    engine_queue_max: Int = Field(4096, ge=1, le=1_000_000)
    overload_response: Overload = "reject"  # reject: 429 with Retry-After; fallback: popularity, reason overloaded
    queue_timeout_ms: Float = Field(200.0, ge=1, le=60_000)  # queued longer -> the fallback (reason overloaded)
    request_timeout_ms: Float = Field(1000.0, ge=1, le=60_000)  # no answer by then -> the fallback (reason timeout)
    rerank: RerankConfig = Field(default_factory=RerankConfig)  # the rules of domains without their own
    domains: Annotated[tuple[DomainConfig, ...], BeforeValidator(_none_is_nothing)] = ()  # the router; empty = every domain, the top-level generator
    # A/B tests: name -> {domains, arms: {arm: {share, holdout, generator, ...}}} (serving/experiments.py)
    experiments: Annotated[tuple[ExperimentConfig, ...], BeforeValidator(_mapping_to_named)] = ()
    # each served list is published to Topics.impressions (schemas/impression.avsc) from a bounded buffer
    impressions: bool = False
    impression_buffer: Int = Field(10_000, ge=1, le=10_000_000)  # impressions waiting for Kafka; past it: dropped
    impression_timeout_ms: Float = Field(10_000.0, ge=100, le=600_000)  # unconfirmed by Kafka this long: dropped

    @property
    def model_name(self) -> str:
        return f"{self.generator}-{self.generator_version}"

    @model_validator(mode="before")
    @classmethod
    def _domains_from_mapping(cls, data: Any) -> Any:
        """YAML's ``domains: {name: {...}}``; a domain inherits the top-level generator, version and rules."""
        if not isinstance(data, dict):
            return data
        if data.get("rerank", ...) is None:
            data = {**data, "rerank": {}}
        if not isinstance(data.get("domains"), Mapping):
            return data
        inherited = {k: data[k] for k in ("generator", "generator_version", "rerank") if data.get(k) is not None}
        domains = [
            {**inherited, **(raw or {}), "name": str(name)} if isinstance(raw, Mapping | None) else raw
            for name, raw in data["domains"].items()
        ]
        return {**data, "domains": domains}

    @model_validator(mode="after")
    def _cross_checks(self) -> ServingConfig:
        """What no single key can say: checkpoints and files exist, the cache covers the largest answer."""
        from serving.http_models import (
            MAX_K,  # the API bound; the cache must be able to fill the largest answer
        )

        out: list[str] = []
        if self.generator == "ugt":
            out += _checkpoint_problems("checkpoint", self.checkpoint)
        if self.popularity_file and not Path(self.popularity_file).is_file():
            out.append(f"popularity_file: no such file {self.popularity_file!r}")
        if self.similar_index and not Path(self.similar_index).is_dir():
            out.append(f"similar_index: no such folder {self.similar_index!r} (build one with `ugt similar build`)")
        if self.similar_candidates and not self.similar_index:
            out.append("similar_candidates: needs similar_index (a `ugt similar build` folder)")
        needed = MAX_K + self.max_exclude + self.max_history
        if self.popularity_cache_size < needed:
            out.append(
                f"popularity_cache_size: must be >= max k ({MAX_K}) + max_exclude + max_history = {needed}, "
                f"got {self.popularity_cache_size}"
            )
        names = [d.name for d in self.domains]
        if self.domains and self.default_domain not in names:
            out.append(f"default_domain: {self.default_domain!r} is not one of domains {names}")
        for d in self.domains:
            if d.generator == "ugt":
                out += _checkpoint_problems(f"domains.{d.name}.checkpoint", d.checkpoint)
        out += self._experiment_problems()
        if self.quantize == "int8" and self.torch_compile:  # fp8 / int8_weight: the engine refuses it on CPU
            out.append("quantize: int8 runs uncompiled (fbgemm int8 GEMMs): set torch_compile: false")
        if out:
            raise ValueError(_BULLET.join(out))
        return self


    def _experiment_problems(self) -> list[str]:
        """Each experiment's domains are served, no domain runs two experiments, ugt arms have checkpoints."""
        out: list[str] = []
        served = set(routes(self))
        owner: dict[str, str] = {}
        for exp in self.experiments:
            for domain in exp.domains or (self.default_domain,):
                if self.domains and domain not in served:
                    out.append(f"experiments.{exp.name}.domains: {domain!r} is not one of domains {sorted(served)}")
                if domain in owner:
                    out.append(f"experiments.{exp.name}: domain {domain!r} already runs experiment {owner[domain]!r}")
                owner.setdefault(domain, exp.name)
            for arm in exp.arms:
                if arm.generator == "ugt":
                    out += _checkpoint_problems(f"experiments.{exp.name}.arms.{arm.name}.checkpoint", arm.checkpoint)
        if len({e.name for e in self.experiments}) != len(self.experiments):
            out.append("experiments: names must be unique")
        return out


def _checkpoint_problems(where: str, checkpoint: str) -> list[str]:
    if not checkpoint:
        return [f"{where}: generator ugt needs a checkpoint (a checkpoint.pt written by `ugt train`)"]
    if not Path(checkpoint).is_file():
        return [f"{where}: no such file {checkpoint!r} (train one with `ugt train`)"]
    return []


_BULLET = "\n  - "
_ADAPTER = TypeAdapter(ServingConfig)


def resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path)


def _resolved(values: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """``values`` with its relative paths (top level and per domain) made absolute against ``base_dir``."""

    def fix(raw: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: str(resolve_path(v, base_dir)) if k in PATH_KEYS and isinstance(v, str) and v else v
            for k, v in raw.items()
        }

    out = fix(values)
    if isinstance(out.get("domains"), Mapping):
        out["domains"] = {n: fix(d) if isinstance(d, Mapping) else d for n, d in out["domains"].items()}
    if isinstance(out.get("experiments"), Mapping):
        out["experiments"] = {
            n: {**e, "arms": {a: fix(r) if isinstance(r, Mapping) else r for a, r in e["arms"].items()}}
            if isinstance(e, Mapping) and isinstance(e.get("arms"), Mapping) else e
            for n, e in out["experiments"].items()}
    return out


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Every ``UGT_SERVING_<KEY>`` for a top-level key; ``UGT_SERVING_API_KEYS`` is comma-separated."""
    out: dict[str, Any] = {}
    for f in fields(ServingConfig):
        name = ENV_PREFIX + f.name.upper()
        if f.name in ("rerank", "domains", "experiments") or name not in env:
            continue
        out[f.name] = env[name]
        if f.name == "api_keys":
            out[f.name] = [k.strip() for k in env[name].split(",") if k.strip()]
    return out


def _where(loc: tuple[Any, ...], data: Any) -> str:
    """A pydantic error location as the key a user wrote: ``domains.movie.rerank.boosts.Comedy``."""
    parts: list[str] = []
    node = data
    for part in loc:
        if isinstance(part, int) and isinstance(node, Mapping):  # a YAML mapping validated as a tuple
            name, node = list(node.items())[part] if part < len(node) else (part, None)
            parts.append(str(name))
        elif isinstance(part, int) and isinstance(node, (list, tuple)):
            node = node[part] if part < len(node) else None
            parts.append(str(part))
        elif isinstance(part, int):
            continue  # the value half of a (category, value) pair
        else:
            node = node.get(part) if isinstance(node, Mapping) else None
            parts.append(str(part))
    return ".".join(parts)


def _known_keys(loc: tuple[Any, ...]) -> str:
    where = [p for p in loc[:-1] if isinstance(p, str)]
    kind = (RerankConfig if "rerank" in where else DomainConfig if where[:1] == ["domains"]
            else ArmConfig if "arms" in where else ExperimentConfig if where[:1] == ["experiments"] else ServingConfig)
    return ", ".join(sorted(f.name for f in fields(kind) if f.name != "name"))


def _messages(exc: ValidationError, data: Mapping[str, Any], origins: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for error in exc.errors():
        loc = error["loc"]
        if not loc:  # _cross_checks: its lines already name their keys
            out.append(error["msg"].removeprefix("Value error, "))
            continue
        where = _where(loc, data)
        origin = f" (from {origins[loc[0]]})" if loc[0] in origins else ""
        if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            out.append(f"{where}: unknown key (known keys: {_known_keys(loc)})")
        else:
            message = error["msg"].removeprefix("Value error, ")
            out.append(f"{where}: {message}, got {error['input']!r}{origin}")
    return out


def build_config(
    values: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServingConfig:
    """A validated config from a mapping (the parsed YAML), then ``UGT_SERVING_<KEY>`` env, then ``overrides``.

    Relative paths in ``values`` resolve against ``base_dir`` (the YAML file's folder); those from the
    environment or ``overrides`` (the command line) against the working directory.
    """
    env = os.environ if env is None else env
    cwd = Path.cwd()
    from_env = env_overrides(env)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = {**_resolved(values, base_dir or cwd), **_resolved(from_env, cwd), **_resolved(given, cwd)}
    origins = {k: f"env {ENV_PREFIX}{k.upper()}" for k in from_env} | {k: "the command line" for k in given}
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError("invalid serving config:" + _BULLET + _BULLET.join(_messages(exc, data, origins))) from exc


def routes(config: ServingConfig) -> dict[str, DomainConfig]:
    """Domain name -> what serves it; without a ``domains`` section, one entry for the default domain."""
    if config.domains:
        return {d.name: d for d in config.domains}
    return {
        config.default_domain: DomainConfig(
            name=config.default_domain,
            generator=config.generator,
            generator_version=config.generator_version,
            checkpoint=config.checkpoint,
            rerank=config.rerank,
        )
    }


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServingConfig:
    """Read, override and validate the serving config (default: serving/configs/default.yaml)."""
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read serving config {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"serving config {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(
            f"serving config {str(path)!r} must be a mapping of key: value, got {type(values).__name__}"
        )
    return build_config(values, env=env, base_dir=path.resolve().parent, overrides=overrides)
