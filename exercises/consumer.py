"""Stage 1, consumer: copy the Kafka topic into consumer_data, exactly once.

Reads the topic with Spark Structured Streaming (startingOffsets earliest, failOnDataLoss false) and
appends the rows unchanged (key, value, topic, partition, offset, timestamp, timestampType; value
stays binary) to ``consumer_data`` as parquet, with its checkpoint in ``checkpoint_consumer``. The
trigger is availableNow: it takes what the topic holds now, in micro-batches of at most
``--max-offsets-per-trigger``, and stops. The checkpoint makes each offset land exactly once, also
across crashes and reruns. A topic deleted and recreated is read again from its start into a new
generation, ``consumer_data/generation-N`` (see ``choose_generation``).

Kafka client options (security) come from the environment (KAFKA_SECURITY_PROTOCOL,
KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_CA_LOCATION) or a Java-style
properties file (``--kafka-properties``, env KAFKA_PROPERTIES_FILE, keys such as security.protocol,
sasl.jaas.config, ssl.truststore.location). Their values are never printed.

``--continuous`` keeps reading instead: a micro-batch every ``--interval`` seconds (default 10)
until SIGTERM or Ctrl-C, then the batch in progress is finished and the run exits 0.

Usage:
    python exercises/consumer.py [--bootstrap-servers HOST:PORT] [--topic mytopic] [--datastore DIR]
    python exercises/consumer.py --continuous --interval 10
    spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version> \\
        exercises/consumer.py --bootstrap-servers HOST:PORT
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyspark
from py4j.protocol import Py4JJavaError
from pyspark.errors import StreamingQueryException
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery

from common import config
from common import message as m
from common.contracts import RAW_SCHEMA
from common.raw_input import generation_folder
from common.session import build_session, kafka_connector_jars
from common.storage import SINK_LOG, exit_code_of, list_files, read_text, stage_lock, write_text

STAGE = "consumer"
#: In the checkpoint folder: the topic's id and the current generation (see ``choose_generation``).
GENERATION_STATE = "generation.json"
log = config.get_logger(STAGE)

#: Client timeouts that make an unreachable broker fail the run within about a minute (the
#: client defaults wait several minutes).
TIMEOUT_OPTIONS = {
    "kafka.request.timeout.ms": "15000",
    "kafka.default.api.timeout.ms": "30000",
    "kafka.socket.connection.setup.timeout.ms": "5000",
    "kafka.socket.connection.setup.timeout.max.ms": "10000",
    "fetchOffset.numRetries": "2",
    "fetchOffset.retryIntervalMs": "1000",
    # An executor waiting on a broker that went away fails the batch after this, not after 2 min.
    "kafkaConsumer.pollTimeoutMs": "30000",
}
#: Larger polls for the stream's consumers (Spark's consumers are assigned partitions, not in a
#: group, so a long poll loop cannot cause a rebalance). The client default of 500 records per
#: poll halves the throughput: measured 1 M messages at 275-417k msg/s with it, 505-600k with
#: 10,000 (warm JVM, 2 cores). ``--kafka-properties`` can override it.
FETCH_OPTIONS = {"kafka.max.poll.records": "10000"}
REACHABLE_WAIT_SECONDS = 15.0
#: How often a continuous run checks whether its topic was recreated.
ID_CHECK_SECONDS = 30.0
ENV_INTERVAL = "METER_TRIGGER_SECONDS"
DEFAULT_INTERVAL_SECONDS = 10.0
_JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


class ConsumerError(Exception):
    """The run cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class IngestResult:
    """What one run wrote, and where a partition's offsets went backwards (topic recreated)."""

    batches: int
    rows: int
    end_offsets: dict[str, dict[str, int]]
    rewound: tuple[tuple[str, str, int, int], ...] = ()
    generation: int = 0
    batch_seconds: float = 0.0  # the batches' own time (Spark's triggerExecution), set-up excluded


def client_options(env_security: dict[str, str], properties: dict[str, str]) -> dict[str, str]:
    """Return the Spark Kafka source's ``kafka.*`` client options for the security settings.

    Args:
        env_security: librdkafka-style settings from the environment (``sasl.username`` ...).
        properties: Java client properties from a file; they win over the environment.

    Raises:
        ConsumerError: when a username is given without a password or with an unknown mechanism.
    """
    options = {}
    for key in ("security.protocol", "sasl.mechanism"):
        if key in env_security:
            options[f"kafka.{key}"] = env_security[key]
    if "ssl.ca.location" in env_security:
        options["kafka.ssl.truststore.type"] = "PEM"
        options["kafka.ssl.truststore.location"] = env_security["ssl.ca.location"]
    if "sasl.username" in env_security:
        mechanism = env_security.get("sasl.mechanism", "PLAIN").upper()
        if mechanism not in _JAAS_MODULES or "sasl.password" not in env_security:
            raise ConsumerError(
                f"KAFKA_SASL_USERNAME needs KAFKA_SASL_PASSWORD and a mechanism of {', '.join(_JAAS_MODULES)}"
            )
        user = json.dumps(env_security["sasl.username"])
        password = json.dumps(env_security["sasl.password"])
        options["kafka.sasl.jaas.config"] = f"{_JAAS_MODULES[mechanism]} required username={user} password={password};"
    for key, value in properties.items():
        options[key if key.startswith("kafka.") else f"kafka.{key}"] = value
    return options


def wait_until_reachable(bootstrap_servers: str, wait_seconds: float = REACHABLE_WAIT_SECONDS) -> None:
    """Return once one bootstrap server accepts TCP connections.

    Raises:
        ConsumerError: when none does within ``wait_seconds``.
    """
    servers = [s.strip() for s in bootstrap_servers.split(",") if s.strip()]
    deadline = time.monotonic() + wait_seconds
    while True:
        for server in servers:
            host, _, port = server.rpartition(":")
            try:
                with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=3):
                    return
            except (OSError, ValueError):
                continue
        if time.monotonic() >= deadline:
            raise ConsumerError(
                f"cannot reach the Kafka broker at {bootstrap_servers} (tried for {wait_seconds:.0f} s); "
                "is it running? Locally: scripts/kafka-local start"
            )
        time.sleep(1)


def _latest_batch(spark: SparkSession, folder: str) -> int:
    """The highest batch id among a streaming log folder's files (``N`` or ``N.compact``); -1 if none."""
    ids = [
        int(match.group(1))
        for name in list_files(spark, f"{folder}/*")
        if (match := re.fullmatch(r"(\d+)(\.compact)?", name.rsplit("/", 1)[-1]))
    ]
    return max(ids, default=-1)


def check_sink_matches_checkpoint(spark: SparkSession, output: str, checkpoint: str) -> None:
    """Refuse to run when the file sink would silently skip the next batches.

    The parquet sink skips every batch whose id is not above the latest one in its
    ``_spark_metadata`` log. When the log is ahead of the checkpoint's commits (the checkpoint was
    deleted, or belongs to other output), new data would be dropped without a word.

    Raises:
        ConsumerError: naming both folders and how to fix it.
    """
    sink_batch = _latest_batch(spark, f"{output.rstrip('/')}/{SINK_LOG}")
    if sink_batch < 0:
        return
    committed = _latest_batch(spark, f"{checkpoint.rstrip('/')}/commits")
    if sink_batch > committed:
        raise ConsumerError(
            f"{output} holds a {SINK_LOG} log up to batch {sink_batch}, but the checkpoint "
            f"{checkpoint} has committed only up to batch {committed} (missing, or made for "
            "other output); Spark would silently skip the new batches. Restore the checkpoint that belongs "
            "to this output, or move the output aside (or point --consumer-data and --checkpoint-consumer "
            "at new folders) and consume again from the earliest offset."
        )


def topic_id(spark: SparkSession, bootstrap_servers: str, topic: str, kafka_options: dict[str, str]) -> str | None:
    """Return the topic's id, which Kafka gives anew to a recreated topic; None when it cannot be told.

    Asked with Kafka's Java admin client and the same client options (security) as the stream.
    """
    jvm = spark.sparkContext._jvm
    properties = jvm.java.util.Properties()
    properties.put("bootstrap.servers", bootstrap_servers)
    for key, value in {**TIMEOUT_OPTIONS, **kafka_options}.items():
        if key.startswith("kafka."):
            properties.put(key.removeprefix("kafka."), value)
    admin = jvm.org.apache.kafka.clients.admin.Admin.create(properties)
    try:
        names = jvm.java.util.Collections.singleton(topic)
        described = admin.describeTopics(names).allTopicNames().get(30, jvm.java.util.concurrent.TimeUnit.SECONDS)
        return str(described.get(topic).topicId().toString())
    except Py4JJavaError as error:
        log.info("cannot tell the id of topic %s (%s)", topic, _first_line(error))
        return None
    finally:
        admin.close()


def choose_generation(spark: SparkSession, paths: config.Paths, topic: str, current_id: str | None) -> int:
    """Return the generation to ingest into: a new one when the topic was recreated since the last run.

    Spark cannot rewind a checkpointed Kafka source: after a topic is deleted and recreated, it
    would skip the new topic's messages up to the old offsets. So the consumer keeps the topic's id
    with the checkpoint; when the id changes, it starts generation N+1, a new checkpoint and output
    subfolder (``generation_folder``) read from the new topic's earliest offset. The processor reads
    every generation. The record is written before the stream starts, so a failed run resumes the
    same generation.
    """
    state_path = f"{paths.checkpoint_consumer.rstrip('/')}/{GENERATION_STATE}"
    text = read_text(spark, state_path)
    state = json.loads(text) if text else {}
    generation = int(state.get("generation", 0))
    recorded = state.get("topic_id") if state.get("topic") == topic else None
    if current_id is None or current_id == recorded:
        return generation
    if recorded is not None:
        generation += 1
        log.warning(
            "topic %s was deleted and recreated (its id changed from %s to %s): reading it "
            "from its earliest offset into %s, with the checkpoint %s. What was ingested from the old topic "
            "stays in %s.",
            topic,
            recorded,
            current_id,
            generation_folder(paths.consumer_data, generation),
            generation_folder(paths.checkpoint_consumer, generation),
            paths.consumer_data,
        )
    state = {"topic": topic, "topic_id": current_id, "generation": generation}
    write_text(spark, state_path, json.dumps(state, indent=2) + "\n")
    return generation


class TopicRecreatedError(ConsumerError):
    """The topic was deleted and recreated while the stream read it."""


@dataclass
class Stream:
    """A started consumer query, the generation it writes and the topic id it started with."""

    query: StreamingQuery
    generation: int
    topic_id: str | None
    output: str


def start_stream(
    spark: SparkSession,
    paths: config.Paths,
    bootstrap_servers: str,
    topic: str,
    kafka_options: dict[str, str],
    max_offsets_per_trigger: int | None = None,
    interval_seconds: float | None = None,
) -> Stream:
    """Start the query: availableNow, or with ``interval_seconds`` a processing-time trigger.

    Raises:
        ConsumerError: when the sink and checkpoint disagree.
    """
    current_id = topic_id(spark, bootstrap_servers, topic, kafka_options)
    generation = choose_generation(spark, paths, topic, current_id)
    output = generation_folder(paths.consumer_data, generation)
    checkpoint = generation_folder(paths.checkpoint_consumer, generation)
    check_sink_matches_checkpoint(spark, output, checkpoint)
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", bootstrap_servers)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .option("failOnDataLoss", "false")
        # Split a topic partition's offsets over the cores: one Kafka partition is one task otherwise.
        .option("minPartitions", str(spark.sparkContext.defaultParallelism))
        .options(**TIMEOUT_OPTIONS)
        .options(**FETCH_OPTIONS)
        .options(**kafka_options)
    )
    if max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(max_offsets_per_trigger))
    # Keep every batch's progress for the summary, not only the last 100.
    spark.conf.set("spark.sql.streaming.numRecentProgressUpdates", "100000")
    trigger = {"availableNow": True} if interval_seconds is None else {"processingTime": f"{interval_seconds} seconds"}
    query = (
        reader.load()
        .select(*RAW_SCHEMA.fieldNames())
        .writeStream.format("parquet")
        .option("path", output)
        .option("checkpointLocation", checkpoint)
        .outputMode("append")
        .trigger(**trigger)
        .queryName(f"consumer-{topic}")
        .start()
    )
    return Stream(query, generation, current_id, output)


def stop_after_batch(query: StreamingQuery, wait_seconds: float = 300.0) -> None:
    """Stop a query between batches: wait for the running batch (if any) to commit, then stop.

    A batch cut short would be redone by the next run (the checkpoint's offset log makes that
    exactly-once); waiting avoids redoing it.
    """
    deadline = time.monotonic() + wait_seconds
    while query.isActive and query.status["isTriggerActive"] and time.monotonic() < deadline:
        time.sleep(0.1)
    query.stop()


def await_stream(
    stream: Stream,
    spark: SparkSession,
    bootstrap_servers: str,
    topic: str,
    kafka_options: dict[str, str],
    should_stop: Callable[[], bool] = lambda: False,
) -> list:
    """Wait until the query ends (or ``should_stop()``, then stop it after its batch); return its progress.

    While it runs, the topic's id is checked now and then: a recreated topic stops the query.

    Raises:
        TopicRecreatedError: when the topic was recreated while it was read.
        ConsumerError: when the query fails.
    """
    query, next_id_check = stream.query, time.monotonic() + ID_CHECK_SECONDS
    try:
        while not query.awaitTermination(0.5):
            if should_stop():
                stop_after_batch(query)
                break
            if stream.topic_id and time.monotonic() >= next_id_check:
                next_id_check = time.monotonic() + ID_CHECK_SECONDS
                if topic_id(spark, bootstrap_servers, topic, kafka_options) not in (None, stream.topic_id):
                    stop_after_batch(query)
                    raise TopicRecreatedError(f"topic {topic} was deleted and recreated while it was read")
    except StreamingQueryException as error:
        cause = _first_line(error)
        if "SaslAuthenticationException" in cause or "Authentication failed" in cause:
            raise ConsumerError(
                f"authentication to the Kafka broker at {bootstrap_servers} failed: check "
                f"KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM ({cause})"
            ) from error
        if "less than end offset" in cause and stream.topic_id:
            raise TopicRecreatedError(f"topic {topic} went back while it was read: {cause}") from error
        raise ConsumerError(f"reading {topic} from {bootstrap_servers} failed: {cause}") from error
    return query.recentProgress


def run(
    spark: SparkSession,
    paths: config.Paths,
    bootstrap_servers: str,
    topic: str,
    kafka_options: dict[str, str],
    max_offsets_per_trigger: int | None = None,
    interval_seconds: float | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> IngestResult:
    """Copy the topic into consumer_data; return what was written.

    Without ``interval_seconds``, what the topic holds now is copied and the run ends. With it,
    a micro-batch starts every ``interval_seconds`` until ``should_stop()`` turns true; the run
    then ends after the batch in progress. A topic recreated while it is read is picked up again
    from its start in a new generation (``choose_generation``), and the run goes on.

    Raises:
        ConsumerError: when the broker cannot be reached, the sink and checkpoint disagree, or
            the query fails.
    """
    with stage_lock(paths.checkpoint_consumer, STAGE, log):
        started = time.monotonic()
        wait_until_reachable(bootstrap_servers)
        log.info(
            "reading %s from %s%s%s",
            topic,
            bootstrap_servers,
            f" with client options {sorted(config.redact(kafka_options).items())}" if kafka_options else "",
            f", a batch every {interval_seconds:g} s until stopped" if interval_seconds else "",
        )
        progress: list = []
        while True:
            stream = start_stream(
                spark, paths, bootstrap_servers, topic, kafka_options, max_offsets_per_trigger, interval_seconds
            )
            try:
                progress += await_stream(stream, spark, bootstrap_servers, topic, kafka_options, should_stop)
                break
            except TopicRecreatedError as error:
                progress += stream.query.recentProgress
                log.warning("%s; going on with the recreated topic", error)
        result = summarize(progress, stream.generation)
        for topic_name, partition, before, after in result.rewound:
            log.warning(
                "partition %s-%s went back from offset %d to %d: the topic was deleted and recreated (or "
                "truncated) while it was read. Spark's Kafka source skips the new partition's messages "
                "below offset %d. %s",
                topic_name,
                partition,
                before,
                after,
                after,
                "The next run sees the new topic id and reads the recreated topic again from its earliest "
                "offset (the processor collapses the messages read twice as duplicates)."
                if stream.topic_id
                else "The topic's id could not be read, so they were not ingested (re-send them if they matter).",
            )
        log.info(
            "%d batches, %d rows written to %s; end offsets %s (%.1f s)",
            result.batches,
            result.rows,
            stream.output,
            json.dumps(result.end_offsets, sort_keys=True) if result.end_offsets else "unchanged",
            time.monotonic() - started,
        )
        return result


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "desc", None) or error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if "Exception:" in line and "StreamingQueryException" not in line]
    return (causes[-1] if causes else lines[0] if lines else type(error).__name__)[:500]


def summarize(progress: list, generation: int = 0) -> IngestResult:
    """Return batches, rows, end offsets and offset regressions from a query's progress reports."""
    with_rows = [p for p in progress if p.numInputRows > 0]
    end_offsets: dict[str, dict[str, int]] = {}
    rewound = []
    for report in progress:
        for source in report.sources:
            end = _offsets(source.endOffset)
            if not end:
                continue
            start = _offsets(source.startOffset)
            rewound += [
                (topic, partition, start[topic][partition], offset)
                for topic, partitions in end.items()
                for partition, offset in partitions.items()
                if start.get(topic, {}).get(partition, -1) > offset
            ]
            end_offsets = end
    rows = sum(p.numInputRows for p in with_rows)
    batch_seconds = sum(p.durationMs.get("triggerExecution", 0) for p in with_rows) / 1000
    return IngestResult(len(with_rows), rows, end_offsets, tuple(rewound), generation, batch_seconds)


def _offsets(text: str | None) -> dict[str, dict[str, int]]:
    """Kafka source offsets from their JSON text (``null`` or none: {})."""
    parsed = json.loads(text) if text else None
    return {topic: {p: int(o) for p, o in parts.items()} for topic, parts in (parsed or {}).items()}


def add_arguments(parser) -> None:
    """Add the consumer's Kafka options."""
    group = parser.add_argument_group("kafka")
    group.add_argument(
        "--bootstrap-servers",
        default=config.env_default(config.ENV_BOOTSTRAP_SERVERS, m.DEFAULT_BOOTSTRAP_SERVERS),
        help=f"Kafka brokers, host:port[,host:port] [env {config.ENV_BOOTSTRAP_SERVERS}]",
    )
    group.add_argument(
        "--topic", default=config.env_default(config.ENV_TOPIC, m.DEFAULT_TOPIC), help=f"topic [env {config.ENV_TOPIC}]"
    )
    group.add_argument(
        "--max-offsets-per-trigger",
        type=int,
        default=config.env_default("METER_MAX_OFFSETS_PER_TRIGGER", None),
        help="at most this many offsets per micro-batch (default: all at once) [env METER_MAX_OFFSETS_PER_TRIGGER]",
    )
    group.add_argument(
        "--continuous",
        action="store_true",
        help="keep reading: a micro-batch every --interval seconds until SIGTERM or Ctrl-C, then stop after "
        "the batch in progress with exit code 0",
    )
    group.add_argument(
        "--interval",
        type=float,
        default=config.env_default(ENV_INTERVAL, DEFAULT_INTERVAL_SECONDS),
        help=f"seconds between micro-batches with --continuous [env {ENV_INTERVAL}]",
    )
    group.add_argument(
        "--kafka-properties",
        default=config.env_default(config.ENV_PROPERTIES_FILE, None),
        help=f"Java-style properties file of Kafka client options (security) [env {config.ENV_PROPERTIES_FILE}]",
    )


def kafka_options_from_args(args) -> dict[str, str]:
    """Return the Kafka client options from the environment and ``--kafka-properties``.

    Raises:
        ConsumerError, OSError, ValueError: on unusable security settings or properties file.
    """
    properties = config.read_properties(args.kafka_properties) if args.kafka_properties else {}
    return client_options(config.kafka_security_from_env(), properties)


def ingest(
    spark: SparkSession, paths: config.Paths, args, should_stop: Callable[[], bool] = lambda: False
) -> IngestResult:
    """Run the consumer with parsed command-line arguments (``--continuous``: until ``should_stop()``)."""
    max_offsets = int(args.max_offsets_per_trigger) if args.max_offsets_per_trigger else None
    if max_offsets is not None and max_offsets <= 0:
        raise ConsumerError("--max-offsets-per-trigger must be positive")
    interval = float(args.interval) if getattr(args, "continuous", False) else None
    if interval is not None and interval <= 0:
        raise ConsumerError("--interval must be positive")
    options = kafka_options_from_args(args)
    return run(spark, paths, args.bootstrap_servers, args.topic, options, max_offsets, interval, should_stop)


def main(argv: list[str] | None = None) -> int:
    """Run the consumer from the command line; return the exit code."""
    parser = config.make_parser(__doc__)
    add_arguments(parser)
    config.add_datastore_options(parser, ("consumer_data", "checkpoint_consumer"))
    args = parser.parse_args(argv)
    paths = config.paths_from_args(args)

    def consume() -> int:
        try:
            kafka_options_from_args(args)  # fail on bad settings before Spark starts
            spark = build_session(
                "meter-stream consumer", verbose=args.verbose, jars=kafka_connector_jars(pyspark.__version__)
            )
            # After the session: PySpark's SparkContext sets its own SIGINT handler.
            should_stop = config.StopRequest(log) if args.continuous else (lambda: False)
            ingest(spark, paths, args, should_stop)
        except (ConsumerError, OSError, ValueError) as error:
            log.error("%s", error)
            return 1
        return 0

    return exit_code_of(consume, log)


if __name__ == "__main__":
    sys.exit(main())
