"""Pipeline runner: consumer -> processor -> cleaner -> checker in one SparkSession.

Runs the four stages in order in one JVM (the scripts one after another start four) and stops at the
first stage that fails, exiting with that stage's code. It takes the options of all four stages.
``--skip-consumer`` starts from the raw data already in ``consumer_data`` (or ``--consumer-data``).

``--watch INTERVAL`` is the live mode (the ``live`` package): after one full run, the consumer reads the topic
every INTERVAL seconds and each cycle folds only the new raw files into processed_data, cleaned_data
and the check report, until SIGTERM or Ctrl-C.

Usage:
    python exercises/pipeline.py [--bootstrap-servers HOST:PORT] [--datastore DIR]
    python exercises/pipeline.py --watch 10
    spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.13:<spark version> \\
        exercises/pipeline.py --bootstrap-servers HOST:PORT
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import astuple

import pyspark
from pyspark.sql import SparkSession

from meter_stream import check_figures, checker, cleaner, config, consumer, live, processor
from meter_stream.session import build_session, kafka_connector_jars
from meter_stream.storage import EXIT_INPUT_MISSING, exit_code_of, without_atomic_rename

log = config.get_logger("pipeline")

DEFAULT_REPORT_WINDOW_SECONDS = 3600.0


def parse_args(
    argv: list[str] | None,
) -> tuple[argparse.Namespace, config.Paths, processor.ClockLimits, cleaner.CleanerConfig, check_figures.CheckerConfig]:
    """Parse the options of all four stages into (args, paths, clock limits, cleaner config, checker config)."""
    parser = config.make_parser(__doc__)
    parser.add_argument("--skip-consumer", action="store_true", help="start from consumer_data as it is")
    watching = parser.add_argument_group("live mode")
    watching.add_argument(
        "--watch",
        type=float,
        metavar="INTERVAL",
        default=config.env_default("METER_WATCH_SECONDS", None),
        help="keep every output fresh: read the topic every INTERVAL seconds and fold the new data in, "
        "until SIGTERM or Ctrl-C [env METER_WATCH_SECONDS]",
    )
    watching.add_argument(
        "--report-window",
        type=float,
        default=config.env_default("METER_REPORT_WINDOW_SECONDS", str(DEFAULT_REPORT_WINDOW_SECONDS)),
        help="with --watch, the check report covers the hours of this many seconds before the newest slot "
        "[env METER_REPORT_WINDOW_SECONDS]",
    )
    watching.add_argument(
        "--max-rows-per-cycle",
        type=int,
        default=config.env_default("METER_MAX_ROWS_PER_CYCLE", str(live.DEFAULT_MAX_ROWS_PER_CYCLE)),
        help="with --watch, a cycle takes at most this many raw rows, oldest first, so a backlog after downtime "
        "is absorbed in bounded cycles; the consumer's micro-batches are capped at it too unless "
        "--max-offsets-per-trigger is given [env METER_MAX_ROWS_PER_CYCLE] (default %(default)s)",
    )
    watching.add_argument(
        "--max-broker-outage",
        type=float,
        metavar="SECONDS",
        default=config.env_default("METER_MAX_BROKER_OUTAGE_SECONDS", None),
        help="with --watch, exit 1 when the broker has been unreachable for this long; by default the runner "
        "waits for it as long as it takes, cycles going on [env METER_MAX_BROKER_OUTAGE_SECONDS]",
    )
    config.add_datastore_options(parser, tuple(config.FOLDERS))
    consumer.add_arguments(parser)
    processor.add_arguments(parser)
    config.add_series_options(parser)
    cleaner.add_arguments(parser)
    checker.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        clock = processor.clock_from_args(args)
        return args, config.paths_from_args(args), clock, cleaner.load_config(args), checker.config_from_args(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def run(
    spark: SparkSession,
    paths: config.Paths,
    consumer_config: consumer.ConsumerConfig | None,
    cleaner_config: cleaner.CleanerConfig,
    checker_config: check_figures.CheckerConfig,
    clock: processor.ClockLimits = processor.DEFAULT_CLOCK,
) -> int:
    """Run the stages in order (without ``consumer_config``, from consumer_data as it is); return the
    first non-zero exit code, else 0."""

    def consume(consumer_config: consumer.ConsumerConfig) -> int:
        try:
            consumer.run(spark, paths, consumer_config)
        except (consumer.ConsumerError, OSError, ValueError) as error:
            consumer.log.error("%s", error)
            return 1
        return 0

    def process() -> int:
        return 0 if processor.run(spark, paths, clock).balanced() else 1

    def clean() -> int:
        cleaner.run(spark, paths, cleaner_config)
        return 0

    def check() -> int:
        return checker.exit_code(checker.run(spark, paths, checker_config))

    stages = [("processor", process), ("cleaner", clean), ("checker", check)]
    if consumer_config is not None:
        stages.insert(0, ("consumer", lambda: consume(consumer_config)))
    for name, stage in stages:
        started = time.monotonic()
        code = exit_code_of(stage, log)
        log.info("%s finished with exit code %d in %.1f s", name, code, time.monotonic() - started)
        if code:
            log.error("stopping: %s failed", name)
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline from the command line; return the exit code."""
    args, paths, clock, cleaner_config, checker_config = parse_args(argv)
    if args.watch is not None and float(args.watch) <= 0:
        log.error("--watch needs a positive number of seconds")
        return 1
    unsafe = sorted({f"{scheme}://" for scheme in map(without_atomic_rename, astuple(paths)) if scheme})
    if args.watch is not None and unsafe:
        log.error(
            "the live mode needs a file system with atomic rename and create-if-absent, and %s has neither: a "
            "cycle's commit would be a copy, not one step, and no lock could keep a second runner out. Put the "
            "datastore on HDFS (hdfs://), ADLS Gen2 (abfss://, hierarchical namespace) or a local or mounted "
            "disk (README: File systems)",
            " and ".join(unsafe),
        )
        return EXIT_INPUT_MISSING
    try:
        limits = live.RunnerLimits(args.max_rows_per_cycle, args.max_broker_outage)
    except ValueError as error:
        log.error("%s", error)
        return 1
    started = time.monotonic()
    try:
        # Bad Kafka settings fail here, before Spark starts.
        consumer_config = None if args.skip_consumer else consumer.config_from_args(args)
        jars = None if args.skip_consumer else kafka_connector_jars(pyspark.__version__)
        spark = build_session("meter-stream pipeline", verbose=args.verbose, jars=jars)
    except (consumer.ConsumerError, OSError, ValueError) as error:
        log.error("%s", error)
        return 1
    if args.watch is not None:
        # After the session: PySpark's SparkContext sets its own SIGINT handler.
        should_stop = config.StopRequest(log)
        settings = live.Settings(cleaner_config, checker_config, args.report_window, clock)
        consumer_live = None if consumer_config is None else consumer_config.continuous(float(args.watch))
        code = exit_code_of(lambda: live.watch(spark, paths, settings, consumer_live, should_stop, limits), log)
    else:
        code = run(spark, paths, consumer_config, cleaner_config, checker_config, clock)
    log.info("pipeline %s in %.1f s", "done" if code == 0 else "stopped", time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
