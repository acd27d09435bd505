"""Schemas, the SparkSession builder and safe stage I/O shared by the stages."""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from pyspark import SparkConf, SparkContext
from pyspark.sql import Column, DataFrame, DataFrameWriter, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from common import message as m
from common.config import get_logger

# --- schemas -------------------------------------------------------------------------------------

#: Rows as the Kafka source delivers them; consumer_data keeps exactly these.
RAW_SCHEMA = T.StructType(
    [
        T.StructField("key", T.BinaryType()),
        T.StructField("value", T.BinaryType()),
        T.StructField("topic", T.StringType()),
        T.StructField("partition", T.IntegerType()),
        T.StructField("offset", T.LongType()),
        T.StructField("timestamp", T.TimestampType()),
        T.StructField("timestampType", T.IntegerType()),
    ]
)

#: processed_data: one typed row per measurement.
PROCESSED_SCHEMA = T.StructType(
    [
        T.StructField(m.T_MEASUREMENT, T.TimestampType()),
        T.StructField(m.T_REPORT, T.TimestampType()),
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField(m.VALUE, T.DoubleType()),
    ]
)

#: quarantine_data: a rejected raw record, why, and where it came from.
QUARANTINE_SCHEMA = T.StructType(
    [
        T.StructField("raw_value", T.StringType()),
        T.StructField("reason", T.StringType()),
        T.StructField("topic", T.StringType()),
        T.StructField("partition", T.IntegerType()),
        T.StructField("offset", T.LongType()),
    ]
)

QUALITY = "quality"

#: cleaned_data: one row per series and slot; t_measurement is the slot's start.
CLEANED_SCHEMA = T.StructType(
    [
        T.StructField(m.T_MEASUREMENT, T.TimestampType()),
        T.StructField(m.T_REPORT, T.TimestampType()),
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField(m.VALUE, T.DoubleType()),
        T.StructField(QUALITY, T.StringType()),
    ]
)

#: unknown_series: series outside the expected catalog, as the cleaner saw them.
UNKNOWN_SERIES_SCHEMA = T.StructType(
    [
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField("rows", T.LongType()),
    ]
)

# --- session -------------------------------------------------------------------------------------

LOG4J2_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
ENV_JAR_CACHE = "METER_JAR_CACHE"
ENV_LOCAL_DRIVER_MEMORY = "METER_LOCAL_DRIVER_MEMORY"
DEFAULT_LOCAL_DRIVER_MEMORY = "4g"
#: The shuffle data a task reads, at most (Spark's adaptive execution splits and merges partitions
#: to about this size). A task sorts its whole input in memory when it can, so this bounds the
#: memory each task holds: from 1 M to 10 M measurements Spark's data memory went from 594 to
#: 738 MiB with 16 MB, from 610 to 1,922 MiB with Spark's default of 64 MB, at the same speed.
#: The price: more, smaller files in cleaned_data (a task writes into every hour its series cover).
ADVISORY_PARTITION_SIZE = "16m"
DEFAULT_JAR_CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "jars")


def build_session(app_name: str, verbose: bool = False, jars: list[str] | None = None) -> SparkSession:
    """Return the SparkSession for a stage: UTC, quiet, and ``local[*]`` only as a fallback.

    A master given by ``spark-submit --master`` (or spark-defaults) always wins.

    Args:
        app_name: the Spark application name.
        verbose: keep Spark's INFO logging instead of WARN.
        jars: extra local jar files to put on the classpath (the Kafka connector).
    """
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.log.structuredLogging.enabled", "false")
    )
    submitted = submitted_conf()
    if not submitted.contains("spark.master"):
        # The local fallback: all cores, and a heap for them (Spark's default of 1 GiB runs out
        # at about 10 M measurements). Only read when this process starts the JVM.
        builder = builder.config("spark.master", "local[*]").config(
            "spark.driver.memory", os.environ.get(ENV_LOCAL_DRIVER_MEMORY) or DEFAULT_LOCAL_DRIVER_MEMORY
        )
    if not submitted.contains("spark.sql.adaptive.advisoryPartitionSizeInBytes"):
        builder = builder.config("spark.sql.adaptive.advisoryPartitionSizeInBytes", ADVISORY_PARTITION_SIZE)
    if not submitted.contains("spark.driver.extraJavaOptions"):
        # Read only when this process starts the JVM; spark-submit keeps the cluster's logging.
        builder = builder.config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}")
    if jars:
        builder = builder.config("spark.jars", ",".join(jars))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("INFO" if verbose else "WARN")
    get_logger("session").info("Spark %s, master %s", spark.version, spark.sparkContext.master)
    return spark


def submitted_conf() -> SparkConf:
    """Return the configuration spark-submit (or PYSPARK_SUBMIT_ARGS) gives this process.

    Under spark-submit the JVM is already running and holds ``--master``, ``--jars`` etc.; a plain
    ``SparkConf()`` only sees them once Python is connected to that JVM.
    """
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        SparkContext._ensure_initialized()
        return SparkConf()
    conf = SparkConf()
    args = os.environ.get("PYSPARK_SUBMIT_ARGS", "").split()
    for flag, key in (("--master", "spark.master"), ("--packages", "spark.jars.packages"), ("--jars", "spark.jars")):
        if flag in args[:-1]:
            conf.set(key, args[args.index(flag) + 1])
    return conf


def kafka_connector_jars(spark_version: str) -> list[str]:
    """Return the cached jars of Spark's Kafka connector, or [] when Spark is given it otherwise.

    ``scripts/fetch-jars`` puts them in ``.cache/jars/spark-kafka-VERSION`` (or under
    ``$METER_JAR_CACHE``). Under ``spark-submit --packages/--jars`` naming the connector, those win.

    Raises:
        FileNotFoundError: when the connector is neither configured nor fetched.
    """
    submitted = submitted_conf()
    if any("spark-sql-kafka" in (submitted.get(key) or "") for key in ("spark.jars.packages", "spark.jars")):
        return []
    root = os.environ.get(ENV_JAR_CACHE) or DEFAULT_JAR_CACHE
    folder = os.path.abspath(os.path.join(root, f"spark-kafka-{spark_version}"))
    jars = sorted(glob.glob(os.path.join(folder, "*.jar")))
    if not any(os.path.basename(jar).startswith("spark-sql-kafka") for jar in jars):
        raise FileNotFoundError(
            f"Spark's Kafka connector {spark_version} is not in {folder}; run `make setup` (or "
            "scripts/fetch-jars) once with access to Maven Central, or pass it to spark-submit with --packages"
        )
    return jars


# --- stage I/O -----------------------------------------------------------------------------------

STAGING_SUFFIX = ".staging"
PREVIOUS_SUFFIX = ".previous"
SINK_LOG = "_spark_metadata"


class StageInputError(Exception):
    """A stage's input is missing or unusable; the message says what to do."""


class StageBusyError(Exception):
    """Another run of the same stage holds its lock; the message names the lock and its holder."""


#: Exit codes of the stages besides 0 (success) and 1 (failed checks or stage error).
EXIT_INPUT_MISSING = 2
EXIT_BUSY = 3


def exit_code_of(action: Callable[[], int], log: logging.Logger) -> int:
    """Run a stage's action and return its exit code; a missing input is 2 and a held lock 3."""
    try:
        return action()
    except StageInputError as error:
        log.error("%s", error)
        return EXIT_INPUT_MISSING
    except StageBusyError as error:
        log.error("%s", error)
        return EXIT_BUSY


def local_path(path: str) -> str | None:
    """The local file-system path of a plain path or ``file:`` URI; None for other file systems."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) and not path.startswith("file:"):
        return None
    return re.sub(r"^file:(//)?", "", path)


@contextmanager
def stage_lock(path: str, stage: str, log: logging.Logger) -> Iterator[None]:
    """Hold an exclusive lock on ``PATH.lock`` while a stage writes ``path``.

    The lock is an OS file lock (flock): the kernel releases it when its process ends, also on
    SIGKILL, so a lock left by a killed run never blocks the next one.

    Raises:
        StageBusyError: when another process holds the lock.
    """
    local = local_path(path)
    if local is None:
        log.warning("%s is not on a local file system: running without a lock against concurrent runs", path)
        yield
        return
    lock_file = local.rstrip("/") + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
    handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StageBusyError(
                f"{stage} is already running: {lock_file} is held by {holder}; wait for that run to end"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(f"{stage} (pid {os.getpid()} on {socket.gethostname()}, since {started})\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _fs_path(spark: SparkSession, path: str):
    """Return (Hadoop FileSystem, Hadoop Path) for a local path or URI."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    return hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hadoop_path


def path_exists(spark: SparkSession, path: str) -> bool:
    """Return whether a file or folder exists (any Hadoop file system)."""
    fs, hadoop_path = _fs_path(spark, path)
    return bool(fs.exists(hadoop_path))


def delete_path(spark: SparkSession, path: str) -> None:
    """Delete a file or a folder with its contents; nothing when it does not exist."""
    fs, hadoop_path = _fs_path(spark, path)
    if fs.exists(hadoop_path):
        fs.delete(hadoop_path, True)


def rename_path(spark: SparkSession, source: str, target: str) -> None:
    """Rename a file or folder (atomic on a local or HDFS file system).

    Raises:
        OSError: when the file system refuses.
    """
    fs, source_path = _fs_path(spark, source)
    if not fs.rename(source_path, _fs_path(spark, target)[1]):
        raise OSError(f"could not rename {source} to {target}")


def recover_output(spark: SparkSession, path: str, log: logging.Logger) -> None:
    """Finish or undo a replacement that a crash interrupted (see ``replace_output``)."""
    previous = path + PREVIOUS_SUFFIX
    if not path_exists(spark, previous):
        return
    if path_exists(spark, path):
        delete_path(spark, previous)
    else:
        log.warning("restoring %s from %s left by an interrupted run", path, previous)
        rename_path(spark, previous, path)


#: processed_data and cleaned_data are partitioned by the UTC hour of t_measurement, so that a live
#: cycle rewrites only the hours new data touches: folders ``hour=2026112514`` (yyyyMMddHH). The
#: value is a number, not text: Spark sorts the rows by it before a partitioned write, and text
#: whose first eight characters are alike in every row sorts slowly (10 M measurements: the
#: cleaner's write took 26 s partitioned by ``2024-05-22T14``, 17 s by a number, 16 s unpartitioned).
PARTITION = "hour"
PARTITION_FORMAT = "yyyyMMddHH"


_HOUR_MICROS = 3_600_000_000


def hour_of(timestamp: Column) -> Column:
    """The partition value of a timestamp: its UTC hour as the number yyyyMMddHH.

    Computed from the epoch microseconds with integer steps and the calendar of the day, not
    formatted as text and parsed back (half the time per row), and whatever the session's time zone.
    """
    micros = F.unix_micros(timestamp)
    # An exact multiple of an hour, so the division is exact.
    hours = ((micros - F.pmod(micros, F.lit(_HOUR_MICROS))) / F.lit(_HOUR_MICROS)).cast(T.LongType())
    day = F.date_from_unix_date(F.floor(hours / 24).cast(T.IntegerType()))
    return (
        F.year(day).cast(T.LongType()) * 1_000_000
        + F.month(day) * 10_000
        + F.dayofmonth(day) * 100
        + F.pmod(hours, F.lit(24))
    )


def hour_value(moment: datetime) -> int:
    """The partition value (``hour_of``) of an aware datetime."""
    return int(moment.astimezone(UTC).strftime("%Y%m%d%H"))


def with_hour(rows: DataFrame) -> DataFrame:
    """Add the partition column: the UTC hour (``hour_of``) of t_measurement."""
    return rows.withColumn(PARTITION, hour_of(F.col(m.T_MEASUREMENT)))


def read_partitioned(
    spark: SparkSession, path: str, schema: T.StructType, hours: Iterable[int] | None = None
) -> DataFrame:
    """An hour-partitioned output with its ``hour`` column; with ``hours``, only those folders are listed.

    Empty when the output (or every one of the hours) does not exist yet.
    """
    partitioned = T.StructType([*schema.fields, T.StructField(PARTITION, T.LongType())])
    if not path_exists(spark, path):
        return spark.createDataFrame([], partitioned)
    if hours is None:
        return spark.read.schema(partitioned).parquet(path)
    folders = [folder for hour in hours if path_exists(spark, folder := f"{path}/{PARTITION}={hour}")]
    if not folders:
        return spark.createDataFrame([], partitioned)
    return spark.read.schema(partitioned).option("basePath", path).parquet(*folders)


#: Parquet options of every output the stages write. Report times and values are nearly unique in a
#: real feed, so a dictionary for them fills up and is dropped in each column chunk after the work of
#: building it: plain encoding from the start wrote 15 M cleaned rows in 9.0-10.4 s instead of
#: 11.4-15.4 s, and 7 % smaller (BENCHMARKS.md). Names, grid times and flags keep their dictionaries.
PARQUET_OPTIONS = {f"parquet.enable.dictionary#{column}": "false" for column in (m.T_REPORT, m.VALUE)}


def parquet_writer(df: DataFrame) -> DataFrameWriter:
    """``df.write`` with the project's Parquet options (``PARQUET_OPTIONS``)."""
    return df.write.options(**PARQUET_OPTIONS)


def replace_output(df: DataFrame, path: str, log: logging.Logger, partition_by: str | None = None) -> None:
    """Write ``df`` as parquet to ``path``, replacing what was there only once it is complete.

    The data is written to ``PATH.staging`` and swapped in by two renames, so readers see either
    the previous complete output or the new one; ``recover_output`` repairs a crash between the
    renames. On object stores without atomic rename the swap is a copy and not atomic.
    """
    spark = df.sparkSession
    staging, previous = path + STAGING_SUFFIX, path + PREVIOUS_SUFFIX
    recover_output(spark, path, log)
    delete_path(spark, staging)
    if partition_by:
        parquet_writer(df).mode("overwrite").partitionBy(partition_by).parquet(staging)
        if not list_files(spark, f"{staging}/{partition_by}=*/*.parquet"):
            # No rows, no partition files: one empty file keeps the schema readable.
            parquet_writer(df.limit(0).drop(partition_by)).mode("overwrite").parquet(staging)
    else:
        parquet_writer(df).mode("overwrite").parquet(staging)
    if path_exists(spark, path):
        rename_path(spark, path, previous)
    rename_path(spark, staging, path)
    delete_path(spark, previous)


def read_output(spark: SparkSession, path: str, schema: T.StructType, log: logging.Logger, producer: str) -> DataFrame:
    """Read a previous stage's parquet output with its declared schema.

    Raises:
        StageInputError: when the output does not exist, naming the stage that makes it.
    """
    recover_output(spark, path, log)
    if not path_exists(spark, path):
        raise StageInputError(f"{path} does not exist: run the {producer} first")
    # Partitioned outputs add their ``hour`` column; the contract is the schema's columns.
    return spark.read.schema(schema).parquet(path).select(*schema.fieldNames())


GENERATION_PREFIX = "generation-"


def generation_folder(root: str, generation: int) -> str:
    """The folder of a consumer generation: the root itself for 0, ``ROOT/generation-N`` after.

    The consumer starts a new generation (new output folder and checkpoint) when its topic was
    deleted and recreated, since Spark cannot rewind a checkpointed Kafka source.
    """
    return root if generation == 0 else f"{root.rstrip('/')}/{GENERATION_PREFIX}{generation}"


def read_raw(spark: SparkSession, path: str, log: logging.Logger) -> DataFrame:
    """Read consumer_data, every generation of it, robust to a log written on another machine.

    Generation 0 is the folder itself, later ones its ``generation-N`` subfolders (see
    ``generation_folder``); each is a file-sink output read as ``_read_sink_output`` says.

    Raises:
        StageInputError: when the folder does not exist.
    """
    if not path_exists(spark, path):
        raise StageInputError(f"{path} does not exist: run the consumer first (or point --consumer-data at raw data)")
    first, *later = generation_folders(spark, path)
    frame = _read_sink_output(spark, first, log, nested=not later)
    for folder in later:
        frame = frame.unionByName(_read_sink_output(spark, folder, log, nested=True))
    return frame


def generation_folders(spark: SparkSession, path: str) -> list[str]:
    """consumer_data's generation folders, oldest first: the folder itself, then ``generation-N``."""
    later = {
        int(match.group(1)): folder
        for folder in list_files(spark, f"{path.rstrip('/')}/{GENERATION_PREFIX}*", folders=True)
        if (match := re.search(rf"/{GENERATION_PREFIX}(\d+)$", folder))
    }
    return [path] + [folder for _generation, folder in sorted(later.items())]


def _read_sink_output(spark: SparkSession, path: str, log: logging.Logger, nested: bool) -> DataFrame:
    """Read one file-sink output folder.

    With a file-sink log, Spark reads only the files the log names: right on the machine that wrote
    them (files of failed batches are left out), but a copied folder's log names absolute paths that
    do not exist here, and Spark then reads nothing at all. So: when every file the log names is
    present, Spark reads through the log; otherwise the files present whose names the log lists are
    read (with a warning), and when the log lists none of them, every parquet file present. Without a
    log, every parquet file in the folder is read, and in its subfolders too when ``nested``.
    """
    reader = spark.read.schema(RAW_SCHEMA)
    sink_log = f"{path.rstrip('/')}/{SINK_LOG}"
    glob_path = f"{path.rstrip('/')}/*.parquet"
    if not path_exists(spark, sink_log):
        if nested:
            return reader.parquet(path)
        present = list_files(spark, glob_path)
        return reader.parquet(*present) if present else spark.createDataFrame([], RAW_SCHEMA)
    # One spelling per file: file:///x and file:/x are the same local file.
    logged = {local_path(name) or name for name in _sink_log_files(spark, sink_log)}
    # A glob is not a folder, so Spark lists the files instead of reading the log.
    present = {local_path(f) or f: f for f in list_files(spark, glob_path)}
    if logged <= present.keys():
        return reader.parquet(path)
    logged_names = {name.rsplit("/", 1)[-1] for name in logged}
    matched = [f for local, f in present.items() if local.rsplit("/", 1)[-1] in logged_names]
    log.warning(
        "%s: %d of the %d files named by its %s log are not there (was the folder copied from "
        "another machine?); reading the %d files present%s",
        path,
        len(logged - present.keys()),
        len(logged),
        SINK_LOG,
        len(matched) or len(present),
        " that the log names" if matched else "",
    )
    if not present:
        return spark.createDataFrame([], RAW_SCHEMA)
    return reader.parquet(*(matched or present.values()))


def _sink_log_files(spark: SparkSession, sink_log: str) -> set[str]:
    """The files a file-sink log adds, over its batch and compact files."""
    return {
        entry["path"]
        for log_file in list_files(spark, f"{sink_log}/*")
        if re.fullmatch(r"\d+(\.compact)?", log_file.rsplit("/", 1)[-1])
        for entry in sink_log_entries(spark, log_file)
    }


def sink_log_entries(spark: SparkSession, log_file: str) -> list[dict]:
    """The ``add`` entries of one file-sink log file: JSON lines after a version line.

    Read in the driver through Hadoop: the log is metadata (a line per file written), and Spark's
    own readers skip folders whose names start with an underscore.
    """
    entries = []
    for line in (read_text(spark, log_file) or "").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("action") == "add" and entry.get("path"):
                entries.append(entry)
    return entries


def make_folder(spark: SparkSession, path: str) -> None:
    """Create a folder and its parents (nothing when it exists)."""
    fs, hadoop_path = _fs_path(spark, path)
    fs.mkdirs(hadoop_path)


def list_files(spark: SparkSession, glob_path: str, folders: bool = False) -> list[str]:
    """The files (or with ``folders``, the folders) a glob matches; none when it matches nothing."""
    fs, hadoop_path = _fs_path(spark, glob_path)
    statuses = fs.globStatus(hadoop_path) or []
    return [str(status.getPath().toString()) for status in statuses if status.isDirectory() == folders]


def read_text(spark: SparkSession, path: str) -> str | None:
    """Read a small UTF-8 text file through Hadoop; None when it does not exist."""
    fs, hadoop_path = _fs_path(spark, path)
    if not fs.exists(hadoop_path):
        return None
    jvm = spark.sparkContext._jvm
    stream = fs.open(hadoop_path)
    try:
        return bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(stream)).decode("utf-8")
    finally:
        stream.close()


def write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    """Write a small file (a report, a chart) through Hadoop, replacing the old one by a rename."""
    fs, target = _fs_path(spark, path)
    staging = _fs_path(spark, path + STAGING_SUFFIX)[1]
    stream = fs.create(staging, True)
    try:
        stream.write(bytearray(data))
    finally:
        stream.close()
    if fs.exists(target):
        fs.delete(target, False)
    if not fs.rename(staging, target):
        raise OSError(f"could not write {path}")


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small UTF-8 text file through Hadoop (see ``write_bytes``)."""
    write_bytes(spark, path, text.encode("utf-8"))
