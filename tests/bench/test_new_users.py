"""bench/new_users.py at a tiny size on a private redis-server: every key is there, and every rate is a count of
hits over the users counted (NDCG@10 never above HR@10)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from bench import new_users
from tests.private_redis import private_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow]
AFTER = (0, 1, 3)


@pytest.fixture()
def redis_port(tmp_path) -> Iterator[int]:
    with private_redis(tmp_path) as client:
        yield client.connection_pool.connection_kwargs["port"]


def test_tiny_run_writes_rates_over_the_users_counted(redis_port, tmp_path):
    out = tmp_path / "new_users.json"
    argv = ["--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--holdout", "0.02", "--epochs", "1",
            "--seeds", "0", "--max-users", "6", "--after", ",".join(map(str, AFTER)), "--work-dir", str(tmp_path / "run"),
            "--out", str(out)]
    assert new_users.main(argv) == 0
    result = json.loads(out.read_text())
    recipe = result["conditions"]["recipes"][0]
    assert result["benchmark"] == "new_users" and recipe["evaluated_users"] == 6
    assert recipe["held_out_users"] == round(0.02 * 943) and recipe["train_users"] == 943 - recipe["held_out_users"]
    for n in AFTER:
        users = result["users"][str(n)]
        assert users == 6  # every ML-100K user has at least 20 events: a target after 0, 1 and 3
        for prefix in (new_users.KEY_PREFIX[source] for source in new_users.sources_at(n)):
            hr, ndcg = result[f"{prefix}_hr@10_after_{n}"], result[f"{prefix}_ndcg@10_after_{n}"]
            assert 0.0 <= ndcg <= hr <= 1.0, (prefix, n, hr, ndcg)
            assert abs(hr * users - round(hr * users)) < 1e-3, f"{prefix} after {n}: {hr} is not hits / {users}"
    assert "new_user_hr@10_after_5" not in result  # only the --after counts asked for
    assert "new_user_hr@10_after_0" not in result and "interests_new_user_hr@10_after_1" not in result
    # the states it wrote were removed: the Redis holds nothing of the run
    assert redis.Redis(port=redis_port).dbsize() == 0
