"""One live cycle: the new raw rows through the processor's, the cleaner's and the checker's parts, then the commit."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

import checker
import cleaner
import processor
from common import config
from common import message as m
from common.contracts import (
    CLEANED_SCHEMA,
    PARTITION,
    PROCESSED_SCHEMA,
    RAW_SCHEMA,
    with_hour,
)
from common.session import cached_for_the_block, one_row
from common.storage import (
    read_partitioned,
)
from live.checks import check_state, merge_state, update_figures, write_report, write_unknown
from live.compaction import Compactor
from live.store import (
    KEYS,
    REPLACES,
    SERIES_STATE,
    Cursor,
    Settings,
    SinkPosition,
    append_files,
    cleanup,
    commit_cursor,
    hour_of_micros,
    read_series_state,
    rewrite_hours,
    write_state,
)

log = config.get_logger("live")


#: Latencies are counted in 0.1-s buckets up to this; longer ones (a backlog) count as this.
LATENCY_CAP_SECONDS = 600.0


@dataclass
class CycleResult:
    """What one cycle did: the accounting of its raw rows, its new measurements' latencies, the report."""

    accounting: processor.Accounting
    latency_histogram: dict[float, int]
    newest: int | None
    exit_code: int | None
    seconds: dict[str, float]


def run_cycle(
    spark: SparkSession,
    paths: config.Paths,
    settings: Settings,
    cursor: Cursor,
    files: list[str],
    positions: dict[str, SinkPosition],
    compactor: Compactor | None = None,
) -> tuple[Cursor, CycleResult]:
    """Fold new raw files into every output and commit; return the new cursor and what the cycle did.

    Without a ``compactor``, a closed hour is compacted within the cycle.
    """
    cycle = cursor.cycle + 1
    marks = [time.monotonic()]
    # Everything a cycle caches is the cycle's own.
    with cached_for_the_block(spark):
        state = read_series_state(spark, paths, cursor.cycle).persist()
        parsed = processor.parse_and_cache(spark.read.schema(RAW_SCHEMA).parquet(*files), Observation(f"parse-{cycle}"))
        counts = _count(parsed)
        valid = parsed.where(F.col("reason").isNull()).drop("raw_value")
        processed = _process(spark, paths, valid, state, cycle)
        if counts["quarantined"]:
            append_files(processor.select_quarantine(parsed), paths.quarantine_data, cycle, partitioned=False)
        marks.append(time.monotonic())
        grid = _clean(spark, paths, settings.cleaner, processed, state, cycle)
        histogram = latency_histogram(valid, time.time())
        marks.append(time.monotonic())
        new_figures, grid_updates, newest_new = check_state(grid, settings)
        newest = max(filter(None, [cursor.newest, newest_new]), default=None)
        figures = update_figures(spark, paths, settings, cursor, new_figures, newest, cycle)
        marks.append(time.monotonic())
        exit_code = write_report(spark, paths, settings.checker, figures)
        marks.append(time.monotonic())
        # Written, then read back for what else needs it: one pass, where a checkpoint and a write were two.
        write_state(
            merge_state(state, processed.updates, grid_updates, settings.checker.spike_window),
            paths,
            SERIES_STATE,
            cycle,
        )
        write_unknown(spark, paths, settings.cleaner, read_series_state(spark, paths, cycle), processed.updates)
        open_hours = _open_hours(cursor, processed, grid)
        open_hours = (compactor or Compactor(background=False)).step(spark, paths, open_hours, newest, cycle)
        committed = Cursor(cycle, positions, settings.fingerprint, newest, open_hours)
        commit_cursor(spark, paths, committed)
        cleanup(spark, paths, cycle)
        marks.append(time.monotonic())
    accounting = processor.Accounting(
        counts["raw"], processed.gained, counts["quarantined"], counts["valid"] - processed.gained
    )
    return committed, CycleResult(accounting, histogram, newest, exit_code, _part_seconds(marks))


def _count(parsed: DataFrame) -> Row:
    """The cycle's raw, valid and quarantined rows; this job parses and fills the cache."""
    return one_row(
        parsed.agg(
            F.count(F.lit(1)).alias("raw"),
            F.count_if(F.col("reason").isNull()).alias("valid"),
            F.count_if(F.col("reason").isNotNull()).alias("quarantined"),
        )
    )


def _open_hours(cursor: Cursor, processed: Processed, grid: Grid) -> dict[str, list[int]]:
    """The hours of each output that cycles appended to and that are not compacted yet."""
    return {
        output: sorted(set(cursor.open_hours.get(output, [])) | set(hours))
        for output, hours in (("processed_data", processed.appended_hours), ("cleaned_data", grid.appended_hours))
    }


def _part_seconds(marks: list[float]) -> dict[str, float]:
    """The seconds of a cycle's parts from the times they ended (the first mark: the start)."""
    parts = ("processor", "cleaner", "checker", "report", "commit")
    return {f"{part}_s": later - earlier for part, earlier, later in zip(parts, marks[:-1], marks[1:], strict=True)}


@dataclass
class Processed:
    """What the processor's part of a cycle wrote.

    Attributes:
        appended: the new measurements appended (processed columns and hour), persisted.
        late: per series with late measurements, the earliest of them (``since``, epoch micros).
        updates: per series, the rows gained and the latest t_measurement.
        appended_hours: the hours appended to.
        late_hours: the hours rewritten for late measurements.
        gained: the rows processed_data gained.
    """

    appended: DataFrame
    late: DataFrame
    updates: DataFrame
    appended_hours: list[int]
    late_hours: list[int]
    gained: int


def _process(spark: SparkSession, paths: config.Paths, valid: DataFrame, state: DataFrame, cycle: int) -> Processed:
    """Add the cycle's valid measurements to processed_data: appended, or merged into their hours when late.

    A measurement later than every stored one of its series cannot replace a stored row, so it is
    appended (replays within the cycle collapsed as in a batch run). A late one (at or before its
    series' latest) is collapsed with the stored rows of its hour, the hour rewritten; a tie in
    t_report goes to the new arrival, as the stored rows have no Kafka position.
    """
    marked = (
        valid.join(state.select(*KEYS, "max_t"), KEYS, "left")
        .withColumn("_late", F.coalesce(F.col(m.T_MEASUREMENT) <= F.col("max_t"), F.lit(False)))
        .drop("max_t")
        .localCheckpoint()
    )
    fresh = processor.collapse_replays(marked.where(~F.col("_late")), with_partition=True)
    late = marked.where(F.col("_late"))
    # The hour names late rows fall in: a handful, not data.
    late_hours = sorted(r[0] for r in with_hour(late).select(PARTITION).distinct().collect())
    # The rows a cycle adds are few; kept for the cleaner's part, which reads them again.
    appended = fresh.persist(StorageLevel.MEMORY_AND_DISK)
    appended_count = Observation(f"appended-{cycle}")
    to_append = appended.where(~F.col(PARTITION).isin(*late_hours)).observe(
        appended_count, F.count(F.lit(1)).alias("n")
    )
    appended_hours = append_files(to_append, paths.processed_data, cycle)
    gained = appended_count.get["n"]
    updates = appended.groupBy(*KEYS).agg(F.count(F.lit(1)).alias("rows"), F.max(m.T_MEASUREMENT).alias("max_t"))
    late_series = spark.createDataFrame([], T.StructType([*[T.StructField(k, T.StringType()) for k in KEYS]]))
    if late_hours:
        updates = _merge_late(spark, paths, late, appended, late_hours, updates, cycle)
        gained = one_row(updates.agg(F.sum("rows")))[0] or 0
        late_series = late.groupBy(*KEYS).agg(F.min(_slot_micros(F.col(m.T_MEASUREMENT), 1)).alias("since"))
    return Processed(appended, late_series, updates.persist(), appended_hours, late_hours, gained)


def _merge_late(
    spark: SparkSession,
    paths: config.Paths,
    late: DataFrame,
    appended: DataFrame,
    late_hours: list[int],
    updates: DataFrame,
    cycle: int,
) -> DataFrame:
    """Rewrite the hours late measurements fall in, collapsed with their stored rows; return the updates.

    The cycle's fresh measurements in those hours go into the rewrite instead of being appended.
    The returned per-series updates (rows gained, latest t_measurement) count the rewrite in.
    """
    stored = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA, late_hours).drop(PARTITION)
    kafka = [F.lit(None).cast(RAW_SCHEMA[c].dataType).alias(c) for c in ("topic", "partition", "offset")]
    candidates = (
        stored.select("*", *kafka)
        .unionByName(appended.where(F.col(PARTITION).isin(*late_hours)).drop(PARTITION).select("*", *kafka))
        .withColumn("reason", F.lit(None).cast("string"))
        .unionByName(late.select(*PROCESSED_SCHEMA.fieldNames(), "topic", "partition", "offset", "reason"))
    )
    merged = processor.collapse_replays(candidates, with_partition=True).localCheckpoint()
    # Counted before the swap: afterwards the stored files are in the undo folder.
    delta = (
        merged.groupBy(*KEYS)
        .agg(F.count(F.lit(1)).alias("rows"))
        .join(stored.groupBy(*KEYS).agg(F.count(F.lit(1)).alias("old")), KEYS, "full")
        .select(*KEYS, (F.coalesce("rows", F.lit(0)) - F.coalesce("old", F.lit(0))).alias("rows"))
        .localCheckpoint()
    )
    rewrite_hours(merged, paths.processed_data, late_hours, cycle)
    late_max = late.groupBy(*KEYS).agg(F.max(m.T_MEASUREMENT).alias("max_t"))
    updates = (
        updates.join(appended.where(F.col(PARTITION).isin(*late_hours)).groupBy(*KEYS).count(), KEYS, "left")
        .select(*KEYS, (F.col("rows") - F.coalesce("count", F.lit(0))).alias("rows"), "max_t")
        .unionByName(delta.withColumn("max_t", F.lit(None).cast("timestamp")))
        .unionByName(late_max.withColumn("rows", F.lit(0).cast("long")))
        .groupBy(*KEYS)
        .agg(F.sum("rows").alias("rows"), F.max("max_t").alias("max_t"))
    )
    return updates


def _slot_micros(t_measurement: Column, slot_seconds: int) -> Column:
    """The start of the slot that holds a timestamp, as epoch microseconds."""
    micros = F.unix_micros(t_measurement)
    return micros - F.pmod(micros, F.lit(slot_seconds * 1_000_000))


@dataclass
class Grid:
    """What the cleaner's part of a cycle wrote.

    Attributes:
        rows: the grid rows to check (cleaned columns, hour, the checker's carried columns from
            the state, ``REPLACES``): the new slots of growing series, and the whole rewritten
            hours of recomputed series.
        appended_hours: the hours appended to.
    """

    rows: DataFrame
    appended_hours: list[int]


def _clean(
    spark: SparkSession,
    paths: config.Paths,
    config_: cleaner.CleanerConfig,
    processed: Processed,
    state: DataFrame,
    cycle: int,
) -> Grid:
    """Grow the grid of each series with appended measurements; recompute series with late ones.

    A growing series' grid goes on from its last slot (the state's ``last_slot`` and value, an
    anchor that is not written again) to its newest measurement, as a batch run would fill it.
    A series with a late measurement is recomputed from the measurement before the late one
    (``_recompute_late``) and the hours that touches are rewritten.
    """
    catalog = cleaner.catalog_frame(spark, config_)
    appended, late = processed.appended.drop(PARTITION), processed.late
    if catalog is not None:
        appended = appended.join(F.broadcast(catalog), KEYS, "left_semi")
        late = late.join(F.broadcast(catalog), KEYS, "left_semi")
    late = late.persist()
    growing = appended.join(late.select(*KEYS), KEYS, "left_anti")
    grown = _grow(state, growing, config_)
    written = [*CLEANED_SCHEMA.fieldNames(), PARTITION]
    if not processed.late_hours or late.isEmpty():
        return Grid(grown, append_files(grown.select(*written), paths.cleaned_data, cycle))
    recomputed, hours = _recompute_late(spark, paths, config_, late, grown.select(*written), cycle)
    appended_hours = append_files(
        grown.where(~F.col(PARTITION).isin(*hours)).select(*written), paths.cleaned_data, cycle
    )
    late_rows = recomputed.join(late.select(*KEYS), KEYS, "left_semi").withColumn(REPLACES, F.lit(True))
    return Grid(grown.unionByName(late_rows, allowMissingColumns=True), appended_hours)


def _grow(state: DataFrame, growing: DataFrame, config_: cleaner.CleanerConfig) -> DataFrame:
    """The new grid rows of series that only grew: from each one's last slot (the state's anchor) on.

    Returns:
        The new rows (cleaned columns, hour, ``REPLACES`` false) with what the checks carry over
        from the state, checkpointed.
    """
    series = state.join(growing.select(*KEYS).distinct(), KEYS, "left_semi").where(F.col("last_slot").isNotNull())
    anchors = series.select(
        F.timestamp_micros("last_slot").alias(m.T_MEASUREMENT),
        F.lit(None).cast("timestamp").alias(m.T_REPORT),
        *KEYS,
        F.col("last_value").alias(m.VALUE),
    )
    grown, _unknown = cleaner.clean(anchors.unionByName(growing), config_, None)
    carry = series.select(
        *KEYS,
        F.col("last_slot").alias(checker.CARRY_SLOT),
        F.col("last_value").alias(checker.CARRY_VALUE),
        F.col("tail").alias(checker.CARRY_TAIL),
        F.col("flat_run").alias(checker.FLAT_CARRY),
    )
    # The anchor's slot is written already: only the slots after it are new.
    is_new = F.col(checker.CARRY_SLOT).isNull() | (F.unix_micros(m.T_MEASUREMENT) > F.col(checker.CARRY_SLOT))
    return with_hour(grown.join(carry, KEYS, "left").where(is_new)).withColumn(REPLACES, F.lit(False)).localCheckpoint()


def _recompute_late(
    spark: SparkSession,
    paths: config.Paths,
    config_: cleaner.CleanerConfig,
    late: DataFrame,
    grown: DataFrame,
    cycle: int,
) -> tuple[DataFrame, list[int]]:
    """Recompute the grid of series with late measurements and rewrite the hours it touches.

    Each series is recomputed from its anchor (``_recompute_regions``) to its end. The rewritten
    hours keep the other series' rows and get the cycle's grown rows for them.

    Returns:
        The rewritten hours' rows (cleaned columns and hour), and the hours.
    """
    slot = _slot_micros(F.col(m.T_MEASUREMENT), config_.slot_seconds)
    processed = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA).withColumn("slot", slot)
    regions = _recompute_regions(processed, late, config_)
    start = one_row(regions.agg(F.min("start")))[0]
    changed = (
        processed.where(F.col(PARTITION) >= hour_of_micros(start))
        .join(regions, KEYS)
        .where(F.col("slot") >= F.col("start"))
        .select(*PROCESSED_SCHEMA.fieldNames())
    )
    recomputed = with_hour(cleaner.clean(changed, config_, None)[0]).persist()
    # The hour names the recomputed slots fall in: a handful, not data.
    hours = sorted(r[0] for r in recomputed.select(PARTITION).distinct().collect())
    kept = (
        read_partitioned(spark, paths.cleaned_data, CLEANED_SCHEMA, hours)
        .join(regions, KEYS, "left")
        .where(F.col("start").isNull() | (F.unix_micros(m.T_MEASUREMENT) < F.col("start")))
        .select(*CLEANED_SCHEMA.fieldNames(), PARTITION)
    )
    content = kept.unionByName(recomputed).unionByName(grown.where(F.col(PARTITION).isin(*hours))).localCheckpoint()
    rewrite_hours(content, paths.cleaned_data, hours, cycle)
    return content, hours


def _recompute_regions(processed: DataFrame, late: DataFrame, config_: cleaner.CleanerConfig) -> DataFrame:
    """Per series with late measurements, the slot its grid is recomputed from (``start``): its anchor.

    The anchor is the last measured slot before the series' earliest late one, looked for in the
    last ``max_gap + slot`` seconds first and only for a series without one there in all of
    ``processed`` (rows with their ``slot``); without any, the late slot itself.
    """
    lookback = (config_.max_gap_seconds + config_.slot_seconds) * 1_000_000
    # From the start of the slot of the earliest late measurement: its slot may change its value.
    slot_micros = config_.slot_seconds * 1_000_000
    late = late.withColumn("since", F.col("since") - F.pmod("since", F.lit(slot_micros)))
    # Scalars that bound the partitions read: one aggregate row.
    earliest = one_row(late.agg(F.min("since")))[0]
    anchors = (
        processed.where(F.col(PARTITION) >= hour_of_micros(earliest - lookback))
        .join(late, KEYS)
        .where((F.col("slot") < F.col("since")) & (F.col("slot") >= F.col("since") - lookback))
        .groupBy(*KEYS)
        .agg(F.max("slot").alias("anchor"))
    )
    regions = late.join(anchors, KEYS, "left")
    far = regions.where(F.col("anchor").isNull()).select(*KEYS, "since").persist()
    if not far.isEmpty():
        far_anchors = (
            processed.join(far, KEYS)
            .where(F.col("slot") < F.col("since"))
            .groupBy(*KEYS)
            .agg(F.max("slot").alias("far"))
        )
        regions = regions.join(far_anchors, KEYS, "left").withColumn("anchor", F.coalesce("anchor", "far"))
    return regions.select(*KEYS, F.coalesce("anchor", "since").alias("start")).persist()


def latency_histogram(measurements: DataFrame, done: float) -> dict[float, int]:
    """Seconds from each measurement's t_measurement to ``done``, counted in 0.1-s buckets."""
    seconds = F.lit(done) - F.unix_micros(m.T_MEASUREMENT) / 1_000_000
    bucket = F.least(F.floor(seconds * 10) / 10, F.lit(LATENCY_CAP_SECONDS)).alias("bucket")
    # One row per bucket: a bounded summary, not the measurements.
    return {float(r.bucket): int(r["count"]) for r in measurements.groupBy(bucket).count().collect()}
