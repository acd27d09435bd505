"""The SparkSession builder (UTC, quiet, ``local[*]`` only as a fallback), the Kafka connector's jars, and
the driver-side helpers every stage uses (the row of a global aggregation, the JVM gateway, a frame of
rows the driver holds)."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pyspark
from pyspark import SparkConf, SparkContext
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import types as T

from meter_stream import jvm
from meter_stream.config import get_logger

LOG4J2_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "log4j2.properties")
ENV_JAR_CACHE = "METER_JAR_CACHE"
ENV_LOCAL_DRIVER_MEMORY = "METER_LOCAL_DRIVER_MEMORY"
DEFAULT_LOCAL_DRIVER_MEMORY = "4g"
#: The shuffle data a task reads, at most: a task sorts its input in memory when it can, so this bounds
#: each task's memory as data grows (BENCHMARKS.md, "Settings"); the price is more, smaller files.
ADVISORY_PARTITION_SIZE = "16m"
#: Lets adaptive execution coalesce a persisted plan's shuffle partitions too, which Spark leaves at
#: ``spark.sql.shuffle.partitions`` otherwise (the checker's metrics; BENCHMARKS.md, "Settings").
CACHED_PLAN_PARTITIONING = "spark.sql.optimizer.canChangeCachedPlanOutputPartitioning"
#: Room for a live cycle's generated classes: with Spark's 100, every cycle compiled them all again
#: (BENCHMARKS.md, "Settings").
CODEGEN_CACHE = ("spark.sql.codegen.cache.maxEntries", "2000")
#: Less work per query beyond the query, changing no plan or result (BENCHMARKS.md, "Settings"):
#: - Spark writes every query's plan as text for its listeners, again at each adaptive re-plan.
#: - PySpark records the Python line behind every column function: two more round trips to the JVM each.
QUERY_OVERHEAD = {
    "spark.sql.ui.explainMode": "simple",
    "spark.python.sql.dataFrameDebugging.enabled": "false",
}
#: Session-wide settings the stages' code relies on, set when the session is built: library code changes
#: no setting while the session runs, as the live mode's threads (consumer, compaction) share it.
#: - Caches are kept uncompressed: compression cost more time than the smaller blocks saved
#:   (BENCHMARKS.md, "Settings": the processor's cache).
SESSION_SETTINGS = {
    "spark.sql.inMemoryColumnarStorage.compressed": "false",
}
#: The settings a stage uses unless spark-submit (or spark-defaults) gives its own.
STAGE_DEFAULTS = {
    **SESSION_SETTINGS,
    # The UI's kill links stop jobs with a click: off unless spark-submit turns them on.
    "spark.ui.killEnabled": "false",
    "spark.sql.adaptive.advisoryPartitionSizeInBytes": ADVISORY_PARTITION_SIZE,
    CODEGEN_CACHE[0]: CODEGEN_CACHE[1],
    CACHED_PLAN_PARTITIONING: "true",
    **QUERY_OVERHEAD,
}
#: In local mode (one executor) no wait for data locality: a local backend offers its cores again only
#: when a task ends, so a task that prefers another host (a cached frame over HDFS blocks, whose
#: locations name the DataNode's host) waited for an offer that never came, and the job hung (SPARK-37488).
LOCAL_MODE_DEFAULTS = {"spark.locality.wait": "0s"}
DEFAULT_JAR_CACHE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "jars")
#: A class-data-sharing archive of the classes a stage's JVM loads (``scripts/make_class_archive.py``,
#: run by ``make setup``): the JVM maps them ready-parsed instead of reading Spark's ~250 jars, a few
#: seconds sooner per start (BENCHMARKS.md, "Settings"). One archive per pyspark version; a JVM made
#: by another JDK ignores it (quietly: ``-Xlog:cds*=off``).
ENV_CLASS_ARCHIVE = "METER_CLASS_ARCHIVE"
DEFAULT_CLASS_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "spark-classes")


def class_archive(spark_version: str) -> str:
    """The path of the class-data-sharing archive for ``spark_version`` (which may not exist)."""
    folder = os.environ.get(ENV_CLASS_ARCHIVE) or DEFAULT_CLASS_ARCHIVE
    return os.path.abspath(os.path.join(folder, f"spark-{spark_version}.jsa"))


def class_archive_options(spark_version: str) -> list[str]:
    """The JVM options that use the class archive of ``spark_version``: none when it is not made."""
    archive = class_archive(spark_version)
    return [f"-XX:SharedArchiveFile={archive}", "-Xlog:cds*=off"] if os.path.isfile(archive) else []


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
        inherited = os.environ.get("SPARK_LOCAL_DIRS", "")
        if not submitted.contains("spark.local.dir") and (not inherited or inherited.startswith(LOCAL_DIR_ROOT)):
            # Read when this process starts the JVM (as the setting, Spark warns that a cluster overrides it).
            os.environ["SPARK_LOCAL_DIRS"] = own_local_dir(LOCAL_DIR_ROOT)
        # Spark's UI listens where SPARK_LOCAL_IP says, on every interface without it: in local mode
        # nothing outside this machine needs it (nor the driver). Read when this process starts the JVM.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    local_mode = submitted.get("spark.master", "local[*]").startswith("local")
    for key, value in {**STAGE_DEFAULTS, **(LOCAL_MODE_DEFAULTS if local_mode else {})}.items():
        if not submitted.contains(key):
            builder = builder.config(key, value)
    if not submitted.contains("spark.driver.extraJavaOptions"):
        # Read only when this process starts the JVM; spark-submit keeps the cluster's logging.
        options = [f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}", *class_archive_options(pyspark.__version__)]
        builder = builder.config("spark.driver.extraJavaOptions", " ".join(options))
    if jars:
        builder = builder.config("spark.jars", ",".join(jars))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("INFO" if verbose else "WARN")
    get_logger("session").info("Spark %s, master %s", spark.version, spark.sparkContext.master)
    return spark


#: Where a local stage's Spark keeps its scratch files (shuffle, spilled blocks): a folder per process, so
#: that what a killed process left is found and removed by the next start (``own_local_dir``).
LOCAL_DIR_ROOT = os.path.join(tempfile.gettempdir(), f"meter-stream-spark-{os.getuid()}")


def own_local_dir(root: str) -> str:
    """Return a scratch folder for this process under ``root``, after removing those of processes gone.

    Spark removes its scratch folders when its JVM exits normally; a SIGKILL leaves them behind.
    """
    for folder in glob.glob(os.path.join(root, "pid-*")):
        pid = folder.rsplit("pid-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    own = os.path.join(root, f"pid-{os.getpid()}")
    os.makedirs(own, mode=0o700, exist_ok=True)
    return own


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def local_frame(spark: SparkSession, rows: Iterable[Any], schema: T.StructType | str) -> DataFrame:
    """A frame of rows the driver holds (a catalog, an empty output, a test's input): ``createDataFrame``'s.

    An empty one is made from an RDD without partitions, so no query over it starts Python workers,
    as one over ``createDataFrame([], schema)`` does (BENCHMARKS.md, "Driver-held frames").

    Raises:
        TypeError, ValueError: for a value that does not fit its field's type (``createDataFrame``'s check).
    """
    rows = list(rows)
    if not rows:
        return spark.createDataFrame(spark.sparkContext.emptyRDD(), schema)
    return spark.createDataFrame(rows, schema)


def one_row(aggregate: DataFrame) -> Row:
    """The row of a global aggregation (``frame.agg(...)`` without grouping): always exactly one.

    Raises:
        ValueError: when the frame has no row (it is not a global aggregation).
    """
    row = aggregate.first()
    if row is None:
        raise ValueError("a global aggregation gave no row")
    return row


@contextmanager
def cached_for_the_block(spark: SparkSession) -> Iterator[None]:
    """Release, when the block ends, everything it cached: ``persist`` and ``localCheckpoint`` alike.

    ``spark.catalog.clearCache()`` drops only what ``persist`` cached. A local checkpoint's blocks
    stay (in memory, or on disk) until the JVM's garbage collector happens to collect its RDD: six
    tiny live cycles in one JVM held 2-9 such RDDs after each, and a catch-up cycle at 100,000
    series checkpoints millions of rows. Every cached DataFrame is dropped (``clearCache``); of the
    RDDs, those persisted before the block are kept (those other threads persisted meanwhile would
    not be: none of this project's threads persists anything).
    """
    before = set(jvm.persisted_rdds(spark))
    try:
        yield
    finally:
        spark.catalog.clearCache()
        for rdd_id, rdd in jvm.persisted_rdds(spark).items():
            if rdd_id not in before:
                rdd.unpersist(False)
