package ugt.flink;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.HexFormat;

/**
 * Runs {@link KeyBatches} without Flink, for tests/jobs/test_user_state_batch.py: stdin lines
 * {@code key<TAB>k hex or -<TAB>topic<TAB>value hex or -<TAB>partition<TAB>offset}, or {@code DRAIN}; prints one line
 * per batch closed or drained: {@code key<TAB>k hex or -<TAB>topic<TAB>count<TAB>records hex}.
 */
public final class KeyBatchCheck {
    private KeyBatchCheck() {}

    public static void main(String[] args) throws IOException {
        HexFormat hex = HexFormat.of();
        KeyBatches batches = new KeyBatches();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            if (line.equals("DRAIN")) {
                batches.drain().forEach(b -> print(hex, b));
                continue;
            }
            String[] f = line.split("\t", -1);
            KeyBatches.Batch closed = batches.add(f[0], f[1].equals("-") ? null : hex.parseHex(f[1]), f[2],
                    f[3].equals("-") ? null : hex.parseHex(f[3]), Integer.parseInt(f[4]), Long.parseLong(f[5]));
            if (closed != null) {
                print(hex, closed);
            }
        }
        batches.drain().forEach(b -> print(hex, b));
    }

    private static void print(HexFormat hex, KeyBatches.Batch b) {
        System.out.println(b.key() + "\t" + (b.recordKey() == null ? "-" : hex.formatHex(b.recordKey())) + "\t"
                + b.topic() + "\t" + b.count() + "\t" + hex.formatHex(b.records()));
    }
}
