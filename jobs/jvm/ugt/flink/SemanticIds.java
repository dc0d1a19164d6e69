package ugt.flink;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

/**
 * {@code jobs.sid_cache.SemanticIdCache} in the JVM: item_id -> semantic-ID levels of the active (or pinned)
 * version, the whole map loaded with HSCAN when the version is (re)loaded, HMGET for items not seen, misses
 * remembered {@code negativeTtlMs}, the active pointer re-read at most every {@code checkEveryMs}.
 */
final class SemanticIds {
    static final String ACTIVE_KEY = "ugt:sid:active";
    static final String ITEM_PREFIX = "ugt:sid:item:";
    static final int MAX_REMEMBERED_MISSES = 100_000;

    private final RedisLite redis;
    private final String pinned;
    private final long negativeTtlMs;
    private final long checkEveryMs;
    String version;
    long roundTrips;
    private Map<String, int[]> known = new HashMap<>();
    private Map<String, Long> missing = new HashMap<>();
    private long nextCheck;

    SemanticIds(RedisLite redis, String pinned, long negativeTtlMs, long checkEveryMs) throws IOException {
        this.redis = redis;
        this.pinned = pinned == null || pinned.isEmpty() ? null : pinned;
        this.negativeTtlMs = negativeTtlMs;
        this.checkEveryMs = checkEveryMs;
        refresh(true, now());
    }

    static long now() {
        return System.nanoTime() / 1_000_000L;
    }

    /** contracts.redis_keys.item_key: the version as a hash tag (one cluster slot per version). */
    static String itemKey(String version) {
        return ITEM_PREFIX + "{" + version + "}";
    }

    private void refresh(boolean force, long nowMs) throws IOException {
        if (!force && (pinned != null || nowMs < nextCheck)) {
            return;
        }
        nextCheck = nowMs + checkEveryMs;
        String active = pinned;
        if (active == null) {
            roundTrips++;
            byte[] value = (byte[]) redis.call("GET", ACTIVE_KEY);
            active = value == null ? null : new String(value, StandardCharsets.UTF_8);
        }
        if (java.util.Objects.equals(active, version) && !force) {
            return;
        }
        version = active;
        known = new HashMap<>();
        missing = new HashMap<>();
        if (version != null) {
            loadAll(itemKey(version));
        }
    }

    private void loadAll(String key) throws IOException {
        String cursor = "0";
        do {
            roundTrips++;
            List<?> reply = (List<?>) redis.call("HSCAN", key, cursor, "COUNT", "10000");
            cursor = new String((byte[]) reply.get(0), StandardCharsets.UTF_8);
            List<?> pairs = (List<?>) reply.get(1);
            for (int i = 0; i + 1 < pairs.size(); i += 2) {
                known.put(new String((byte[]) pairs.get(i), StandardCharsets.UTF_8), parse((byte[]) pairs.get(i + 1)));
            }
        } while (!cursor.equals("0"));
    }

    /** contracts.redis_keys.parse_code: "l1-l2-...-dedup" -> the levels. */
    static int[] parse(byte[] code) {
        String[] parts = new String(code, StandardCharsets.UTF_8).split("-", -1);
        int[] levels = new int[parts.length];
        for (int i = 0; i < parts.length; i++) {
            levels[i] = Integer.parseInt(parts[i].strip());
        }
        return levels;
    }

    void close() {
        redis.close();
    }

    /** The item's levels, or null when the store has none (or no version is active). */
    int[] get(String item) throws IOException {
        long nowMs = now();
        refresh(false, nowMs);
        int[] levels = known.get(item);
        if (levels != null || version == null) {
            return levels;
        }
        Long retryAt = missing.get(item);
        if (retryAt != null && retryAt > nowMs) {
            return null;
        }
        roundTrips++;
        List<?> codes = (List<?>) redis.call("HMGET", itemKey(version), item);
        byte[] code = (byte[]) codes.get(0);
        if (code == null) {
            if (missing.size() > MAX_REMEMBERED_MISSES) {
                missing.values().removeIf(t -> t <= nowMs);
                if (missing.size() > MAX_REMEMBERED_MISSES) {
                    missing.clear();
                }
            }
            missing.put(item, nowMs + negativeTtlMs);
            return null;
        }
        levels = parse(code);
        known.put(item, levels);
        missing.remove(item);
        return levels;
    }
}
