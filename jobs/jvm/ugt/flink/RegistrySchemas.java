package ugt.flink;

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.avro.Schema;

/** Writer schemas from a Confluent-compatible Schema Registry (GET /schemas/ids/{id}); 404 = unknown id. */
final class RegistrySchemas implements RecordTokenizer.Schemas {
    private static final ObjectMapper JSON = new ObjectMapper();
    private final String url;
    private final HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(10)).build();

    RegistrySchemas(String url) {
        this.url = url.endsWith("/") ? url.substring(0, url.length() - 1) : url;
    }

    @Override
    public Schema byId(int id) throws IOException {
        HttpRequest request = HttpRequest.newBuilder(URI.create(url + "/schemas/ids/" + id))
                .timeout(Duration.ofSeconds(10)).GET().build();
        HttpResponse<String> response;
        try {
            response = client.send(request, HttpResponse.BodyHandlers.ofString());
        } catch (InterruptedException exc) {
            Thread.currentThread().interrupt();
            throw new IOException("interrupted while asking " + url + " for schema " + id, exc);
        }
        if (response.statusCode() == 404) {
            return null;
        }
        if (response.statusCode() >= 400) {
            throw new IOException("Schema Registry at " + url + ": GET /schemas/ids/" + id + " -> "
                    + response.statusCode() + ": " + response.body());
        }
        JsonNode body = JSON.readTree(response.body());
        return new Schema.Parser().parse(body.get("schema").asText());
    }
}
