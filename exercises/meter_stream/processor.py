"""Stage 2, processor: parse raw Kafka rows into typed measurements.

Reads ``consumer_data`` (raw Kafka rows), parses each message value with an explicit schema,
flattens it to t_measurement, t_report (UTC timestamps), device_id, signal_name and value (double),
collapses replays of a measurement to the one with the latest t_report, and replaces
``processed_data``. Records that cannot be used go to ``quarantine_data`` with the raw value as
text, a reason and their Kafka topic/partition/offset. A measurement whose t_measurement is too far
ahead of its arrival at the broker (Kafka's timestamp, ``--max-ahead``) or older than the lateness
horizon before it (``--max-lateness``) is a clock fault: quarantined with its own reason. One log
line accounts for every raw row: raw = processed + quarantined + duplicates collapsed.

Usage:
    python exercises/processor.py --datastore DIR
    spark-submit exercises/processor.py --datastore DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from meter_stream import config
from meter_stream import message as m
from meter_stream.contracts import (
    CLOCK_FAULT_REASONS,
    MICROS,
    PARTITION,
    PROCESSED_SCHEMA,
    QUARANTINE_SCHEMA,
    REASON_AHEAD_OF_ARRIVAL,
    REASON_BEYOND_LATENESS,
    REASON_IMPLAUSIBLE_TIMESTAMP,
    epoch_seconds,
    with_hour,
)
from meter_stream.locks import stage_lock
from meter_stream.raw_input import read_raw
from meter_stream.session import build_session
from meter_stream.storage import exit_code_of, replace_output

STAGE = "processor"
log = config.get_logger(STAGE)

# Quarantine reasons, in the order they are tested: a record gets the first that applies.
REASON_EMPTY = "empty_value"
REASON_NOT_UTF8 = "invalid_utf8"
REASON_MALFORMED = "malformed_json"
REASON_NOT_OBJECT = "not_a_json_object"
REASON_MISSING = "missing_field:"  # followed by the field's name
REASON_BAD_TIMESTAMP = "unparseable_timestamp:"  # followed by the field's name
REASON_NON_NUMERIC = "non_numeric_value"
REASON_NON_FINITE = "non_finite_value"

#: Plausible measurement times, in epoch seconds: 2000-01-01 to 2100-01-01 (UTC). Milliseconds or
#: microseconds sent as seconds land far beyond the upper bound.
PLAUSIBLE_EPOCH_SECONDS = (946_684_800, 4_102_444_800)

#: Clock faults, judged against the record's arrival at the broker: a meter's clock runs minutes off, a
#: reset one reports from 2000 or 1970, a broken one months or years ahead. The horizon lets a head-end's
#: or the producer's backfill of days through; both are options (``--max-ahead``, ``--max-lateness``).
DEFAULT_MAX_AHEAD_SECONDS = 3600.0
DEFAULT_MAX_LATENESS_SECONDS = 7 * 86400.0
ENV_MAX_AHEAD = "METER_MAX_AHEAD"
ENV_MAX_LATENESS = "METER_MAX_LATENESS"


@dataclass(frozen=True)
class ClockLimits:
    """How far a t_measurement may be from its record's arrival at the broker (Kafka's timestamp).

    Attributes:
        max_ahead_seconds: the most a measurement may be ahead of its arrival.
        max_lateness_seconds: the most it may be older than its arrival (the lateness horizon).
    """

    max_ahead_seconds: float = DEFAULT_MAX_AHEAD_SECONDS
    max_lateness_seconds: float = DEFAULT_MAX_LATENESS_SECONDS

    def __post_init__(self) -> None:
        if not (self.max_ahead_seconds > 0 and self.max_lateness_seconds > 0):
            raise ValueError("the clock limits (max ahead, max lateness) must be positive durations")


DEFAULT_CLOCK = ClockLimits()

_CORRUPT = "_corrupt_record"
# Every field is read as text: producers send numbers, the brief's example file has strings, and
# the text is converted below with tolerant casts (Spark 4's ANSI mode makes plain casts raise).
MESSAGE_SCHEMA = T.StructType(
    [T.StructField(name, T.StringType()) for name in m.FIELDS] + [T.StructField(_CORRUPT, T.StringType())]
)
_NON_FINITE_TEXT = ("NAN", "INFINITY", "+INFINITY", "-INFINITY", "INF", "+INF", "-INF")


@dataclass(frozen=True)
class Accounting:
    """Where the raw rows went."""

    raw: int
    processed: int
    quarantined: int
    duplicates: int
    clock_faults: int = 0  # of the quarantined

    def balanced(self) -> bool:
        """Return whether every raw row is accounted for."""
        return self.raw == self.processed + self.quarantined + self.duplicates


def _epoch_seconds(text: Column) -> Column:
    """Epoch-seconds text (a JSON number, or a number in quotes) as a double; null when unparseable.

    A double, not a decimal: a 38-digit decimal is a Java BigDecimal per row. Below 2100 a double
    is within 0.25 microseconds of the text, so rounding to whole microseconds gives the exact
    microsecond the text says.
    """
    return F.btrim(text, F.lit('"')).try_cast(T.DoubleType())


def _timestamp(seconds: Column) -> Column:
    """Epoch seconds (a plausible double) as a timestamp, rounded half up to whole microseconds.

    ``floor(x + 0.5)``, not ``round``: Spark rounds a double through a BigDecimal made from its text.
    """
    return F.timestamp_micros(F.floor(seconds * MICROS + 0.5))


def _rejection(value: Column) -> Column:
    """The quarantine reason of a row of converted fields (the first failing condition, in order)."""
    non_finite = (
        F.upper(F.trim("_value_text")).isin(*_NON_FINITE_TEXT) | F.isnan(value) | F.abs(value).eqNullSafe(float("inf"))
    )
    reason = F.when(F.col("raw_value").isNull() | (F.trim("raw_value") == ""), REASON_EMPTY)
    reason = reason.when(~F.is_valid_utf8("raw_value"), REASON_NOT_UTF8)
    reason = reason.when(
        F.col(_CORRUPT).isNotNull(),
        F.when(F.try_parse_json("raw_value").isNull(), REASON_MALFORMED).otherwise(REASON_NOT_OBJECT),
    )
    for field in m.FIELDS:
        field_text = F.trim(F.col(field))
        missing = field_text.isNull() | (field_text == "") | (field_text == "null")
        reason = reason.when(missing, REASON_MISSING + field)
    for field in (m.T_MEASUREMENT, m.T_REPORT):
        plausible = F.col(f"_{field}_plausible")
        reason = reason.when(plausible.isNull(), REASON_BAD_TIMESTAMP + field)
        reason = reason.when(~plausible, REASON_IMPLAUSIBLE_TIMESTAMP + field)
    reason = reason.when(F.col("_ahead"), REASON_AHEAD_OF_ARRIVAL).when(F.col("_behind"), REASON_BEYOND_LATENESS)
    reason = reason.when(non_finite, REASON_NON_FINITE).when(value.isNull(), REASON_NON_NUMERIC)
    return reason


def _usable(value: Column) -> Column:
    """Whether a row of converted fields is usable: one test that nearly every record passes.

    The JSON parsed, both times plausible, the value a finite number and the names not blank. Each
    failure of it fails a condition of ``_rejection``, so that chain (whose conditions trim and
    convert again) runs only for the rest.
    """
    return (
        F.col(_CORRUPT).isNull()
        & F.is_valid_utf8("raw_value")
        & F.col(f"_{m.T_MEASUREMENT}_plausible")
        & F.col(f"_{m.T_REPORT}_plausible")
        & ~F.coalesce(F.col("_ahead") | F.col("_behind"), F.lit(False))
        & ~F.isnan(value)
        & (F.abs(value) < float("inf"))
        & ~F.coalesce(F.trim(F.col(m.DEVICE_ID)).isin("", "null"), F.lit(True))
        & ~F.coalesce(F.trim(F.col(m.SIGNAL_NAME)).isin("", "null"), F.lit(True))
    )


def parse_measurements(raw: DataFrame, clock: ClockLimits = DEFAULT_CLOCK) -> DataFrame:
    """Parse raw Kafka rows into typed columns plus a quarantine ``reason`` (null when usable).

    Built in steps that each read the previous step's columns, so that the JSON is parsed once and
    each conversion is made once per row (written as one expression, the reason's conditions
    repeated the conversions: three times slower).

    Args:
        raw: rows of ``RAW_SCHEMA``.
        clock: the clock-fault limits; a record without an arrival time is not judged by them.

    Returns:
        The processed columns, ``reason``, ``raw_value`` (the value as text, where rejected) and the Kafka
        topic, partition and offset; one row per raw row.
    """
    text = F.col("value").cast(T.StringType())
    kafka = ["topic", "partition", "offset"]
    parsed = raw.select(
        text.alias("raw_value"),
        *kafka,
        epoch_seconds(F.col("timestamp")).alias("_arrival_s"),
        F.from_json(text, MESSAGE_SCHEMA, {"columnNameOfCorruptRecord": _CORRUPT}).alias("msg"),
    )
    fields = parsed.select(
        "raw_value", *kafka, "_arrival_s", *[F.col(f"msg.{name}").alias(name) for name in MESSAGE_SCHEMA.names]
    )
    converted = _converted(fields, clock)
    value = F.col("_value")
    reason = F.when(_usable(value), F.lit(None).cast(T.StringType())).otherwise(_rejection(value))

    return converted.select(
        *[
            F.when(F.col(f"_{name}_plausible"), _timestamp(F.col(f"_{name}_s"))).alias(name)
            for name in (m.T_MEASUREMENT, m.T_REPORT)
        ],
        m.DEVICE_ID,
        m.SIGNAL_NAME,
        value.alias(m.VALUE),
        reason.alias("reason"),
        "raw_value",
        *kafka,
    ).withColumn(
        # The raw text is kept only where it is needed: in the quarantine.
        "raw_value",
        F.when(F.col("reason").isNotNull(), F.col("raw_value")),
    )


def _converted(fields: DataFrame, clock: ClockLimits) -> DataFrame:
    """The message's fields with their conversions: epoch seconds, whether plausible, the value as a number,
    and whether t_measurement is ``_ahead`` of its arrival or ``_behind`` it (null without an arrival time)."""
    low, high = PLAUSIBLE_EPOCH_SECONDS
    offset = F.col(f"_{m.T_MEASUREMENT}_s") - F.col("_arrival_s")
    return fields.select(
        "*",
        *[_epoch_seconds(F.col(name)).alias(f"_{name}_s") for name in (m.T_MEASUREMENT, m.T_REPORT)],
        F.btrim(F.col(m.VALUE), F.lit('"')).alias("_value_text"),
    ).select(
        "*",
        F.col("_value_text").try_cast(T.DoubleType()).alias("_value"),
        *[F.col(f"_{name}_s").between(low, high).alias(f"_{name}_plausible") for name in (m.T_MEASUREMENT, m.T_REPORT)],
        (offset > clock.max_ahead_seconds).alias("_ahead"),
        (offset < -clock.max_lateness_seconds).alias("_behind"),
    )


def select_quarantine(parsed: DataFrame) -> DataFrame:
    """Return the rejected rows of ``parse_measurements`` in the quarantine_data contract.

    The raw value is kept as text; bytes that are not UTF-8 become U+FFFD (the Kafka topic,
    partition and offset locate the original bytes).
    """
    return parsed.where(F.col("reason").isNotNull()).select(
        F.make_valid_utf8("raw_value").alias("raw_value"),
        *[F.col(field.name).cast(field.dataType) for field in QUARANTINE_SCHEMA.fields[1:]],
    )


def collapse_replays(parsed: DataFrame, with_partition: bool = False) -> DataFrame:
    """Keep one row per measurement (device_id, signal_name, t_measurement): the latest report.

    Kafka delivers at least once and producers resend corrections, so the same measurement can
    arrive several times; the one with the latest t_report wins (a later report is a correction),
    and among equal reports the one latest in Kafka (partition, offset) wins, so the choice is
    deterministic. Returns the processed_data contract, with ``with_partition`` also its ``hour``.

    One shuffle, by ranges of (hour, device_id, signal_name): each task gets whole hours, or a
    slice of one hour's series when an hour is large, so the hour-partitioned write needs no second
    sort and writes about one file per hour, and a task's share stays bounded as the series grow.
    (Hashed by every column, each task wrote a file into every hour: twice the files and twice the
    time for 200,000 rows over 23 days; hashed by the hour alone, one task would take a whole
    hour of a million series.)
    """
    # Rows without Kafka coordinates (measurements already in processed_data, in a live cycle)
    # sort last: a new arrival wins a tie.
    latest_first = Window.partitionBy(PARTITION, m.DEVICE_ID, m.SIGNAL_NAME, m.T_MEASUREMENT).orderBy(
        F.col(m.T_REPORT).desc(),
        F.col("topic").desc_nulls_last(),
        F.col("partition").desc_nulls_last(),
        F.col("offset").desc_nulls_last(),
    )
    columns = [F.col(field.name).cast(field.dataType) for field in PROCESSED_SCHEMA.fields]
    return (
        with_hour(parsed.where(F.col("reason").isNull()))
        .repartitionByRange(PARTITION, m.DEVICE_ID, m.SIGNAL_NAME)
        .withColumn("_rank", F.row_number().over(latest_first))
        .where(F.col("_rank") == 1)
        .select(*columns, *([PARTITION] if with_partition else []))
    )


def parse_and_cache(raw: DataFrame, counts: Observation, clock: ClockLimits = DEFAULT_CLOCK) -> DataFrame:
    """Parse raw rows (``parse_measurements``), count raw/valid/quarantined into ``counts``, and cache.

    One parse feeds both outputs. The cache is also a barrier: a filter on the parsed columns would
    otherwise be pushed below the parse and evaluate from_json again for each field. It is kept on
    disk, not in the heap, so the heap does not grow with the input, and uncompressed (the session's
    ``SESSION_SETTINGS``). The caller unpersists.
    """
    parsed = parse_measurements(raw, clock).observe(
        counts,
        F.count(F.lit(1)).alias("raw"),
        F.count_if(F.col("reason").isNull()).alias("valid"),
        F.count_if(F.col("reason").isNotNull()).alias("quarantined"),
        F.count_if(F.col("reason").isin(*CLOCK_FAULT_REASONS)).alias("clock_faults"),
    )
    return parsed.persist(StorageLevel.DISK_ONLY)


def run(spark: SparkSession, paths: config.Paths, clock: ClockLimits = DEFAULT_CLOCK) -> Accounting:
    """Read consumer_data, write processed_data and quarantine_data, and account for every row.

    Args:
        clock: the clock-fault limits (``ClockLimits``).
    """
    with stage_lock(paths.processed_data, STAGE, log, spark):
        started = time.monotonic()
        raw = read_raw(spark, paths.consumer_data, log)
        parse_counts = Observation("parse")
        parsed = parse_and_cache(raw, parse_counts, clock)
        try:
            output_counts = Observation("output")
            processed = collapse_replays(parsed, with_partition=True).observe(
                output_counts, F.count(F.lit(1)).alias("processed")
            )
            replace_output(processed, paths.processed_data, log, partition_by=PARTITION)
            replace_output(select_quarantine(parsed), paths.quarantine_data, log)
        finally:
            parsed.unpersist()
        counts = parse_counts.get
        accounting = Accounting(
            raw=counts["raw"],
            processed=output_counts.get["processed"],
            quarantined=counts["quarantined"],
            duplicates=counts["valid"] - output_counts.get["processed"],
            clock_faults=counts["clock_faults"],
        )
        log.info(
            "raw rows %d = processed %d + quarantined %d (clock faults %d) + duplicates collapsed %d%s (%.1f s)",
            accounting.raw,
            accounting.processed,
            accounting.quarantined,
            accounting.clock_faults,
            accounting.duplicates,
            "" if accounting.balanced() else "  MISMATCH",
            time.monotonic() - started,
        )
        if not accounting.raw:
            log.warning("%s holds no raw rows: processed_data and quarantine_data are empty", paths.consumer_data)
        if accounting.quarantined:
            log.warning("%d raw rows quarantined in %s", accounting.quarantined, paths.quarantine_data)
        return accounting


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the processor's own options: the clock-fault limits."""
    group = parser.add_argument_group("clock faults")
    group.add_argument(
        "--max-ahead",
        default=config.env_default(ENV_MAX_AHEAD, f"{DEFAULT_MAX_AHEAD_SECONDS / 3600:g}h"),
        help="quarantine a measurement whose t_measurement is more than this ahead of its arrival at the broker "
        f"(Kafka's timestamp): a duration such as 90s, 15m, 6h or 2d [env {ENV_MAX_AHEAD}]",
    )
    group.add_argument(
        "--max-lateness",
        default=config.env_default(ENV_MAX_LATENESS, f"{DEFAULT_MAX_LATENESS_SECONDS / 86400:g}d"),
        help="quarantine a measurement whose t_measurement is more than this older than its arrival (the lateness "
        f"horizon; a backfill older than this is rejected) [env {ENV_MAX_LATENESS}]",
    )


def clock_from_args(args: argparse.Namespace) -> ClockLimits:
    """The clock-fault limits of parsed ``add_arguments`` options.

    Raises:
        ValueError: on a duration that does not parse or is not positive.
    """
    return ClockLimits(config.parse_duration(args.max_ahead), config.parse_duration(args.max_lateness))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, config.Paths, ClockLimits]:
    """Parse the command line into (args, paths, clock limits)."""
    parser = config.make_parser(__doc__)
    config.add_datastore_options(parser, ("consumer_data", "processed_data", "quarantine_data"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        clock = clock_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args, config.paths_from_args(args), clock


def main(argv: list[str] | None = None) -> int:
    """Run the processor from the command line; return the exit code."""
    args, paths, clock = parse_args(argv)

    def process() -> int:
        with stage_lock(paths.processed_data, STAGE, log):  # a second run is refused before Spark starts
            spark = build_session("meter-stream processor", verbose=args.verbose)
            return 0 if run(spark, paths, clock).balanced() else 1

    return exit_code_of(process, log)


if __name__ == "__main__":
    sys.exit(main())
