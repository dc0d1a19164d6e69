package ugt.flink;

import java.io.IOException;
import java.io.UncheckedIOException;
import java.util.HashMap;
import java.util.List;
import java.util.Map;

import org.apache.avro.generic.GenericRecord;
import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;
import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.annotation.FunctionHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.TableFunction;
import org.apache.flink.types.Row;

/**
 * The tokenize job's {@code --engine sql} operator: a SQL table function that turns one events.raw record into
 * exactly one row, a token or a dead letter, both already encoded (Confluent wire format), plus the lake's
 * columns of a token. {@code config} is the job's options as {@code key=value;...} (jobs/tokenize_sql.py).
 */
@FunctionHint(output = @DataTypeHint(
        "ROW<k BYTES, v BYTES, dead STRING, event_id STRING, user_id STRING, item_id STRING, event_time BIGINT, "
        + "`domain` STRING, action_token INT, rating_token INT, duration_token INT, hour_token INT, "
        + "weekday_token INT, context_tokens ARRAY<BIGINT>, semantic_ids ARRAY<INT>, sid_version STRING, "
        + "tokenizer_version INT, src_partition INT, src_offset BIGINT>"))
public class TokenizeRecord extends TableFunction<Row> {
    private transient RecordTokenizer tokenizer;
    private transient String configSeen;
    private transient MetricGroup metrics;
    private transient Counter processed;
    private transient Counter tokenized;
    private transient Counter deadLettered;
    private transient Counter sidRoundTrips;
    private transient long sidRoundTripsSeen;
    private transient Map<String, Counter> byReason;

    @Override
    public void open(FunctionContext context) {
        metrics = context.getMetricGroup().addGroup("ugt");
        processed = metrics.counter("processed");
        tokenized = metrics.counter("tokenized");
        deadLettered = metrics.counter("dead_lettered");
        sidRoundTrips = metrics.counter("sid_round_trips");
        byReason = new HashMap<>();
    }

    @Override
    public void close() {
        if (tokenizer != null && tokenizer.sids != null) {
            tokenizer.sids.close();
        }
    }

    public void eval(byte[] value, String topic, Integer partition, Long offset, String config) {
        if (tokenizer == null || !config.equals(configSeen)) {
            Map<String, String> options = RecordTokenizer.parseOptions(config);
            try {
                tokenizer = RecordTokenizer.fromOptions(options, new RegistrySchemas(options.get("registry")));
            } catch (IOException exc) {
                throw new UncheckedIOException("tokenize: the output schemas or semantic IDs could not be loaded: "
                        + exc.getMessage(), exc);
            }
            configSeen = config;
            sidRoundTripsSeen = 0;
        }
        RecordTokenizer.Result out;
        try {
            out = tokenizer.process(value, topic, partition, offset, System.currentTimeMillis());
        } catch (IOException exc) { // a registry or Redis outage is not the record's fault: Flink restarts the task
            throw new UncheckedIOException("tokenize: Schema Registry or Redis unreachable: " + exc.getMessage(), exc);
        }
        processed.inc();
        if (tokenizer.sids != null && tokenizer.sids.roundTrips != sidRoundTripsSeen) {
            sidRoundTrips.inc(tokenizer.sids.roundTrips - sidRoundTripsSeen);
            sidRoundTripsSeen = tokenizer.sids.roundTrips;
        }
        if (out.dead != null) {
            deadLettered.inc();
            byReason.computeIfAbsent(out.dead, code -> metrics.addGroup("reason", code).counter("dead_lettered"))
                    .inc();
            collect(Row.of(out.key, out.value, out.dead, null, null, null, null, null, null, null, null, null,
                    null, null, null, null, null, partition, offset));
            return;
        }
        tokenized.inc();
        GenericRecord t = out.token;
        @SuppressWarnings("unchecked")
        List<Long> context = (List<Long>) t.get("context_tokens");
        collect(Row.of(out.key, out.value, null, t.get("event_id"), t.get("user_id"), t.get("item_id"),
                t.get("event_time"), t.get("domain"), t.get("action_token"), t.get("rating_token"),
                t.get("duration_token"), t.get("hour_token"), t.get("weekday_token"), context.toArray(new Long[0]),
                ((List<?>) t.get("semantic_ids")).toArray(new Integer[0]), t.get("sid_version"), t.get("tokenizer_version"), partition, offset));
    }
}
