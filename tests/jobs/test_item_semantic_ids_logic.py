"""item_semantic_ids job logic without Flink: item decoding, stable collision-free IDs, the decode index, batching."""

from __future__ import annotations

import json
import math

import fastavro
import numpy as np
import pytest

from contracts.limits import MAX_ID_CHARS
from contracts.redis_keys import (
    ACTIVE_KEY,
    ARTIFACTS_KEY,
    activate,
    activate_if_none,
    active_version,
    artifact_path_of,
    code_string,
    feed_entry,
    index_key,
    item_key,
    parse_code,
    register_artifact,
)
from jobs.common import JobSetupError
from jobs.dead_letters import DeadLetterError
from jobs.item_semantic_ids_job import check_artifact
from jobs.item_semantic_ids_logic import (
    ActiveVersionAssigner,
    DictSidIndex,
    ItemBatcher,
    ItemSidAssigner,
    artifact_version,
    decode_item_event,
    feature_row,
    item_from_record,
)
from models.semantic_ids import SemanticIdArtifact, build_semantic_ids
from models.semantic_ids.dedup import DedupAllocator, InMemoryDedupStore, seed_rows
from streams.serde import AvroSerde, encode_with_id, schema_text

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War"]
WORDS = "red blue night day love war star king queen city dark light game story ghost river".split()
CONFIG = {  # structured features only: fast and offline (as tests/semantic_ids does)
    "quantizer": "rqkmeans", "codebook_sizes": [8, 8], "dedup_size": 32,
    "encoders": [{"type": "structured", "weight": 1.0, "hash_dim": 8}],
    "compare_baseline": False, "embedding_cache": "off", "progress": False,
}


def item_events(n: int, prefix: str, seed: int = 0) -> list[dict]:
    """ItemEvent records (schemas/item_event.avsc) of movie-like items."""
    rng = np.random.default_rng(seed)
    return [{
        "item_id": f"{prefix}{i}", "domain": "movie",
        "title": " ".join(rng.choice(WORDS, 2 + i % 3).tolist()).title(), "description": "",
        "categories": sorted(rng.choice(GENRES, 1 + i % 3, replace=False).tolist()),
        "attributes": {"year": str(int(rng.integers(1930, 2001)))}, "updated_at": 1_700_000_000_000 + i,
    } for i in range(n)]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[SemanticIdArtifact, object]:
    built = build_semantic_ids([item_from_record(r) for r in item_events(120, "old-")], CONFIG, dataset="synthetic")
    path = tmp_path_factory.mktemp("sid") / "artifact"
    built.save(path)
    return SemanticIdArtifact.load(path), path


def assigner_for(artifact: SemanticIdArtifact, store=None, index=None, rows=None) -> ItemSidAssigner:
    if store is None:
        store = InMemoryDedupStore()
        store.seed(seed_rows(artifact.codes[:, :-1], artifact.item_ids, artifact.codes[:, -1]))
    return ItemSidAssigner(artifact, DedupAllocator(store, artifact.dedup_size),
                           index if index is not None else DictSidIndex(),
                           rows.extend if rows is not None else None)


def test_decode_item_event_round_trip_and_dead_letters(serde: AvroSerde):
    good = item_events(1, "d-")[0]
    item = decode_item_event(serde, serde.encode("items-test-value", "item_event", good))
    assert (item["item_id"], item["domain"], item["year"], item["genres"]) == (
        "d-0", "movie", int(good["attributes"]["year"]), good["categories"])
    cases = {"BAD_MAGIC": b"not avro", "DECODE_ERROR": serde.encode("items-test-value", "item_event", good)[:-9]}
    # a user event published to the items topic by mistake: decodes, but is not an item
    user_schema = json.loads(schema_text("user_event"))
    uid = serde.registry.register("items-test-user-value", json.dumps(user_schema))
    user_event = {"event_id": "e", "user_id": "u", "item_id": "i", "action": "VIEW", "event_time": 1,
                  "rating": None, "duration_s": None, "domain": "movie", "context": {}}
    cases["MISSING_FIELD"] = encode_with_id(uid, fastavro.parse_schema(user_schema), user_event)
    for code, data in cases.items():
        with pytest.raises(DeadLetterError) as info:
            decode_item_event(serde, data)
        assert info.value.reason_code == code, info.value.reason
    for bad, code in [({**good, "title": None}, "MISSING_FIELD"), ({**good, "item_id": "  "}, "BAD_VALUE"),
                      ({**good, "domain": 3}, "WRONG_TYPE")]:
        with pytest.raises(DeadLetterError) as info:
            item_from_record(bad)
        assert info.value.reason_code == code


def test_overlong_item_ids_are_bad_values(serde: AvroSerde):
    good = item_events(1, "d-")[0]
    at_bound = decode_item_event(serde, serde.encode("items-test-value", "item_event",
                                                     {**good, "item_id": "i" * MAX_ID_CHARS}))
    assert at_bound["item_id"] == "i" * MAX_ID_CHARS
    data = serde.encode("items-test-value", "item_event", {**good, "item_id": "i" * (MAX_ID_CHARS + 1)})
    with pytest.raises(DeadLetterError) as info:
        decode_item_event(serde, data)
    assert info.value.reason_code == "BAD_VALUE"
    assert info.value.reason.startswith(
        f"item_id is {MAX_ID_CHARS + 1} characters long, over the {MAX_ID_CHARS} that /recommend accepts")


@pytest.mark.parametrize("year", ["inf", "-inf", "Infinity", "nan", "1e30", "-1e30"])
def test_a_year_that_is_no_int64_is_no_year(serde: AvroSerde, year):
    """Not a PROCESSING_ERROR ("cannot convert float infinity to integer"), nor a Feast write that fails the batch."""
    good = item_events(1, "d-")[0]
    data = serde.encode("items-test-value", "item_event", {**good, "attributes": {"year": year}})
    item = decode_item_event(serde, data)
    assert item["year"] is None and item["attributes"] == {"year": year}
    assert feature_row(item, (1, 2, 0))["year"] is None and feed_entry(item, "1-2-0")["year"] == ""


def test_canonical_item_year_from_a_frame_row():
    from models.semantic_ids.items import canonical_item

    for year in (math.inf, -math.inf, math.nan, 1e30):
        assert canonical_item({"item_id": "x", "year": year})["year"] is None
        assert canonical_item({"item_id": "x", "year": year, "attributes": {"year": "1995"}})["year"] == 1995
    assert canonical_item({"item_id": "x", "year": 1995.0})["year"] == 1995


def test_new_items_get_unique_decodable_ids_and_feast_rows(artifact):
    art, _ = artifact
    index, rows = DictSidIndex(), []
    assigner = assigner_for(art, index=index, rows=rows)
    assert assigner.seed_index() == len(art.item_ids)
    new = [item_from_record(r) for r in item_events(60, "new-", seed=3)]
    out = assigner.assign(new)
    assert [a.item_id for a in out] == [it["item_id"] for it in new] and all(a.new for a in out)
    assert all(len(a.sid) == art.num_levels for a in out)
    every = {tuple(r) for r in art.codes.tolist()} | {a.sid for a in out}
    assert len(every) == len(art.item_ids) + len(new)  # unique against the table and each other
    for a in out:  # the generator's view: code string -> item, and back
        assert index.code_to_item[code_string(a.sid)] == a.item_id
        assert parse_code(index.item_to_code[a.item_id]) == a.sid
    assert rows == [feature_row(it, a.sid) for it, a in zip(new, out, strict=True)]
    assert rows[0]["semantic_ids"] == list(out[0].sid) and rows[0]["domain"] == "movie"
    # the live generators' feed: every new item once, in order, with what the model embeds (not the seeded table)
    assert index.feed == [feed_entry(it, code_string(a.sid)) for it, a in zip(new, out, strict=True)]
    assert json.loads(index.feed[0]["categories"]) == new[0]["genres"] and index.feed[0]["year"] == str(new[0]["year"])
    again = assigner.assign(new[:5] + [item_from_record(r) for r in item_events(3, "old-")])  # replay + table items
    assert not any(a.new for a in again) and len(index.feed) == len(new)


def test_ids_are_stable_for_replays_updates_and_known_items(artifact):
    art, _ = artifact
    assigner = assigner_for(art)
    new = [item_from_record(r) for r in item_events(20, "st-", seed=4)]
    first = {a.item_id: a.sid for a in assigner.assign(new)}
    replay = assigner.assign(list(reversed(new)))  # Flink restarting from a checkpoint
    assert {a.item_id: a.sid for a in replay} == first and not any(a.new for a in replay)
    renamed = [{**new[0], "title": "A Completely Different Title", "genres": ["War"]}]
    assert assigner.assign(renamed)[0].sid == first[new[0]["item_id"]]  # an update keeps the ID
    known = [item_from_record(r) for r in item_events(5, "old-")]  # items of the artifact's own table
    got = assigner.assign(known)
    assert [a.sid for a in got] == [tuple(art.codes[art.row_of(it["item_id"])].tolist()) for it in known]
    dup = assigner.assign([new[1], {**new[1], "title": "Later"}])  # one item twice in a batch: one ID, last row
    assert len(dup) == 1


def test_parallel_assigners_sharing_a_store_never_collide(artifact):
    art, _ = artifact
    store, index = InMemoryDedupStore(), DictSidIndex()
    store.seed(seed_rows(art.codes[:, :-1], art.item_ids, art.codes[:, -1]))
    a, b = assigner_for(art, store, index), assigner_for(art, store, index)
    # near-duplicate items (same title, year, genres): same prefix, so only the dedup index tells them apart
    base = item_events(1, "x-", seed=9)[0]
    items = [item_from_record({**base, "item_id": f"twin-{i}"}) for i in range(12)]
    got = a.assign(items[::2]) + b.assign(items[1::2])
    assert len({g.sid[:-1] for g in got}) == 1 and len({g.sid for g in got}) == 12
    assert sorted(g.sid[-1] for g in got) == sorted(set(g.sid[-1] for g in got))


def test_batcher_flushes_by_size_and_time_and_dead_letters_overflow(artifact):
    art, _ = artifact
    now = [0.0]
    batcher = ItemBatcher(assigner_for(art), max_items=3, max_delay_s=0.5, clock=lambda: now[0])
    items = [item_from_record(r) for r in item_events(4, "b-", seed=5)]
    origin = (b"raw", "items.catalog", 0, 7)
    assert not batcher.due()
    batcher.add(items[0], origin)
    assert not batcher.due()
    now[0] = 0.6
    assert batcher.due()
    assigned, dead = batcher.flush()
    assert len(assigned) == 1 and dead == [] and not batcher.due()
    for it in items[1:]:
        batcher.add(it, origin)
    assert batcher.due() and len(batcher.flush()[0]) == 3
    # a dedup level of capacity 1: the second twin of a prefix has no index left
    tiny = ItemSidAssigner(art, DedupAllocator(InMemoryDedupStore(), 1), DictSidIndex())
    base = item_events(1, "o-", seed=11)[0]
    twins = [item_from_record({**base, "item_id": f"ov-{i}"}) for i in range(2)]
    overflow = ItemBatcher(tiny, max_items=10, wall=lambda: 1.0)
    overflow.add(twins[0], (b"a", "items.catalog", 0, 1))
    overflow.add(twins[1], (b"b", "items.catalog", 0, 2))
    assigned, dead = overflow.flush()
    assert [a.item_id for a in assigned] == ["ov-0"]
    assert len(dead) == 1 and dead[0][0] == b"items.catalog:0:2"
    assert dead[0][1]["reason_code"] == "DEDUP_OVERFLOW" and dead[0][1]["original"] == b"b"
    assert dead[0][1]["job"] == "item_semantic_ids" and dead[0][1]["failed_at"] == 1000


def test_artifact_version_keys_and_check_artifact(artifact, tmp_path):
    art, path = artifact
    version = artifact_version(path)
    assert len(version) == 16 and version == artifact_version(path / "manifest.json")
    assert index_key(version) == f"ugt:sid:index:{{{version}}}" and item_key(version) == f"ugt:sid:item:{{{version}}}"
    assert check_artifact(str(path)) == str(path)
    with pytest.raises(JobSetupError, match="no such file"):
        check_artifact(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_bytes((path / "manifest.json").read_bytes())
    data = bytearray((path / "arrays.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "arrays.npz").write_bytes(bytes(data))
    with pytest.raises(JobSetupError, match="corrupt"):
        check_artifact(str(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobSetupError, match="not a semantic-ID artifact"):
        check_artifact(str(tmp_path / "empty"))


class FakeRedis:
    """The few string/hash commands the active-pointer helpers use (unit tests of pure logic only)."""

    def __init__(self) -> None:
        self.strings: dict[str, bytes] = {}
        self.hashes: dict[str, dict[str, bytes]] = {}

    def get(self, key):
        return self.strings.get(key)

    def set(self, key, value, nx=False, get=False):
        old = self.strings.get(key)
        if nx and old is not None:
            return None
        self.strings[key] = str(value).encode()
        return old if get else True

    def hset(self, key, field, value):
        self.hashes.setdefault(key, {})[field] = str(value).encode()

    def hget(self, key, field):
        return self.hashes.get(key, {}).get(field)


def test_active_pointer_helpers():
    r = FakeRedis()
    assert active_version(r) is None
    assert activate_if_none(r, "v1") and active_version(r) == "v1"
    assert not activate_if_none(r, "v2") and active_version(r) == "v1"  # a second job start does not move it
    assert activate(r, "v2") == "v1" and active_version(r) == "v2"  # the backfill's flip returns the old one
    assert active_version(r, "test:active") is None and ACTIVE_KEY == "ugt:sid:active"
    register_artifact(r, "v2", "some/folder")
    assert artifact_path_of(r, "v2").endswith("some/folder") and artifact_path_of(r, "v3") is None
    assert r.hashes[ARTIFACTS_KEY]


def test_active_version_assigner_follows_the_flip_and_survives_a_bad_version(artifact):
    art, _ = artifact
    pointer = ["v1"]
    first, second = assigner_for(art), assigner_for(art)
    made: list[str] = []

    def make(version: str) -> ItemSidAssigner:
        made.append(version)
        if version == "broken":
            raise ValueError("no artifact registered")
        return second

    follower = ActiveVersionAssigner("v1", first, lambda: pointer[0], make)
    items = [item_from_record(r) for r in item_events(6, "f-", seed=12)]
    follower.assign(items[:2])
    assert first.ids_given == 2 and follower.version == "v1" and made == []
    pointer[0] = "v2"  # a backfill flipped: the next batch goes to v2, the batch before stayed on v1
    follower.assign(items[2:4])
    assert (follower.version, follower.switches, second.ids_given, first.ids_given) == ("v2", 1, 2, 2)
    pointer[0] = "broken"  # unloadable: stay on v2, try once only, keep assigning
    follower.assign(items[4:5])
    follower.assign(items[5:])
    assert follower.version == "v2" and made == ["v2", "broken"] and second.ids_given == 4
    pointer[0] = None  # pointer deleted: keep the version we have
    assert len(follower.assign(items[:1])) == 1 and follower.version == "v2"
