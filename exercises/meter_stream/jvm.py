"""What PySpark has no public form for, in one place: the session's JVM behind Py4J.

The project needs the JVM for five things PySpark does not offer:

- Hadoop's ``FileSystem`` (``storage``): atomic renames, listings and small files on any Hadoop file
  system, the same calls for a local disk, HDFS or ADLS.
- Parquet's ``ParquetRewriter`` (``storage.concatenate_parquet``): files merged by copying their row
  groups, for the compaction of closed hours.
- Kafka's Java admin client (``consumer``): the topic's id, which tells a recreated topic.
- The RDDs a block persisted (``session.cached_for_the_block``): ``localCheckpoint`` blocks are not
  dropped by ``spark.catalog.clearCache()``.
- The benchmarks' view of Spark's status store and memory (``bench/harness.py``), and the JVM process
  that ``scripts/make_class_archive.py`` closes to make the JVM write its class archive.

Each goes through PySpark's private ``SparkContext._jvm``, ``._jsc`` or ``._gateway``, which PySpark
has kept since its first versions. ``tests/test_common.py`` exercises every function here: when a
pyspark upgrade changes one, that test fails first.
"""

from __future__ import annotations

from typing import Any

from pyspark import SparkContext
from pyspark.sql import SparkSession


def gateway(spark: SparkSession) -> Any:
    """The JVM's packages (``gateway(spark).org.apache.hadoop.fs.Path(...)``)."""
    return spark.sparkContext._jvm


def hadoop_configuration(spark: SparkSession) -> Any:
    """The session's Hadoop configuration (what ``FileSystem.get`` needs)."""
    return spark.sparkContext._jsc.hadoopConfiguration()


def scala_context(spark: SparkSession) -> Any:
    """The Scala ``SparkContext`` (its status store, for the benchmarks' stage tables)."""
    return spark.sparkContext._jsc.sc()


def persisted_rdds(spark: SparkSession) -> dict[int, Any]:
    """The RDDs persisted now, by id (persisted frames and local checkpoints alike)."""
    return {int(rdd_id): rdd for rdd_id, rdd in spark.sparkContext._jsc.getPersistentRDDs().items()}


def jvm_process() -> Any:
    """The ``Popen`` of the JVM that PySpark started for this Python process (None under spark-submit)."""
    gateway_ = SparkContext._gateway
    return None if gateway_ is None else getattr(gateway_, "proc", None)
