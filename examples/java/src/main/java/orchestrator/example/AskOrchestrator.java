package orchestrator.example;

import java.io.File;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * Asks the orchestrator from Java: sends one {@code request_received} and prints the run's
 * {@code workflow_completed} (or {@code workflow_failed}) as one JSON line on stdout.
 *
 * <p>Everything it needs is the Avro schemas in {@code schemas/} and the Kafka address; the
 * wire format is described in {@code docs/wire-format.md}. Exit codes: 0 answered, 1 the run
 * failed, 2 bad arguments, 3 no answer within the timeout.
 */
public final class AskOrchestrator {
  private static final String USAGE =
      "usage: ask-orchestrator --message TEXT [--goal G] [--user U] [--context k=v]...\n"
          + "       [--run-id ID] [--timeout SECONDS] [--bootstrap HOST:PORT] [--prefix P]\n"
          + "       [--schemas DIR]\n"
          + "defaults: --bootstrap $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092,"
          + " --prefix $ORCH_TOPIC_PREFIX or none,\n"
          + "          --schemas $ORCH_SCHEMA_DIR or ./schemas, --goal g1, --user u1,"
          + " --timeout 60\n"
          + "login: $KAFKA_SECURITY_PROTOCOL, $KAFKA_SASL_MECHANISM, $KAFKA_SASL_USERNAME,"
          + " $KAFKA_SASL_PASSWORD\n"
          + "       (the local broker's: eval \"$(orchestrator kafka-env)\")";

  private AskOrchestrator() {}

  public static void main(String[] args) throws Exception {
    // Before any Kafka class asks for a logger: only warnings, on stderr.
    if (System.getProperty("org.slf4j.simpleLogger.defaultLogLevel") == null) {
      System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
    }
    PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    Options opts;
    try {
      opts = Options.parse(args);
    } catch (IllegalArgumentException e) {
      System.err.println("error: " + e.getMessage() + "\n" + USAGE);
      System.exit(2);
      return;
    }
    System.exit(run(opts, out));
  }

  static int run(Options opts, PrintStream out) throws IOException, InterruptedException {
    Schemas schemas = Schemas.load(new File(opts.schemaDir));
    String requestTopic = opts.prefix + "request_received";
    String completedTopic = opts.prefix + "workflow_completed";
    String failedTopic = opts.prefix + "workflow_failed";

    try (KafkaConsumer<byte[], byte[]> replies = new KafkaConsumer<>(consumerConfig(opts));
        KafkaProducer<String, byte[]> producer = new KafkaProducer<>(producerConfig(opts))) {
      // The reply reader first: every partition of the terminal topics (they are keyed by
      // goal, not by run), assigned without a group and positioned at their end before the
      // request leaves, so the answer cannot slip past it.
      List<TopicPartition> parts = new ArrayList<>();
      for (String topic : List.of(completedTopic, failedTopic)) {
        List<PartitionInfo> found = replies.partitionsFor(topic, Duration.ofSeconds(10));
        if (found == null || found.isEmpty()) {
          System.err.println("error: topic " + topic + " does not exist; is the platform up?");
          return 1;
        }
        for (PartitionInfo p : found) {
          parts.add(new TopicPartition(topic, p.partition()));
        }
      }
      replies.assign(parts);
      replies.seekToEnd(parts);
      for (TopicPartition tp : parts) {
        replies.position(tp); // resolve the end offsets now, not at the first poll
      }

      GenericRecord request = new GenericData.Record(schemas.request);
      request.put("event_id", UUID.randomUUID().toString());
      request.put("event_type", "request_received");
      request.put("occurred_at", System.currentTimeMillis());
      request.put("source", "java-example");
      request.put("run_id", opts.runId);
      request.put("goal_id", opts.goal);
      request.put("user_id", opts.user);
      request.put("message", opts.message);
      request.put("context", opts.context);
      request.put("deadline_at", null);
      ByteBuffer body = schemas.encoder.encode(request);
      byte[] value = new byte[body.remaining()];
      body.get(value);
      producer.send(new ProducerRecord<>(requestTopic, opts.runId, value)).get();
      System.err.println("sent request_received run " + opts.runId + " to " + requestTopic);

      long deadline = System.nanoTime() + (long) (opts.timeoutSeconds * 1e9);
      while (System.nanoTime() < deadline) {
        for (ConsumerRecord<byte[], byte[]> r : replies.poll(Duration.ofMillis(200))) {
          boolean completed = r.topic().equals(completedTopic);
          BinaryMessageDecoder<GenericRecord> decoder =
              completed ? schemas.completed : schemas.failed;
          GenericRecord event;
          try {
            event = decoder.decode(r.value());
          } catch (IOException e) {
            continue; // not ours to judge: the platform dead-letters what it cannot read
          }
          if (!opts.runId.equals(String.valueOf(event.get("run_id")))) {
            continue; // another run's answer
          }
          // Avro's own JSON rendering of the record, one line.
          out.println(GenericData.get().toString(event));
          return completed ? 0 : 1;
        }
      }
      System.err.println(
          "timeout: no answer for run " + opts.runId + " within " + opts.timeoutSeconds + " s");
      return 3;
    } catch (java.util.concurrent.ExecutionException e) {
      System.err.println("error: the request could not be sent: " + e.getCause());
      return 1;
    }
  }

  /** The broker's login, from the variables `orchestrator kafka-env` prints. */
  private static Properties login() {
    Properties p = new Properties();
    String user = System.getenv("KAFKA_SASL_USERNAME");
    String protocol =
        Options.envOr("KAFKA_SECURITY_PROTOCOL", user == null ? "PLAINTEXT" : "SASL_PLAINTEXT");
    p.put("security.protocol", protocol);
    if (protocol.startsWith("SASL")) {
      String mechanism = Options.envOr("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512");
      String module =
          mechanism.equals("PLAIN")
              ? "org.apache.kafka.common.security.plain.PlainLoginModule"
              : "org.apache.kafka.common.security.scram.ScramLoginModule";
      p.put("sasl.mechanism", mechanism);
      p.put(
          "sasl.jaas.config",
          module
              + " required username=\""
              + jaasQuoted(Options.envOr("KAFKA_SASL_USERNAME", ""))
              + "\" password=\""
              + jaasQuoted(Options.envOr("KAFKA_SASL_PASSWORD", ""))
              + "\";");
    }
    return p;
  }

  private static String jaasQuoted(String value) {
    return value.replace("\\", "\\\\").replace("\"", "\\\"");
  }

  private static Properties consumerConfig(Options opts) {
    Properties p = login();
    p.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, opts.bootstrap);
    p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    p.put(ConsumerConfig.FETCH_MAX_WAIT_MS_CONFIG, "50");
    p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
    return p;
  }

  private static Properties producerConfig(Options opts) {
    Properties p = login();
    p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, opts.bootstrap);
    p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
    p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    p.put(ProducerConfig.ACKS_CONFIG, "all");
    p.put(ProducerConfig.LINGER_MS_CONFIG, "0");
    return p;
  }

  /** The schemas this program writes and reads, from the platform's schemas/ directory. */
  static final class Schemas {
    private static final String COMPLETED_NAME = "orchestrator.events.WorkflowCompleted";
    private static final String FAILED_NAME = "orchestrator.events.WorkflowFailed";
    final Schema request;
    final BinaryMessageEncoder<GenericRecord> encoder;
    final BinaryMessageDecoder<GenericRecord> completed;
    final BinaryMessageDecoder<GenericRecord> failed;

    private Schemas(Schema request, Schema completed, Schema failed) {
      this.request = request;
      this.encoder = new BinaryMessageEncoder<>(GenericData.get(), request);
      this.completed = new BinaryMessageDecoder<>(GenericData.get(), completed);
      this.failed = new BinaryMessageDecoder<>(GenericData.get(), failed);
    }

    static Schemas load(File dir) throws IOException {
      File request = new File(dir, "request_received.avsc");
      if (!request.isFile()) {
        throw new IOException("no " + request + "; point --schemas at the platform's schemas/");
      }
      Schemas s =
          new Schemas(
              parse(request),
              parse(new File(dir, "workflow_completed.avsc")),
              parse(new File(dir, "workflow_failed.avsc")));
      // Earlier versions of a schema may still be on a topic: the decoder finds the writer
      // schema by the fingerprint in the message header and resolves it to the current one.
      File[] history = new File(dir, "history").listFiles((d, name) -> name.endsWith(".avsc"));
      if (history != null) {
        for (File f : history) {
          Schema old = parse(f);
          if (old.getFullName().equals(COMPLETED_NAME)) {
            s.completed.addSchema(old);
          } else if (old.getFullName().equals(FAILED_NAME)) {
            s.failed.addSchema(old);
          }
        }
      }
      return s;
    }

    private static Schema parse(File f) throws IOException {
      return new Schema.Parser().parse(f); // one parser per file: versions share a name
    }
  }

  /** Command-line options. */
  static final class Options {
    String bootstrap = envOr("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092");
    String prefix = envOr("ORCH_TOPIC_PREFIX", "");
    String schemaDir = envOr("ORCH_SCHEMA_DIR", "schemas");
    String goal = "g1";
    String user = "u1";
    String message;
    String runId = UUID.randomUUID().toString();
    double timeoutSeconds = 60;
    final Map<String, String> context = new LinkedHashMap<>();

    static Options parse(String[] args) {
      Options o = new Options();
      Map<String, String> seen = new HashMap<>();
      for (int i = 0; i < args.length; i++) {
        String flag = args[i];
        if (flag.equals("--help") || flag.equals("-h")) {
          throw new IllegalArgumentException("help");
        }
        if (i + 1 >= args.length) {
          throw new IllegalArgumentException(flag + " needs a value");
        }
        String value = args[++i];
        seen.put(flag, value);
        switch (flag) {
          case "--bootstrap" -> o.bootstrap = value;
          case "--prefix" -> o.prefix = value;
          case "--schemas" -> o.schemaDir = value;
          case "--goal" -> o.goal = value;
          case "--user" -> o.user = value;
          case "--message" -> o.message = value;
          case "--run-id" -> o.runId = value;
          case "--timeout" -> o.timeoutSeconds = Double.parseDouble(value);
          case "--context" -> {
            int eq = value.indexOf('=');
            if (eq <= 0) {
              throw new IllegalArgumentException("--context wants key=value, got " + value);
            }
            o.context.put(value.substring(0, eq), value.substring(eq + 1));
          }
          default -> throw new IllegalArgumentException("unknown option " + flag);
        }
      }
      if (o.message == null || o.message.isBlank()) {
        throw new IllegalArgumentException("--message is required");
      }
      return o;
    }

    private static String envOr(String name, String fallback) {
      String v = System.getenv(name);
      return v == null || v.isEmpty() ? fallback : v;
    }
  }
}
