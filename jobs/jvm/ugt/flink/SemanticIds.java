package ugt.flink;

import java.io.IOException;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.function.Supplier;
import redis.clients.jedis.DefaultJedisClientConfig;
import redis.clients.jedis.HostAndPort;
import redis.clients.jedis.JedisClientConfig;
import redis.clients.jedis.JedisCluster;
import redis.clients.jedis.JedisPooled;
import redis.clients.jedis.UnifiedJedis;
import redis.clients.jedis.exceptions.JedisException;
import redis.clients.jedis.params.ScanParams;
import redis.clients.jedis.resps.ScanResult;

/**
 * {@code jobs.sid_cache.SemanticIdCache} in the JVM: item_id -> semantic-ID levels of the active (or pinned)
 * version, the whole map loaded with HSCAN when the version is (re)loaded, HMGET for items not seen, misses
 * remembered {@code negativeTtlMs}, the active pointer re-read at most every {@code checkEveryMs}. Redis is read
 * through Jedis ({@link #connect}); its errors come out as IOException, so an outage fails the task instead of
 * dead-lettering the records it hit.
 */
final class SemanticIds {
    static final String ACTIVE_KEY = "ugt:sid:active";
    static final String ITEM_PREFIX = "ugt:sid:item:";
    static final int MAX_REMEMBERED_MISSES = 100_000;

    private final UnifiedJedis redis;
    private final String pinned;
    private final long negativeTtlMs;
    private final long checkEveryMs;
    String version;
    long roundTrips;
    private Map<String, int[]> known = new HashMap<>();
    private Map<String, Long> missing = new HashMap<>();
    private long nextCheck;

    SemanticIds(UnifiedJedis redis, String pinned, long negativeTtlMs, long checkEveryMs) throws IOException {
        this.redis = redis;
        this.pinned = pinned == null || pinned.isEmpty() ? null : pinned;
        this.negativeTtlMs = negativeTtlMs;
        this.checkEveryMs = checkEveryMs;
        refresh(true, now());
    }

    /**
     * A Jedis client for {@code redis://[[user]:password@]host:port[/db]} (one node, a pool) or
     * {@code redis+cluster://[[user]:password@]host:port,host:port} (a Redis Cluster, MOVED/ASK followed by Jedis).
     */
    static UnifiedJedis connect(String url) {
        int schemeEnd = url.indexOf("://");
        String scheme = schemeEnd > 0 ? url.substring(0, schemeEnd) : "";
        if (!scheme.equals("redis") && !scheme.equals("redis+cluster")) {
            throw new IllegalArgumentException("the sql engine reads Redis over redis:// or redis+cluster:// only, got "
                    + url);
        }
        String rest = url.substring(schemeEnd + 3);
        int slash = rest.indexOf('/');
        String path = slash >= 0 ? rest.substring(slash + 1).split("\\?")[0] : "";
        rest = slash >= 0 ? rest.substring(0, slash) : rest;
        int at = rest.lastIndexOf('@');
        String auth = at >= 0 ? rest.substring(0, at) : "";
        int colon = auth.indexOf(':');
        String user = colon > 0 ? decode(auth.substring(0, colon)) : null;
        String secret = decode(colon >= 0 ? auth.substring(colon + 1) : auth);
        DefaultJedisClientConfig.Builder config = DefaultJedisClientConfig.builder()
                .connectionTimeoutMillis(5000).socketTimeoutMillis(10_000)
                .user(user).password(secret.isEmpty() ? null : secret);
        Set<HostAndPort> nodes = new LinkedHashSet<>();
        for (String node : (at >= 0 ? rest.substring(at + 1) : rest).split(",")) {
            URI address = URI.create("redis://" + node.trim());
            nodes.add(new HostAndPort(address.getHost(), address.getPort() > 0 ? address.getPort() : 6379));
        }
        if (scheme.equals("redis+cluster")) {
            return new JedisCluster(nodes, config.build());
        }
        JedisClientConfig single = config.database(path.isEmpty() ? 0 : Integer.parseInt(path)).build();
        return new JedisPooled(nodes.iterator().next(), single);
    }

    private static String decode(String text) {
        return URLDecoder.decode(text, StandardCharsets.UTF_8);
    }

    /** One Redis command; Jedis's unchecked errors (connection lost, cluster down) as IOException. */
    private <T> T call(String what, Supplier<T> command) throws IOException {
        roundTrips++;
        try {
            return command.get();
        } catch (JedisException exc) {
            throw new IOException("semantic IDs: Redis " + what + " failed: " + exc.getMessage(), exc);
        }
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
            active = call("GET", () -> redis.get(ACTIVE_KEY));
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
        ScanParams count = new ScanParams().count(10_000);
        String cursor = ScanParams.SCAN_POINTER_START;
        do {
            String at = cursor;
            ScanResult<Map.Entry<String, String>> page = call("HSCAN", () -> redis.hscan(key, at, count));
            for (Map.Entry<String, String> pair : page.getResult()) {
                known.put(pair.getKey(), parse(pair.getValue()));
            }
            cursor = page.getCursor();
        } while (!cursor.equals(ScanParams.SCAN_POINTER_START));
    }

    /** contracts.redis_keys.parse_code: "l1-l2-...-dedup" -> the levels. */
    static int[] parse(String code) {
        String[] parts = code.split("-", -1);
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
        List<String> codes = call("HMGET", () -> redis.hmget(itemKey(version), item));
        String code = codes.get(0);
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
