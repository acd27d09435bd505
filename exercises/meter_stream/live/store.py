"""What the live mode keeps and how it writes: the cursor over consumer_data's sink logs, the per-series state,
and the file protocol (appended files, swapped hours, recovery) that makes a cycle atomic."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from meter_stream import check_figures, cleaner, config, processor
from meter_stream import message as m
from meter_stream.contracts import (
    PARTITION,
    PARTITION_FORMAT,
    RAW_SCHEMA,
    SERIES_KEYS,
    SERIES_KEYS_SCHEMA,
    hour_value,
    utc_datetime,
)
from meter_stream.raw_input import generation_folders, sink_log_entries_after
from meter_stream.storage import (
    SINK_LOG,
    create_empty_file,
    delete_path,
    exchange_paths,
    list_files,
    make_folder,
    parquet_writer,
    path_exists,
    read_text,
    rename_path,
    write_parquet,
    write_text,
)

log = config.get_logger("live")


KEYS = SERIES_KEYS
#: The committed cursors: ``cursor-<cycle>.json``, the newest wins (``read_cursor``).
CURSOR_PREFIX = "cursor-"
CURSOR_SUFFIX = ".json"
SERIES_STATE = "series"
FIGURES = "figures"
CYCLE_TAG = "cycle-"
UNDO_SUFFIX = ".undo-"
STAGING_SUFFIX = ".staging-"
#: In an undo folder: marks an hour that the cycle's swap created (it had no old folder to keep).
CREATED_PREFIX = "created-"
#: In an undo folder: a new hour folder on its way in (``swap_hours``), or one a swap put aside.
NEXT_PREFIX, SPARE_PREFIX, DROPPED_PREFIX = "next-", "spare-", "dropped-"


def _aside(undo: str, prefix: str, name: str) -> str:
    """A new name in the undo folder for a folder put aside: unique, as an hour may be put aside more than once."""
    return f"{undo}/{prefix}{uuid.uuid4().hex[:12]}-{name}"


#: In an hour folder that a cycle swapped in (``_written-by-cycle-N``): tells its data from the folder it replaced.
WRITTEN_BY = "_written-by-cycle-"
#: Marks the grid rows of a recomputed series: their figures replace the old ones of their hours.
REPLACES = "_replaces"
#: Written into the cursor: state written by another layout or other settings needs a full run.
LAYOUT = f"live-2 {PARTITION}={PARTITION_FORMAT}"

#: The running check figures: one row per series and hour (``check_figures.series_figures``).
FIGURES_SCHEMA = T.StructType(
    [
        *SERIES_KEYS_SCHEMA.fields,
        T.StructField(PARTITION, T.LongType()),
        *[T.StructField(name, T.LongType()) for name in check_figures.SUMMED_FIGURES],
        *[
            T.StructField(name, T.DoubleType() if name == "report_delay_seconds" else T.LongType())
            for name in check_figures.LARGEST_FIGURES
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


@dataclass(frozen=True)
class SinkPosition:
    """How far a reader has read a file-sink output: its latest log batch and file time (ms)."""

    batch: int = -1
    modified_ms: int = -1


@dataclass(frozen=True)
class SinkFile:
    """One file a file-sink log committed: its path, its modification time (ms) and the log file naming it."""

    path: str
    modified_ms: int
    batch: int


def _new_sink_entries(spark: SparkSession, folder: str, since: SinkPosition) -> list[SinkFile]:
    """The files a file-sink output committed after ``since``, oldest first.

    Log files above ``since.batch`` are read. A compact log file (every tenth batch) repeats the
    older files too, and a batch taken only in part (``take_rows``) is read again: of the files
    they name, those modified after ``since.modified_ms`` are new. The sink commits batches one
    after another, so a later batch's files are written after every file of the batches before it.
    """
    files: dict[str, SinkFile] = {}
    for log_file in list_files(spark, f"{folder.rstrip('/')}/{SINK_LOG}/*"):
        match = re.fullmatch(r"(\d+)(\.compact)?", log_file.rsplit("/", 1)[-1])
        if not match or int(match.group(1)) <= since.batch:
            continue
        for entry in sink_log_entries_after(spark, log_file, since.modified_ms):
            if entry["path"] not in files:
                files[entry["path"]] = SinkFile(entry["path"], int(entry["modificationTime"]), int(match.group(1)))
    return sorted(files.values(), key=lambda f: (f.modified_ms, f.batch, f.path))


def _position_after(since: SinkPosition, new: list[SinkFile], taken: int) -> SinkPosition:
    """The position after the first ``taken`` of ``new`` (oldest first): the newest log batch whose new
    files were all taken, and the newest file time taken."""
    if not taken:
        return since
    left = {f.batch for f in new[taken:]}
    whole = [f.batch for f in new[:taken] if not left or f.batch < min(left)]
    return SinkPosition(max([since.batch, *whole]), new[taken - 1].modified_ms)


def new_sink_files(spark: SparkSession, folder: str, since: SinkPosition) -> tuple[list[str], SinkPosition]:
    """Return the files a file-sink output committed after ``since``, and the position after them."""
    new = _new_sink_entries(spark, folder, since)
    return [f.path for f in new], _position_after(since, new, len(new))


def new_raw_files(
    spark: SparkSession, paths: config.Paths, since: dict[str, SinkPosition], max_rows: int | None = None
) -> tuple[list[str], dict[str, SinkPosition]]:
    """Return (new raw files, positions after them) over every generation of consumer_data, oldest first.

    With ``max_rows``, only the oldest files up to that many rows are taken when the new files come
    from more than one consumer batch (``take_rows``); a single batch is taken whole, as the live
    runner's consumer writes batches of at most ``max_rows`` (``ConsumerConfig.max_offsets_per_trigger``).
    """
    by_folder = []
    for folder in generation_folders(spark, paths.consumer_data):
        key = "." if folder == paths.consumer_data else folder.rsplit("/", 1)[-1]
        position = since.get(key, SinkPosition())
        by_folder.append((key, position, _new_sink_entries(spark, folder, position)))
    new = [f for _key, _position, entries in by_folder for f in entries]
    batches = {(key, f.batch) for key, _position, entries in by_folder for f in entries}
    taken = take_rows(spark, new, max_rows) if max_rows and len(batches) > 1 else len(new)
    positions, files = {}, []
    for key, position, entries in by_folder:
        share = min(taken, len(entries))
        positions[key] = _position_after(position, entries, share)
        files += [f.path for f in entries[:share]]
        taken -= share
    return files, positions


def take_rows(spark: SparkSession, files: list[SinkFile], max_rows: int) -> int:
    """How many of ``files`` (oldest first) a cycle takes: as many as hold at most ``max_rows`` rows, at
    least one, and never only some of the files with one modification time (``_position_after``
    could not tell them apart).

    The rows are counted from the files' parquet footers (one Spark job, no data read).
    """
    counts = {
        row.name: row["count"]
        for row in spark.read.schema(RAW_SCHEMA)
        .parquet(*[f.path for f in files])
        .groupBy(F.element_at(F.split(F.input_file_name(), "/"), -1).alias("name"))
        .count()
        .collect()  # one row per file: a summary, not the data
    }
    rows, taken = 0, 0
    for index, file in enumerate(files):
        rows += counts.get(file.path.rsplit("/", 1)[-1], 0)
        if rows > max_rows and taken:
            break
        if index + 1 == len(files) or files[index + 1].modified_ms != file.modified_ms:
            taken = index + 1
    return taken


@dataclass
class Cursor:
    """The committed state of the live mode (``live_state/cursor-<cycle>.json``, the newest).

    Attributes:
        cycle: the last committed cycle (0: the full run).
        positions: consumer_data's positions after that cycle, per generation folder.
        settings: the layout and the cleaner's and checker's settings the state was made with.
        newest: the newest slot in cleaned_data (epoch microseconds), or None.
        open_hours: per output, the hours cycles appended to that are not compacted yet.
        clock_faults: the rows quarantine_data holds per clock-fault reason (for the report's check).
    """

    cycle: int
    positions: dict[str, SinkPosition]
    settings: str
    newest: int | None = None
    open_hours: dict[str, list[int]] = field(default_factory=dict)
    clock_faults: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        fields = asdict(self)
        fields["positions"] = {key: asdict(position) for key, position in self.positions.items()}
        return json.dumps(fields, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Cursor:
        fields = json.loads(text)
        fields["positions"] = {key: SinkPosition(**value) for key, value in fields["positions"].items()}
        return cls(**fields)


def cursor_file(paths: config.Paths, cycle: int) -> str:
    return config.join_path(paths.live_state, f"{CURSOR_PREFIX}{cycle:010d}{CURSOR_SUFFIX}")


def cursor_files(spark: SparkSession, paths: config.Paths) -> list[str]:
    """The committed cursor files, oldest first (a cursor being written has another name until it is whole)."""
    pattern = config.join_path(paths.live_state, f"{CURSOR_PREFIX}*{CURSOR_SUFFIX}")
    return sorted(list_files(spark, pattern), key=lambda path: path.rsplit("/", 1)[-1])


def read_cursor(spark: SparkSession, paths: config.Paths) -> Cursor | None:
    """The committed cursor: the newest cursor file; None when there is none."""
    files = cursor_files(spark, paths)
    text = read_text(spark, files[-1]) if files else None
    return Cursor.from_json(text) if text else None


def commit_cursor(spark: SparkSession, paths: config.Paths, cursor: Cursor) -> None:
    """Commit a cycle: one atomic step, the rename of its new cursor file into place.

    The file has a name of its own per cycle, so nothing is replaced or deleted first: at every
    instant the newest whole cursor file is the previous cycle's or this one's. ``cleanup`` then
    removes the older ones.
    """
    write_text(spark, cursor_file(paths, cursor.cycle), cursor.to_json())


def state_folder(paths: config.Paths, kind: str, cycle: int) -> str:
    return config.join_path(paths.live_state, f"{kind}-{cycle}")


def read_series_state(spark: SparkSession, paths: config.Paths, cycle: int) -> DataFrame:
    return spark.read.schema(SERIES_STATE_SCHEMA).parquet(state_folder(paths, SERIES_STATE, cycle))


def read_figures(spark: SparkSession, paths: config.Paths, cycle: int) -> DataFrame:
    return spark.read.schema(FIGURES_SCHEMA).parquet(state_folder(paths, FIGURES, cycle))


def conform(frame: DataFrame, schema: T.StructType) -> DataFrame:
    return frame.select(*[F.col(f.name).cast(f.dataType) for f in schema.fields])


def write_state(frame: DataFrame, paths: config.Paths, kind: str, cycle: int) -> None:
    """Write one of a cycle's state tables (a folder of its own, named by the cycle; a file per task)."""
    write_parquet(frame.write.mode("overwrite"), state_folder(paths, kind, cycle))


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
    write_parquet(writer.partitionBy(PARTITION) if partitioned else writer, staging)
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


#: Files of an unpartitioned output (quarantine_data) merged into one once this many of one level are there.
ROLL_FANOUT = 16
#: Files of this level are not merged further: each holds the rows of ROLL_FANOUT ** ROLL_TOP_LEVEL cycles.
ROLL_TOP_LEVEL = 3
#: In a rolled file's name after the cycle tag: its level (a cycle's own file is level 0).
LEVEL_TAG = "L"
#: In an undo folder: a file a roll put aside (``roll_files``), put back by ``recover``.
ROLLED_PREFIX = "rolled-"


def _level_of(name: str) -> int | None:
    """The roll level of a file a cycle wrote (``append_files``, ``roll_files``); None for other files."""
    match = re.match(rf"{CYCLE_TAG}\d+-(?:{LEVEL_TAG}(\d+)-)?", name)
    return (int(match.group(1) or 0)) if match else None


def roll_files(spark: SparkSession, output: str, schema: T.StructType, cycle: int) -> None:
    """Merge the files cycles appended to the unpartitioned ``output``, so that their number stays bounded.

    Levels, as in a log-structured merge: once ``ROLL_FANOUT`` files of one level are there, they are
    merged into one file of the next level, named for this cycle; up to ``ROLL_TOP_LEVEL``. So the folder
    holds fewer than ``ROLL_FANOUT`` files per level below the top, a row is rewritten at most
    ``ROLL_TOP_LEVEL`` times, and a top-level file is added once per ``ROLL_FANOUT ** ROLL_TOP_LEVEL`` cycles
    that appended. The merged file is renamed in first, then the merged ones are moved into the cycle's
    undo folder: if the cycle is not committed, ``recover`` deletes the merged file (it is the cycle's) and
    moves them back; after the commit, ``cleanup`` deletes them. A reader listing the folder between those
    renames may see the merged rows twice; never a row missing.
    """
    by_level: dict[int, list[str]] = {}
    for file in list_files(spark, f"{output}/{CYCLE_TAG}*.parquet"):
        level = _level_of(file.rsplit("/", 1)[-1])
        if level is not None and level < ROLL_TOP_LEVEL:
            by_level.setdefault(level, []).append(file)
    undo, staging = f"{output}{UNDO_SUFFIX}{cycle}", f"{output}{STAGING_SUFFIX}{cycle}"
    for level in range(ROLL_TOP_LEVEL):
        files = sorted(by_level.get(level, []))
        if len(files) < ROLL_FANOUT:
            continue
        delete_path(spark, staging)
        write_parquet(parquet_writer(spark.read.schema(schema).parquet(*files).coalesce(1)).mode("overwrite"), staging)
        for merged in list_files(spark, f"{staging}/*.parquet"):
            name = f"{CYCLE_TAG}{cycle:08d}-{LEVEL_TAG}{level + 1}-{merged.rsplit('/', 1)[-1]}"
            rename_path(spark, merged, f"{output}/{name}")
            by_level.setdefault(level + 1, []).append(f"{output}/{name}")
        make_folder(spark, undo)
        for file in files:
            rename_path(spark, file, f"{undo}/{ROLLED_PREFIX}{file.rsplit('/', 1)[-1]}")
        delete_path(spark, staging)


def rewrite_hours(frame: DataFrame, output: str, hours: list[int], cycle: int) -> None:
    """Replace the ``hours`` folders of ``output`` with ``frame``'s rows (which have the hour column).

    The new folders are written to staging first and then swapped in (``swap_hours``).
    """
    staging = f"{output}{STAGING_SUFFIX}{cycle}"
    delete_path(frame.sparkSession, staging)
    write_parquet(parquet_writer(frame).mode("overwrite").partitionBy(PARTITION), staging)
    swap_hours(frame.sparkSession, output, staging, hours, cycle)


def swap_hours(spark: SparkSession, output: str, staging: str, hours: list[int], cycle: int) -> None:
    """Swap the ``hours`` folders of ``staging`` into ``output``, then delete ``staging``.

    A reader sees each hour whole, the old folder or the new one, at every instant: the new folder,
    marked as this cycle's (``WRITTEN_BY``), is moved into ``OUTPUT.undo-N`` and exchanged with the
    old one in one step (``exchange_paths``; by three renames where the file system cannot). The old
    folder stays in the undo folder until the cycle is committed, or ``recover`` puts it back. An
    hour without an old folder is marked ``created-hour=H`` in the undo folder first. An hour that
    ``staging`` lacks is removed (moved into the undo folder).
    """
    undo = f"{output}{UNDO_SUFFIX}{cycle}"
    make_folder(spark, undo)
    make_folder(spark, output)
    for hour in hours:
        name = f"{PARTITION}={hour}"
        new, current, kept = f"{staging}/{name}", f"{output}/{name}", f"{undo}/{name}"
        # Swapped before in this cycle: the undo folder keeps what was there before the cycle already.
        first = not (path_exists(spark, kept) or path_exists(spark, f"{undo}/{CREATED_PREFIX}{name}"))
        if not path_exists(spark, new):
            if path_exists(spark, current):
                rename_path(spark, current, kept if first else _aside(undo, DROPPED_PREFIX, name))
            continue
        create_empty_file(spark, f"{new}/{WRITTEN_BY}{cycle}")
        if not path_exists(spark, current):
            if first:
                make_folder(spark, f"{undo}/{CREATED_PREFIX}{name}")
            rename_path(spark, new, current)
            continue
        arriving = f"{undo}/{NEXT_PREFIX}{name}"
        rename_path(spark, new, arriving)
        _exchange(spark, arriving, current, _aside(undo, SPARE_PREFIX, name))
        # ``arriving`` holds the replaced folder now: kept for recover, or dropped if not the cycle's first
        rename_path(spark, arriving, kept if first else _aside(undo, DROPPED_PREFIX, name))
    delete_path(spark, staging)


def _exchange(spark: SparkSession, first: str, second: str, spare: str) -> None:
    """Swap two folders: in one step where the file system can, else by three renames through ``spare``."""
    if not exchange_paths(spark, first, second):
        rename_path(spark, second, spare)
        rename_path(spark, first, second)
        rename_path(spark, spare, first)


def _cycle_of(name: str, suffix: str) -> int | None:
    match = re.search(rf"{re.escape(suffix)}(\d+)$", name)
    return int(match.group(1)) if match else None


def _restore_hours(spark: SparkSession, output: str, undo: str, cycle: int) -> None:
    """Put each hour that the interrupted ``cycle`` swapped back as it was before the cycle.

    Which folder holds what is read from the folders themselves (``WRITTEN_BY``), not from where a
    crash stopped the swap, so this is right after a crash at any point, and again after a crash
    within it: the hour's folder that the cycle did not write is the old one, and goes back into
    place in one step; a created hour is removed.
    """
    by_hour: dict[str, list[str]] = {}
    for folder in list_files(spark, f"{undo}/*{PARTITION}=*", folders=True):
        by_hour.setdefault(folder.rsplit("/", 1)[-1].rsplit("-", 1)[-1], []).append(folder)
    for name, folders in sorted(by_hour.items()):
        current = f"{output}/{name}"
        candidates = [current, *(f for f in folders if not f.rsplit("/", 1)[-1].startswith(CREATED_PREFIX))]
        old = [
            folder
            for folder in candidates
            if path_exists(spark, folder) and not path_exists(spark, f"{folder}/{WRITTEN_BY}{cycle}")
        ]
        if old and old[0] == current:
            continue
        if old:
            log.warning("restoring %s as it was before the interrupted cycle %d", current, cycle)
            if path_exists(spark, current):
                _exchange(spark, old[0], current, _aside(undo, SPARE_PREFIX, name))
            else:
                rename_path(spark, old[0], current)
        elif path_exists(spark, current):
            log.warning("removing %s, created by the interrupted cycle %d", current, cycle)
            rename_path(spark, current, _aside(undo, DROPPED_PREFIX, name))


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
                _restore_hours(spark, output, folder, cycle)
                for file in list_files(spark, f"{folder}/{ROLLED_PREFIX}*"):
                    rename_path(spark, file, f"{output}/{file.rsplit('/', 1)[-1][len(ROLLED_PREFIX) :]}")
            delete_path(spark, folder)
        for folder in list_files(spark, f"{parent}/{name}{STAGING_SUFFIX}*", folders=True):
            delete_path(spark, folder)
        for pattern in (f"{output}/{PARTITION}=*/{CYCLE_TAG}*", f"{output}/{CYCLE_TAG}*"):
            for file in list_files(spark, pattern):
                cycle = int(file.rsplit("/", 1)[-1][len(CYCLE_TAG) :].split("-", 1)[0])
                if cycle > cursor.cycle:
                    log.warning("removing %s, written by the interrupted cycle %d", file, cycle)
                    delete_path(spark, file)
    # A cursor file that a kill stopped before its commit's rename (``write_bytes``).
    for unfinished in list_files(spark, config.join_path(paths.live_state, f".{CURSOR_PREFIX}*")):
        delete_path(spark, unfinished)
    for older in cursor_files(spark, paths)[:-1]:
        delete_path(spark, older)
    keep = {state_folder(paths, kind, cursor.cycle).rsplit("/", 1)[-1] for kind in (SERIES_STATE, FIGURES)}
    for folder in list_files(spark, config.join_path(paths.live_state, "*-*"), folders=True):
        if folder.rsplit("/", 1)[-1] not in keep:
            delete_path(spark, folder)


def cleanup(spark: SparkSession, paths: config.Paths, committed: int) -> None:
    """After a commit: the undo copies of that cycle, the state tables and cursor files before it are not needed."""
    for output in (paths.processed_data, paths.cleaned_data, paths.quarantine_data):
        delete_path(spark, f"{output}{UNDO_SUFFIX}{committed}")
    for kind in (SERIES_STATE, FIGURES):
        delete_path(spark, state_folder(paths, kind, committed - 1))
    for older in cursor_files(spark, paths)[:-1]:
        delete_path(spark, older)


def remove_cycle_leftovers(spark: SparkSession, paths: config.Paths) -> None:
    """Before a full run: the undo and staging folders of earlier cycles describe outputs it replaces.

    Left in place, a later ``recover`` could restore one of them over newer data.
    """
    for output in (paths.processed_data, paths.cleaned_data, paths.quarantine_data):
        parent, name = output.rstrip("/").rsplit("/", 1)
        for suffix in (UNDO_SUFFIX, STAGING_SUFFIX):
            for folder in list_files(spark, f"{parent}/{name}{suffix}*", folders=True):
                delete_path(spark, folder)


@dataclass(frozen=True)
class Settings:
    """What a cycle needs besides its input: the processor's clock limits, the cleaner's and the checker's
    configurations."""

    cleaner: cleaner.CleanerConfig
    checker: check_figures.CheckerConfig
    report_window_seconds: float
    clock: processor.ClockLimits = processor.DEFAULT_CLOCK

    @property
    def fingerprint(self) -> str:
        return f"{LAYOUT} {self.clock!r} {self.cleaner!r} {self.checker!r}"


def hour_of_micros(micros: int) -> int:
    return hour_value(utc_datetime(micros))
