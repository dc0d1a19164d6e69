package ugt.flink;

import java.nio.ByteBuffer;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.regex.Pattern;

import org.apache.avro.LogicalType;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericEnumSymbol;
import org.apache.avro.generic.GenericFixed;
import org.apache.avro.generic.GenericRecord;

/**
 * {@code contracts.tokenizer.validate_event} on a record decoded by its writer schema: the same checks, in the
 * same order, with the same reason codes, judging each value by the Python type fastavro would have given it.
 */
final class Fields {
    /** contracts.limits.DOMAIN_PATTERN without its anchors (Python's "$" also matches before one final "\n"). */
    static final Pattern DOMAIN = Pattern.compile("[A-Za-z0-9][A-Za-z0-9_.-]{0,63}");

    private Fields() {}

    /** The field's value, or null when the writer schema has no such field (a dict without the key). */
    static Object get(GenericRecord record, String name) {
        return record.getSchema().getField(name) == null ? null : record.get(name);
    }

    static void validate(GenericRecord event, int maxIdChars) throws RecordTokenizer.DeadLetter {
        for (String name : RecordTokenizer.REQUIRED) {
            Object value = get(event, name);
            if (value == null) {
                throw new RecordTokenizer.DeadLetter("MISSING_FIELD", "field '" + name + "' is missing");
            }
            String type = pythonType(value, branch(event, name, value));
            if (name.equals("event_time")) {
                if (type.equals("datetime")) {
                    continue;
                }
                if (!type.equals("int")) {
                    throw new RecordTokenizer.DeadLetter("WRONG_TYPE",
                            "field 'event_time' must be int, got " + type);
                }
                continue;
            }
            if (!type.equals("str")) {
                throw new RecordTokenizer.DeadLetter("WRONG_TYPE", "field '" + name + "' must be str, got " + type);
            }
            String text = value.toString();
            if (text.isEmpty()) {
                throw new RecordTokenizer.DeadLetter("BAD_VALUE", "field '" + name + "' is empty");
            }
            int chars = text.codePointCount(0, text.length());
            if ((name.equals("user_id") || name.equals("item_id")) && chars > maxIdChars) {
                throw new RecordTokenizer.DeadLetter("BAD_VALUE", "field '" + name + "' is " + chars
                        + " characters long, over the " + maxIdChars + " that /recommend accepts");
            }
        }
        for (String name : new String[] {"rating", "duration_s"}) {
            Object value = get(event, name);
            if (value == null) {
                continue;
            }
            String type = pythonType(value, branch(event, name, value));
            if (!type.equals("int") && !type.equals("float")) {
                throw new RecordTokenizer.DeadLetter("WRONG_TYPE",
                        "field '" + name + "' must be a number, got " + type);
            }
            if (!Double.isFinite(((Number) value).doubleValue())) {
                throw new RecordTokenizer.DeadLetter("BAD_VALUE", "field '" + name + "' must be a finite float, got "
                        + value);
            }
        }
        Object context = get(event, "context");
        if (truthy(context) && !(context instanceof Map) && !(context instanceof GenericRecord)) {
            throw new RecordTokenizer.DeadLetter("WRONG_TYPE", "field 'context' must be a map, got "
                    + pythonType(context, branch(event, "context", context)));
        }
        Object domain = get(event, "domain");
        if (truthy(domain)) {
            String type = pythonType(domain, branch(event, "domain", domain));
            if (!type.equals("str")) {
                throw new RecordTokenizer.DeadLetter("WRONG_TYPE", "field 'domain' must be a string, got " + type);
            }
            String text = domain.toString();
            String body = text.endsWith("\n") ? text.substring(0, text.length() - 1) : text;
            if (!DOMAIN.matcher(body).matches()) {
                throw new RecordTokenizer.DeadLetter("BAD_VALUE", "field 'domain' must be 1-64 letters, digits, '_', "
                        + "'.' or '-' starting with a letter or digit (it names Redis keys), got '"
                        + text.substring(0, Math.min(70, text.length())) + "'");
            }
        }
    }

    /** event_time in epoch ms: timestamp-micros (a datetime to fastavro) rounded as Python's round() does. */
    static long epochMs(GenericRecord event) {
        Object value = event.get("event_time");
        LogicalType logical = branch(event, "event_time", value).getLogicalType();
        long raw = ((Number) value).longValue();
        if (logical != null && logical.getName().endsWith("timestamp-micros")) {
            return (long) Math.rint(raw / 1e6 * 1000);
        }
        return raw;
    }

    /** The schema of the union branch (or the field's schema) that holds `value`. */
    static Schema branch(GenericRecord record, String name, Object value) {
        Schema schema = record.getSchema().getField(name).schema();
        if (schema.getType() == Schema.Type.UNION) {
            return schema.getTypes().get(GenericData.get().resolveUnion(schema, value));
        }
        return schema;
    }

    /** The name of the Python type fastavro decodes this value to. */
    static String pythonType(Object value, Schema schema) {
        LogicalType logical = schema == null ? null : schema.getLogicalType();
        if (logical != null) {
            String name = logical.getName();
            if (name.startsWith("timestamp") || name.startsWith("local-timestamp")) {
                return "datetime";
            }
            if (name.equals("date")) {
                return "date";
            }
            if (name.startsWith("time-")) {
                return "time";
            }
            if (name.equals("decimal")) {
                return "Decimal";
            }
            if (name.equals("uuid")) {
                return "UUID";
            }
        }
        if (value == null) {
            return "NoneType";
        }
        if (value instanceof CharSequence || value instanceof GenericEnumSymbol) {
            return "str";
        }
        if (value instanceof Boolean) {
            return "bool";
        }
        if (value instanceof Integer || value instanceof Long) {
            return "int";
        }
        if (value instanceof Float || value instanceof Double) {
            return "float";
        }
        if (value instanceof ByteBuffer || value instanceof GenericFixed) {
            return "bytes";
        }
        if (value instanceof Map || value instanceof GenericRecord) {
            return "dict";
        }
        if (value instanceof Collection) {
            return "list";
        }
        return value.getClass().getSimpleName();
    }

    /** Python's truth value of what fastavro would have decoded. */
    static boolean truthy(Object value) {
        if (value == null) {
            return false;
        }
        if (value instanceof Boolean) {
            return (Boolean) value;
        }
        if (value instanceof Number) {
            return ((Number) value).doubleValue() != 0.0;
        }
        if (value instanceof CharSequence) {
            return ((CharSequence) value).length() > 0;
        }
        if (value instanceof Map) {
            return !((Map<?, ?>) value).isEmpty();
        }
        if (value instanceof Collection) {
            return !((Collection<?>) value).isEmpty();
        }
        if (value instanceof ByteBuffer) {
            return ((ByteBuffer) value).remaining() > 0;
        }
        if (value instanceof GenericRecord) {
            return !((GenericRecord) value).getSchema().getFields().isEmpty();
        }
        return true;
    }

    /** A context map (or a record, which fastavro makes a dict) as key -> value. */
    static Map<?, ?> asMap(Object context) {
        if (context instanceof Map) {
            return (Map<?, ?>) context;
        }
        GenericRecord record = (GenericRecord) context;
        Map<String, Object> out = new LinkedHashMap<>();
        for (Schema.Field field : record.getSchema().getFields()) {
            out.put(field.name(), record.get(field.pos()));
        }
        return out;
    }

    /** Python's str() of a context value; values whose str() the JVM does not reproduce are refused. */
    static String pythonStr(Object value) throws RecordTokenizer.DeadLetter {
        if (value == null) {
            return "None";
        }
        if (value instanceof CharSequence || value instanceof GenericEnumSymbol || value instanceof Integer
                || value instanceof Long) {
            return value.toString();
        }
        if (value instanceof Boolean) {
            return (Boolean) value ? "True" : "False";
        }
        throw new RecordTokenizer.DeadLetter("PROCESSING_ERROR", "context value of type "
                + pythonType(value, null) + ": the sql engine hashes only string, int, bool and null values");
    }

    /** A nullable Avro number as a double (rating, duration_s). */
    static Double number(Object value) {
        return value == null ? null : ((Number) value).doubleValue();
    }
}
