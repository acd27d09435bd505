"""One live cycle: the new raw rows through the processor's, the cleaner's and the checker's parts, then the commit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from meter_stream import check_figures, cleaner, config, processor
from meter_stream import message as m
from meter_stream.contracts import (
    CLEANED_SCHEMA,
    CLOCK_FAULT_REASONS,
    PARTITION,
    QUARANTINE_SCHEMA,
    RAW_SCHEMA,
    SERIES_KEYS_SCHEMA,
    epoch_seconds,
    hour_of,
    with_hour,
)
from meter_stream.live.checks import check_state, merge_state, update_figures, write_report, write_unknown
from meter_stream.live.compaction import Compactor
from meter_stream.live.late import merge_late, recompute_late
from meter_stream.live.store import (
    KEYS,
    REPLACES,
    SERIES_STATE,
    Cursor,
    Settings,
    SinkPosition,
    append_files,
    cleanup,
    commit_cursor,
    read_series_state,
    roll_files,
    write_state,
)
from meter_stream.session import cached_for_the_block, local_frame, one_row
from meter_stream.storage import path_exists

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
        counts, valid, processed = _processor_part(spark, paths, settings, files, state, cycle)
        marks.append(time.monotonic())
        grid = _clean(spark, paths, settings.cleaner, processed, state, cycle)
        histogram = latency_histogram(valid, time.time())
        marks.append(time.monotonic())
        new_figures, grid_updates = check_state(grid.rows, settings)
        newest = max(filter(None, [cursor.newest, grid.newest]), default=None)
        figures = update_figures(spark, paths, settings, cursor, new_figures, newest, cycle)
        marks.append(time.monotonic())
        clock_faults = {reason: cursor.clock_faults.get(reason, 0) + counts[reason] for reason in CLOCK_FAULT_REASONS}
        written = grid.rows.select(*CLEANED_SCHEMA.fieldNames())
        exit_code = write_report(spark, paths, settings.checker, figures, written, clock_faults)
        marks.append(time.monotonic())
        # Written, then read back for what else needs it: one pass, where a checkpoint and a write were two.
        write_state(
            merge_state(state, processed.updates, grid_updates, settings.checker.spike_window),
            paths,
            SERIES_STATE,
            cycle,
        )
        if counts["unknown"] or not path_exists(spark, paths.unknown_series):
            write_unknown(spark, paths, settings.cleaner, read_series_state(spark, paths, cycle))
        open_hours = _open_hours(cursor, processed, grid)
        open_hours = (compactor or Compactor(background=False)).step(spark, paths, open_hours, newest, cycle)
        committed = Cursor(cycle, positions, settings.fingerprint, newest, open_hours, clock_faults)
        commit_cursor(spark, paths, committed)
        cleanup(spark, paths, cycle)
        marks.append(time.monotonic())
    accounting = processor.Accounting(
        counts["raw"],
        processed.gained,
        counts["quarantined"],
        counts["valid"] - processed.gained,
        sum(counts[reason] for reason in CLOCK_FAULT_REASONS),
    )
    return committed, CycleResult(accounting, histogram, newest, exit_code, _part_seconds(marks))


def _processor_part(
    spark: SparkSession,
    paths: config.Paths,
    settings: Settings,
    files: list[str],
    state: DataFrame,
    cycle: int,
) -> tuple[dict[str, Any], DataFrame, Processed]:
    """Parse the new raw files (cached for the cycle), quarantine the rejected rows, add the valid ones.

    Returns:
        The counts (``_mark``), the valid rows, what processed_data gained.
    """
    raw = spark.read.schema(RAW_SCHEMA).parquet(*files)
    parsed = processor.parse_and_cache(raw, Observation(f"parse-{cycle}"), settings.clock)
    observed = Observation(f"counts-{cycle}")
    marked = _mark(parsed, state, cleaner.catalog_frame(spark, settings.cleaner), observed)
    counts = observed.get
    valid = parsed.where(F.col("reason").isNull()).drop("raw_value")
    processed = _process(spark, paths, marked.where(F.col("reason").isNull()), counts["late_hours"], cycle)
    if counts["quarantined"]:
        append_files(processor.select_quarantine(parsed), paths.quarantine_data, cycle, partitioned=False)
        roll_files(spark, paths.quarantine_data, QUARANTINE_SCHEMA, cycle)
    return counts, valid, processed


def _mark(parsed: DataFrame, state: DataFrame, catalog: DataFrame | None, counts: Observation) -> DataFrame:
    """The parsed rows marked ``_late`` (at or before their series' latest stored measurement) and ``_known``
    (in the catalog), checkpointed; its job parses, fills the parse's cache and counts.

    Counted into ``counts``: the raw, valid and quarantined rows, the hours of the late measurements
    (``late_hours``, a handful) and the valid rows of series outside the catalog (``unknown``). One job
    where they took three more queries (BENCHMARKS.md, "Settings").
    """
    marked = (
        parsed.drop("raw_value")
        .join(state.select(*KEYS, "max_t"), KEYS, "left")
        .withColumn("_late", F.coalesce(F.col(m.T_MEASUREMENT) <= F.col("max_t"), F.lit(False)))
        .drop("max_t")
    )
    if catalog is None:
        marked = marked.withColumn("_known", F.lit(True))
    else:
        known = F.broadcast(catalog.withColumn("_known", F.lit(True)))
        marked = marked.join(known, KEYS, "left").withColumn("_known", F.coalesce("_known", F.lit(False)))
    valid = F.col("reason").isNull()
    late_hour = F.when(valid & F.col("_late"), hour_of(F.col(m.T_MEASUREMENT)))
    return marked.observe(
        counts,
        F.count(F.lit(1)).alias("raw"),
        F.count_if(valid).alias("valid"),
        F.count_if(~valid).alias("quarantined"),
        *[F.count_if(F.col("reason") == reason).alias(reason) for reason in CLOCK_FAULT_REASONS],
        F.array_sort(F.collect_set(late_hour)).alias("late_hours"),
        F.count_if(valid & ~F.col("_known")).alias("unknown"),
    ).localCheckpoint()


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


def _process(
    spark: SparkSession, paths: config.Paths, marked: DataFrame, late_hours: list[int], cycle: int
) -> Processed:
    """Add the cycle's valid measurements to processed_data: appended, or merged into their hours when late.

    A measurement later than every stored one of its series cannot replace a stored row, so it is
    appended (replays within the cycle collapsed as in a batch run). A late one (at or before its
    series' latest) is collapsed with the stored rows of its hour, the hour rewritten; a tie in
    t_report goes to the new arrival, as the stored rows have no Kafka position.

    Args:
        marked: the valid rows, marked by ``_mark``.
        late_hours: the hours of the late ones.
    """
    fresh = processor.collapse_replays(marked.where(~F.col("_late")), with_partition=True)
    late = marked.where(F.col("_late")).drop("_late", "_known")
    # The rows a cycle adds are few; kept for the cleaner's part, which reads them again.
    appended = fresh.persist(StorageLevel.MEMORY_AND_DISK)
    appended_count = Observation(f"appended-{cycle}")
    to_append = appended.where(~F.col(PARTITION).isin(*late_hours)).observe(
        appended_count, F.count(F.lit(1)).alias("n")
    )
    appended_hours = append_files(to_append, paths.processed_data, cycle)
    gained = appended_count.get["n"]
    updates = appended.groupBy(*KEYS).agg(F.count(F.lit(1)).alias("rows"), F.max(m.T_MEASUREMENT).alias("max_t"))
    late_series = local_frame(spark, [], SERIES_KEYS_SCHEMA)
    if late_hours:
        updates = merge_late(spark, paths, late, appended, late_hours, updates, cycle)
        gained = one_row(updates.agg(F.sum("rows")))[0] or 0
        late_series = late.groupBy(*KEYS).agg(F.min(F.unix_micros(m.T_MEASUREMENT)).alias("since"))
    return Processed(appended, late_series, updates.persist(), appended_hours, late_hours, gained)


@dataclass
class Grid:
    """What the cleaner's part of a cycle wrote.

    Attributes:
        rows: the grid rows to check (cleaned columns, hour, the checker's carried columns from
            the state, ``REPLACES``): the new slots of growing series, and the whole rewritten
            hours of recomputed series.
        appended_hours: the hours appended to.
        newest: the newest slot of the rows (epoch micros), or None when there are none.
    """

    rows: DataFrame
    appended_hours: list[int]
    newest: int | None


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
    (``recompute_late``) and the hours that touches are rewritten.
    """
    catalog = cleaner.catalog_frame(spark, config_)
    appended, late = processed.appended.drop(PARTITION), processed.late
    if catalog is not None:
        appended = appended.join(F.broadcast(catalog), KEYS, "left_semi")
        late = late.join(F.broadcast(catalog), KEYS, "left_semi")
    if processed.late_hours:  # else (most cycles) every series only grew: no join, no empty frame to cache
        late = late.persist()
        appended = appended.join(late.select(*KEYS), KEYS, "left_anti")
    grown, newest = _grow(state, appended, config_)
    written = [*CLEANED_SCHEMA.fieldNames(), PARTITION]
    if not processed.late_hours or late.isEmpty():
        return Grid(grown, append_files(grown.select(*written), paths.cleaned_data, cycle), newest)
    recomputed, hours, newest_recomputed = recompute_late(spark, paths, config_, late, grown.select(*written), cycle)
    appended_hours = append_files(
        grown.where(~F.col(PARTITION).isin(*hours)).select(*written), paths.cleaned_data, cycle
    )
    late_rows = recomputed.join(late.select(*KEYS), KEYS, "left_semi").withColumn(REPLACES, F.lit(True))
    newest = max(filter(None, [newest, newest_recomputed]), default=None)
    return Grid(grown.unionByName(late_rows, allowMissingColumns=True), appended_hours, newest)


def _grow(state: DataFrame, growing: DataFrame, config_: cleaner.CleanerConfig) -> tuple[DataFrame, int | None]:
    """The new grid rows of series that only grew: from each one's last slot (the state's anchor) on.

    Returns:
        The new rows (cleaned columns, hour, ``REPLACES`` false) with what the checks carry over
        from the state, checkpointed; and their newest slot (epoch micros), counted by the checkpoint.
    """
    # A semi join keeps each state row once however many rows match it: no distinct (a shuffle) first.
    series = state.join(growing.select(*KEYS), KEYS, "left_semi").where(F.col("last_slot").isNotNull())
    anchors = series.select(
        F.timestamp_micros("last_slot").alias(m.T_MEASUREMENT),
        F.lit(None).cast("timestamp").alias(m.T_REPORT),
        *KEYS,
        F.col("last_value").alias(m.VALUE),
    )
    grown, _unknown = cleaner.clean(anchors.unionByName(growing), config_, None)
    carry = series.select(
        *KEYS,
        F.col("last_slot").alias(check_figures.CARRY_SLOT),
        F.col("last_value").alias(check_figures.CARRY_VALUE),
        F.col("tail").alias(check_figures.CARRY_TAIL),
        F.col("flat_run").alias(check_figures.FLAT_CARRY),
    )
    # The anchor's slot is written already: only the slots after it are new.
    carried_slot = F.col(check_figures.CARRY_SLOT)
    is_new = carried_slot.isNull() | (F.unix_micros(m.T_MEASUREMENT) > carried_slot)
    newest = Observation()
    rows = (
        with_hour(grown.join(carry, KEYS, "left").where(is_new))
        .withColumn(REPLACES, F.lit(False))
        .observe(newest, F.max(F.unix_micros(m.T_MEASUREMENT)).alias("slot"))
        .localCheckpoint()
    )
    return rows, newest.get["slot"]


def latency_histogram(measurements: DataFrame, done: float) -> dict[float, int]:
    """Seconds from each measurement's t_measurement to ``done``, counted in 0.1-s buckets."""
    seconds = F.lit(done) - epoch_seconds(F.col(m.T_MEASUREMENT))
    bucket = F.least(F.floor(seconds * 10) / 10, F.lit(LATENCY_CAP_SECONDS)).alias("bucket")
    # One row per bucket: a bounded summary, not the measurements.
    return {float(r.bucket): int(r["count"]) for r in measurements.groupBy(bucket).count().collect()}
