package ugt.flink;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericDatumReader;
import org.apache.avro.generic.GenericDatumWriter;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.io.BinaryDecoder;
import org.apache.avro.io.BinaryEncoder;
import org.apache.avro.io.DecoderFactory;
import org.apache.avro.io.EncoderFactory;
import org.bouncycastle.crypto.digests.Blake2bDigest;

/**
 * The tokenize job's per-record logic in the JVM, without Flink: raw Kafka bytes -> TokenizedEvent bytes, or a
 * dead letter. A line-by-line port of {@code jobs.tokenize_logic.EventTokenizer} (without semantic IDs) and of
 * {@code contracts.tokenizer.tokenize_event}, with the same reason codes, checks in the same order and the same
 * output bytes; {@code tests/jobs/test_tokenize_jvm.py} compares the two record by record.
 */
final class RecordTokenizer {
    /** Writer schemas by Confluent id: null when the registry does not know the id, IOException on an outage. */
    interface Schemas {
        Schema byId(int id) throws IOException;
    }

    /** One record's result: {@code dead} is null for a token (then {@code token} holds its fields). */
    static final class Result {
        final byte[] key;
        final byte[] value;
        final String dead;
        final GenericRecord token;

        Result(byte[] key, byte[] value, String dead, GenericRecord token) {
            this.key = key;
            this.value = value;
            this.dead = dead;
            this.token = token;
        }
    }

    static final class DeadLetter extends Exception {
        final String code;

        DeadLetter(String code, String reason) {
            super(reason, null, false, false);
            this.code = code;
        }
    }

    /** No string, bytes or collection of a record can be longer than the record (at most 1 MiB, --max-record-bytes):
     * Avro Java allocates a claimed length before reading it, so a 10-byte record claiming a 2 GB string would
     * exhaust the TaskManager's heap (an Error, not a dead letter). Its limits (JVM-wide system properties, left
     * alone when set) make such a claim a SystemLimitException, i.e. DECODE_ERROR as fastavro says. */
    static final long AVRO_LENGTH_LIMIT = 1 << 20;

    static {
        for (String property : new String[] {"org.apache.avro.limits.string.maxLength",
                "org.apache.avro.limits.bytes.maxLength", "org.apache.avro.limits.collectionItems.maxLength"}) {
            if (System.getProperty(property) == null) {
                System.setProperty(property, Long.toString(AVRO_LENGTH_LIMIT));
            }
        }
        try { // the limits are read once, when Avro first uses them: read them again in case that was earlier
            java.lang.reflect.Method reset = org.apache.avro.SystemLimitException.class.getDeclaredMethod("resetLimits");
            reset.setAccessible(true);
            reset.invoke(null);
        } catch (ReflectiveOperationException | RuntimeException exc) {
            // an Avro without resetLimits reads the properties at its first use, which comes after this
        }
    }

    static final String[] ACTIONS = {"VIEW", "CLICK", "RATE", "LIKE", "PURCHASE", "SKIP", "SHARE", "UNKNOWN"};
    static final String[] REQUIRED = {"event_id", "user_id", "item_id", "action", "event_time"};
    static final int MAX_REASON_CHARS = 1000;
    static final long UNKNOWN_SCHEMA_RETRY_MS = 5000;
    static final int TOKENIZER_VERSION = 2;
    static final String ITEM_LENGTH_KEY = "item_length_s";
    static final double MAX_FLOAT32 = Float.MAX_VALUE; // the largest Avro float (contracts.tokenizer._MAX_FLOAT32)
    /** A finite decimal number as Python's float() parses it (digits may be Unicode; '_' only between digits). */
    private static final java.util.regex.Pattern PYTHON_FLOAT = java.util.regex.Pattern.compile(
            "(?U)[+-]?(?:\\d(?:_?\\d)*(?:\\.(?:\\d(?:_?\\d)*)?)?|\\.\\d(?:_?\\d)*)(?:[eE][+-]?\\d(?:_?\\d)*)?");
    private static final ThreadLocal<Blake2bDigest> BLAKE2B_64 = ThreadLocal.withInitial(() -> new Blake2bDigest(64));

    private final Schemas schemas;
    private final Rules rules;
    final SemanticIds sids; // null: no semantic-ID lookup (--no-semantic-ids)
    private final boolean unknownItemsDlq;
    private final String job;
    private final Schema tokenSchema;
    private final Schema dlqSchema;
    private final byte[] tokenHeader;
    private final byte[] dlqHeader;
    private final GenericDatumWriter<GenericRecord> tokenWriter;
    private final GenericDatumWriter<GenericRecord> dlqWriter;
    private final Map<Integer, GenericDatumReader<Object>> readers = new HashMap<>();
    private final Map<Integer, Long> unknownUntil = new HashMap<>();
    private final ByteArrayOutputStream buffer = new ByteArrayOutputStream(256);
    private BinaryDecoder decoder;
    private BinaryEncoder encoder;

    /** What the job accepts (its command-line options), as {@code jobs.tokenize_logic.Rules}. */
    static final class Rules {
        final int maxRecordBytes;
        final long maxFutureSkewMs;
        final long minEventTimeMs;
        final int maxIdChars;

        Rules(int maxRecordBytes, long maxFutureSkewMs, long minEventTimeMs, int maxIdChars) {
            this.maxRecordBytes = maxRecordBytes;
            this.maxFutureSkewMs = maxFutureSkewMs;
            this.minEventTimeMs = minEventTimeMs;
            this.maxIdChars = maxIdChars;
        }
    }

    RecordTokenizer(Schemas schemas, Rules rules, String job, Schema tokenSchema, int tokenSchemaId,
                    Schema dlqSchema, int dlqSchemaId, SemanticIds sids, boolean unknownItemsDlq) {
        if (unknownItemsDlq && (sids == null || sids.version == null)) {
            throw new IllegalArgumentException("unknown_items=dlq needs a semantic-ID store: no version is active "
                    + "(ugt:sid:active) and none was given (--sid-version); run the item_semantic_ids job first");
        }
        this.schemas = schemas;
        this.rules = rules;
        this.sids = sids;
        this.unknownItemsDlq = unknownItemsDlq;
        this.job = job;
        this.tokenSchema = tokenSchema;
        this.dlqSchema = dlqSchema;
        this.tokenHeader = header(tokenSchemaId);
        this.dlqHeader = header(dlqSchemaId);
        this.tokenWriter = new GenericDatumWriter<>(tokenSchema);
        this.dlqWriter = new GenericDatumWriter<>(dlqSchema);
    }

    /** key=value;... -> the options (values never hold ';'). */
    static Map<String, String> parseOptions(String config) {
        Map<String, String> options = new HashMap<>();
        for (String pair : config.split(";")) {
            int eq = pair.indexOf('=');
            if (eq > 0) {
                options.put(pair.substring(0, eq), pair.substring(eq + 1));
            }
        }
        return options;
    }

    static RecordTokenizer fromOptions(Map<String, String> o, Schemas schemas) throws IOException {
        Rules rules = new Rules(
                Integer.parseInt(o.get("max_record_bytes")), Long.parseLong(o.get("max_future_skew_ms")),
                Long.parseLong(o.get("min_event_time_ms")), Integer.parseInt(o.get("max_id_chars")));
        int tokensId = Integer.parseInt(o.get("tokens_schema_id"));
        int dlqId = Integer.parseInt(o.get("dlq_schema_id"));
        String redis = o.getOrDefault("redis", "");
        SemanticIds sids = redis.isEmpty() ? null
                : new SemanticIds(SemanticIds.connect(redis), o.getOrDefault("sid_version", ""), 5000, 1000);
        return new RecordTokenizer(schemas, rules, o.get("job"), schemas.byId(tokensId), tokensId,
                schemas.byId(dlqId), dlqId, sids, "dlq".equals(o.get("unknown_items")));
    }

    private static byte[] header(int schemaId) {
        return ByteBuffer.allocate(5).put((byte) 0).putInt(schemaId).array();
    }

    Result process(byte[] data, String topic, int partition, long offset, long nowMs) throws IOException {
        GenericRecord token;
        try {
            token = tokenize(data, nowMs);
        } catch (DeadLetter dead) {
            return deadLetter(data, topic, partition, offset, dead.code, dead.getMessage(), nowMs);
        } catch (RuntimeException exc) { // the record made decoding or tokenizing fail in a way nobody named
            String reason = exc.getClass().getSimpleName() + ": " + exc.getMessage();
            return deadLetter(data, topic, partition, offset, "PROCESSING_ERROR", reason, nowMs);
        }
        byte[] key = ((String) token.get("user_id")).getBytes(StandardCharsets.UTF_8);
        return new Result(key, encode(tokenHeader, tokenWriter, token), null, token);
    }

    private Result deadLetter(byte[] data, String topic, int partition, long offset, String code, String reason,
                              long nowMs) throws IOException {
        GenericRecord letter = new GenericData.Record(dlqSchema);
        letter.put("original", ByteBuffer.wrap(data == null ? new byte[0] : data));
        letter.put("topic", topic);
        letter.put("partition", partition);
        letter.put("offset", offset);
        letter.put("reason_code", code);
        letter.put("reason", truncate(reason == null ? "" : reason));
        letter.put("job", job);
        letter.put("failed_at", nowMs);
        byte[] key = (topic + ":" + partition + ":" + offset).getBytes(StandardCharsets.UTF_8);
        return new Result(key, encode(dlqHeader, dlqWriter, letter), code, null);
    }

    private static String truncate(String reason) {
        if (reason.codePointCount(0, reason.length()) <= MAX_REASON_CHARS) {
            return reason;
        }
        return reason.substring(0, reason.offsetByCodePoints(0, MAX_REASON_CHARS));
    }

    private byte[] encode(byte[] header, GenericDatumWriter<GenericRecord> writer, GenericRecord record)
            throws IOException {
        buffer.reset();
        buffer.write(header);
        encoder = EncoderFactory.get().directBinaryEncoder(buffer, encoder);
        writer.write(record, encoder);
        encoder.flush();
        return buffer.toByteArray();
    }

    /** Wire-format bytes -> the record as its writer wrote it (the serde reason codes). */
    Object decode(byte[] data, long nowMs) throws DeadLetter, IOException {
        if (data == null) {
            throw new DeadLetter("BAD_MAGIC", "record has no value (null)");
        }
        int size = data.length;
        if (size > rules.maxRecordBytes) {
            throw new DeadLetter("OVERSIZED", "record is " + size + " bytes, limit " + rules.maxRecordBytes);
        }
        if (size < 5) {
            throw new DeadLetter("BAD_MAGIC", "record is " + size + " bytes, shorter than the 5-byte header");
        }
        if (data[0] != 0) {
            throw new DeadLetter("BAD_MAGIC", "magic byte is " + (data[0] & 0xff)
                    + ", expected 0 (Confluent wire format)");
        }
        int schemaId = ByteBuffer.wrap(data, 1, 4).getInt();
        GenericDatumReader<Object> reader = reader(schemaId, nowMs);
        decoder = DecoderFactory.get().binaryDecoder(data, 5, size - 5, decoder);
        Object record;
        try {
            record = reader.read(null, decoder);
        } catch (IOException | RuntimeException exc) { // EOFException, AvroRuntimeException, negative lengths...
            throw new DeadLetter("DECODE_ERROR", "Avro body does not match the schema: "
                    + exc.getClass().getSimpleName() + ": " + exc.getMessage());
        }
        if (!decoder.isEnd()) {
            throw new DeadLetter("DECODE_ERROR", "trailing bytes after the Avro record");
        }
        return record;
    }

    private GenericDatumReader<Object> reader(int schemaId, long nowMs) throws DeadLetter, IOException {
        GenericDatumReader<Object> reader = readers.get(schemaId);
        if (reader != null) {
            return reader;
        }
        Long retryAt = unknownUntil.get(schemaId);
        if (retryAt != null && nowMs < retryAt) {
            throw new DeadLetter("UNKNOWN_SCHEMA", "schema id " + schemaId + " is not in the registry");
        }
        Schema schema = schemas.byId(schemaId); // IOException (registry outage) fails the task
        if (schema == null) {
            if (unknownUntil.size() > 10_000) {
                unknownUntil.clear();
            }
            unknownUntil.put(schemaId, nowMs + UNKNOWN_SCHEMA_RETRY_MS);
            throw new DeadLetter("UNKNOWN_SCHEMA", "schema id " + schemaId + " is not in the registry");
        }
        reader = new GenericDatumReader<>(schema);
        readers.put(schemaId, reader);
        return reader;
    }

    /** Bytes -> the TokenizedEvent record (no semantic IDs), or DeadLetter. */
    GenericRecord tokenize(byte[] data, long nowMs) throws DeadLetter, IOException {
        Object decoded = decode(data, nowMs);
        int[] levels = null;
        if (sids != null) { // looked up before validation, as EventTokenizer.tokenize does
            if (!(decoded instanceof GenericRecord)) { // Python's record.get() on what is no dict
                throw new DeadLetter("PROCESSING_ERROR", "AttributeError: '" + Fields.pythonType(decoded, null)
                        + "' object has no attribute 'get'");
            }
            GenericRecord record = (GenericRecord) decoded;
            Object item = Fields.get(record, "item_id");
            if (item != null && Fields.pythonType(item, Fields.branch(record, "item_id", item)).equals("str")) {
                levels = sids.get(item.toString());
            }
        }
        if (!(decoded instanceof GenericRecord)) {
            throw new DeadLetter("WRONG_TYPE", "event must be a record, got " + Fields.pythonType(decoded, null));
        }
        GenericRecord event = (GenericRecord) decoded;
        Fields.validate(event, rules.maxIdChars);
        long eventTime = Fields.epochMs(event);
        GenericRecord token = new GenericData.Record(tokenSchema);
        token.put("event_id", event.get("event_id").toString());
        token.put("user_id", event.get("user_id").toString());
        token.put("item_id", event.get("item_id").toString());
        token.put("event_time", eventTime);
        Object domain = Fields.get(event, "domain");
        token.put("domain", Fields.truthy(domain) ? domain.toString() : "movie");
        token.put("action_token", actionToken(event.get("action").toString()));
        token.put("rating_token", ratingToken(Fields.number(Fields.get(event, "rating"))));
        token.put("duration_token", durationToken(Fields.number(Fields.get(event, "duration_s"))));
        token.put("hour_token", (int) Math.floorMod(Math.floorDiv(eventTime, 3_600_000L), 24L));
        token.put("context_tokens", contextTokens(Fields.get(event, "context")));
        List<Integer> semanticIds = new ArrayList<>(levels == null ? 0 : levels.length);
        if (levels != null) {
            for (int level : levels) {
                semanticIds.add(level);
            }
        }
        token.put("semantic_ids", semanticIds);
        token.put("tokenizer_version", TOKENIZER_VERSION);
        token.put("weekday_token", (int) (Math.floorMod(Math.floorDiv(eventTime, 86_400_000L) + 3, 7L) + 1));
        token.put("sid_version", levels == null || sids.version == null ? "" : sids.version);
        Double duration = Fields.number(Fields.get(event, "duration_s")); // contracts.tokenizer.raw_seconds
        token.put("duration_s", duration == null || duration < 0 ? null : (float) Math.min(duration, MAX_FLOAT32));
        token.put("item_length_s", itemLength(Fields.get(event, "context")));
        if (eventTime > nowMs + rules.maxFutureSkewMs) {
            throw new DeadLetter("FAR_FUTURE", "event_time " + eventTime + " is more than " + rules.maxFutureSkewMs
                    + " ms after now (" + nowMs + ")");
        }
        if (eventTime < rules.minEventTimeMs) {
            throw new DeadLetter("TOO_OLD", "event_time " + eventTime + " is before the floor "
                    + rules.minEventTimeMs + " (--min-event-time)");
        }
        if (sids != null && levels == null && unknownItemsDlq) {
            throw new DeadLetter("UNKNOWN_ITEM", "item '" + token.get("item_id") + "' has no semantic ID in "
                    + SemanticIds.itemKey(sids.version));
        }
        return token;
    }

    static int actionToken(String action) {
        for (int i = 0; i < ACTIONS.length; i++) {
            if (ACTIONS[i].equals(action)) {
                return i;
            }
        }
        return ACTIONS.length - 1;
    }

    static int ratingToken(Double rating) {
        if (rating == null) {
            return 0;
        }
        return (int) Math.ceil(Math.max(1.0, Math.min(10.0, rating * 2)));
    }

    /** min(23, 1 + int(log2(1 + d))): the binary exponent of 1 + d is exactly floor(log2(1 + d)). */
    static int durationToken(Double duration) {
        if (duration == null || duration < 0) {
            return 0;
        }
        return Math.min(23, 1 + Math.getExponent(1.0 + duration));
    }

    /** stable_hash64("k=v") of every context pair, keys in Python's order (by code point). */
    static List<Long> contextTokens(Object context) throws DeadLetter {
        if (!Fields.truthy(context)) {
            return new ArrayList<>(0);
        }
        TreeMap<String, String> sorted = new TreeMap<>(RecordTokenizer::byCodePoint);
        for (Map.Entry<?, ?> pair : Fields.asMap(context).entrySet()) {
            sorted.put(pair.getKey().toString(), Fields.pythonStr(pair.getValue()));
        }
        List<Long> tokens = new ArrayList<>(sorted.size());
        for (Map.Entry<String, String> pair : sorted.entrySet()) {
            tokens.add(stableHash64(pair.getKey() + "=" + pair.getValue()));
        }
        return tokens;
    }

    /**
     * {@code contracts.tokenizer.stable_hash64}: BLAKE2b with an 8-byte digest and no key (Python's
     * {@code hashlib.blake2b(text.encode(), digest_size=8)}), read little-endian as a signed long. The JDK has no
     * BLAKE2; BouncyCastle's digest resets itself after doFinal, so each thread keeps one.
     */
    static long stableHash64(String text) {
        byte[] data = text.getBytes(StandardCharsets.UTF_8);
        byte[] digest = new byte[8];
        Blake2bDigest blake2b = BLAKE2B_64.get();
        blake2b.update(data, 0, data.length);
        blake2b.doFinal(digest, 0);
        return ByteBuffer.wrap(digest).order(ByteOrder.LITTLE_ENDIAN).getLong();
    }

    /**
     * contracts.tokenizer.item_length: the context's item_length_s as Python's float() reads it (ASCII or Unicode
     * digits, '_' between digits, surrounding whitespace), kept when positive and within an Avro float.
     */
    static Float itemLength(Object context) {
        if (!Fields.truthy(context)) {
            return null;
        }
        Object raw = null;
        for (Map.Entry<?, ?> pair : Fields.asMap(context).entrySet()) {
            if (ITEM_LENGTH_KEY.equals(pair.getKey().toString())) {
                raw = pair.getValue();
            }
        }
        double value;
        if (raw instanceof CharSequence) {
            String text = raw.toString().strip();
            if (!PYTHON_FLOAT.matcher(text).matches()) {
                return null;
            }
            StringBuilder ascii = new StringBuilder(text.length());
            text.codePoints().filter(c -> c != '_').forEach(c -> ascii.append(
                    Character.isDigit(c) ? (char) ('0' + Character.digit(c, 10)) : (char) c));
            value = Double.parseDouble(ascii.toString());
        } else if (raw instanceof Boolean) {
            value = (Boolean) raw ? 1.0 : 0.0;
        } else if (raw instanceof Number) {
            value = ((Number) raw).doubleValue();
        } else {
            return null;
        }
        return value > 0 && value <= MAX_FLOAT32 ? (float) value : null;
    }

    static int byCodePoint(String a, String b) {
        int i = 0;
        int j = 0;
        while (i < a.length() && j < b.length()) {
            int ca = a.codePointAt(i);
            int cb = b.codePointAt(j);
            if (ca != cb) {
                return Integer.compare(ca, cb);
            }
            i += Character.charCount(ca);
            j += Character.charCount(cb);
        }
        return Boolean.compare(i < a.length(), j < b.length());
    }
}
