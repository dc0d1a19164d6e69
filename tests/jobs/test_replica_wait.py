"""The replica barrier's pure parts: one barrier key per master, and when too few acknowledgements fail a flush."""

from __future__ import annotations

import zlib

import pytest

from jobs.replica_wait import (
    BARRIER_PREFIX,
    ReplicaBarrier,
    ReplicaWaitError,
    barrier_keys,
    check_acks,
    connected_replicas,
)


def owner_by_crc(masters: list[str]):
    """A stand-in slot map: a key belongs to masters[crc32(key) % len(masters)]."""
    return lambda key: masters[zlib.crc32(key.encode()) % len(masters)]


def test_barrier_keys_give_every_master_a_key_it_serves():
    masters = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    owner = owner_by_crc(masters)
    keys = barrier_keys(masters, owner)
    assert set(keys) == set(masters)
    assert all(owner(key) == master and key.startswith(BARRIER_PREFIX) for master, key in keys.items())
    assert len(set(keys.values())) == 3


def test_barrier_keys_fail_clearly_when_a_master_serves_no_slot():
    with pytest.raises(ReplicaWaitError, match="7009"):
        barrier_keys(["127.0.0.1:7001", "127.0.0.1:7009"], lambda key: "127.0.0.1:7001", limit=50)


@pytest.mark.parametrize(("required", "attached", "acked", "fails"), [
    (1, 1, 1, False),
    (1, 1, 0, True),  # the replica is attached but did not acknowledge in time
    (1, 0, 0, False),  # no replica attached: nothing to lose the write to (the AOF keeps it)
    (2, 1, 1, False),  # waits for the replicas there are
    (2, 2, 1, True),
])
def test_check_acks(required: int, attached: int, acked: int, fails: bool):
    if fails:
        with pytest.raises(ReplicaWaitError, match=f"{acked} of {min(required, attached)} replicas"):
            check_acks("m", required, attached, acked, 100)
    else:
        check_acks("m", required, attached, acked, 100)


def test_barrier_rejects_bad_settings():
    with pytest.raises(ValueError):
        ReplicaBarrier(object(), replicas=0)


def test_the_writer_waits_after_each_batch_and_a_failed_wait_fails_the_flush():
    from job_events import make_event

    from contracts.tokenizer import tokenize_event
    from contracts.user_state_rule import fold_events
    from jobs.user_state_logic import OnlineStateWriter, Track

    calls: list[str] = []
    waits: list[int] = []
    writer = OnlineStateWriter(lambda rows: calls.append("rows"), lambda batch: calls.append("popularity"),
                               after_write=lambda: waits.append(len(calls)))
    assert writer.flush() == 0 and waits == []  # nothing written, nothing to wait for
    state = fold_events([tokenize_event(make_event(1, user="w"))])[0]["w"]
    writer.add(state, Track(pending=[(1, "movie", "item1")]))
    writer.flush()
    assert calls == ["rows", "popularity"] and waits == [2]  # after both writes of the batch

    def replicas_behind() -> None:
        raise ReplicaWaitError("0 of 1 replicas")

    writer.after_write = replicas_behind
    writer.add(state, Track(pending=[(1, "movie", "item1")]))
    with pytest.raises(ReplicaWaitError):
        writer.flush()


@pytest.mark.parametrize(("requested", "url", "resolved"), [
    (-1, "redis://localhost:6379/0", 0),
    (-1, "redis+cluster://localhost:7001,localhost:7002", 1),
    (2, "redis+cluster://localhost:7001", 2),
    (0, "redis+cluster://localhost:7001", 0),
])
def test_wait_replicas_default_follows_the_profile(requested: int, url: str, resolved: int, monkeypatch):
    from jobs.user_state_job import wait_replicas

    monkeypatch.delenv("UGT_REDIS_CLUSTER", raising=False)
    assert wait_replicas(requested, url) == resolved


def test_only_online_replicas_count():
    info = {"role": "master", "connected_slaves": 2,  # as redis-py parses INFO replication
            "slave0": {"ip": "127.0.0.1", "port": 7004, "state": "online", "offset": 10, "lag": 0},
            "slave1": {"ip": "127.0.0.1", "port": 7005, "state": "wait_bgsave", "offset": 0, "lag": 0}}
    assert connected_replicas(info) == 1
    assert connected_replicas({"role": "master", "connected_slaves": 0}) == 0
