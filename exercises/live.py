"""The live mode's protocol (``pipeline.py --watch``): cycles that cost what their new data costs.

Read top to bottom:

1. **Cursor.** consumer_data is a file-sink output; the files its log committed after the cursor
   are a cycle's input (``new_raw_files``).
2. **State** (``live_state/``, next to the outputs): ``cursor.json`` (the last committed cycle, the
   raw positions after it, the settings it ran with, the newest slot, the hours still open) and, per
   series, one row in ``series-<cycle>/``: its processed rows and latest t_measurement (the
   processor's), its last grid slot and value, the tail of grid values and the flat run the checks
   continue from (the cleaner's and the checker's). ``figures-<cycle>/`` holds the running check
   figures per series and hour. A cycle reads the state instead of searching the outputs.
3. **A cycle** (``run_cycle``): parse the new raw rows once; a measurement later than its series'
   latest is *appended* to processed_data, and the grid grows from the series' last slot (kept in
   the state) to its newest measurement; a measurement at or before the series' latest is *late*:
   the hours it falls in are rewritten (processed_data), and its series' grid is recomputed from the
   measurement before it (cleaned_data), as a batch run would. The checks run on the new grid rows
   with what their series ended with carried from the state, and the running figures of the report
   window are summed up.
4. **Files.** Appended files are named ``cycle-<N>-...`` inside their hour folder; a rewritten hour
   folder is swapped in by renames, the old one kept in ``<output>.undo-<N>`` until the cycle is
   committed. The commit is one atomic write of ``cursor.json``; on start, ``recover`` undoes what
   an uncommitted cycle left (its tagged files, its swapped hours), so a SIGKILL loses nothing and
   a reader never sees a (series, slot) twice.
5. **Compaction.** Hours that cycles appended to are compacted once they are closed (older than the
   newest slot's hour): one hour per cycle, a few files each.
6. **The runner** (``watch``): a full run when there is no usable state, then the consumer in a
   thread and a cycle whenever new raw files are committed.

Spark's own machinery, considered: its file-stream source could replace the cursor (it reads a
file sink's log too), but consumer_data has one folder per topic generation, each a file-sink output
of its own, and a cycle's input, state and outputs must commit together: one cursor over the logs,
committed with the state, does both. ``transformWithStateInPandas`` would keep the per-series state
with exactly-once checkpoints, but calls Python once per series and micro-batch (tens of thousands
of calls per cycle at fleet sizes) and does not cover the rewrite of hours for late data; the state
here is a small parquet table (one row per series) joined in Spark with native functions.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

import checker
import cleaner
import consumer
import processor
from common import config
from common import message as m
from common.contracts import (
    CLEANED_SCHEMA,
    PARTITION,
    PARTITION_FORMAT,
    PROCESSED_SCHEMA,
    QUARANTINE_SCHEMA,
    RAW_SCHEMA,
    UNKNOWN_SERIES_SCHEMA,
    hour_value,
    with_hour,
)
from common.raw_input import generation_folders, sink_log_entries
from common.storage import (
    SINK_LOG,
    delete_path,
    list_files,
    make_folder,
    parquet_writer,
    path_exists,
    read_partitioned,
    read_text,
    rename_path,
    replace_output,
    stage_lock,
    write_text,
)

log = config.get_logger("live")

KEYS = [m.DEVICE_ID, m.SIGNAL_NAME]
CURSOR_FILE = "cursor.json"
SERIES_STATE = "series"
FIGURES = "figures"
CYCLE_TAG = "cycle-"
UNDO_SUFFIX = ".undo-"
STAGING_SUFFIX = ".staging-"
#: Marks the grid rows of a recomputed series: their figures replace the old ones of their hours.
REPLACES = "_replaces"
#: Written into the cursor: state written by another layout or other settings needs a full run.
LAYOUT = f"live-2 {PARTITION}={PARTITION_FORMAT}"
#: A closed hour is compacted into this many files per core.
COMPACT_FILES_PER_CORE = 1
#: Latencies are counted in 0.1-s buckets up to this; longer ones (a backlog) count as this.
LATENCY_CAP_SECONDS = 600.0
#: In reports: the live runner's recent cycles with their latency histograms.
LIVE_CYCLES = "live_cycles.json"
KEPT_CYCLES = 2000

#: The running check figures: one row per series and hour (``checker.series_figures``).
FIGURES_SCHEMA = T.StructType(
    [
        *[T.StructField(key, T.StringType()) for key in KEYS],
        T.StructField(PARTITION, T.LongType()),
        *[T.StructField(name, T.LongType()) for name in checker.SUMMED_FIGURES],
        *[
            T.StructField(name, T.DoubleType() if name == "report_delay_seconds" else T.LongType())
            for name in checker.LARGEST_FIGURES
        ],
    ]
)

#: One row per series: what a cycle needs to know of it (see the module docstring).
SERIES_STATE_SCHEMA = T.StructType(
    [
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField("rows", T.LongType()),
        T.StructField("max_t", T.TimestampType()),
        T.StructField("last_slot", T.LongType()),
        T.StructField("last_value", T.DoubleType()),
        T.StructField("flat_run", T.LongType()),
        T.StructField("tail", T.ArrayType(T.DoubleType())),
    ]
)


# --- 1. cursor ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SinkPosition:
    """How far a reader has read a file-sink output: its latest log batch and file time (ms)."""

    batch: int = -1
    modified_ms: int = -1


def new_sink_files(spark: SparkSession, folder: str, since: SinkPosition) -> tuple[list[str], SinkPosition]:
    """Return the files a file-sink output committed after ``since``, and the position after them.

    Batch log files above ``since.batch`` hold only new files. A compact log file (every tenth
    batch) repeats the older ones too; of those, the files modified after ``since.modified_ms`` are
    new: the sink commits batches one after another, so a later batch's files are written after
    every file of the batches before it.
    """
    files: set[str] = set()
    batch, modified = since.batch, since.modified_ms
    for log_file in list_files(spark, f"{folder.rstrip('/')}/{SINK_LOG}/*"):
        match = re.fullmatch(r"(\d+)(\.compact)?", log_file.rsplit("/", 1)[-1])
        if not match or int(match.group(1)) <= since.batch:
            continue
        batch = max(batch, int(match.group(1)))
        for entry in sink_log_entries(spark, log_file):
            if match.group(2) and entry["modificationTime"] <= since.modified_ms:
                continue
            files.add(entry["path"])
            modified = max(modified, int(entry["modificationTime"]))
    return sorted(files), SinkPosition(batch, modified)


def new_raw_files(
    spark: SparkSession, paths: config.Paths, since: dict[str, SinkPosition]
) -> tuple[list[str], dict[str, SinkPosition]]:
    """Return (new raw files, positions after them) over every generation of consumer_data."""
    files, positions = [], {}
    for folder in generation_folders(spark, paths.consumer_data):
        key = "." if folder == paths.consumer_data else folder.rsplit("/", 1)[-1]
        new, positions[key] = new_sink_files(spark, folder, since.get(key, SinkPosition()))
        files += new
    return files, positions


# --- 2. state -------------------------------------------------------------------------------------


@dataclass
class Cursor:
    """The committed state of the live mode (``live_state/cursor.json``).

    Attributes:
        cycle: the last committed cycle (0: the full run).
        positions: consumer_data's positions after that cycle, per generation folder.
        settings: the layout and the cleaner's and checker's settings the state was made with.
        newest: the newest slot in cleaned_data (epoch microseconds), or None.
        open_hours: per output, the hours cycles appended to that are not compacted yet.
    """

    cycle: int
    positions: dict[str, SinkPosition]
    settings: str
    newest: int | None = None
    open_hours: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> str:
        fields = asdict(self)
        fields["positions"] = {key: asdict(position) for key, position in self.positions.items()}
        return json.dumps(fields, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Cursor:
        fields = json.loads(text)
        fields["positions"] = {key: SinkPosition(**value) for key, value in fields["positions"].items()}
        return cls(**fields)


def read_cursor(spark: SparkSession, paths: config.Paths) -> Cursor | None:
    """The committed cursor, or None when there is none."""
    text = read_text(spark, config.join_path(paths.live_state, CURSOR_FILE))
    return Cursor.from_json(text) if text else None


def commit_cursor(spark: SparkSession, paths: config.Paths, cursor: Cursor) -> None:
    """Commit a cycle: one atomic write (a rename) of ``cursor.json``."""
    write_text(spark, config.join_path(paths.live_state, CURSOR_FILE), cursor.to_json())


def state_folder(paths: config.Paths, kind: str, cycle: int) -> str:
    return config.join_path(paths.live_state, f"{kind}-{cycle}")


def read_series_state(spark: SparkSession, paths: config.Paths, cycle: int) -> DataFrame:
    return spark.read.schema(SERIES_STATE_SCHEMA).parquet(state_folder(paths, SERIES_STATE, cycle))


def read_figures(spark: SparkSession, paths: config.Paths, cycle: int) -> DataFrame:
    return spark.read.schema(FIGURES_SCHEMA).parquet(state_folder(paths, FIGURES, cycle))


def _conform(frame: DataFrame, schema: T.StructType) -> DataFrame:
    return frame.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields])


def write_state(frame: DataFrame, paths: config.Paths, kind: str, cycle: int) -> None:
    """Write one of a cycle's state tables (a folder of its own, named by the cycle; a file per task)."""
    frame.write.mode("overwrite").parquet(state_folder(paths, kind, cycle))


# --- 4. files ------------------------------------------------------------------------------------


def _hour_of_file(path: str) -> int | None:
    match = re.search(rf"/{PARTITION}=(\d+)/[^/]+$", path)
    return int(match.group(1)) if match else None


def append_files(frame: DataFrame, output: str, cycle: int, partitioned: bool = True) -> list[int]:
    """Add ``frame``'s rows to ``output`` as new files named for the cycle; return the hours written.

    The files are written to a staging folder first and then renamed into place one by one, so a
    reader sees only whole files. Each is one task's rows of one hour: no folder is rewritten.
    """
    spark = frame.sparkSession
    staging = f"{output}{STAGING_SUFFIX}{cycle}"
    delete_path(spark, staging)
    writer = parquet_writer(frame).mode("overwrite")
    (writer.partitionBy(PARTITION) if partitioned else writer).parquet(staging)
    hours = set()
    for file in list_files(spark, f"{staging}/{PARTITION}=*/*.parquet" if partitioned else f"{staging}/*.parquet"):
        hour = _hour_of_file(file)
        folder = f"{output}/{PARTITION}={hour}" if partitioned else output
        make_folder(spark, folder)
        rename_path(spark, file, f"{folder}/{CYCLE_TAG}{cycle:08d}-{file.rsplit('/', 1)[-1]}")
        if hour is not None:
            hours.add(hour)
    delete_path(spark, staging)
    return sorted(hours)


def rewrite_hours(frame: DataFrame, output: str, hours: list[int], cycle: int) -> None:
    """Replace the ``hours`` folders of ``output`` with ``frame``'s rows (which have the hour column).

    The new folders are written to staging first and then swapped in (``swap_hours``).
    """
    staging = f"{output}{STAGING_SUFFIX}{cycle}"
    delete_path(frame.sparkSession, staging)
    parquet_writer(frame).mode("overwrite").partitionBy(PARTITION).parquet(staging)
    swap_hours(frame.sparkSession, output, staging, hours, cycle)


def swap_hours(spark: SparkSession, output: str, staging: str, hours: list[int], cycle: int) -> None:
    """Swap the ``hours`` folders of ``staging`` into ``output``, then delete ``staging``.

    Each old folder is renamed into ``OUTPUT.undo-N`` and the new one into place, so a reader sees
    one or the other, never both. The undo copies are deleted once the cycle is committed, or
    restored by ``recover``.
    """
    undo = f"{output}{UNDO_SUFFIX}{cycle}"
    make_folder(spark, undo)
    make_folder(spark, output)
    for hour in hours:
        name = f"{PARTITION}={hour}"
        if path_exists(spark, f"{output}/{name}") and not path_exists(spark, f"{undo}/{name}"):
            rename_path(spark, f"{output}/{name}", f"{undo}/{name}")
        delete_path(spark, f"{output}/{name}")
        if path_exists(spark, f"{staging}/{name}"):
            rename_path(spark, f"{staging}/{name}", f"{output}/{name}")
    delete_path(spark, staging)


def _cycle_of(name: str, suffix: str) -> int | None:
    match = re.search(rf"{re.escape(suffix)}(\d+)$", name)
    return int(match.group(1)) if match else None


def recover(spark: SparkSession, paths: config.Paths, cursor: Cursor) -> None:
    """Undo what cycles after the committed one left, and remove what the committed one no longer needs.

    Swapped hours come back from their undo copies, files named for a later cycle are deleted, and
    staging folders and older state tables go.
    """
    outputs = (paths.processed_data, paths.cleaned_data, paths.quarantine_data)
    for output in outputs:
        parent, name = output.rstrip("/").rsplit("/", 1)
        for folder in list_files(spark, f"{parent}/{name}{UNDO_SUFFIX}*", folders=True):
            cycle = _cycle_of(folder, UNDO_SUFFIX)
            if cycle is not None and cycle > cursor.cycle:
                for hour_folder in list_files(spark, f"{folder}/{PARTITION}=*", folders=True):
                    target = f"{output}/{hour_folder.rsplit('/', 1)[-1]}"
                    log.warning("restoring %s as it was before the interrupted cycle %d", target, cycle)
                    delete_path(spark, target)
                    rename_path(spark, hour_folder, target)
            delete_path(spark, folder)
        for folder in list_files(spark, f"{parent}/{name}{STAGING_SUFFIX}*", folders=True):
            delete_path(spark, folder)
        for pattern in (f"{output}/{PARTITION}=*/{CYCLE_TAG}*", f"{output}/{CYCLE_TAG}*"):
            for file in list_files(spark, pattern):
                cycle = int(file.rsplit("/", 1)[-1][len(CYCLE_TAG) :].split("-", 1)[0])
                if cycle > cursor.cycle:
                    log.warning("removing %s, written by the interrupted cycle %d", file, cycle)
                    delete_path(spark, file)
    keep = {state_folder(paths, kind, cursor.cycle).rsplit("/", 1)[-1] for kind in (SERIES_STATE, FIGURES)}
    for folder in list_files(spark, config.join_path(paths.live_state, "*-*"), folders=True):
        if folder.rsplit("/", 1)[-1] not in keep:
            delete_path(spark, folder)


def cleanup(spark: SparkSession, paths: config.Paths, committed: int) -> None:
    """After a commit: the undo copies of that cycle and the state tables before it are not needed."""
    for output in (paths.processed_data, paths.cleaned_data, paths.quarantine_data):
        delete_path(spark, f"{output}{UNDO_SUFFIX}{committed}")
    for kind in (SERIES_STATE, FIGURES):
        delete_path(spark, state_folder(paths, kind, committed - 1))


# --- 3. a cycle ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a cycle needs besides its input: the cleaner's and the checker's configurations."""

    cleaner: cleaner.CleanerConfig
    checker: checker.CheckerConfig
    report_window_seconds: float

    @property
    def fingerprint(self) -> str:
        return f"{LAYOUT} {self.cleaner!r} {self.checker!r}"


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
    state = read_series_state(spark, paths, cursor.cycle).persist()
    parsed = processor.parse_and_cache(spark.read.schema(RAW_SCHEMA).parquet(*files), Observation(f"parse-{cycle}"))
    try:
        # This job parses and fills the cache.
        counts = parsed.agg(
            F.count(F.lit(1)).alias("raw"),
            F.count_if(F.col("reason").isNull()).alias("valid"),
            F.count_if(F.col("reason").isNotNull()).alias("quarantined"),
        ).first()
        valid = parsed.where(F.col("reason").isNull()).drop("raw_value")
        processed = _process(spark, paths, valid, state, cycle)
        if counts["quarantined"]:
            append_files(processor.select_quarantine(parsed), paths.quarantine_data, cycle, partitioned=False)
        marks.append(time.monotonic())
        grid = _clean(spark, paths, settings.cleaner, processed, state, cycle)
        histogram = latency_histogram(valid, time.time())
        marks.append(time.monotonic())
        new_figures, grid_updates, newest_new = _check_state(grid, settings)
        newest = max(filter(None, [cursor.newest, newest_new]), default=None)
        figures = _update_figures(spark, paths, settings, cursor, new_figures, newest, cycle)
        exit_code = _report(spark, paths, settings.checker, figures)
        marks.append(time.monotonic())
        # Written, then read back for what else needs it: one pass, where a checkpoint and a write were two.
        write_state(
            _merge_state(state, processed.updates, grid_updates, settings.checker.spike_window),
            paths,
            SERIES_STATE,
            cycle,
        )
        new_state = read_series_state(spark, paths, cycle)
        _write_unknown(spark, paths, settings.cleaner, new_state, processed.updates)
        open_hours = {
            output: sorted(set(cursor.open_hours.get(output, [])) | set(hours))
            for output, hours in (("processed_data", processed.appended_hours), ("cleaned_data", grid.appended_hours))
        }
        open_hours = (compactor or Compactor(background=False)).step(spark, paths, open_hours, newest, cycle)
        committed = Cursor(cycle, positions, settings.fingerprint, newest, open_hours)
        commit_cursor(spark, paths, committed)
        cleanup(spark, paths, cycle)
        marks.append(time.monotonic())
    finally:
        # Everything a cycle cached is the cycle's own.
        spark.catalog.clearCache()
    seconds = {
        f"{part}_s": later - earlier
        for part, earlier, later in zip(
            ("processor", "cleaner", "checker", "commit"), marks[:-1], marks[1:], strict=True
        )
    }
    accounting = processor.Accounting(
        counts["raw"], processed.gained, counts["quarantined"], counts["valid"] - processed.gained
    )
    return committed, CycleResult(accounting, histogram, newest, exit_code, seconds)


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
        gained = updates.agg(F.sum("rows")).first()[0] or 0
        late_series = late.groupBy(*KEYS).agg(F.min(_slot_micros(F.col(m.T_MEASUREMENT), 1)).alias("since"))
    return Processed(appended, late_series, updates.persist(), appended_hours, late_hours, gained)


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
    grown = (
        with_hour(grown.join(carry, KEYS, "left").where(is_new)).withColumn(REPLACES, F.lit(False)).localCheckpoint()
    )
    written = [*CLEANED_SCHEMA.fieldNames(), PARTITION]
    if not processed.late_hours or late.isEmpty():
        return Grid(grown, append_files(grown.select(*written), paths.cleaned_data, cycle))
    recomputed, hours = _recompute_late(spark, paths, config_, late, grown.select(*written), cycle)
    appended_hours = append_files(
        grown.where(~F.col(PARTITION).isin(*hours)).select(*written), paths.cleaned_data, cycle
    )
    late_rows = recomputed.join(late.select(*KEYS), KEYS, "left_semi").withColumn(REPLACES, F.lit(True))
    return Grid(grown.unionByName(late_rows, allowMissingColumns=True), appended_hours)


def _recompute_late(
    spark: SparkSession,
    paths: config.Paths,
    config_: cleaner.CleanerConfig,
    late: DataFrame,
    grown: DataFrame,
    cycle: int,
) -> tuple[DataFrame, list[int]]:
    """Recompute the grid of series with late measurements and rewrite the hours it touches.

    Each series is recomputed from the last measured slot before its earliest late one (its anchor)
    to its end: the anchor is looked for in the last ``max_gap + slot`` seconds of processed_data
    first, and only for a series without one there in all of it. The rewritten hours keep the
    other series' rows and get the cycle's grown rows for them.

    Returns:
        The rewritten hours' rows (cleaned columns and hour), and the hours.
    """
    slot = _slot_micros(F.col(m.T_MEASUREMENT), config_.slot_seconds)
    processed = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA).withColumn("slot", slot)
    lookback = (config_.max_gap_seconds + config_.slot_seconds) * 1_000_000
    # From the start of the slot of the earliest late measurement: its slot may change its value.
    slot_micros = config_.slot_seconds * 1_000_000
    late = late.withColumn("since", F.col("since") - F.pmod("since", F.lit(slot_micros)))
    # Scalars that bound the partitions read: one aggregate row.
    earliest = late.agg(F.min("since")).first()[0]
    anchors = (
        processed.where(F.col(PARTITION) >= _hour_of_micros(earliest - lookback))
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
    regions = regions.select(*KEYS, F.coalesce("anchor", "since").alias("start")).persist()
    start = regions.agg(F.min("start")).first()[0]
    changed = (
        processed.where(F.col(PARTITION) >= _hour_of_micros(start))
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


def _hour_of_micros(micros: int) -> int:
    return hour_value(datetime.fromtimestamp(micros / 1_000_000, UTC))


def _check_state(grid: Grid, settings: Settings) -> tuple[DataFrame, DataFrame, int | None]:
    """Annotate the cycle's grid rows for the checks; return (figures per series and hour, state updates, newest).

    The state updates are, per series with new rows: its last slot and value, the flat run it ends
    with and the tail of its last ``spike_window`` values, from which the next cycle's checks go on.
    One aggregation per (series, hour) gives the figures and each hour's last slot, value, flat run
    and values; the updates come from those few rows per series. (With the annotated rows persisted
    for two aggregations and the tail carried through them: 9.5-11 s at 100,000 series × 2 slots on
    2 cores; so: 4.3-4.6 s.)
    """
    config_ = settings.checker
    window = config_.spike_window
    slot = F.unix_micros(m.T_MEASUREMENT)
    # The values in slot order, nulls included (a struct is never null); the last `window` of them.
    values = F.array_sort(F.collect_list(F.struct(slot.alias("slot"), F.col(m.VALUE).alias("value"))))
    hourly = (
        grid.rows.transform(checker.annotate_rows(config_))
        .transform(
            checker.series_figures(
                config_,
                PARTITION,
                REPLACES,
                extra=[
                    F.max(slot).alias("_last_slot"),
                    F.max_by(m.VALUE, slot).alias("_last_value"),
                    F.max_by("_flat_run", slot).cast("long").alias("_last_flat_run"),
                    _last(values, window).alias("_values"),
                ],
            )
        )
        .persist()
    )
    figures = hourly.drop("_last_slot", "_last_value", "_last_flat_run", "_values")
    hours = F.array_sort(F.collect_list(F.struct(F.col("_last_slot"), F.col("_values"))))
    # Read once, by the state's merge: not persisted.
    updates = hourly.groupBy(*KEYS).agg(
        F.max("_last_slot").alias("last_slot"),
        F.max_by("_last_value", "_last_slot").alias("last_value"),
        F.max_by("_last_flat_run", "_last_slot").alias("flat_run"),
        _last(F.transform(F.flatten(F.transform(hours, lambda x: x["_values"])), lambda x: x["value"]), window).alias(
            "new_values"
        ),
        F.max(REPLACES).alias(REPLACES),
    )
    newest = hourly.agg(F.max("_last_slot")).first()[0]
    return figures, updates, newest


def _last(items: Column, count: int) -> Column:
    """The last ``count`` elements of an array (all of a shorter one)."""
    return F.slice(items, F.greatest(F.size(items) - count + 1, F.lit(1)), count)


def _update_figures(
    spark: SparkSession,
    paths: config.Paths,
    settings: Settings,
    cursor: Cursor,
    new: DataFrame,
    newest: int | None,
    cycle: int,
) -> DataFrame:
    """Write, and return, the running check figures per series and hour of the report window after this cycle.

    New rows' figures add to their (series, hour); a recomputed series' figures replace its old
    ones for the hours it was recomputed in (they cover those hours whole).
    """
    old = read_figures(spark, paths, cursor.cycle)
    replaced = new.where(F.col(REPLACES)).select(*KEYS, PARTITION)
    old = old.join(replaced, [*KEYS, PARTITION], "left_anti")
    newest = max(filter(None, [cursor.newest, newest]), default=None)
    merged = old.unionByName(new.drop(REPLACES))
    figures = merged.groupBy(*KEYS, PARTITION).agg(
        *[F.sum(name).alias(name) for name in checker.SUMMED_FIGURES],
        *[F.max(name).alias(name) for name in checker.LARGEST_FIGURES],
    )
    if newest is not None:
        since = _hour_of_micros(newest - int(settings.report_window_seconds * 1_000_000))
        figures = figures.where(F.col(PARTITION) >= since)
    write_state(_conform(figures, FIGURES_SCHEMA), paths, FIGURES, cycle)
    return read_figures(spark, paths, cycle)


def _merge_state(state: DataFrame, processed: DataFrame, grid: DataFrame, window: int) -> DataFrame:
    """The per-series state after a cycle: the old rows with the processor's and the cleaner's updates.

    A grown series' tail is its old tail and the new values, the last ``window`` of them; a
    recomputed one's is its new values.
    """
    old = state.select(*KEYS, *[F.col(c).alias(f"old_{c}") for c in SERIES_STATE_SCHEMA.fieldNames()[2:]])
    gained = processed.select(*KEYS, F.col("rows").alias("new_rows"), F.col("max_t").alias("new_max_t"))
    grown = grid.select(*KEYS, F.lit(True).alias("_grown"), *[F.col(c).alias(f"new_{c}") for c in grid.columns[2:]])
    merged = old.join(gained, KEYS, "full").join(grown, KEYS, "full")
    none = F.array().cast("array<double>")
    carried = F.when(F.col(f"new_{REPLACES}"), none).otherwise(F.coalesce("old_tail", none))
    new = {
        "last_slot": F.col("new_last_slot"),
        "last_value": F.col("new_last_value"),
        "flat_run": F.col("new_flat_run"),
        "tail": _last(F.concat(carried, "new_new_values"), window),
    }
    return merged.select(
        *KEYS,
        (F.coalesce("old_rows", F.lit(0)) + F.coalesce("new_rows", F.lit(0))).alias("rows"),
        F.greatest("old_max_t", "new_max_t").alias("max_t"),
        *[F.when(F.col("_grown"), column).otherwise(F.col(f"old_{name}")).alias(name) for name, column in new.items()],
    )


def _write_unknown(
    spark: SparkSession,
    paths: config.Paths,
    config_: cleaner.CleanerConfig,
    state: DataFrame,
    touched: DataFrame | None = None,
) -> None:
    """Write unknown_series from the state: always, or with ``touched``, when it has a series outside the catalog."""
    catalog = cleaner.catalog_frame(spark, config_)
    if catalog is None:
        if not path_exists(spark, paths.unknown_series):
            replace_output(spark.createDataFrame([], UNKNOWN_SERIES_SCHEMA), paths.unknown_series, log)
        return
    exists = path_exists(spark, paths.unknown_series)
    if touched is not None and exists and touched.join(F.broadcast(catalog), KEYS, "left_anti").isEmpty():
        return
    unknown = state.join(F.broadcast(catalog), KEYS, "left_anti").where(F.col("rows") > 0).select(*KEYS, "rows")
    replace_output(unknown, paths.unknown_series, log)


def _report(spark: SparkSession, paths: config.Paths, config_: checker.CheckerConfig, figures: DataFrame) -> int:
    """Check the running figures of the report window, write the report; return the checker's exit code."""
    with stage_lock(paths.reports, checker.STAGE, checker.log):
        started = time.monotonic()
        schema = checker.Result("schema", checker.ERROR, True, "as declared", "cleaned_data contract")
        metrics = checker.summarize_figures(figures)
        results, _listed = checker.evaluate(metrics, checker.read_unknown(spark, paths), config_, [schema])
        checker.log_outcome(results, checker.write_report(spark, paths, results), started)
        return checker.exit_code(results)


# --- 5. compaction --------------------------------------------------------------------------------


@dataclass
class _Compaction:
    """One closed hour being compacted: the files it had when it started, and where they are merged to."""

    output: str
    hour: int
    files: list[str]
    staging: str
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class Compactor:
    """Compacts the closed hours that cycles appended to, one at a time, in the background or at once.

    A compaction reads the files of the oldest closed hour (of either output) as they are when it
    starts and writes them, merged into one file per core, to a staging folder. A later cycle's
    commit swaps that folder in, undo-protected like any rewritten hour, if the hour still has
    exactly those files; otherwise (a late measurement rewrote the hour meanwhile) the merged copy
    is dropped and the hour compacted again later. An hour is closed once the newest slot is in a
    later hour.

    In the background (the runner), the merge runs in a thread of the session while cycles go on:
    an hour of 100,000 series (36 M grid rows) took 20-45 s to merge here, which held a cycle up
    that long when it ran inside the cycle. At once (``background=False``), the cycle that starts a
    compaction waits for it and swaps it in itself.
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self.running: _Compaction | None = None

    def step(
        self, spark: SparkSession, paths: config.Paths, open_hours: dict[str, list[int]], newest: int | None, cycle: int
    ) -> dict[str, list[int]]:
        """In a cycle's commit: swap in a finished compaction, start the next one; return the hours still open."""
        open_hours = self._finish(spark, paths, open_hours, cycle)
        if self.running is None and newest is not None:
            self.running = self._start(spark, paths, open_hours, _hour_of_micros(newest))
            if self.running is not None and not self.background:
                self.running.done.wait()
                open_hours = self._finish(spark, paths, open_hours, cycle)
        return open_hours

    def close(self, spark: SparkSession) -> None:
        """Wait for a running compaction and drop what it merged (no cycle will swap it in)."""
        if self.running is not None:
            self.running.done.wait()
            delete_path(spark, self.running.staging)
            self.running = None

    def _start(
        self, spark: SparkSession, paths: config.Paths, open_hours: dict[str, list[int]], current: int
    ) -> _Compaction | None:
        closed = sorted((hour, output) for output, hours in open_hours.items() for hour in hours if hour < current)
        if not closed:
            return None
        hour, output = closed[0]
        path = getattr(paths, output)
        job = _Compaction(
            output, hour, _data_files(spark, path, hour), f"{path}{STAGING_SUFFIX}compact-{PARTITION}={hour}"
        )
        delete_path(spark, job.staging)
        schema = PROCESSED_SCHEMA if output == "processed_data" else CLEANED_SCHEMA
        files = spark.sparkContext.defaultParallelism * COMPACT_FILES_PER_CORE

        def merge() -> None:
            try:
                rows = spark.read.schema(schema).parquet(*job.files).withColumn(PARTITION, F.lit(hour).cast("long"))
                parquet_writer(rows.coalesce(files)).mode("overwrite").partitionBy(PARTITION).parquet(job.staging)
            except Exception as error:  # a late rewrite moved the files away: dropped, compacted later
                job.error = error
            finally:
                job.done.set()

        if self.background:
            threading.Thread(target=merge, name=f"compact-{output}-{hour}", daemon=True).start()
        else:
            merge()
        return job

    def _finish(
        self, spark: SparkSession, paths: config.Paths, open_hours: dict[str, list[int]], cycle: int
    ) -> dict[str, list[int]]:
        job = self.running
        if job is None or not job.done.is_set():
            return open_hours
        self.running = None
        path = getattr(paths, job.output)
        if job.error is not None or _data_files(spark, path, job.hour) != job.files:
            reason = job.error or "the hour changed meanwhile"
            log.info("compaction of %s hour %d dropped: %s", job.output, job.hour, reason)
            delete_path(spark, job.staging)
            return open_hours
        swap_hours(spark, path, job.staging, [job.hour], cycle)
        log.info("compacted %s hour %d (%d files)", job.output, job.hour, len(job.files))
        return {name: [h for h in hours if (h, name) != (job.hour, job.output)] for name, hours in open_hours.items()}


def _data_files(spark: SparkSession, output: str, hour: int) -> list[str]:
    return sorted(list_files(spark, f"{output}/{PARTITION}={hour}/*.parquet"))


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


# --- 6. the runner --------------------------------------------------------------------------------


def start(spark: SparkSession, paths: config.Paths, settings: Settings) -> Cursor:
    """Return the committed cursor to go on from, after repairing what an interrupted cycle left.

    Without a cursor made with these settings (first start, other settings, or a batch run
    replaced the outputs since: the state says nothing about them then), one full run first: the
    batch stages, then the state and the figures built from their outputs.
    """
    cursor = read_cursor(spark, paths)
    if cursor is not None and cursor.settings == settings.fingerprint and _outputs_match(spark, paths, cursor):
        log.info("live: going on after cycle %d", cursor.cycle)
        recover(spark, paths, cursor)
        # The interrupted cycle may have written it from its own state.
        _write_unknown(spark, paths, settings.cleaner, read_series_state(spark, paths, cursor.cycle))
        return cursor
    delete_path(spark, paths.live_state)
    # Positions before the full run: a file that arrives during it is read twice, not missed.
    _files, positions = new_raw_files(spark, paths, {})
    if path_exists(spark, paths.consumer_data):
        log.info("live: no usable live state in %s: one full run first", paths.live_state)
        processor.run(spark, paths)
        cleaner.run(spark, paths, settings.cleaner)
        checker.run(spark, paths, settings.checker, show=False)
    state, figures, newest = initial_state(spark, paths, settings)
    if not path_exists(spark, paths.quarantine_data):  # cycles add to it only when they reject a row
        replace_output(spark.createDataFrame([], QUARANTINE_SCHEMA), paths.quarantine_data, log)
    for output in (paths.processed_data, paths.cleaned_data):
        make_folder(spark, output)
        write_text(spark, config.join_path(output, LIVE_MARKER), "kept up to date by the live mode\n")
    write_state(state, paths, SERIES_STATE, 0)
    write_state(figures, paths, FIGURES, 0)
    cursor = Cursor(0, positions, settings.fingerprint, newest, {})
    commit_cursor(spark, paths, cursor)
    return cursor


def _outputs_match(spark: SparkSession, paths: config.Paths, cursor: Cursor) -> bool:
    """Whether the outputs are still the ones the state describes (a batch run leaves no live marker)."""
    return path_exists(spark, state_folder(paths, SERIES_STATE, cursor.cycle)) and all(
        path_exists(spark, config.join_path(output, LIVE_MARKER))
        for output in (paths.processed_data, paths.cleaned_data)
    )


#: In processed_data and cleaned_data: written when the live state is built; a batch run replaces the
#: folder without it.
LIVE_MARKER = "_live"


def initial_state(
    spark: SparkSession, paths: config.Paths, settings: Settings
) -> tuple[DataFrame, DataFrame, int | None]:
    """Build the per-series state and the report window's figures from full outputs (after a full run)."""
    if not path_exists(spark, paths.cleaned_data):
        return spark.createDataFrame([], SERIES_STATE_SCHEMA), spark.createDataFrame([], FIGURES_SCHEMA), None
    processed = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA)
    counts = processed.groupBy(*KEYS).agg(F.count(F.lit(1)).alias("rows"), F.max(m.T_MEASUREMENT).alias("max_t"))
    cleaned = read_partitioned(spark, paths.cleaned_data, CLEANED_SCHEMA)
    step = settings.cleaner.slot_seconds * 1_000_000
    window = settings.checker.spike_window
    slot = F.unix_micros(m.T_MEASUREMENT)
    ends = cleaned.groupBy(*KEYS).agg(F.max(slot).alias("last_slot"), F.max_by(m.VALUE, slot).alias("last_value"))
    tail = F.array_sort(F.collect_list(F.when(slot > F.col("last_slot") - window * step, F.struct(slot, m.VALUE))))
    grid = (
        cleaned.join(ends, KEYS)
        .groupBy(*KEYS, "last_slot", "last_value")
        .agg(
            F.max(F.when(~F.col(m.VALUE).eqNullSafe(F.col("last_value")), slot)).alias("_break"),
            F.min(slot).alias("_first"),
            tail.alias("_tail"),
        )
        .select(
            *KEYS,
            "last_slot",
            "last_value",
            ((F.col("last_slot") - F.coalesce("_break", F.col("_first") - step)) / step).cast("long").alias("flat_run"),
            F.transform("_tail", lambda x: x[m.VALUE]).alias("tail"),
        )
    )
    state = _conform(counts.join(grid, KEYS, "full"), SERIES_STATE_SCHEMA)
    newest = ends.agg(F.max("last_slot")).first()[0]
    figures = spark.createDataFrame([], FIGURES_SCHEMA)
    if newest is not None:
        since = _hour_of_micros(newest - int(settings.report_window_seconds * 1_000_000))
        figures = (
            cleaned.where(F.col(PARTITION) >= since)
            .transform(checker.annotate_rows(settings.checker))
            .transform(checker.series_figures(settings.checker, PARTITION))
            .transform(lambda frame: _conform(frame, FIGURES_SCHEMA))
        )
    return state, figures, newest


class LiveRunner:
    """The live mode behind ``--watch``: a continuous consumer and a cycle whenever it committed new files."""

    def __init__(self, spark, args, paths, settings, should_stop) -> None:
        self.spark, self.args, self.paths, self.settings = spark, args, paths, settings
        self.should_stop = should_stop
        self.cycles: list[dict] = []
        self.consumer_errors: list[Exception] = []
        self.compactor = Compactor(background=True)

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

    def cycle(self, cursor: Cursor, files: list[str], positions: dict[str, SinkPosition]) -> Cursor:
        """Run one cycle under the stages' locks; log and keep its metrics; return the new cursor."""
        started, wall = time.monotonic(), time.time()
        with stage_lock(self.paths.processed_data, "processor", processor.log):
            with stage_lock(self.paths.cleaned_data, "cleaner", cleaner.log):
                cursor, result = run_cycle(
                    self.spark, self.paths, self.settings, cursor, files, positions, self.compactor
                )
        metrics = cycle_metrics(len(self.cycles) + 1, wall, time.monotonic() - started, result)
        self.cycles = [*self.cycles, metrics][-KEPT_CYCLES:]
        write_text(self.spark, config.join_path(self.paths.reports, LIVE_CYCLES), json.dumps(self.cycles) + "\n")
        log.info(
            "cycle %d: %d raw rows = %d new + %d quarantined + %d duplicates; latency p50 %s s, p95 %s s, "
            "max %s s; freshness %s s; checks exit %s; %.1f s (processor %.1f, cleaner %.1f, checker %.1f)",
            *(metrics[k] for k in ("cycle", "raw_rows", "processed", "quarantined", "duplicates")),
            *(metrics[k] for k in ("latency_p50_s", "latency_p95_s", "latency_max_s", "freshness_s")),
            *(metrics[k] for k in ("checker_exit_code", "seconds", "processor_s", "cleaner_s", "checker_s")),
        )
        return cursor


def cycle_metrics(number: int, wall: float, seconds: float, result: CycleResult) -> dict:
    """One entry of ``reports/live_cycles.json``."""
    histogram, accounting = result.latency_histogram, result.accounting
    return {
        "cycle": number,
        "at": datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        **{name: round(value, 2) for name, value in result.seconds.items()},
        "raw_rows": accounting.raw,
        "processed": accounting.processed,
        "quarantined": accounting.quarantined,
        "duplicates": accounting.duplicates,
        "measurements": sum(histogram.values()),
        "latency_p50_s": percentile(histogram, 0.5),
        "latency_p95_s": percentile(histogram, 0.95),
        "latency_max_s": percentile(histogram, 1.0),
        "freshness_s": None if result.newest is None else round(time.time() - result.newest / 1_000_000, 1),
        "checker_exit_code": result.exit_code,
        "latency_histogram": {f"{bucket:.1f}": count for bucket, count in sorted(histogram.items())},
    }


def watch(spark: SparkSession, args, paths: config.Paths, settings: Settings, should_stop) -> int:
    """Run the live mode until ``should_stop()``; return the exit code.

    After ``start`` (a full run only when there is no usable state), the consumer runs continuously
    in a thread of this session (unless ``--skip-consumer``: then another process fills
    consumer_data). A cycle starts as soon as new raw files are committed. On SIGTERM or Ctrl-C the
    consumer ends after its batch, a last cycle takes what it wrote, and the run exits 0.
    """
    runner = LiveRunner(spark, args, paths, settings, should_stop)
    cursor = start(spark, paths, settings)
    # A cycle's data is small: one shuffle partition per core, not Spark's default of 200.
    spark.conf.set("spark.sql.shuffle.partitions", str(spark.sparkContext.defaultParallelism))
    thread = None if args.skip_consumer else runner.start_consumer()
    log.info("live: a cycle as soon as new raw data is committed (consumer every %g s); Ctrl-C stops", args.watch)
    while True:
        finished = thread is None or not thread.is_alive()
        files, after = new_raw_files(spark, paths, cursor.positions)
        if files:
            cursor = runner.cycle(cursor, files, after)
            continue
        if runner.consumer_errors:
            runner.compactor.close(spark)
            return 1
        if should_stop() and finished:
            runner.compactor.close(spark)
            log.info("live: stopped after %d cycles", len(runner.cycles))
            return 0
        time.sleep(0.5)
