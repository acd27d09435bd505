"""Pipeline runner: consumer -> processor -> cleaner -> checker in one SparkSession.

Runs the four stages in order in one JVM (the scripts one after another start four) and stops at the
first stage that fails, exiting with that stage's code. It takes the options of all four stages.
``--skip-consumer`` starts from the raw data already in ``consumer_data`` (or ``--consumer-data``).

``--watch INTERVAL`` is the live mode: after one full run, the consumer reads the topic every
INTERVAL seconds and each cycle folds only the new raw files into processed_data, cleaned_data and
the check report (see ``watch``), until SIGTERM or Ctrl-C.

Usage:
    python exercises/pipeline.py [--bootstrap-servers HOST:PORT] [--datastore DIR]
    python exercises/pipeline.py --watch 10
    spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version> \\
        exercises/pipeline.py --bootstrap-servers HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pyspark
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import checker
import cleaner
import consumer
import processor
from common import config
from common import message as m
from common.spark import (
    PARTITION,
    PARTITION_FORMAT,
    SinkPosition,
    build_session,
    exit_code_of,
    kafka_connector_jars,
    list_files,
    path_exists,
    read_text,
    stage_lock,
    write_text,
)

log = config.get_logger("pipeline")

DEFAULT_REPORT_WINDOW_SECONDS = 3600.0
#: In processed_data: how far the live runner has read consumer_data, and whether a cycle is running.
LIVE_STATE = "_live_state.json"
#: In reports: the live runner's recent cycles with their latency histograms.
LIVE_CYCLES = "live_cycles.json"
KEPT_CYCLES = 2000
#: Latencies are counted in 0.1-s buckets up to this; longer ones (a backlog) count as this.
LATENCY_CAP_SECONDS = 600.0


def parse_args(argv: list[str] | None):
    """Parse the options of all four stages into (args, paths, cleaner config, checker config)."""
    parser = config.make_parser(__doc__)
    parser.add_argument("--skip-consumer", action="store_true", help="start from consumer_data as it is")
    live = parser.add_argument_group("live mode")
    live.add_argument(
        "--watch",
        type=float,
        metavar="INTERVAL",
        default=config.env_default("METER_WATCH_SECONDS", None),
        help="keep every output fresh: read the topic every INTERVAL seconds and fold the new data in, "
        "until SIGTERM or Ctrl-C [env METER_WATCH_SECONDS]",
    )
    live.add_argument(
        "--report-window",
        type=float,
        default=config.env_default("METER_REPORT_WINDOW_SECONDS", DEFAULT_REPORT_WINDOW_SECONDS),
        help="with --watch, the check report covers the slots of this many seconds before the newest "
        "[env METER_REPORT_WINDOW_SECONDS]",
    )
    config.add_datastore_options(parser, tuple(config.FOLDERS))
    consumer.add_arguments(parser)
    config.add_series_options(parser)
    cleaner.add_arguments(parser)
    checker.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args, config.paths_from_args(args), cleaner.load_config(args), checker.config_from_args(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def run(spark, args, paths, cleaner_config, checker_config) -> int:
    """Run the stages in order; return the first non-zero exit code, else 0."""

    def consume() -> int:
        try:
            consumer.ingest(spark, paths, args)
        except consumer.ConsumerError as error:
            consumer.log.error("%s", error)
            return 1
        return 0

    def process() -> int:
        return 0 if processor.run(spark, paths).balanced() else 1

    def clean() -> int:
        cleaner.run(spark, paths, cleaner_config)
        return 0

    def check() -> int:
        return checker.exit_code(checker.run(spark, paths, checker_config))

    stages = [("processor", process), ("cleaner", clean), ("checker", check)]
    if not args.skip_consumer:
        stages.insert(0, ("consumer", consume))
    for name, stage in stages:
        started = time.monotonic()
        code = exit_code_of(stage, log)
        log.info("%s finished with exit code %d in %.1f s", name, code, time.monotonic() - started)
        if code:
            log.error("stopping: %s failed", name)
            return code
    return 0


# --- live mode ----------------------------------------------------------------------------------


def read_live_state(spark: SparkSession, paths: config.Paths, fingerprint: str) -> dict[str, SinkPosition] | None:
    """The raw positions of the last completed cycle; None when a full run is needed first.

    That is: no state (first start, or a batch run replaced processed_data), a cycle that did not
    finish (a crash mid-cycle may have left some hours old and some new), or another cleaner
    configuration.
    """
    text = read_text(spark, config.join_path(paths.processed_data, LIVE_STATE))
    state = json.loads(text) if text else {}
    if not state or state.get("in_progress") or state.get("config") != fingerprint:
        return None
    return {key: SinkPosition(**value) for key, value in state["positions"].items()}


def write_live_state(
    spark: SparkSession, paths: config.Paths, positions: dict[str, SinkPosition], fingerprint: str, in_progress: bool
) -> None:
    state = {
        "positions": {key: vars(position) for key, position in positions.items()},
        "config": fingerprint,
        "in_progress": in_progress,
    }
    write_text(spark, config.join_path(paths.processed_data, LIVE_STATE), json.dumps(state, indent=2) + "\n")


def newest_slot(spark: SparkSession, paths: config.Paths) -> datetime | None:
    """The latest slot in cleaned_data, read from its newest hour partition only."""
    hours = list_files(spark, f"{paths.cleaned_data}/{PARTITION}=*", folders=True)
    if not hours:
        return None
    newest_hour = max(hours, key=lambda h: int(h.rsplit("=", 1)[-1]))
    newest = spark.read.parquet(newest_hour).agg(F.unix_micros(F.max(m.T_MEASUREMENT))).first()[0]
    return None if newest is None else datetime.fromtimestamp(newest / 1_000_000, UTC)


def latency_histogram(measurements: DataFrame, done: float) -> dict[float, int]:
    """Seconds from each measurement's t_measurement to ``done``, counted in 0.1-s buckets."""
    seconds = F.lit(done) - F.unix_micros(m.T_MEASUREMENT) / 1_000_000
    bucket = F.least(F.floor(seconds * 10) / 10, F.lit(LATENCY_CAP_SECONDS)).alias("bucket")
    # One row per bucket: a bounded summary, not the measurements.
    return {float(r.bucket): int(r["count"]) for r in measurements.groupBy(bucket).count().collect()}


def percentile(histogram: dict[float, int], share: float) -> float | None:
    """The bucket (upper edge) below which ``share`` of the counted latencies lie."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= share * total:
            return round(bucket + 0.1, 1)
    return None


class LiveRunner:
    """The live mode behind ``--watch``: a continuous consumer and incremental cycles (see ``watch``)."""

    def __init__(self, spark, args, paths, cleaner_config, checker_config, should_stop) -> None:
        self.spark, self.args, self.paths = spark, args, paths
        self.cleaner_config, self.checker_config = cleaner_config, checker_config
        self.should_stop = should_stop
        # An output written with another cleaner configuration or partition layout needs a full run.
        self.fingerprint = f"{PARTITION}={PARTITION_FORMAT} {cleaner_config!r}"
        self.cycles: list[dict] = []
        self.newest: datetime | None = None
        self.consumer_errors: list[Exception] = []

    def start(self) -> dict[str, SinkPosition]:
        """Return the raw positions to go on from, after a full run when the live state says so."""
        positions = read_live_state(self.spark, self.paths, self.fingerprint)
        if positions is not None:
            log.info("live: going on from the last cycle's state")
        elif not path_exists(self.spark, self.paths.consumer_data):
            positions = {}
            write_live_state(self.spark, self.paths, positions, self.fingerprint, in_progress=False)
        else:
            log.info("live: no complete live state in %s: one full run first", self.paths.processed_data)
            # Positions before the full run: a file that arrives during it is read twice, not missed.
            _files, positions = processor.raw_positions(self.spark, self.paths, {})
            write_live_state(self.spark, self.paths, positions, self.fingerprint, in_progress=True)
            processor.run(self.spark, self.paths)
            cleaner.run(self.spark, self.paths, self.cleaner_config)
            checker.run(self.spark, self.paths, self.checker_config, show=False)
            write_live_state(self.spark, self.paths, positions, self.fingerprint, in_progress=False)
        self.newest = newest_slot(self.spark, self.paths)
        # A cycle's data is small: one shuffle partition per core, not Spark's default of 200
        # (which made a cycle three times slower here).
        self.spark.conf.set("spark.sql.shuffle.partitions", str(self.spark.sparkContext.defaultParallelism))
        return positions

    def start_consumer(self) -> threading.Thread:
        """Run the consumer continuously (a batch every --watch seconds) in a thread of this session."""
        args = argparse.Namespace(**{**vars(self.args), "continuous": True, "interval": self.args.watch})

        def consume() -> None:
            try:
                consumer.ingest(self.spark, self.paths, args, self.should_stop)
            except Exception as error:  # reported by the main loop, which then stops
                consumer.log.error("%s", error)
                self.consumer_errors.append(error)

        thread = threading.Thread(target=consume, name="consumer", daemon=True)
        thread.start()
        return thread

    def cycle(self, files: list[str], positions: dict[str, SinkPosition], after: dict[str, SinkPosition]) -> dict:
        """Fold new raw files into processed_data, cleaned_data and the report; return the cycle's metrics."""
        started, wall = time.monotonic(), time.time()
        write_live_state(self.spark, self.paths, positions, self.fingerprint, in_progress=True)
        with stage_lock(self.paths.processed_data, "processor", processor.log):
            with stage_lock(self.paths.cleaned_data, "cleaner", cleaner.log):
                changes = processor.process_new(self.spark, self.paths, files)
                processed_at = time.monotonic()
                slots = cleaner.clean_changes(
                    self.spark, self.paths, self.cleaner_config, changes.measurements, changes.series_rows
                )
        done = time.time()
        cleaned_at = time.monotonic()
        histogram = latency_histogram(changes.measurements, done)
        write_live_state(self.spark, self.paths, after, self.fingerprint, in_progress=False)
        if slots["newest"] is not None:
            newest = slots["newest"]
            self.newest = max(self.newest or newest, newest)
        report = None
        if self.newest is not None:
            since = self.newest - timedelta(seconds=self.args.report_window)
            report = checker.exit_code(checker.run(self.spark, self.paths, self.checker_config, since, show=False))
        checked_at = time.monotonic()
        accounting = changes.accounting
        metrics = {
            "cycle": len(self.cycles) + 1,
            "at": datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 2),
            "processor_s": round(processed_at - started, 2),
            "cleaner_s": round(cleaned_at - processed_at, 2),
            "checker_s": round(checked_at - cleaned_at, 2),
            "raw_rows": accounting.raw,
            "processed": accounting.processed,
            "quarantined": accounting.quarantined,
            "duplicates": accounting.duplicates,
            "measurements": sum(histogram.values()),
            "latency_p50_s": percentile(histogram, 0.5),
            "latency_p95_s": percentile(histogram, 0.95),
            "latency_max_s": percentile(histogram, 1.0),
            "freshness_s": round(time.time() - self.newest.timestamp(), 1) if self.newest else None,
            "checker_exit_code": report,
            "latency_histogram": {f"{bucket:.1f}": count for bucket, count in sorted(histogram.items())},
        }
        self.cycles = [*self.cycles, metrics][-KEPT_CYCLES:]
        write_text(self.spark, config.join_path(self.paths.reports, LIVE_CYCLES), json.dumps(self.cycles) + "\n")
        log.info(
            "cycle %d: %d raw rows = %d new + %d quarantined + %d duplicates; latency p50 %s s, p95 %s s, "
            "max %s s; freshness %s s; checks exit %s; %.1f s (processor %.1f, cleaner %.1f, checker %.1f)",
            metrics["cycle"],
            accounting.raw,
            accounting.processed,
            accounting.quarantined,
            accounting.duplicates,
            metrics["latency_p50_s"],
            metrics["latency_p95_s"],
            metrics["latency_max_s"],
            metrics["freshness_s"],
            report,
            metrics["seconds"],
            metrics["processor_s"],
            metrics["cleaner_s"],
            metrics["checker_s"],
        )
        return metrics


def watch(spark, args, paths, cleaner_config, checker_config, should_stop) -> int:
    """Run the live mode until ``should_stop()``; return the exit code.

    After one full run (only when the live state is missing or a cycle was interrupted), the
    consumer runs continuously in a thread of this session (unless ``--skip-consumer``: then
    another process fills consumer_data). Each cycle starts as soon as new raw files are committed:
    it reads only them, rewrites the hours of processed_data and cleaned_data they touch (see
    ``processor.process_new`` and ``cleaner.clean_changes``), and checks the last
    ``--report-window`` seconds. On SIGTERM or Ctrl-C the consumer ends after its batch, a last
    cycle takes what it wrote, and the run exits 0.
    """
    runner = LiveRunner(spark, args, paths, cleaner_config, checker_config, should_stop)
    positions = runner.start()
    thread = None if args.skip_consumer else runner.start_consumer()
    log.info("live: a cycle as soon as new raw data is committed (consumer every %g s); Ctrl-C stops", args.watch)
    while True:
        finished = thread is None or not thread.is_alive()
        files, after = processor.raw_positions(spark, paths, positions)
        if files:
            runner.cycle(files, positions, after)
            positions = after
            continue
        if runner.consumer_errors:
            return 1
        if should_stop() and finished:
            log.info("live: stopped after %d cycles", len(runner.cycles))
            return 0
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline from the command line; return the exit code."""
    args, paths, cleaner_config, checker_config = parse_args(argv)
    if args.watch is not None and float(args.watch) <= 0:
        log.error("--watch needs a positive number of seconds")
        return 1
    started = time.monotonic()
    try:
        if not args.skip_consumer:
            consumer.kafka_options_from_args(args)  # fail on bad settings before Spark starts
        jars = None if args.skip_consumer else kafka_connector_jars(pyspark.__version__)
        spark = build_session("meter-stream pipeline", verbose=args.verbose, jars=jars)
    except (consumer.ConsumerError, OSError, ValueError) as error:
        log.error("%s", error)
        return 1
    if args.watch is not None:
        # After the session: PySpark's SparkContext sets its own SIGINT handler.
        should_stop = config.StopRequest(log)
        code = exit_code_of(lambda: watch(spark, args, paths, cleaner_config, checker_config, should_stop), log)
    else:
        code = run(spark, args, paths, cleaner_config, checker_config)
    log.info("pipeline %s in %.1f s", "done" if code == 0 else "stopped", time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
