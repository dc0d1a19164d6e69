"""Popularity increments -> Redis, idempotently: the user_state job's writer for ``ugt:popularity:<domain>``.

ZINCRBY is not idempotent, and Flink replays what came after the last checkpoint. So each increment carries
the user's per-user sequence number n (Kafka keeps per-user order, so a replay gives the same n), and one Lua
call per domain and batch increments only for n above the n recorded under the user's applied key
(``ugt:popularity-applied:<domain>:<user_id>`` = "n origin"; origin = the first event id of the state's life,
so a state that expired by TTL and started over is not mistaken for a replay). See jobs/user_state_logic.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from contracts.redis_keys import applied_key, popularity_key

# KEYS[1] = the domain's popularity ZSET, KEYS[2..] = each user's applied key.
# ARGV[1] = TTL (s); then per user: origin, m, then m pairs (n, item_id).
POPULARITY_SCRIPT = """
local ttl = tonumber(ARGV[1])
local a = 2
local counts = {}
for k = 2, #KEYS do
  local origin = ARGV[a]
  local m = tonumber(ARGV[a + 1])
  a = a + 2
  local done = 0
  local stored = redis.call('GET', KEYS[k])
  if stored then
    local sep = string.find(stored, ' ', 1, true)
    if sep and string.sub(stored, sep + 1) == origin then done = tonumber(string.sub(stored, 1, sep - 1)) end
  end
  local top = done
  for j = 1, m do
    local n = tonumber(ARGV[a])
    local item = ARGV[a + 1]
    a = a + 2
    if n > done then
      counts[item] = (counts[item] or 0) + 1
      if n > top then top = n end
    end
  end
  if top > done then redis.call('SET', KEYS[k], top .. ' ' .. origin, 'EX', ttl) end
end
for item, c in pairs(counts) do redis.call('ZINCRBY', KEYS[1], c, item) end
return 0
"""


def redis_popularity_writer(
    client: Any, ttl_s: int = 90 * 24 * 3600
) -> Callable[[dict[str, dict[str, tuple[str, list[tuple[int, str]]]]]], None]:
    """Popularity increments -> one idempotent Lua call per domain (see POPULARITY_SCRIPT)."""
    script = client.register_script(POPULARITY_SCRIPT)

    def incr(batch: dict[str, dict[str, tuple[str, list[tuple[int, str]]]]]) -> None:
        for domain, users in batch.items():
            keys = [popularity_key(domain)]
            args: list[Any] = [ttl_s]
            for user_id, (origin, items) in users.items():
                keys.append(applied_key(domain, user_id))
                args += [origin, len(items)]
                for n, item in items:
                    args += [n, item]
            script(keys=keys, args=args)

    return incr
