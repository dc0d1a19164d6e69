"""Redis key layouts the jobs write and serving reads: one place, so writer and reader cannot drift apart.

Semantic IDs (written by the item_semantic_ids job, read by tokenize and the generator)::

    GET  ugt:sid:active                      the version readers use now (a backfill flips it with one SET)
    HSET ugt:sid:artifacts <version> <dir>   where each version's artifact lives
    HSET ugt:sid:index:{<version>} "l1-l2-...-dedup" <item_id>    code -> item
    HSET ugt:sid:item:{<version>}  <item_id> "l1-l2-...-dedup"    item -> code
    XADD ugt:sid:feed:{<version>} ... item_id <id> code <code> categories <json> year <y>   items coded later
    ugt:sid:dedup:<version>:{<prefix>}       the shared dedup allocator's namespace (one key per prefix)

Popularity (written by the user_state job, read by serving's fallback)::

    ZINCRBY ugt:popularity:<domain> 1 <item_id>
    SET     ugt:popularity-applied:{ugt:popularity:<domain>}:<user_id> "n origin"

Experiments (written by the feedback_join job, read by `ugt experiment report` and dashboards)::

    HSET ugt:exp:<experiment>:<arm>:<window_start_ms> <metric> <value>    one arm's metrics of one window
    ZADD ugt:exp:<experiment>:windows <window_start_ms> "<arm>:<window_start_ms>"   the windows written so far

Redis Cluster hash tags. A multi-key command or script runs on a cluster only when its keys share a hash slot, and
a key's slot is the CRC16 of its `{...}` part when it has one (else of the whole key). So the keys that one call
touches carry the same tag: a version's index, item and feed (`{<version>}`: the item_semantic_ids job writes all
three in one script), and each user's applied key carries `{ugt:popularity:<domain>}`, the WHOLE name of its
domain's popularity set, so the popularity script's keys share that set's slot while the set keeps its plain name
(serving's fallback and every popularity reader are unchanged). Stacks written before the tags (2026-12): restart
the item_semantic_ids job (it seeds its version's index again) and, for popularity, let user_state resume from a
savepoint taken after the upgrade (an older checkpoint's replay would not find the old applied keys).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

INDEX_PREFIX = "ugt:sid:index:"
ITEM_PREFIX = "ugt:sid:item:"
DEDUP_PREFIX = "ugt:sid:dedup:"
FEED_PREFIX = "ugt:sid:feed:"  # Redis stream per version: items given a code after the artifact was built
FEED_MAXLEN = 1_000_000  # approximate cap of a feed (XADD MAXLEN ~): a generator restarted later reads at most this
ACTIVE_KEY = "ugt:sid:active"  # Redis string: the artifact version readers (tokenize, generator) use now
ARTIFACTS_KEY = "ugt:sid:artifacts"  # Redis hash version -> artifact folder, so a job can follow a flip
POPULARITY_PREFIX = "ugt:popularity:"
APPLIED_PREFIX = "ugt:popularity-applied:"
EXPERIMENT_PREFIX = "ugt:exp:"


def experiment_window_key(experiment: str, arm: str, window_start_ms: int) -> str:
    """The hash of one arm's metrics in one window (experiment and arm names match DOMAIN_PATTERN: no ':')."""
    return f"{EXPERIMENT_PREFIX}{experiment}:{arm}:{int(window_start_ms)}"


def experiment_index_key(experiment: str) -> str:
    """ZSET of ``<arm>:<window_start_ms>`` members scored by window start: every window written so far."""
    return f"{EXPERIMENT_PREFIX}{experiment}:windows"

def active_version(client: Any, key: str = ACTIVE_KEY) -> str | None:
    """The semantic-ID version readers should use (``GET ugt:sid:active``), or None when none is active yet.

    Readers resolve it, then read ``ugt:sid:item:<version>`` / ``ugt:sid:index:<version>``; a backfill flips it
    with one SET once the new version's index is complete, so a reader never sees a half-written version.
    """
    value = client.get(key)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def activate_if_none(client: Any, version: str, key: str = ACTIVE_KEY) -> bool:
    """Make `version` active unless one already is (SET NX): a job starting with an artifact; True if it did."""
    return bool(client.set(key, version, nx=True))


def register_artifact(client: Any, version: str, path: str | Path) -> None:
    """Record where version's artifact lives (absolute path, same box / shared disk) for jobs that follow flips."""
    client.hset(ARTIFACTS_KEY, version, str(Path(path).resolve()))


def artifact_path_of(client: Any, version: str) -> str | None:
    """The folder registered for `version` by :func:`register_artifact`, or None."""
    value = client.hget(ARTIFACTS_KEY, version)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def activate(client: Any, version: str, key: str = ACTIVE_KEY) -> str | None:
    """Make `version` active (atomic SET, GET of the old value in the same command); returns the previous one."""
    old = client.set(key, version, get=True)
    if old is None:
        return None
    return old.decode() if isinstance(old, bytes) else str(old)


def index_key(version: str) -> str:
    """Redis hash code string -> item_id: what the generator decodes generated IDs with."""
    return f"{INDEX_PREFIX}{{{version}}}"


def item_key(version: str) -> str:
    """Redis hash item_id -> code string (the reverse of :func:`index_key`)."""
    return f"{ITEM_PREFIX}{{{version}}}"


def feed_key(version: str) -> str:
    """The stream of items given a code under `version` after its artifact was built (the live generators' feed)."""
    return f"{FEED_PREFIX}{{{version}}}"


def feed_entry(item: Mapping[str, Any], code: str) -> dict[str, str]:
    """One feed entry: what a generator needs to serve a new item (its code and the metadata the model embeds)."""
    year = item.get("year")
    return {"item_id": str(item["item_id"]), "code": code,
            "categories": json.dumps(list(item.get("genres") or [])),
            "year": "" if year is None else str(int(year))}


def dedup_namespace(version: str) -> str:
    """RedisDedupStore namespace of one artifact version (dedup indices are only meaningful per artifact)."""
    return f"{DEDUP_PREFIX}{version}"


def code_string(sid: Sequence[int]) -> str:
    """"l1-l2-l3-dedup": the text form of a full semantic ID (index field, dedup prefix keys use the same)."""
    return "-".join(str(int(c)) for c in sid)


def parse_code(code: str | bytes) -> tuple[int, ...]:
    """The inverse of :func:`code_string`."""
    text = code.decode() if isinstance(code, bytes) else code
    return tuple(int(part) for part in text.split("-"))


def popularity_key(domain: str) -> str:
    """The Redis sorted set of item popularity for one domain (what serving's fallback reads)."""
    return f"{POPULARITY_PREFIX}{domain or 'movie'}"


def applied_key(domain: str, user_id: str) -> str:
    """Where the popularity script records the last event sequence number it counted for a user."""
    return f"{APPLIED_PREFIX}{{{popularity_key(domain)}}}:{user_id}"  # the set's slot (module docstring)
