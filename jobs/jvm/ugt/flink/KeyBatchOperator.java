package ugt.flink;

import org.apache.flink.api.common.operators.ProcessingTimeService.ProcessingTimeCallback;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.BoundedOneInput;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;
import org.apache.flink.types.Row;

/**
 * Groups the user_state job's input per key into micro-batches in the JVM (jobs/user_state_batch.py), so its Python
 * operator runs once per (key, batch) with the batch's records as bytes, not once per record.
 *
 * <p>In: Row(key STRING, value BYTES, k BYTES, src_topic STRING, src_partition INT, src_offset BIGINT), chained to
 * the Kafka source. Out: Row(key, Row(records BYTES, k BYTES, src_topic STRING)) ({@link KeyBatches}' format).
 * The buffer is emptied when its first record has waited {@code maxDelayMs} (a processing-time timer), when it holds
 * {@code maxRecords}, before every checkpoint barrier ({@link #prepareSnapshotPreBarrier}) and at the end of input:
 * it holds no state, so a checkpoint never covers a buffered record and a restore replays from the source's
 * offsets exactly as without batching.
 */
public final class KeyBatchOperator extends AbstractStreamOperator<Row>
        implements OneInputStreamOperator<Row, Row>, BoundedOneInput, ProcessingTimeCallback {
    private static final long serialVersionUID = 1L;

    private final long maxDelayMs;
    private final int maxRecords;
    private transient KeyBatches batches;
    private transient boolean timerSet;

    public KeyBatchOperator(long maxDelayMs, int maxRecords) {
        if (maxDelayMs < 1 || maxRecords < 1) {
            throw new IllegalArgumentException("maxDelayMs and maxRecords must be >= 1");
        }
        this.maxDelayMs = maxDelayMs;
        this.maxRecords = maxRecords;
    }

    @Override
    public void open() throws Exception {
        super.open();
        batches = new KeyBatches();
    }

    @Override
    public void processElement(StreamRecord<Row> element) {
        Row row = element.getValue();
        KeyBatches.Batch closed = batches.add((String) row.getField(0), (byte[]) row.getField(2),
                (String) row.getField(3), (byte[]) row.getField(1), (Integer) row.getField(4), (Long) row.getField(5));
        if (closed != null) {
            emit(closed);
        }
        if (batches.buffered() >= maxRecords) {
            flush();
        } else if (!timerSet && batches.buffered() > 0) {
            timerSet = true;
            ProcessingTimeCallback callback = this;
            getProcessingTimeService().registerTimer(
                    getProcessingTimeService().getCurrentProcessingTime() + maxDelayMs, callback);
        }
    }

    @Override
    public void onProcessingTime(long time) {
        timerSet = false;
        flush();
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        super.prepareSnapshotPreBarrier(checkpointId);
        flush();
    }

    @Override
    public void endInput() {
        flush();
    }

    @Override
    public void finish() throws Exception {
        flush();
        super.finish();
    }

    private void flush() {
        if (batches.buffered() == 0) {
            return;
        }
        for (KeyBatches.Batch batch : batches.drain()) {
            emit(batch);
        }
    }

    private void emit(KeyBatches.Batch batch) {
        output.collect(new StreamRecord<>(Row.of(batch.key(), Row.of(batch.records(), batch.recordKey(), batch.topic()))));
    }
}
