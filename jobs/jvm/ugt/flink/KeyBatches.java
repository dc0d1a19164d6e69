package ugt.flink;

import java.io.ByteArrayOutputStream;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Objects;

/**
 * The records of each key since the last drain, in arrival order, packed into one byte string per key: the
 * user_state job's micro-batches (jobs/user_state_batch.py unpacks them). No Flink here; {@link KeyBatchOperator}
 * decides when to drain.
 *
 * <p>Batch format (big-endian), per record: int32 value length (-1 = null value), the value bytes, int32 partition,
 * int64 offset. A batch also carries its key text, the record key bytes (nullable) and the source topic; a record
 * whose key bytes or topic differ from the open batch of its key text closes that batch first, so every record of
 * a batch shares them and a key's records leave in arrival order.
 */
public final class KeyBatches {
    /** One packed batch: the key text, the raw record key (null = unkeyed), the topic and the packed records. */
    public record Batch(String key, byte[] recordKey, String topic, byte[] records, int count) {}

    private static final class Open {
        final byte[] recordKey;
        final String topic;
        final ByteArrayOutputStream out = new ByteArrayOutputStream(256);
        int count;

        Open(byte[] recordKey, String topic) {
            this.recordKey = recordKey;
            this.topic = topic;
        }
    }

    private final Map<String, Open> open = new LinkedHashMap<>();
    private int buffered;

    /** Add one record; returns a batch it closed (its key text's open batch had other key bytes or topic), or null. */
    public Batch add(String key, byte[] recordKey, String topic, byte[] value, int partition, long offset) {
        Batch closed = null;
        Open batch = open.get(key);
        if (batch != null && (!Arrays.equals(batch.recordKey, recordKey) || !Objects.equals(batch.topic, topic))) {
            closed = close(key, open.remove(key));
            batch = null;
        }
        if (batch == null) {
            batch = new Open(recordKey, topic);
            open.put(key, batch);
        }
        writeRecord(batch.out, value, partition, offset);
        batch.count++;
        buffered++;
        return closed;
    }

    /** Records buffered since the last drain. */
    public int buffered() {
        return buffered;
    }

    /** Every open batch, in the order their keys first arrived; empties the buffer. */
    public List<Batch> drain() {
        List<Batch> batches = new ArrayList<>(open.size());
        for (Map.Entry<String, Open> entry : open.entrySet()) {
            batches.add(close(entry.getKey(), entry.getValue()));
        }
        open.clear();
        buffered = 0;
        return batches;
    }

    private Batch close(String key, Open batch) {
        buffered -= batch.count;
        return new Batch(key, batch.recordKey, batch.topic, batch.out.toByteArray(), batch.count);
    }

    static void writeRecord(ByteArrayOutputStream out, byte[] value, int partition, long offset) {
        writeInt(out, value == null ? -1 : value.length);
        if (value != null) {
            out.write(value, 0, value.length);
        }
        writeInt(out, partition);
        writeInt(out, (int) (offset >>> 32));
        writeInt(out, (int) offset);
    }

    private static void writeInt(ByteArrayOutputStream out, int v) {
        out.write(v >>> 24);
        out.write(v >>> 16);
        out.write(v >>> 8);
        out.write(v);
    }
}
