"""Safe stage I/O on any Hadoop file system: errors and exit codes, atomic replace, partitions, small files."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, DataFrameWriter, SparkSession
from pyspark.sql import types as T

from meter_stream import jvm
from meter_stream import message as m
from meter_stream.contracts import PARTITION
from meter_stream.session import local_frame

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


#: Schemes of object stores whose rename is a copy and a delete, and whose create-if-absent is not a lock.
NON_ATOMIC_SCHEMES = ("s3a", "s3", "s3n", "gs")


def without_atomic_rename(path: str) -> str | None:
    """The scheme of ``path`` when its file system has no atomic rename (S3, GCS); None otherwise."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
    scheme = match.group(1).lower() if match else ""
    return scheme if scheme in NON_ATOMIC_SCHEMES else None


#: Called before each file-system mutation the stages make (write, rename, exchange, delete, mkdir) with its
#: kind and path; None in a run. The crash-point tests set it to crash at each mutation in turn.
mutation_hook: Callable[[str, str], None] | None = None


def _mutation(kind: str, path: str) -> None:
    if mutation_hook is not None:
        mutation_hook(kind, path)


def _fs_path(spark: SparkSession, path: str) -> tuple[Any, Any]:
    """Return (Hadoop FileSystem, Hadoop Path) for a local path or URI."""
    hadoop_path = jvm.gateway(spark).org.apache.hadoop.fs.Path(path)
    return hadoop_path.getFileSystem(jvm.hadoop_configuration(spark)), hadoop_path


def path_exists(spark: SparkSession, path: str) -> bool:
    """Return whether a file or folder exists (any Hadoop file system)."""
    fs, hadoop_path = _fs_path(spark, path)
    return bool(fs.exists(hadoop_path))


def delete_path(spark: SparkSession, path: str) -> None:
    """Delete a file or a folder with its contents; nothing when it does not exist."""
    fs, hadoop_path = _fs_path(spark, path)
    if fs.exists(hadoop_path):
        _mutation("delete", path)
        fs.delete(hadoop_path, True)


def rename_path(spark: SparkSession, source: str, target: str) -> None:
    """Rename a file or folder (atomic on a local or HDFS file system).

    Raises:
        OSError: when the file system refuses.
    """
    fs, source_path = _fs_path(spark, source)
    _mutation("rename", f"{source} -> {target}")
    if not fs.rename(source_path, _fs_path(spark, target)[1]):
        raise OSError(f"could not rename {source} to {target}")


def copy_file(spark: SparkSession, source: str, target: str) -> None:
    """Copy a file (the target is written in place: copy only into a folder no reader sees yet).

    Raises:
        OSError: when the file system refuses.
    """
    source_fs, source_path = _fs_path(spark, source)
    target_fs, target_path = _fs_path(spark, target)
    _mutation("copy", f"{source} -> {target}")
    file_util = jvm.gateway(spark).org.apache.hadoop.fs.FileUtil
    if not file_util.copy(source_fs, source_path, target_fs, target_path, False, jvm.hadoop_configuration(spark)):
        raise OSError(f"could not copy {source} to {target}")


#: Files ``concatenate_parquet`` merges into one: each is held open until that merged file is done.
CONCATENATE_FILES = 128


def concatenate_parquet(spark: SparkSession, sources: list[str], folder: str) -> bool:
    """Merge parquet files of one schema into files in ``folder`` (one per ``CONCATENATE_FILES`` sources),
    their row groups copied as they are: nothing decoded, nothing encoded (Parquet's own ``ParquetRewriter``).

    An hour of 100,000 series merged this way costs a read and a write of its bytes, where Spark's
    read and write of the rows held a core for minutes (BENCHMARKS.md, "Settings").

    Returns:
        False when the sources' schemas differ (``folder`` deleted again): the caller merges them by Spark.
    """
    java = jvm.gateway(spark)
    rewrite = java.org.apache.parquet.hadoop.rewrite
    for number, start in enumerate(range(0, len(sources), CONCATENATE_FILES)):
        inputs = java.java.util.ArrayList()
        for source in sources[start : start + CONCATENATE_FILES]:
            inputs.add(java.org.apache.hadoop.fs.Path(source))
        target = f"{folder}/part-{number:05d}-{uuid.uuid4()}-c000.parquet"
        _mutation("write", target)
        options = getattr(rewrite, "RewriteOptions$Builder")(
            jvm.hadoop_configuration(spark), inputs, java.org.apache.hadoop.fs.Path(target)
        )
        try:
            rewriter = rewrite.ParquetRewriter(options.build())
        except Py4JJavaError as error:
            if error.java_exception.getClass().getSimpleName() != "InvalidSchemaException":
                raise
            delete_path(spark, folder)
            return False
        try:
            rewriter.processBlocks()
        finally:
            rewriter.close()
    return True


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_libc = ctypes.CDLL(None, use_errno=True)


def exchange_paths(spark: SparkSession, first: str, second: str) -> bool:
    """Swap two existing files or folders in one atomic step, where the file system can; return whether it did.

    Linux local file systems can (``renameat2`` with ``RENAME_EXCHANGE``); for others (HDFS, or a
    kernel or file system without it) nothing is changed and False is returned: the caller then
    swaps by renames, with an instant between them where one of the names is absent.

    Raises:
        OSError: when the file system refuses for another reason.
    """
    local_first, local_second = local_path(first), local_path(second)
    renameat2 = getattr(_libc, "renameat2", None)
    if local_first is None or local_second is None or renameat2 is None:
        return False
    _mutation("exchange", f"{first} <-> {second}")
    done = renameat2(_AT_FDCWD, os.fsencode(local_first), _AT_FDCWD, os.fsencode(local_second), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"could not exchange {first} and {second}: {os.strerror(code)}")


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


def read_partitioned(
    spark: SparkSession, path: str, schema: T.StructType, hours: Iterable[int] | None = None
) -> DataFrame:
    """An hour-partitioned output with its ``hour`` column; with ``hours``, only those folders are listed.

    Empty when the output (or every one of the hours) does not exist yet.
    """
    partitioned = T.StructType([*schema.fields, T.StructField(PARTITION, T.LongType())])
    if not path_exists(spark, path):
        return local_frame(spark, [], partitioned)
    if hours is None:
        return spark.read.schema(partitioned).parquet(path)
    folders = [folder for hour in hours if path_exists(spark, folder := f"{path}/{PARTITION}={hour}")]
    if not folders:
        return local_frame(spark, [], partitioned)
    return spark.read.schema(partitioned).option("basePath", path).parquet(*folders)


#: Parquet options of every output the stages write. Report times and values are nearly unique in a
#: real feed, so their dictionaries fill up and are dropped after the work of building them: plain
#: encoding is faster and smaller (BENCHMARKS.md, "Settings"). Names, grid times and flags keep theirs.
PARQUET_OPTIONS = {f"parquet.enable.dictionary#{column}": "false" for column in (m.T_REPORT, m.VALUE)}


def parquet_writer(df: DataFrame) -> DataFrameWriter:
    """``df.write`` with the project's Parquet options (``PARQUET_OPTIONS``)."""
    return df.write.options(**PARQUET_OPTIONS)


def write_parquet(writer: DataFrameWriter, path: str) -> None:
    """Run a configured parquet writer into ``path`` (every stage's parquet output goes through here)."""
    _mutation("write", path)
    writer.parquet(path)


def replace_output(df: DataFrame, path: str, log: logging.Logger, partition_by: str | None = None) -> None:
    """Write ``df`` as parquet to ``path``, replacing what was there only once it is complete.

    The data is written to ``PATH.staging`` and then exchanged with the old output in one step
    (``exchange_paths``), so readers see either the previous complete output or the new one. Where
    the file system cannot exchange, two renames swap it (the output is absent between them) and
    ``recover_output`` repairs a crash between them. On object stores without atomic rename the
    swap is a copy and not atomic.
    """
    spark = df.sparkSession
    staging, previous = path + STAGING_SUFFIX, path + PREVIOUS_SUFFIX
    recover_output(spark, path, log)
    delete_path(spark, staging)
    if partition_by:
        write_parquet(parquet_writer(df).mode("overwrite").partitionBy(partition_by), staging)
        if not list_files(spark, f"{staging}/{partition_by}=*/*.parquet"):
            # No rows, no partition files: one empty file keeps the schema readable.
            write_parquet(parquet_writer(df.limit(0).drop(partition_by)).mode("overwrite"), staging)
    else:
        write_parquet(parquet_writer(df).mode("overwrite"), staging)
    if not path_exists(spark, path):
        rename_path(spark, staging, path)
    elif exchange_paths(spark, staging, path):
        delete_path(spark, staging)  # now the old output
    else:
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


def make_folder(spark: SparkSession, path: str) -> None:
    """Create a folder and its parents (nothing when it exists)."""
    fs, hadoop_path = _fs_path(spark, path)
    if not fs.exists(hadoop_path):
        _mutation("mkdir", path)
        fs.mkdirs(hadoop_path)


def create_empty_file(spark: SparkSession, path: str) -> None:
    """Create an empty file (a marker), replacing one of the same name."""
    fs, hadoop_path = _fs_path(spark, path)
    _mutation("write", path)
    fs.create(hadoop_path, True).close()


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
    stream = fs.open(hadoop_path)
    try:
        return bytes(jvm.gateway(spark).org.apache.commons.io.IOUtils.toByteArray(stream)).decode("utf-8")
    finally:
        stream.close()


def read_text_tail(spark: SparkSession, path: str, size: int) -> tuple[str, bool]:
    """Read the last ``size`` bytes of a UTF-8 text file through Hadoop; return them and whether that is the
    whole file. The first line may be cut (the caller drops it unless it has the whole file)."""
    fs, hadoop_path = _fs_path(spark, path)
    start = max(0, int(fs.getFileStatus(hadoop_path).getLen()) - size)
    stream = fs.open(hadoop_path)
    try:
        stream.seek(start)
        data = bytes(jvm.gateway(spark).org.apache.commons.io.IOUtils.toByteArray(stream))
    finally:
        stream.close()
    return data.decode("utf-8", errors="replace"), start == 0


def write_bytes(spark: SparkSession, path: str, data: bytes) -> None:
    """Write a small file (a report, a chart), replacing the old one in one step: never absent, never partial.

    On a local file system the file is written beside its target and renamed over it (``os.replace``).
    Elsewhere Hadoop's ``FileContext`` renames with ``OVERWRITE``, which HDFS does in one step.
    """
    local = local_path(path)
    if local is None:
        _write_bytes_hadoop(spark, path, data)
        return
    folder, name = os.path.split(os.path.abspath(local))
    os.makedirs(folder, exist_ok=True)
    staging = os.path.join(folder, f".{name}{STAGING_SUFFIX}")
    _mutation("write", staging)
    with open(staging, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())  # whole on disk before it is renamed in, also after a power cut
    # Written by Hadoop before, the file may have a checksum beside it that no longer matches.
    checksum = os.path.join(folder, f".{name}.crc")
    if os.path.exists(checksum):
        _mutation("delete", checksum)
        os.remove(checksum)
    _mutation("rename", f"{staging} -> {path}")
    os.replace(staging, local)


def _write_bytes_hadoop(spark: SparkSession, path: str, data: bytes) -> None:
    """``write_bytes`` on a file system other than the local one."""
    java = jvm.gateway(spark)
    fs, target = _fs_path(spark, path)
    staging = _fs_path(spark, path + STAGING_SUFFIX)[1]
    _mutation("write", path + STAGING_SUFFIX)
    stream = fs.create(staging, True)
    try:
        stream.write(bytearray(data))
    finally:
        stream.close()
    context = java.org.apache.hadoop.fs.FileContext.getFileContext(target.toUri(), jvm.hadoop_configuration(spark))
    rename_option = java.java.lang.Class.forName("org.apache.hadoop.fs.Options$Rename")
    overwrite = java.java.lang.reflect.Array.newInstance(rename_option, 1)
    overwrite[0] = java.org.apache.hadoop.fs.Options.Rename.OVERWRITE
    _mutation("rename", f"{path + STAGING_SUFFIX} -> {path}")
    context.rename(staging, target, overwrite)


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small UTF-8 text file through Hadoop (see ``write_bytes``)."""
    write_bytes(spark, path, text.encode("utf-8"))
