package ugt.flink;

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.Closeable;
import java.io.EOFException;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.URI;
import java.net.URLDecoder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;

/**
 * The few Redis commands the JVM tokenizer needs (GET, HSCAN, HMGET) over RESP2, without a client library.
 * One node ({@code redis://[:password@]host:port[/db]}) or a Redis Cluster ({@code redis+cluster://h:p,h:p}):
 * a MOVED or ASK reply is followed to the node it names, as redis-py's cluster client does.
 */
final class RedisLite implements Closeable {
    static final class ReplyError extends IOException {
        ReplyError(String message) {
            super(message);
        }
    }

    private final String password;
    private final int db;
    private String host;
    private int port;
    private Socket socket;
    private InputStream in;
    private OutputStream out;

    RedisLite(String url) {
        String scheme = url.substring(0, Math.max(0, url.indexOf("://")));
        if (!scheme.equals("redis") && !scheme.equals("redis+cluster")) {
            throw new IllegalArgumentException("the sql engine reads Redis over redis:// or redis+cluster:// only, got "
                    + url);
        }
        String rest = url.substring(url.indexOf("://") + 3);
        int slash = rest.indexOf('/');
        String path = slash >= 0 ? rest.substring(slash + 1) : "";
        rest = slash >= 0 ? rest.substring(0, slash) : rest;
        int at = rest.lastIndexOf('@');
        String auth = at >= 0 ? rest.substring(0, at) : "";
        String first = (at >= 0 ? rest.substring(at + 1) : rest).split(",")[0].trim();
        URI node = URI.create("redis://" + first);
        host = node.getHost();
        port = node.getPort() > 0 ? node.getPort() : 6379;
        String secret = auth.contains(":") ? auth.substring(auth.indexOf(':') + 1) : auth;
        password = secret.isEmpty() ? null : URLDecoder.decode(secret, StandardCharsets.UTF_8);
        String dbText = path.split("\\?")[0];
        db = scheme.equals("redis") && !dbText.isEmpty() ? Integer.parseInt(dbText) : 0;
    }

    /** One command; its reply (String, Long, byte[], null or List), following cluster redirects. */
    Object call(String... args) throws IOException {
        boolean asking = false;
        for (int attempt = 0; attempt < 6; attempt++) {
            connect();
            Object reply;
            try {
                if (asking) {
                    send("ASKING");
                    read();
                }
                send(args);
                reply = read();
            } catch (ReplyError error) {
                String message = error.getMessage();
                if (message.startsWith("MOVED ") || message.startsWith("ASK ")) {
                    String[] target = message.split(" ")[2].split(":");
                    close();
                    host = target[0].isEmpty() ? host : target[0];
                    port = Integer.parseInt(target[1]);
                    asking = message.startsWith("ASK ");
                    continue;
                }
                throw error;
            } catch (IOException exc) { // a dropped connection: one fresh try, then the task fails
                close();
                if (attempt > 0) {
                    throw exc;
                }
                continue;
            }
            return reply;
        }
        throw new IOException("Redis kept redirecting " + String.join(" ", args));
    }

    private void connect() throws IOException {
        if (socket != null) {
            return;
        }
        socket = new Socket();
        socket.connect(new InetSocketAddress(host, port), 5000);
        socket.setSoTimeout(10_000);
        socket.setTcpNoDelay(true);
        in = new BufferedInputStream(socket.getInputStream());
        out = new BufferedOutputStream(socket.getOutputStream());
        if (password != null) {
            send("AUTH", password);
            read();
        }
        if (db != 0) {
            send("SELECT", Integer.toString(db));
            read();
        }
    }

    private void send(String... args) throws IOException {
        out.write(('*' + Integer.toString(args.length) + "\r\n").getBytes(StandardCharsets.US_ASCII));
        for (String arg : args) {
            byte[] data = arg.getBytes(StandardCharsets.UTF_8);
            out.write(('$' + Integer.toString(data.length) + "\r\n").getBytes(StandardCharsets.US_ASCII));
            out.write(data);
            out.write('\r');
            out.write('\n');
        }
        out.flush();
    }

    private Object read() throws IOException {
        int kind = in.read();
        String line = line();
        switch (kind) {
            case '+':
                return line;
            case '-':
                throw new ReplyError(line);
            case ':':
                return Long.parseLong(line);
            case '$': {
                int length = Integer.parseInt(line);
                if (length < 0) {
                    return null;
                }
                byte[] data = in.readNBytes(length + 2);
                if (data.length < length + 2) {
                    throw new EOFException("Redis closed the connection mid-reply");
                }
                return java.util.Arrays.copyOf(data, length);
            }
            case '*': {
                int count = Integer.parseInt(line);
                if (count < 0) {
                    return null;
                }
                List<Object> items = new ArrayList<>(count);
                for (int i = 0; i < count; i++) {
                    items.add(read());
                }
                return items;
            }
            case -1:
                throw new EOFException("Redis closed the connection");
            default:
                throw new IOException("not a RESP reply: " + (char) kind + line);
        }
    }

    private String line() throws IOException {
        StringBuilder text = new StringBuilder();
        int c;
        while ((c = in.read()) != '\r') {
            if (c < 0) {
                throw new EOFException("Redis closed the connection");
            }
            text.append((char) c);
        }
        in.read(); // '\n'
        return text.toString();
    }

    @Override
    public void close() {
        if (socket != null) {
            try {
                socket.close();
            } catch (IOException ignored) {
                // closing a broken connection: nothing left to do
            }
        }
        socket = null;
    }
}
