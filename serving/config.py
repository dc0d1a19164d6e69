"""Serving configuration: one flat, typed dataclass read from a YAML file, then ``UGT_SERVING_*`` env overrides.

Everything is validated when the service starts, so a typo or a bad value stops ``ugt serve`` at once with a
message naming the key, instead of surfacing as a wrong answer or a 500 under load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "configs" / "default.yaml"
ENV_PREFIX = "UGT_SERVING_"

STATE_READERS = ("feast", "redis")  # Feast SDK get_online_features | direct read of Feast's Redis hashes
# where the batcher runs the pipeline: a thread of the server, its own forked process, or auto = process unless a
# model runs on CUDA (which does not survive a fork)
ENGINES = ("auto", "thread", "process")
GENERATORS = ("popularity", "ugt")  # ugt: serving/ugt_generator.py, needs `checkpoint`
DOMAIN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A serving config that cannot start; the message lists every problem found."""


@dataclass(frozen=True)
class RerankConfig:
    """Business rules and diversity for one domain (serving/reranker.py); all off by default.

    Categories come from the Feast ``item_metadata`` view (``categories``, e.g. ML genres).
    """

    diversity: float = 0.0  # MMR weight of diversity in [0, 1): 0 = keep the generator's order
    pool: int = 3  # the generator is asked for k * pool candidates when any rule is on
    drop_categories: tuple[str, ...] = ()  # filters: items in any of these categories are never returned
    boosts: tuple[tuple[str, float], ...] = ()  # category -> score multiplier (> 0)
    caps: tuple[tuple[str, int], ...] = ()  # category -> at most this many items per answer

    @property
    def active(self) -> bool:
        return bool(self.diversity or self.drop_categories or self.boosts or self.caps)


@dataclass(frozen=True)
class DomainConfig:
    """What the router picks for a request's ``domain``: the model and the reranking rules."""

    name: str
    generator: str = "popularity"
    generator_version: str = "v1"
    checkpoint: str = ""
    rerank: RerankConfig = field(default_factory=RerankConfig)


@dataclass(frozen=True)
class ServingConfig:
    host: str = "127.0.0.1"  # where `ugt serve` listens
    port: int = 0  # 0 = Settings.serving_port (UGT_SERVING_PORT)
    generator: str = "popularity"  # the main model, one of GENERATORS
    generator_version: str = "v1"  # reported in every response as "<generator>-<version>" (ugt: from the checkpoint)
    checkpoint: str = ""  # generator ugt: a `ugt train` checkpoint.pt; relative to the config file
    state_reader: str = "redis"  # how user state is fetched, one of STATE_READERS (bench/state_fetch.py)
    feature_view: str = "user_recent_events"  # the Feast view holding contracts.user_state_rule.FEATURE_NAMES
    feature_service: str = "recommend_v1"  # what the Feast SDK reader asks for
    default_domain: str = "movie"  # used when a request names no domain (schemas/user_event.avsc default)
    popularity_key_prefix: str = "ugt:popularity:"  # Redis ZSET per domain, kept by the user_state job
    popularity_file: str = ""  # JSON fallback when Redis is down; relative to the config file; "" = none
    popularity_refresh_s: float = 1.0  # the ZSET is re-read at most this often per domain
    popularity_cache_size: int = 2500  # top items cached per domain: must cover k + history + exclude
    redis_timeout_ms: int = 200  # socket connect/read timeout of serving's own Redis client
    max_body_bytes: int = 65536  # larger request bodies get 413
    max_exclude: int = 1000  # longest accepted `exclude` list
    max_history: int = 200  # user-state events assumed at most (contracts.user_state_rule.DEFAULT_MAX_EVENTS)
    log_level: str = "info"  # uvicorn / logging level
    max_context: int = 50  # longest accepted `context` list (session items not yet in the stored state)
    api_keys: tuple[str, ...] = ()  # accepted X-API-Key values; empty = no authentication
    rate_limit_rps: float = 0.0  # per API key (or client address without keys); 0 = no limit
    rate_limit_burst: int = 50  # token-bucket depth of the rate limit
    batch_max_size: int = 64  # the dynamic batcher's largest batch (serving/batcher.py)
    kv_cache_users: int = 10000  # users whose prefix K/V each UGT generator keeps (0 = recompute every request)
    # PyTorch CPU threads per serving process. 1: a served batch is a few hundred small ops, too small to split,
    # and idle OpenMP workers spin on the cores the event loop needs (measured: docs/SERVING.md). 0 = torch's default
    torch_threads: int = 1
    # true: each UGT model served on CPU runs torch.compile'd prefill/decode steps (inductor, C++ wrapper), compiled
    # at start-up (~30-70 s; inductor's disk cache makes restarts faster). Needs a C++ compiler. No effect on CUDA
    torch_compile: bool = False
    # target-aware ranking (models/ugt/ranking.py): the checkpoint's ranking head reorders this many retrieval
    # candidates, each attending to the user's cached history. -1 = the checkpoint's heads.rank_top when it was
    # trained with a ranking head, else off; 0 = off; > 0 needs a ranking head and kv_cache_users > 0
    rank_top: int = -1
    # > 0: semantic-ID beam search with this many beams (constrained by the checkpoint's prefix trie) beside
    # retrieval; the two lists are merged by reciprocal rank, or ordered together by the ranking head (rank_top).
    # Needs a checkpoint with a semantic-ID head. 0 = retrieval only
    beam_size: int = 0
    # new items served without a retrain (serving/live_items.py): each UGT generator follows the item_semantic_ids
    # job's feed and keeps room for this many items that arrive after training (0 = off; a checkpoint that embeds
    # items by ID only cannot serve them and says so)
    live_items: int = 10000
    # the semantic-ID version whose feed to follow; "" = the checkpoint's (from `ugt train`), else the active one.
    # Either way the version's codes must match the checkpoint's
    sid_version: str = ""
    batch_max_wait_ms: float = 1.0  # how long the first request of a batch waits for company
    # thread: the batcher is a thread beside the event loop (one GIL); process: the built service is forked into
    # an engine process with its own GIL, and the server process only does HTTP (serving/engine_process.py);
    # auto (the shipped configs): process on CPU, thread when a model runs on CUDA
    engine: str = "thread"
    engine_hang_timeout_ms: float = 10000.0  # engine: process that answers nothing this long while asked is restarted
    queue_timeout_ms: float = 200.0  # a request queued longer is answered by the fallback (reason overloaded)
    request_timeout_ms: float = 1000.0  # no answer by then -> the fallback (reason timeout)
    rerank: RerankConfig = field(default_factory=RerankConfig)  # the rules of domains without their own
    domains: tuple[DomainConfig, ...] = ()  # the router; empty = every domain, the top-level generator

    @property
    def model_name(self) -> str:
        return f"{self.generator}-{self.generator_version}"


def _problems(config: ServingConfig, base_dir: Path) -> list[str]:
    """Every reason ``config`` cannot start, empty when it is fine."""
    out: list[str] = []
    if not config.host:
        out.append("host: must not be empty")
    if not 0 <= config.port <= 65535:
        out.append(f"port: must be 0..65535, got {config.port}")
    if config.generator not in GENERATORS:
        out.append(f"generator: must be one of {list(GENERATORS)}, got {config.generator!r}")
    if config.generator == "ugt" and not config.checkpoint:
        out.append("checkpoint: generator ugt needs a checkpoint (a checkpoint.pt written by `ugt train`)")
    elif config.generator == "ugt" and not resolve_path(config.checkpoint, base_dir).is_file():
        out.append(f"checkpoint: no such file {str(resolve_path(config.checkpoint, base_dir))!r} (train one with `ugt train`)")
    if not config.generator_version:
        out.append("generator_version: must not be empty")
    if config.state_reader not in STATE_READERS:
        out.append(f"state_reader: must be one of {list(STATE_READERS)}, got {config.state_reader!r}")
    if not config.feature_view or not config.feature_service:
        out.append("feature_view / feature_service: must not be empty")
    if not DOMAIN_PATTERN.match(config.default_domain):
        out.append(f"default_domain: must match {DOMAIN_PATTERN.pattern}, got {config.default_domain!r}")
    if not config.popularity_key_prefix:
        out.append("popularity_key_prefix: must not be empty")
    if config.popularity_file and not resolve_path(config.popularity_file, base_dir).is_file():
        out.append(f"popularity_file: no such file {str(resolve_path(config.popularity_file, base_dir))!r}")
    if not 0 < config.popularity_refresh_s <= 3600:
        out.append(f"popularity_refresh_s: must be in (0, 3600], got {config.popularity_refresh_s}")
    if not 1 <= config.redis_timeout_ms <= 60_000:
        out.append(f"redis_timeout_ms: must be 1..60000, got {config.redis_timeout_ms}")
    if not 1024 <= config.max_body_bytes <= 16 * 1024 * 1024:
        out.append(f"max_body_bytes: must be 1024..16777216, got {config.max_body_bytes}")
    if not 0 <= config.max_exclude <= 100_000:
        out.append(f"max_exclude: must be 0..100000, got {config.max_exclude}")
    if not 0 <= config.max_history <= 100_000:
        out.append(f"max_history: must be 0..100000, got {config.max_history}")
    from serving.http_models import MAX_K  # the API bound; the cache must be able to fill the largest answer

    needed = MAX_K + config.max_exclude + config.max_history
    if config.popularity_cache_size < needed:
        out.append(
            f"popularity_cache_size: must be >= max k ({MAX_K}) + max_exclude + max_history = {needed}, "
            f"got {config.popularity_cache_size}"
        )
    if not 0 <= config.max_context <= 1000:
        out.append(f"max_context: must be 0..1000, got {config.max_context}")
    if any(not key or len(key) < 8 for key in config.api_keys):
        out.append("api_keys: every key must be a string of at least 8 characters")
    if not 0 <= config.rate_limit_rps <= 1e6:
        out.append(f"rate_limit_rps: must be 0..1000000, got {config.rate_limit_rps}")
    if not 1 <= config.rate_limit_burst <= 1_000_000:
        out.append(f"rate_limit_burst: must be 1..1000000, got {config.rate_limit_burst}")
    if not 0 <= config.kv_cache_users <= 10_000_000:
        out.append(f"kv_cache_users: must be 0..10000000, got {config.kv_cache_users}")
    if not 0 <= config.beam_size <= 10_000:
        out.append(f"beam_size: must be 0 (off) .. 10000, got {config.beam_size}")
    if not 0 <= config.live_items <= 10_000_000:
        out.append(f"live_items: must be 0 (off) .. 10000000, got {config.live_items}")
    if not -1 <= config.rank_top <= 10_000:
        out.append(f"rank_top: must be -1 (the checkpoint's), 0 (off) or 1..10000, got {config.rank_top}")
    if not 0 <= config.torch_threads <= 256:
        out.append(f"torch_threads: must be 0..256 (0 = PyTorch's default), got {config.torch_threads}")
    if not 1 <= config.batch_max_size <= 4096:
        out.append(f"batch_max_size: must be 1..4096, got {config.batch_max_size}")
    if not 100 <= config.engine_hang_timeout_ms <= 600_000:
        out.append(f"engine_hang_timeout_ms: must be 100..600000, got {config.engine_hang_timeout_ms}")
    if config.engine not in ENGINES:
        out.append(f"engine: must be one of {list(ENGINES)}, got {config.engine!r}")
    if not 0 <= config.batch_max_wait_ms <= 1000:
        out.append(f"batch_max_wait_ms: must be 0..1000, got {config.batch_max_wait_ms}")
    if not 1 <= config.queue_timeout_ms <= 60_000:
        out.append(f"queue_timeout_ms: must be 1..60000, got {config.queue_timeout_ms}")
    if not 1 <= config.request_timeout_ms <= 60_000:
        out.append(f"request_timeout_ms: must be 1..60000, got {config.request_timeout_ms}")
    names = [d.name for d in config.domains]
    if config.domains and config.default_domain not in names:
        out.append(f"default_domain: {config.default_domain!r} is not one of domains {names}")
    for d in config.domains:
        where = f"domains.{d.name}"
        if d.generator not in GENERATORS:
            out.append(f"{where}.generator: must be one of {list(GENERATORS)}, got {d.generator!r}")
        if d.generator == "ugt" and not d.checkpoint:
            out.append(f"{where}.checkpoint: generator ugt needs a checkpoint (a checkpoint.pt from `ugt train`)")
        elif d.generator == "ugt" and not resolve_path(d.checkpoint, base_dir).is_file():
            out.append(f"{where}.checkpoint: no such file {str(resolve_path(d.checkpoint, base_dir))!r}")
    if config.log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
        out.append(f"log_level: not a log level: {config.log_level!r}")
    return out


def resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path)


def _coerce(name: str, kind: type, value: Any, origin: str) -> tuple[Any, str | None]:
    """Convert one raw value to the field's type; return (value, problem)."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value, None
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
                return value.lower() in ("1", "true", "yes"), None
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value), None
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value), None
        if value is None:
            return "", None
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value), None
    except (TypeError, ValueError):
        return None, f"{name}: expected {kind.__name__} ({origin}), got {value!r}"


_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_STRUCTURED = ("api_keys", "rerank", "domains")  # parsed by _structured, not _coerce


def _mapping(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {value!r}")
        return {}
    return value


def _rerank(value: Any, where: str, problems: list[str]) -> RerankConfig:
    raw = _mapping(value, where, problems)
    known = {"diversity", "pool", "drop_categories", "boosts", "caps"}
    problems += [f"{where}.{key}: unknown key (known keys: {', '.join(sorted(known))})" for key in raw if key not in known]
    out = RerankConfig()
    diversity, problem = _coerce(f"{where}.diversity", float, raw.get("diversity", 0.0), "config file")
    if problem or not 0 <= diversity < 1:
        problems.append(problem or f"{where}.diversity: must be in [0, 1), got {diversity}")
        diversity = 0.0
    pool, problem = _coerce(f"{where}.pool", int, raw.get("pool", 3), "config file")
    if problem or not 1 <= pool <= 20:
        problems.append(problem or f"{where}.pool: must be 1..20, got {pool}")
        pool = 3
    drops = raw.get("drop_categories") or []
    if not isinstance(drops, list) or not all(isinstance(c, str) and c for c in drops):
        problems.append(f"{where}.drop_categories: expected a list of category names, got {drops!r}")
        drops = []
    boosts: list[tuple[str, float]] = []
    for cat, factor in _mapping(raw.get("boosts"), f"{where}.boosts", problems).items():
        value_f, problem = _coerce(f"{where}.boosts.{cat}", float, factor, "config file")
        if problem or not 0 < value_f <= 1000:
            problems.append(problem or f"{where}.boosts.{cat}: must be in (0, 1000], got {factor!r}")
        else:
            boosts.append((str(cat), value_f))
    caps: list[tuple[str, int]] = []
    for cat, cap in _mapping(raw.get("caps"), f"{where}.caps", problems).items():
        value_i, problem = _coerce(f"{where}.caps.{cat}", int, cap, "config file")
        if problem or not 0 <= value_i <= 1000:
            problems.append(problem or f"{where}.caps.{cat}: must be 0..1000, got {cap!r}")
        else:
            caps.append((str(cat), value_i))
    return replace(
        out, diversity=diversity, pool=pool, drop_categories=tuple(drops), boosts=tuple(boosts), caps=tuple(caps)
    )


def _structured(
    values: Mapping[str, Any], env: Mapping[str, str], top: dict[str, Any], problems: list[str]
) -> dict[str, Any]:
    """api_keys (list, or comma-separated in UGT_SERVING_API_KEYS), rerank and domains (mappings)."""
    out: dict[str, Any] = {}
    keys = env.get(ENV_PREFIX + "API_KEYS")
    raw_keys: Any = [k.strip() for k in keys.split(",") if k.strip()] if keys is not None else values.get("api_keys")
    if raw_keys is not None:
        if not isinstance(raw_keys, list) or not all(isinstance(k, str) for k in raw_keys):
            problems.append(f"api_keys: expected a list of strings, got {raw_keys!r}")
        else:
            out["api_keys"] = tuple(raw_keys)
    default_rerank = _rerank(values.get("rerank"), "rerank", problems)
    out["rerank"] = default_rerank
    domains = []
    for name, raw in _mapping(values.get("domains"), "domains", problems).items():
        where = f"domains.{name}"
        if not DOMAIN_PATTERN.match(str(name)):
            problems.append(f"{where}: domain names must match {DOMAIN_PATTERN.pattern}")
            continue
        raw = _mapping(raw, where, problems)
        known = {"generator", "generator_version", "checkpoint", "rerank"}
        problems += [f"{where}.{key}: unknown key (known keys: {', '.join(sorted(known))})" for key in raw if key not in known]
        domains.append(
            DomainConfig(
                name=str(name),
                generator=str(raw.get("generator", top.get("generator", "popularity"))),
                generator_version=str(raw.get("generator_version", top.get("generator_version", "v1"))),
                checkpoint=str(raw.get("checkpoint", "") or ""),
                rerank=_rerank(raw["rerank"], f"{where}.rerank", problems) if "rerank" in raw else default_rerank,
            )
        )
    out["domains"] = tuple(domains)
    return out


def build_config(
    values: Mapping[str, Any], env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> ServingConfig:
    """A validated config from a mapping (the parsed YAML) plus ``UGT_SERVING_<KEY>`` env overrides."""
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    known = {f.name: _TYPES[str(f.type)] for f in fields(ServingConfig) if f.name not in _STRUCTURED}
    problems = [
        f"{key}: unknown key (known keys: {', '.join(sorted([*known, *_STRUCTURED]))})"
        for key in values
        if key not in known and key not in _STRUCTURED
    ]
    updates: dict[str, Any] = {}
    for name, kind in known.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in env:
            raw, origin = env[env_name], f"env {env_name}"
        elif name in values:
            raw, origin = values[name], "config file"
        else:
            continue
        value, problem = _coerce(name, kind, raw, origin)
        if problem:
            problems.append(problem)
        else:
            updates[name] = value
    updates.update(_structured(values, env, updates, problems))
    config = replace(ServingConfig(), **updates)
    problems += _problems(config, base_dir)
    if problems:
        raise ConfigError("invalid serving config:\n  - " + "\n  - ".join(problems))
    if config.popularity_file:
        config = replace(config, popularity_file=str(resolve_path(config.popularity_file, base_dir)))
    if config.checkpoint:
        config = replace(config, checkpoint=str(resolve_path(config.checkpoint, base_dir)))
    if config.domains:
        resolved = tuple(
            replace(d, checkpoint=str(resolve_path(d.checkpoint, base_dir))) if d.checkpoint else d
            for d in config.domains
        )
        config = replace(config, domains=resolved)
    return config


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


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> ServingConfig:
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
    return build_config(values, env=env, base_dir=path.resolve().parent)
