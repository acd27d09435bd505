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

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pyspark
from py4j.protocol import Py4JJavaError
from pyspark.errors import StreamingQueryException
from pyspark.sql import SparkSession
from pyspark.sql.streaming.listener import StreamingQueryProgress
from pyspark.sql.streaming.query import StreamingQuery

from meter_stream import config, jvm, kafka_client
from meter_stream import message as m
from meter_stream.contracts import RAW_SCHEMA
from meter_stream.locks import stage_lock
from meter_stream.raw_input import check_sink_matches_checkpoint, choose_generation, generation_folder
from meter_stream.session import build_session, kafka_connector_jars
from meter_stream.storage import exit_code_of

STAGE = "consumer"
log = config.get_logger(STAGE)

#: How often a continuous run checks whether its topic was recreated.
ID_CHECK_SECONDS = 30.0
ENV_INTERVAL = "METER_TRIGGER_SECONDS"
DEFAULT_INTERVAL_SECONDS = 10.0
#: Spark's Kafka source names its consumer groups <prefix>-<uuid>...; a broker with ACLs grants the
#: pipeline's user Read on the groups with this prefix (a prefixed ACL).
ENV_GROUP_ID_PREFIX = "KAFKA_GROUP_ID_PREFIX"
DEFAULT_GROUP_ID_PREFIX = "meter-stream"


class ConsumerError(Exception):
    """The run cannot go on; the message says why and what to do."""


class AccessError(ConsumerError):
    """The broker refuses this client (TLS, authentication, rights): retrying does not heal it."""


@dataclass(frozen=True)
class ConsumerConfig:
    """Where and how the consumer reads.

    ``kafka_options`` are Spark's ``kafka.*`` client options (``client_options``); they may hold
    secrets, so they are left out of the repr. Without ``interval_seconds`` a run copies what the
    topic holds now and ends; with it, a micro-batch starts every ``interval_seconds``.

    Raises:
        ValueError: when a number is not positive.
    """

    bootstrap_servers: str = m.DEFAULT_BOOTSTRAP_SERVERS
    topic: str = m.DEFAULT_TOPIC
    kafka_options: dict[str, str] = field(default_factory=dict, repr=False)
    max_offsets_per_trigger: int | None = None
    interval_seconds: float | None = None
    group_id_prefix: str = DEFAULT_GROUP_ID_PREFIX

    def __post_init__(self) -> None:
        if self.max_offsets_per_trigger is not None and self.max_offsets_per_trigger <= 0:
            raise ValueError("--max-offsets-per-trigger must be positive")
        if self.interval_seconds is not None and self.interval_seconds <= 0:
            raise ValueError("--interval must be positive")

    def continuous(self, interval_seconds: float) -> ConsumerConfig:
        """The same settings, reading a micro-batch every ``interval_seconds`` until stopped."""
        return replace(self, interval_seconds=interval_seconds)


@dataclass(frozen=True)
class IngestResult:
    """What one run wrote, and where a partition's offsets went backwards (topic recreated)."""

    batches: int
    rows: int
    end_offsets: dict[str, dict[str, int]]
    rewound: tuple[tuple[str, str, int, int], ...] = ()
    generation: int = 0
    batch_seconds: float = 0.0  # the batches' own time (Spark's triggerExecution), set-up excluded


def topic_id(spark: SparkSession, bootstrap_servers: str, topic: str, kafka_options: dict[str, str]) -> str | None:
    """Return the topic's id, which Kafka gives anew to a recreated topic; None when it cannot be told.

    Asked with Kafka's Java admin client and the same client options (security) as the stream.
    """
    java = jvm.gateway(spark)
    properties = java.java.util.Properties()
    properties.put("bootstrap.servers", bootstrap_servers)
    for key, value in {**kafka_client.TIMEOUT_OPTIONS, **kafka_options}.items():
        if key.startswith("kafka."):
            properties.put(key.removeprefix("kafka."), value)
    admin = java.org.apache.kafka.clients.admin.Admin.create(properties)
    try:
        names = java.java.util.Collections.singleton(topic)
        described = admin.describeTopics(names).allTopicNames().get(30, java.java.util.concurrent.TimeUnit.SECONDS)
        return str(described.get(topic).topicId().toString())
    except Py4JJavaError as error:
        failure = access_failure(error, bootstrap_servers, topic)
        if failure:
            raise failure from error
        log.info("cannot tell the id of topic %s (%s)", topic, _first_line(error))
        return None
    finally:
        admin.close()


class TopicRecreatedError(ConsumerError):
    """The topic was deleted and recreated while the stream read it."""


@dataclass
class Stream:
    """A started consumer query, the generation it writes and the topic id it started with."""

    query: StreamingQuery
    generation: int
    topic_id: str | None
    output: str


def start_stream(spark: SparkSession, paths: config.Paths, config_: ConsumerConfig) -> Stream:
    """Start the query: availableNow, or with ``interval_seconds`` a processing-time trigger.

    Raises:
        CheckpointMismatchError: when the sink and checkpoint disagree.
    """
    topic, interval_seconds = config_.topic, config_.interval_seconds
    current_id = topic_id(spark, config_.bootstrap_servers, topic, config_.kafka_options)
    generation = choose_generation(spark, paths, topic, current_id, log)
    output = generation_folder(paths.consumer_data, generation)
    checkpoint = generation_folder(paths.checkpoint_consumer, generation)
    check_sink_matches_checkpoint(spark, output, checkpoint)
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", config_.bootstrap_servers)
        .option("subscribe", topic)
        .option("startingOffsets", "earliest")
        .option("failOnDataLoss", "false")
        .option("groupIdPrefix", config_.group_id_prefix)
        # Split a topic partition's offsets over the cores: one Kafka partition is one task otherwise.
        .option("minPartitions", str(spark.sparkContext.defaultParallelism))
        .options(**kafka_client.TIMEOUT_OPTIONS)
        .options(**kafka_client.FETCH_OPTIONS)
        .options(**config_.kafka_options)
    )
    if config_.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(config_.max_offsets_per_trigger))
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
    config_: ConsumerConfig,
    should_stop: Callable[[], bool],
    progress: ProgressSummary,
) -> None:
    """Wait until the query ends (or ``should_stop()``, then stop it after its batch), adding its batches'
    reports to ``progress`` as they come.

    While it runs, the topic's id is checked now and then: a recreated topic stops the query.

    Raises:
        TopicRecreatedError: when the topic was recreated while it was read.
        ConsumerError: when the query fails.
    """
    query, next_id_check = stream.query, time.monotonic() + ID_CHECK_SECONDS
    bootstrap_servers, topic = config_.bootstrap_servers, config_.topic
    try:
        # Spark takes the seconds as a float; its type hint says int.
        while not query.awaitTermination(0.5):  # type: ignore[arg-type]
            progress.add(query.recentProgress)
            if should_stop():
                stop_after_batch(query)
                break
            if stream.topic_id and time.monotonic() >= next_id_check:
                next_id_check = time.monotonic() + ID_CHECK_SECONDS
                if topic_id(spark, bootstrap_servers, topic, config_.kafka_options) not in (None, stream.topic_id):
                    stop_after_batch(query)
                    raise TopicRecreatedError(f"topic {topic} was deleted and recreated while it was read")
    except StreamingQueryException as error:
        failure = access_failure(error, bootstrap_servers, topic)
        if failure:
            raise failure from error
        cause = _first_line(error)
        if "less than end offset" in cause and stream.topic_id:
            raise TopicRecreatedError(f"topic {topic} went back while it was read: {cause}") from error
        raise ConsumerError(f"reading {topic} from {bootstrap_servers} failed: {cause}") from error


def access_failure(error: Exception, bootstrap_servers: str, topic: str) -> AccessError | None:
    """Return an AccessError that names the cause when a Kafka client error is one of access; else None.

    Failed TLS handshakes, failed authentication and missing rights are not healed by retrying. The
    cause may sit deep in the Java stack trace, so the whole text is searched.
    """
    text = str(getattr(error, "desc", None) or error)

    def line_with(*needles: str) -> str | None:
        return next((line.strip()[:300] for line in text.splitlines() if any(n in line for n in needles)), None)

    if line_with("SslAuthenticationException", "SSLHandshakeException"):
        if detail := line_with("No subject alternative", "No name matching"):
            return AccessError(
                f"TLS hostname mismatch: the certificate of the broker at {bootstrap_servers} does not name the "
                f"host connected to; connect with a name the certificate holds ({detail})"
            )
        if detail := line_with("PKIX path", "unable to find valid certification path"):
            return AccessError(
                f"TLS: the certificate of the broker at {bootstrap_servers} is not trusted; set "
                f"KAFKA_SSL_CA_LOCATION (or ssl.truststore.location) to the CA that signed it ({detail})"
            )
        return AccessError(f"TLS handshake with the broker at {bootstrap_servers} failed ({_first_line(error)})")
    if detail := line_with("SaslAuthenticationException", "Authentication failed"):
        return AccessError(
            f"authentication to the Kafka broker at {bootstrap_servers} failed: check "
            f"KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and KAFKA_SASL_MECHANISM ({detail})"
        )
    if detail := line_with("AuthorizationException", "Not authorized", "not authorized"):
        return AccessError(
            f"not authorized to read topic {topic} at {bootstrap_servers}: the user needs Read and Describe on "
            f"the topic and Read on the consumer groups of its --group-id-prefix ({detail})"
        )
    return None


def run(
    spark: SparkSession, paths: config.Paths, config_: ConsumerConfig, should_stop: Callable[[], bool] = lambda: False
) -> IngestResult:
    """Copy the topic into consumer_data; return what was written.

    Without ``config_.interval_seconds``, what the topic holds now is copied and the run ends. With
    it, a micro-batch starts every ``interval_seconds`` until ``should_stop()`` turns true; the run
    then ends after the batch in progress. A topic recreated while it is read is picked up again
    from its start in a new generation (``choose_generation``), and the run goes on.

    Raises:
        CheckpointMismatchError: when the sink and checkpoint disagree.
        ConsumerError: when the query fails.
        ConnectionError: when the broker cannot be reached.
    """
    with stage_lock(paths.checkpoint_consumer, STAGE, log, spark):
        started = time.monotonic()
        kafka_client.wait_until_reachable(config_.bootstrap_servers)
        check_tls(config_)
        log.info(
            "reading %s from %s%s%s",
            config_.topic,
            config_.bootstrap_servers,
            f" with client options {sorted(kafka_client.redact(config_.kafka_options).items())}"
            if config_.kafka_options
            else "",
            f", a batch every {config_.interval_seconds:g} s until stopped" if config_.interval_seconds else "",
        )
        progress = ProgressSummary()
        while True:
            stream = start_stream(spark, paths, config_)
            try:
                await_stream(stream, spark, config_, should_stop, progress)
                break
            except TopicRecreatedError as error:
                log.warning("%s; going on with the recreated topic", error)
            finally:
                progress.add(stream.query.recentProgress)
        result = progress.result(stream.generation)
        _warn_rewound(result, stream)
        log.info(
            "%d batches, %d rows written to %s; end offsets %s (%.1f s)",
            result.batches,
            result.rows,
            stream.output,
            json.dumps(result.end_offsets, sort_keys=True) if result.end_offsets else "unchanged",
            time.monotonic() - started,
        )
        return result


def check_tls(config_: ConsumerConfig) -> None:
    """Fail at once, naming the cause, when TLS to the broker cannot work (untrusted certificate, wrong name).

    Checked with the PEM CA the client is given; with another truststore (JKS, the JDK's own) Spark's
    client reports the failure instead (``access_failure``).

    Raises:
        ConsumerError: when the TLS handshake fails.
    """
    options = config_.kafka_options
    if not options.get("kafka.security.protocol", "").upper().endswith("SSL"):
        return
    if options.get("kafka.ssl.truststore.type", "").upper() != "PEM" or "kafka.ssl.truststore.location" not in options:
        return
    problem = kafka_client.tls_problem(config_.bootstrap_servers, options["kafka.ssl.truststore.location"])
    if problem:
        raise AccessError(problem)


def _warn_rewound(result: IngestResult, stream: Stream) -> None:
    """Warn about each partition whose offsets went back while the stream read it."""
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


def _first_line(error: Exception) -> str:
    text = str(getattr(error, "desc", None) or error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if "Exception:" in line and "StreamingQueryException" not in line]
    return (causes[-1] if causes else lines[0] if lines else type(error).__name__)[:500]


class ProgressSummary:
    """A run's batch reports summed up as they come: bounded however long the run, while Spark keeps only
    its last few reports (``spark.sql.streaming.numRecentProgressUpdates``)."""

    def __init__(self) -> None:
        self.batches, self.rows, self.milliseconds = 0, 0, 0
        self.end_offsets: dict[str, dict[str, int]] = {}
        self.rewound: list[tuple[str, str, int, int]] = []
        self._last_batch: dict[str, int] = {}  # per query run: the last batch added

    def add(self, reports: Sequence[StreamingQueryProgress]) -> None:
        """Add the reports not added before (a query run's batch ids grow)."""
        for report in reports:
            if report.batchId <= self._last_batch.get(str(report.runId), -1):
                continue
            self._last_batch[str(report.runId)] = report.batchId
            if report.numInputRows > 0:
                self.batches += 1
                self.rows += report.numInputRows
                self.milliseconds += report.durationMs.get("triggerExecution", 0)
            for source in report.sources:
                end = _offsets(source.endOffset)
                if not end:
                    continue
                start = _offsets(source.startOffset)
                self.rewound += [
                    (topic, partition, start[topic][partition], offset)
                    for topic, partitions in end.items()
                    for partition, offset in partitions.items()
                    if start.get(topic, {}).get(partition, -1) > offset
                ]
                self.end_offsets = end

    def result(self, generation: int = 0) -> IngestResult:
        return IngestResult(
            self.batches, self.rows, self.end_offsets, tuple(self.rewound), generation, self.milliseconds / 1000
        )


def _offsets(text: str | None) -> dict[str, dict[str, int]]:
    """Kafka source offsets from their JSON text (``null`` or none: {})."""
    parsed = json.loads(text) if text else None
    return {topic: {p: int(o) for p, o in parts.items()} for topic, parts in (parsed or {}).items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the consumer's Kafka options."""
    group = parser.add_argument_group("kafka")
    group.add_argument(
        "--bootstrap-servers",
        default=config.env_default(kafka_client.ENV_BOOTSTRAP_SERVERS, m.DEFAULT_BOOTSTRAP_SERVERS),
        help=f"Kafka brokers, host:port[,host:port] [env {kafka_client.ENV_BOOTSTRAP_SERVERS}]",
    )
    group.add_argument(
        "--topic",
        default=config.env_default(kafka_client.ENV_TOPIC, m.DEFAULT_TOPIC),
        help=f"topic [env {kafka_client.ENV_TOPIC}]",
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
        default=config.env_default(ENV_INTERVAL, str(DEFAULT_INTERVAL_SECONDS)),
        help=f"seconds between micro-batches with --continuous [env {ENV_INTERVAL}]",
    )
    group.add_argument(
        "--group-id-prefix",
        default=config.env_default(ENV_GROUP_ID_PREFIX, DEFAULT_GROUP_ID_PREFIX),
        help="prefix of the consumer group ids the Kafka source uses; with ACLs, grant the pipeline's user Read on "
        f"groups with this prefix [env {ENV_GROUP_ID_PREFIX}] (default %(default)s)",
    )
    group.add_argument(
        "--kafka-properties",
        default=config.env_default(kafka_client.ENV_PROPERTIES_FILE, None),
        help="Java-style properties file of Kafka client options (security); it must be readable by its owner "
        f"only (chmod 600) [env {kafka_client.ENV_PROPERTIES_FILE}]",
    )


def config_from_args(args: argparse.Namespace) -> ConsumerConfig:
    """The consumer's configuration from parsed options, the environment and ``--kafka-properties``.

    Raises:
        OSError, ValueError: on an unreadable properties file, unusable security settings or numbers.
    """
    properties = kafka_client.read_properties(args.kafka_properties) if args.kafka_properties else {}
    return ConsumerConfig(
        bootstrap_servers=args.bootstrap_servers,
        topic=args.topic,
        kafka_options=kafka_client.client_options(kafka_client.kafka_security_from_env(), properties),
        max_offsets_per_trigger=int(args.max_offsets_per_trigger) if args.max_offsets_per_trigger else None,
        interval_seconds=float(args.interval) if getattr(args, "continuous", False) else None,
        group_id_prefix=args.group_id_prefix,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the consumer from the command line; return the exit code."""
    parser = config.make_parser(__doc__)
    add_arguments(parser)
    config.add_datastore_options(parser, ("consumer_data", "checkpoint_consumer"))
    args = parser.parse_args(argv)
    paths = config.paths_from_args(args)

    def consume() -> int:
        try:
            config_ = config_from_args(args)  # fail on bad settings before Spark starts
            with stage_lock(paths.checkpoint_consumer, STAGE, log):  # and refuse a second run before it too
                spark = build_session(
                    "meter-stream consumer", verbose=args.verbose, jars=kafka_connector_jars(pyspark.__version__)
                )
                # After the session: PySpark's SparkContext sets its own SIGINT handler.
                should_stop = config.StopRequest(log) if args.continuous else (lambda: False)
                run(spark, paths, config_, should_stop)
        except (ConsumerError, OSError, ValueError) as error:
            log.error("%s", error)
            return 1
        return 0

    return exit_code_of(consume, log)


if __name__ == "__main__":
    sys.exit(main())
