package ugt.flink;

import java.io.File;
import java.io.IOException;
import java.util.HexFormat;
import java.util.Map;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;

/**
 * Runs {@link RecordTokenizer} without Flink, for tests/jobs/test_tokenize_jvm.py:
 * {@code java ugt.flink.TokenizeCheck <in.json>} with {"config": "<the job's config>", "now_ms": n, "records": [[hex or null, topic, partition, offset], ...]} prints [{"k", "v", "dead"}, ...].
 */
public final class TokenizeCheck {
    private TokenizeCheck() {}

    public static void main(String[] args) throws IOException {
        ObjectMapper json = new ObjectMapper();
        JsonNode in = json.readTree(new File(args[0]));
        Map<String, String> options = RecordTokenizer.parseOptions(in.get("config").asText());
        RecordTokenizer tokenizer = RecordTokenizer.fromOptions(options, new RegistrySchemas(options.get("registry")));
        HexFormat hex = HexFormat.of();
        long now = in.get("now_ms").asLong();
        ArrayNode out = json.createArrayNode();
        for (JsonNode record : in.get("records")) {
            byte[] data = record.get(0).isNull() ? null : hex.parseHex(record.get(0).asText());
            RecordTokenizer.Result result = tokenizer.process(
                    data, record.get(1).asText(), record.get(2).asInt(), record.get(3).asLong(), now);
            ObjectNode row = out.addObject();
            row.put("k", hex.formatHex(result.key));
            row.put("v", hex.formatHex(result.value));
            row.put("dead", result.dead);
        }
        System.out.println(json.writeValueAsString(out));
    }
}
