"""Stage 3, cleaner: put every expected series on a regular grid, holes filled and flagged.

Reads ``processed_data`` and replaces ``cleaned_data``: one row per series and slot, from the
series' first to its last slot. Slots are aligned to the wall clock (slot start =
floor(epoch / slot) * slot, UTC; 10 s by default). A slot with a measurement keeps it unchanged
(two in one slot: the earliest is kept); a slot without one is filled by the series' fill method
and flagged; a hole longer than ``--max-gap`` is left null and flagged ``missing``. Series outside
the expected catalog are left out, logged, and written to ``unknown_series`` for the checker.

Fill methods: linear (default), forward_fill, backward_fill, nearest, zero. Choose them per
signal name or per series with ``--fill``, or in a JSON ``--config`` file:
    {"fill": {"energy import": "linear", "device2/energy export": "forward_fill"},
     "expected_series": ["device1/energy import", ...] or "all",
     "slot_seconds": 10, "max_gap_seconds": 3600}

Usage:
    python exercises/cleaner.py --datastore DIR [--fill "device1/energy import=nearest"]
    spark-submit exercises/cleaner.py --datastore DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import Column, DataFrame, Observation, SparkSession, Window
from pyspark.sql import functions as F

from meter_stream import config
from meter_stream import message as m
from meter_stream.contracts import (
    BACKWARD_FILLED,
    CLEANED_SCHEMA,
    FORWARD_FILLED,
    INTERPOLATED,
    MEASURED,
    MISSING,
    NEAREST_FILLED,
    PARTITION,
    PROCESSED_SCHEMA,
    QUALITY,
    QUALITY_FLAGS,
    SERIES_KEYS,
    UNKNOWN_SERIES_SCHEMA,
    ZERO_FILLED,
    Transform,
    per_series,
    series_catalog,
    to_micros,
    utc_datetime,
    with_hour,
)
from meter_stream.locks import stage_lock
from meter_stream.session import build_session, local_frame
from meter_stream.storage import exit_code_of, read_output, replace_output

STAGE = "cleaner"
log = config.get_logger(STAGE)

LINEAR = "linear"
FORWARD_FILL = "forward_fill"
BACKWARD_FILL = "backward_fill"
NEAREST = "nearest"
ZERO = "zero"
FILL_METHODS = (LINEAR, FORWARD_FILL, BACKWARD_FILL, NEAREST, ZERO)

#: The quality flag of a slot filled by each method.
FILLED_FLAG = {
    LINEAR: INTERPOLATED,
    FORWARD_FILL: FORWARD_FILLED,
    BACKWARD_FILL: BACKWARD_FILLED,
    NEAREST: NEAREST_FILLED,
    ZERO: ZERO_FILLED,
}

DEFAULT_MAX_GAP_SECONDS = 3600
DEFAULT_FILL = {m.SIGNAL_IMPORT: LINEAR, m.SIGNAL_EXPORT: LINEAR}


@dataclass(frozen=True)
class CleanerConfig:
    """How the cleaner builds the grid.

    Attributes:
        fill: fill method by signal name or by series name (``device/signal``); the series wins.
        default_fill: the method for a series that ``fill`` does not name.
        expected_series: the catalog of (device_id, signal_name), or None to keep every series.
        slot_seconds: the grid's slot length.
        max_gap_seconds: the longest hole that is filled; longer ones are flagged missing.
    """

    fill: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FILL))
    default_fill: str = LINEAR
    expected_series: tuple[tuple[str, str], ...] | None = m.EXPECTED_SERIES
    slot_seconds: int = config.DEFAULT_SLOT_SECONDS
    max_gap_seconds: int = DEFAULT_MAX_GAP_SECONDS

    def __post_init__(self) -> None:
        for method in (self.default_fill, *self.fill.values()):
            if method not in FILL_METHODS:
                raise ValueError(f"unknown fill method {method!r}; allowed: {', '.join(FILL_METHODS)}")
        if self.slot_seconds <= 0 or self.max_gap_seconds < 0:
            raise ValueError("slot_seconds must be > 0 and max_gap_seconds >= 0")

    def method_for(self, device_id: str, signal_name: str) -> str:
        """Return the fill method of one series."""
        series = m.series_name(device_id, signal_name)
        return self.fill.get(series) or self.fill.get(signal_name) or self.default_fill


# --- transforms ----------------------------------------------------------------------------------


def split_catalog(processed: DataFrame, catalog: DataFrame | None) -> tuple[DataFrame, DataFrame]:
    """Split measurements into (expected, unknown-series summary).

    Args:
        processed: rows of ``PROCESSED_SCHEMA``.
        catalog: expected (device_id, signal_name) rows, or None to accept every series.

    Returns:
        The expected series' rows, and one ``UNKNOWN_SERIES_SCHEMA`` row per other series.
    """
    if catalog is None:
        return processed, local_frame(processed.sparkSession, [], UNKNOWN_SERIES_SCHEMA)
    catalog = F.broadcast(catalog.select(*SERIES_KEYS))
    expected = processed.join(catalog, on=SERIES_KEYS, how="left_semi")
    unknown = (
        processed.join(catalog, on=SERIES_KEYS, how="left_anti")
        .groupBy(*SERIES_KEYS)
        .agg(F.count(F.lit(1)).alias("rows"))
    )
    return expected, unknown


def slot_start(micros: Column, slot_micros: int) -> Column:
    """The start of the wall-clock slot that holds a time given in epoch microseconds (also microseconds)."""
    return micros - F.pmod(micros, F.lit(slot_micros))


def _fill_value(method: Column, previous: Column, following: Column, step: Column, steps: Column) -> Column:
    """The value of a slot ``step`` slots after a measurement and ``steps - step`` before the next."""
    return (
        F.when(method == LINEAR, previous + (following - previous) * step / steps)
        .when(method == FORWARD_FILL, previous)
        .when(method == BACKWARD_FILL, following)
        # Ties go to the earlier measurement.
        .when(method == NEAREST, F.when(step * 2 <= steps, previous).otherwise(following))
        .when(method == ZERO, F.lit(0.0))
    )


def align_to_grid(config_: CleanerConfig, flags: Observation | None = None) -> Transform:
    """Return a transform: measurements -> the cleaned grid (fill methods from ``config_``).

    One window per series ordered by slot (one shuffle): two measurements in one slot keep the
    earliest; each kept measurement spans the slots up to the next one, and the slots in between
    are generated with ``sequence`` and filled from the two measurements around them. ``flags``,
    when given, observes the counts of ``_slot_counts``.
    """
    slot_micros = to_micros(config_.slot_seconds)
    max_gap_slots = config_.max_gap_seconds // config_.slot_seconds

    def transform(measured: DataFrame) -> DataFrame:
        by_series = Window.partitionBy(m.DEVICE_ID, m.SIGNAL_NAME).orderBy("slot", m.T_MEASUREMENT, m.T_REPORT)
        slotted = measured.withColumn("slot", slot_start(F.unix_micros(m.T_MEASUREMENT), slot_micros))
        first_in_slot = (
            slotted.withColumn("previous_slot", F.lag("slot").over(by_series))
            .where(F.col("previous_slot").isNull() | (F.col("previous_slot") != F.col("slot")))
            .withColumn("next_slot", F.lead("slot").over(by_series))
            .withColumn("next_value", F.lead(m.VALUE).over(by_series))
        )
        steps = F.coalesce((F.col("next_slot") - F.col("slot")) / F.lit(slot_micros), F.lit(1)).cast("int")
        # The fill method is looked up after the shuffle: a column less to move.
        spans = first_in_slot.withColumn("steps", steps).transform(assign_fill_methods(config_))
        if flags is not None:
            spans = spans.observe(flags, *_slot_counts(slot_micros, max_gap_slots))
        # Most spans are a single measured slot: they share one constant array instead of a new one each.
        offsets = F.when(F.col("steps") > 1, F.sequence(F.lit(0), F.col("steps") - 1)).otherwise(F.array(F.lit(0)))
        spanned = spans.select("*", F.posexplode(offsets).alias("step", "_ignored"))
        return spanned.select(*_grid_columns(slot_micros, max_gap_slots))

    return transform


def _slot_counts(slot_micros: int, max_gap_slots: int) -> list[Column]:
    """Counts of the grid's slots by quality flag, its series and its newest slot (epoch micros).

    Computed on the spans (one row per kept measurement, before the slots between are generated),
    not on each generated slot (a fifth of the stage's time at 10 M: BENCHMARKS.md, "Settings").
    Sums are null when there are no rows.
    """
    holes = F.col("steps") - 1
    too_long = holes > max_gap_slots
    method = F.col("fill_method")
    return [
        F.count_if(F.col("previous_slot").isNull()).alias("series"),
        F.count(F.lit(1)).alias(MEASURED),
        *[
            F.sum(F.when(~too_long & (method == name), holes).otherwise(0)).alias(flag)
            for name, flag in FILLED_FLAG.items()
        ],
        F.sum(F.when(too_long, holes).otherwise(0)).alias(MISSING),
        F.max(F.col("slot") + holes * slot_micros).alias("newest"),
    ]


def slot_counts(flags: Observation) -> dict[str, Any]:
    """The observed ``_slot_counts``: rows per quality flag, ``series`` and ``newest`` (a datetime or None)."""
    observed = flags.get
    newest = observed["newest"]
    return {flag: observed[flag] or 0 for flag in QUALITY_FLAGS} | {
        "series": observed["series"],
        "newest": None if newest is None else utc_datetime(newest),
    }


def _grid_columns(slot_micros: int, max_gap_slots: int) -> list[Column]:
    """The cleaned_data columns of one generated slot (see ``align_to_grid``)."""
    step, steps = F.col("step"), F.col("steps")
    is_measured = step == 0
    hole_too_long = (steps - 1) > max_gap_slots
    filled = _fill_value(F.col("fill_method"), F.col(m.VALUE), F.col("next_value"), step, steps)
    flag = F.when(is_measured, MEASURED).when(hole_too_long, MISSING)
    for method, filled_flag in FILLED_FLAG.items():
        flag = flag.when(F.col("fill_method") == method, filled_flag)
    value = F.when(is_measured, F.col(m.VALUE)).when(~hole_too_long, filled)
    return [
        F.timestamp_micros(F.col("slot") + step * slot_micros).alias(m.T_MEASUREMENT),
        F.when(is_measured, F.col(m.T_REPORT)).alias(m.T_REPORT),
        F.col(m.DEVICE_ID),
        F.col(m.SIGNAL_NAME),
        value.cast("double").alias(m.VALUE),
        flag.alias(QUALITY),
    ]


def assign_fill_methods(config_: CleanerConfig) -> Transform:
    """Return a transform that adds each series' ``fill_method`` from the configuration.

    A series' own method wins over its signal name's, and that over the default (``per_series``).
    """

    def transform(measured: DataFrame) -> DataFrame:
        method = per_series(config_.fill, config_.default_fill)
        return measured.withColumn("fill_method", method)

    return transform


def clean(
    processed: DataFrame, config_: CleanerConfig, catalog: DataFrame | None, flags: Observation | None = None
) -> tuple[DataFrame, DataFrame]:
    """Return (cleaned_data, unknown series) for processed measurements; ``flags`` observes the grid's counts."""
    expected, unknown = split_catalog(processed, catalog)
    cleaned = expected.transform(align_to_grid(config_, flags))
    return cleaned.select(*[F.col(f.name).cast(f.dataType) for f in CLEANED_SCHEMA.fields]), unknown


# --- I/O -----------------------------------------------------------------------------------------


def catalog_frame(spark: SparkSession, config_: CleanerConfig) -> DataFrame | None:
    """The expected series as a small frame, or None when every series is kept."""
    return series_catalog(spark, config_.expected_series)


def run(spark: SparkSession, paths: config.Paths, config_: CleanerConfig) -> dict[str, int]:
    """Read processed_data, write cleaned_data and unknown_series; return counts by quality flag."""
    with stage_lock(paths.cleaned_data, STAGE, log, spark):
        started = time.monotonic()
        processed = read_output(spark, paths.processed_data, PROCESSED_SCHEMA, log, "processor")
        flags = Observation("flags")
        cleaned, unknown = clean(processed, config_, catalog_frame(spark, config_), flags)
        replace_output(with_hour(cleaned), paths.cleaned_data, log, partition_by=PARTITION)
        unknown_counts = Observation("unknown")
        replace_output(
            unknown.observe(unknown_counts, F.count(F.lit(1)).alias("series"), F.sum("rows").alias("rows")),
            paths.unknown_series,
            log,
        )
        observed = slot_counts(flags)
        counts = {flag: observed[flag] for flag in QUALITY_FLAGS}
        filled = sum(counts[flag] for flag in FILLED_FLAG.values())
        log.info(
            "%d series on a %d-s grid: %d slots, %d measured, %d filled, %d missing (%.1f s)",
            observed["series"],
            config_.slot_seconds,
            sum(counts.values()),
            counts[MEASURED],
            filled,
            counts[MISSING],
            time.monotonic() - started,
        )
        if not observed["series"]:
            log.warning("no expected series in %s: cleaned_data is empty", paths.processed_data)
        if unknown_counts.get["series"]:
            log.warning(
                "%d series outside the expected catalog left out (%d rows); see %s",
                unknown_counts.get["series"],
                unknown_counts.get["rows"],
                paths.unknown_series,
            )
            for row in spark.read.parquet(paths.unknown_series).orderBy(F.desc("rows")).take(20):
                log.warning("  unknown series %s: %d rows", m.series_name(row.device_id, row.signal_name), row.rows)
        return counts


def load_config(args: argparse.Namespace) -> CleanerConfig:
    """Build the cleaner's configuration: command line over ``--config`` file over defaults.

    Raises:
        ValueError: on an unknown fill method, a malformed ``--fill`` or series name.
        OSError: when the ``--config`` file cannot be read.
    """
    settings: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            settings = json.load(handle)
    fill = dict(DEFAULT_FILL)
    fill.update(settings.get("fill", {}))
    for item in args.fill or []:
        name, sep, method = item.partition("=")
        if not sep:
            raise ValueError(f"--fill {item!r} is not of the form NAME=METHOD")
        fill[name.strip()] = method.strip()
    expected = args.expected_series if args.expected_series is not None else settings.get("expected_series")
    return CleanerConfig(
        fill=fill,
        default_fill=args.default_fill or settings.get("default_fill", LINEAR),
        expected_series=config.parse_expected_series(expected, m.EXPECTED_SERIES),
        slot_seconds=int(args.slot_seconds or settings.get("slot_seconds", config.DEFAULT_SLOT_SECONDS)),
        max_gap_seconds=int(args.max_gap_seconds or settings.get("max_gap_seconds", DEFAULT_MAX_GAP_SECONDS)),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the cleaner's own options (the series options come from the shared module)."""
    group = parser.add_argument_group("fill")
    group.add_argument(
        "--config",
        default=config.env_default("METER_CLEANER_CONFIG", None),
        help="JSON file with fill, default_fill, expected_series, slot_seconds, max_gap_seconds "
        "[env METER_CLEANER_CONFIG]",
    )
    group.add_argument(
        "--fill",
        action="append",
        metavar="NAME=METHOD",
        help=f"fill method for a signal name or a device/signal series; repeatable; methods: {', '.join(FILL_METHODS)}",
    )
    group.add_argument("--default-fill", choices=FILL_METHODS, help="method for series no rule names (linear)")
    group.add_argument(
        "--max-gap-seconds",
        type=int,
        help=f"longest hole that is filled; longer ones are missing ({DEFAULT_MAX_GAP_SECONDS})",
    )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, config.Paths, CleanerConfig]:
    """Parse the command line into (args, paths, cleaner configuration)."""
    parser = config.make_parser(__doc__)
    config.add_datastore_options(parser, ("processed_data", "cleaned_data", "unknown_series"))
    config.add_series_options(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cleaner_config = load_config(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return args, config.paths_from_args(args), cleaner_config


def main(argv: list[str] | None = None) -> int:
    """Run the cleaner from the command line; return the exit code."""
    args, paths, cleaner_config = parse_args(argv)

    def clean_all() -> int:
        with stage_lock(paths.cleaned_data, STAGE, log):  # a second run is refused before Spark starts
            run(build_session("meter-stream cleaner", verbose=args.verbose), paths, cleaner_config)
        return 0

    return exit_code_of(clean_all, log)


if __name__ == "__main__":
    sys.exit(main())
