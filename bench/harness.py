"""Benchmarks: processor, cleaner and checker against their Spark floors and DuckDB; the consumer against Kafka's tool.

For each size (measurements), on the same generated files and in the same run:
- processor, cleaner and checker: wall time (the stage's own ``run``; the checker's chart apart);
- their floors, the irreducible work of a correct stage (``processor_floor``, ``cleaner_floor``,
  ``checker_floor``: the same reads, shuffles and hour-partitioned writes with the stages' Parquet
  options, none of the validation, flags or accounting);
- DuckDB: the processor's parse, collapse and hour-partitioned write, and the cleaner's gap fill, as
  SQL on the same files;
- the driver's peak JVM heap in use, and the peak of the memory Spark held for data;
- at the largest size, where each action's seconds went, stage by stage (``StageTimes``), written to
  ``stages.md`` next to the results and shown in the report.
Once, for ``--consumer-messages``: the consumer's messages/s from a local broker into consumer_data
against Kafka's ConsumerPerformance tool on the same topic.

Writes ``bench/results.json`` (a list of {metric, rows, value, unit}) and ``BENCHMARKS.md``.

Usage:
    python bench/harness.py [--sizes 1000000,10000000] [--consumer-messages 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, *(os.path.join(ROOT, folder) for folder in ("exercises", "scripts", "tests"))]

import pyspark  # noqa: E402
from pyspark.sql import Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from meter_stream import check_figures, check_report, checker, cleaner, config, consumer, processor  # noqa: E402
from meter_stream import jvm as meter_jvm  # noqa: E402
from meter_stream import message as m  # noqa: E402
from meter_stream.contracts import CLEANED_SCHEMA, PARTITION, PROCESSED_SCHEMA, RAW_SCHEMA, with_hour  # noqa: E402
from meter_stream.session import build_session, kafka_connector_jars  # noqa: E402
from meter_stream.storage import parquet_writer  # noqa: E402

SLOTS_PER_DAY = 8640
START = 1716336000  # 2024-05-22 00:00:00 UTC
RESULTS = os.path.join(ROOT, "bench", "results.json")
REPORT = os.path.join(ROOT, "BENCHMARKS.md")


# --- data ----------------------------------------------------------------------------------------


def measurements(spark, series: int, slots: int):
    """Typed measurements: ``series`` series over ``slots`` 10-s slots, a third skipped, clock drift
    of 0.02 s per slot, and every 500th measurement sent twice (the second a later report).

    Values are energy registers in kWh with three decimals, rising by 0.0025 to 0.0175 kWh per
    slot: nearly unique, as in a real feed (few repeated values would make Parquet's dictionaries
    look better than they are on real data).
    """
    ids = spark.range(series * slots)
    series_idx = (F.col("id") / slots).cast("long")
    slot_idx = F.col("id") % slots
    kept = ids.where(F.abs(F.xxhash64("id")) % 3 != 0)
    t = F.lit(START) + slot_idx * 10.02 + (series_idx % 10).cast("double")
    typed = kept.select(
        F.timestamp_micros((t * 1_000_000).cast("long")).alias(m.T_MEASUREMENT),
        F.timestamp_micros(((t - 10) * 1_000_000).cast("long")).alias(m.T_REPORT),
        F.concat(F.lit("bench-device-"), (series_idx / 2).cast("long").cast("string")).alias(m.DEVICE_ID),
        F.when(series_idx % 2 == 0, m.SIGNAL_IMPORT).otherwise(m.SIGNAL_EXPORT).alias(m.SIGNAL_NAME),
        F.round(F.lit(1000.0) + series_idx * 37.1 + slot_idx * 0.0025 * (series_idx % 7 + 1), 3).alias(m.VALUE),
        F.col("id"),
    )
    replays = typed.where(F.col("id") % 500 == 0).withColumn(
        m.T_REPORT, F.col(m.T_REPORT) + F.expr("INTERVAL 1 SECOND")
    )
    return typed.unionByName(replays)


def raw_rows(typed):
    """The same measurements as the consumer stores them: JSON values in Kafka rows."""
    as_epoch = {c: F.unix_micros(c) / 1e6 for c in (m.T_MEASUREMENT, m.T_REPORT)}
    value = F.to_json(
        F.struct(
            as_epoch[m.T_MEASUREMENT].alias(m.T_MEASUREMENT),
            as_epoch[m.T_REPORT].alias(m.T_REPORT),
            m.DEVICE_ID,
            m.SIGNAL_NAME,
            m.VALUE,
        )
    )
    return typed.select(
        F.lit(None).cast("binary").alias("key"),
        value.cast("binary").alias("value"),
        F.lit("bench").alias("topic"),
        F.lit(0).alias("partition"),
        F.monotonically_increasing_id().alias("offset"),
        # Arrival at the broker a second after the measurement, as a live meter's: the processor judges
        # clocks against it, and a generated history stamped with today's time would all be quarantined.
        (F.col(m.T_MEASUREMENT) + F.expr("INTERVAL 1 SECOND")).alias("timestamp"),
        F.lit(0).alias("timestampType"),
    )


def generate(spark, folder: str, rows: int) -> dict:
    """Write consumer_data and processed_data shapes of about ``rows`` measurements; return the sizes."""
    series = max(2, round(rows / (SLOTS_PER_DAY * 2 / 3)))
    slots = min(SLOTS_PER_DAY, max(10, round(rows * 1.5 / series)))
    typed = measurements(spark, series, slots)
    paths = config.Paths.under(folder)
    raw_rows(typed).write.mode("overwrite").parquet(paths.consumer_data)
    typed.drop("id").write.mode("overwrite").parquet(paths.processed_data)
    return {"series": series, "slots": slots, "rows": spark.read.parquet(paths.consumer_data).count()}


# --- timed work ----------------------------------------------------------------------------------


def _all_processed(accounting: processor.Accounting) -> None:
    """The generated feed is all valid: a quarantined row means the benchmark measures the wrong work."""
    if accounting.quarantined or not accounting.balanced():
        raise RuntimeError(f"the processor quarantined generated rows, so its timing means nothing: {accounting}")


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def processor_floor(spark, source: str, target: str) -> None:
    """The processor's irreducible work: read the raw rows, parse the JSON with the same schema, shuffle by
    the collapse key (ranges of hour and series, as the stage does) and write partitioned by hour with the
    stages' Parquet options. No validation, no quarantine, no accounting, no collapse."""
    raw = spark.read.schema(RAW_SCHEMA).parquet(source)
    msg = F.from_json(F.col("value").cast("string"), processor.MESSAGE_SCHEMA).alias("msg")
    seconds = {name: F.col(f"msg.{name}").cast("double") for name in (m.T_MEASUREMENT, m.T_REPORT)}
    typed = raw.select(msg).select(
        *[F.timestamp_micros((seconds[name] * 1_000_000).cast("long")).alias(name) for name in seconds],
        F.col(f"msg.{m.DEVICE_ID}").alias(m.DEVICE_ID),
        F.col(f"msg.{m.SIGNAL_NAME}").alias(m.SIGNAL_NAME),
        F.col(f"msg.{m.VALUE}").cast("double").alias(m.VALUE),
    )
    shuffled = with_hour(typed).repartitionByRange(PARTITION, m.DEVICE_ID, m.SIGNAL_NAME)
    parquet_writer(shuffled).mode("overwrite").partitionBy(PARTITION).parquet(target)


def cleaner_floor(spark, source: str, target: str) -> None:
    """The cleaner's irreducible work: read the processed rows, bring each series together in time order
    (the stage's shuffle and sort), generate exactly the output's slots (one per slot from the series'
    first to its last measured slot, the value of the measurement at or before it, no flags) and write
    them partitioned by hour with the stages' Parquet options."""
    keys = [m.DEVICE_ID, m.SIGNAL_NAME]
    slot_micros = config.DEFAULT_SLOT_SECONDS * 1_000_000
    micros = F.unix_micros(m.T_MEASUREMENT)
    rows = spark.read.schema(PROCESSED_SCHEMA).parquet(source).withColumn("slot", micros - F.pmod(micros, slot_micros))
    by_series = Window.partitionBy(*keys).orderBy("slot", m.T_MEASUREMENT, m.T_REPORT)
    spans = rows.withColumn("next_slot", F.lead("slot").over(by_series)).where(
        F.col("next_slot").isNull() | (F.col("next_slot") != F.col("slot"))
    )
    steps = F.coalesce((F.col("next_slot") - F.col("slot")) / slot_micros, F.lit(1)).cast("int")
    grid = spans.select(*keys, "slot", m.VALUE, m.T_REPORT, F.explode(F.sequence(F.lit(0), steps - 1)).alias("step"))
    output = grid.select(
        F.timestamp_micros(F.col("slot") + F.col("step") * slot_micros).alias(m.T_MEASUREMENT),
        F.when(F.col("step") == 0, F.col(m.T_REPORT)).alias(m.T_REPORT),
        *keys,
        m.VALUE,
    )
    parquet_writer(with_hour(output)).mode("overwrite").partitionBy(PARTITION).parquet(target)


def checker_floor(spark, source: str) -> None:
    """The checker's irreducible work: read cleaned_data and one per-series aggregation pass (count, min and
    max of the value and of the slot)."""
    cleaned = spark.read.schema(CLEANED_SCHEMA).parquet(source)
    cleaned.groupBy(m.DEVICE_ID, m.SIGNAL_NAME).agg(
        F.count(F.lit(1)).alias("slots"),
        F.min(m.VALUE).alias("low"),
        F.max(m.VALUE).alias("high"),
        F.min(m.T_MEASUREMENT).alias("first"),
        F.max(m.T_MEASUREMENT).alias("last"),
    ).write.format("noop").mode("overwrite").save()


def checker_chart(spark, source: str, chart: str) -> None:
    """The checker's chart alone, as ``make run`` draws it: the first series by name over their last hours."""
    cleaned = spark.read.schema(CLEANED_SCHEMA).parquet(source)
    names = cleaned.select(m.DEVICE_ID, m.SIGNAL_NAME).distinct().orderBy(m.DEVICE_ID, m.SIGNAL_NAME)
    # A handful of names: what the chart draws.
    series = [(r[0], r[1]) for r in names.take(check_report.CHART_SERIES)]
    points = check_report.chart_points(cleaned, series).collect()

    def save(png: bytes) -> None:
        with open(chart, "wb") as handle:
            handle.write(png)

    check_report.draw_chart(points, save)


DUCKDB_PROCESS = """
COPY (
  WITH fields AS (
    SELECT from_json(decode(value), '{{"t_measurement": "VARCHAR", "t_report": "VARCHAR", "device_id": "VARCHAR",
                                      "signal_name": "VARCHAR", "value": "VARCHAR"}}') AS msg, "partition", "offset"
    FROM read_parquet('{source}/**/*.parquet')
  ), typed AS (
    SELECT make_timestamp(CAST(floor(TRY_CAST(msg.t_measurement AS DOUBLE) * 1e6 + 0.5) AS BIGINT)) AS t_measurement,
           make_timestamp(CAST(floor(TRY_CAST(msg.t_report AS DOUBLE) * 1e6 + 0.5) AS BIGINT)) AS t_report,
           msg.device_id AS device_id, msg.signal_name AS signal_name, TRY_CAST(msg.value AS DOUBLE) AS value,
           "partition", "offset"
    FROM fields
  )
  SELECT t_measurement, t_report, device_id, signal_name, value,
         CAST(strftime(t_measurement, '%Y%m%d%H') AS BIGINT) AS hour
  FROM typed
  QUALIFY row_number() OVER (PARTITION BY device_id, signal_name, t_measurement
                             ORDER BY t_report DESC, "partition" DESC, "offset" DESC) = 1
) TO '{target}' (FORMAT parquet, PARTITION_BY (hour))
"""


DUCKDB_GAP_FILL = """
COPY (
  WITH slotted AS (
    SELECT device_id, signal_name, value, t_report,
           (epoch_us(t_measurement) // 10000000) * 10 AS slot, t_measurement
    FROM read_parquet('{source}/**/*.parquet')
  ), first_in_slot AS (
    SELECT * FROM slotted
    QUALIFY row_number() OVER (PARTITION BY device_id, signal_name, slot ORDER BY t_measurement) = 1
  ), spans AS (
    SELECT *, lead(slot) OVER w AS next_slot, lead(value) OVER w AS next_value
    FROM first_in_slot WINDOW w AS (PARTITION BY device_id, signal_name ORDER BY slot)
  )
  SELECT to_timestamp(slot + 10 * step) AS t_measurement,
         CASE WHEN step = 0 THEN t_report END AS t_report, device_id, signal_name,
         CASE WHEN step = 0 THEN value
              ELSE value + (next_value - value) * step / ((next_slot - slot) / 10) END AS value,
         CASE WHEN step = 0 THEN 'measured' ELSE 'interpolated' END AS quality
  FROM spans, range(0, CAST(coalesce((next_slot - slot) / 10, 1) AS BIGINT)) AS r(step)
) TO '{target}' (FORMAT parquet)
"""


def duckdb(sql: str, source: str, target: str) -> None:
    import duckdb

    connection = duckdb.connect()
    connection.execute(f"SET threads = {os.cpu_count()}")
    connection.execute(sql.format(source=source, target=target))
    connection.close()


class MemorySampler:
    """Samples the driver JVM's memory every 0.2 s.

    ``data_peak_mib``: the most memory Spark's operators held at once for data (execution memory:
    sort, shuffle and aggregation buffers; storage memory: cached blocks), from Spark's memory
    manager. In local mode the tasks run in the driver, so this is the part of the driver's heap
    that can grow with the input. ``used_peak_mib``: the largest sample of the whole heap in use,
    garbage not yet collected included, which follows the collector's timing (the heap is sized
    by ``spark.driver.memory``, and the collector lets garbage fill a good part of it) more than
    the work.
    """

    def __init__(self, spark) -> None:
        jvm = meter_jvm.gateway(spark)
        self._memory = jvm.java.lang.management.ManagementFactory.getMemoryMXBean()
        self._spark_memory = jvm.org.apache.spark.SparkEnv.get().memoryManager()
        self._stop = threading.Event()
        self.data_peak_mib = 0.0
        self.used_peak_mib = 0.0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.used_peak_mib = max(self.used_peak_mib, self._memory.getHeapMemoryUsage().getUsed() / 2**20)
            held = self._spark_memory.executionMemoryUsed() + self._spark_memory.storageMemoryUsed()
            self.data_peak_mib = max(self.data_peak_mib, held / 2**20)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


class StageTimes:
    """Times actions and keeps where their seconds went, stage by stage, from Spark's status store.

    Each action runs in a job group of its own; afterwards its jobs' stages are read from the store
    the Spark UI reads (in the driver, no UI or event log needed): wall and task seconds, tasks,
    rows read, shuffled and written, and the call site that started the stage.
    """

    def __init__(self, spark) -> None:
        self._spark = spark
        self.stages: dict[str, list[dict]] = {}
        self.seconds: dict[str, float] = {}

    def time(self, name: str, action) -> float:
        context = self._spark.sparkContext
        context.setJobGroup(name, name)
        try:
            seconds = timed(action)
        finally:
            context.setLocalProperty("spark.jobGroup.id", None)
            context.setLocalProperty("spark.job.description", None)
        self.seconds[name] = seconds
        self.stages[name] = self._stages_of(name)
        return seconds

    def _stages_of(self, group: str) -> list[dict]:
        store = meter_jvm.scala_context(self._spark).statusStore()
        scala = meter_jvm.gateway(self._spark).scala.jdk.javaapi.CollectionConverters
        stages = []
        for job in scala.asJava(store.jobsList(None)):
            if not job.jobGroup().isDefined() or job.jobGroup().get() != group:
                continue
            for stage_id in scala.asJava(job.stageIds()):
                stage = store.lastStageAttempt(stage_id)
                if not stage.submissionTime().isDefined() or not stage.completionTime().isDefined():
                    continue  # skipped: its output was there already
                start, end = stage.submissionTime().get().getTime(), stage.completionTime().get().getTime()
                stages.append(
                    {
                        "stage": stage.stageId(),
                        "site": re.sub(r" at .*/", " at ", stage.name()),
                        "tasks": stage.numTasks(),
                        "start": start / 1000,
                        "wall": (end - start) / 1000,
                        "task": stage.executorRunTime() / 1000,
                        "input": stage.inputRecords(),
                        "shuffle_read": stage.shuffleReadRecords(),
                        "shuffle_write": stage.shuffleWriteRecords(),
                        "output": stage.outputRecords(),
                    }
                )
        return sorted(stages, key=lambda s: s["stage"])

    def table(self, name: str) -> list[str]:
        """The action's stages as Markdown, with the time outside any stage (planning, driver, renames)."""
        stages = self.stages.get(name, [])
        covered, reach = 0.0, float("-inf")
        for stage in sorted(stages, key=lambda s: s["start"]):
            end = stage["start"] + stage["wall"]
            covered += max(0.0, end - max(stage["start"], reach))
            reach = max(reach, end)
        lines = [
            f"**{name}**: {self.seconds[name]:.1f} s, of which {covered:.1f} s in Spark stages and "
            f"{self.seconds[name] - covered:.1f} s outside them (planning, the driver, file renames, DuckDB)",
            "",
            "| stage | started by | tasks | wall s | task s | read | shuffle read | shuffle write | written |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['stage']} | {s['site']} | {s['tasks']} | {s['wall']:.2f} | {s['task']:.2f} | {s['input']:,} | "
            f"{s['shuffle_read']:,} | {s['shuffle_write']:,} | {s['output']:,} |"
            for s in stages
        ]
        return [*lines, ""]


#: Measurements of the warm-up pass (``main``).
WARM_UP_ROWS = 20_000


def bench_size(spark, work: str, rows: int) -> tuple[list[dict], StageTimes]:
    folder = os.path.join(work, f"size-{rows}")
    shape = generate(spark, folder, rows)
    paths = config.Paths.under(folder)
    n = shape["rows"]
    spark.catalog.clearCache()
    results = {}
    times = StageTimes(spark)

    def measure(metric: str, action) -> None:
        results[metric] = times.time(f"{metric.removesuffix('_seconds')} at {rows:,}", action)

    def scratch(name: str) -> str:
        return os.path.join(folder, name)

    sampler = MemorySampler(spark).__enter__()
    measure("processor_seconds", lambda: _all_processed(processor.run(spark, paths)))
    measure("processor_floor_seconds", lambda: processor_floor(spark, paths.consumer_data, scratch("floor_processor")))
    measure(
        "processor_duckdb_seconds", lambda: duckdb(DUCKDB_PROCESS, paths.consumer_data, scratch("duckdb_processed"))
    )
    # The cleaner reads the generated processed shape (every series accepted), not the processor's output.
    generated = config.Paths.under(folder, processed_data=os.path.join(folder, "processed_data"))
    measure("cleaner_seconds", lambda: cleaner.run(spark, generated, cleaner.CleanerConfig(expected_series=None)))
    measure("cleaner_floor_seconds", lambda: cleaner_floor(spark, generated.processed_data, scratch("floor_cleaner")))
    measure(
        "cleaner_duckdb_seconds",
        lambda: duckdb(DUCKDB_GAP_FILL, generated.processed_data, scratch("duckdb_cleaned.parquet")),
    )
    check_config = check_figures.CheckerConfig(expected_series=None, default_bounds=(0.0, 1e9))
    measure("checker_seconds", lambda: checker.run(spark, generated, check_config, show=False))
    measure("checker_floor_seconds", lambda: checker_floor(spark, generated.cleaned_data))
    measure("checker_chart_seconds", lambda: checker_chart(spark, generated.cleaned_data, scratch("chart.png")))
    sampler.__exit__()
    results["driver_peak_mib"] = sampler.used_peak_mib
    results["driver_data_peak_mib"] = sampler.data_peak_mib
    print(f"size {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items()), flush=True)
    rows_out = size_metrics(results, n)
    shutil.rmtree(folder, ignore_errors=True)
    return rows_out, times


def size_metrics(results: dict[str, float], n: int) -> list[dict]:
    """The result rows of one size: its measured seconds and MiB, each stage over its baselines, rows per second."""
    rows_out = [
        {"metric": k, "rows": n, "value": round(v, 3), "unit": "MiB" if "mib" in k else "s"} for k, v in results.items()
    ]
    for stage, baseline in (
        ("processor", "floor"),
        ("processor", "duckdb"),
        ("cleaner", "floor"),
        ("cleaner", "duckdb"),
        ("checker", "floor"),
    ):
        ratio = results[f"{stage}_seconds"] / results[f"{stage}_{baseline}_seconds"]
        rows_out.append({"metric": f"{stage}_over_{baseline}", "rows": n, "value": round(ratio, 3), "unit": "ratio"})
    for stage in ("processor", "cleaner"):
        rate = round(n / results[f"{stage}_seconds"])
        rows_out.append({"metric": f"{stage}_rows_per_s", "rows": n, "value": rate, "unit": "rows/s"})
    return rows_out


# --- consumer against Kafka's own tool -----------------------------------------------------------


def kafka_jars() -> str:
    with open(os.path.join(ROOT, "scripts", "maven", "kafka-broker.pom.xml")) as handle:
        found = re.search(r"<kafka.version>(.*)</kafka.version>", handle.read())
    if found is None:
        raise ValueError("scripts/maven/kafka-broker.pom.xml names no <kafka.version>")
    version = found.group(1)
    return os.path.join(os.environ.get("METER_JAR_CACHE") or os.path.join(ROOT, ".cache", "jars"), f"kafka-{version}")


def produce(bootstrap: str, topic: str, messages: int) -> None:
    """Send ``messages`` copies of one measurement to ``topic``."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000})
    payload = json.dumps(m.make_message(1716369246.734911, 1716369236.734911, "device1", m.SIGNAL_IMPORT, 12))
    for i in range(messages):
        while True:
            try:
                producer.produce(topic, value=payload.encode())
                break
            except BufferError:
                producer.poll(0.1)
        if i % 10000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0


def bench_consumer(spark, work: str, messages: int, bootstrap: str) -> list[dict]:
    topic = f"bench-{int(time.time())}"
    # The Kafka source's classes are not warm yet (the size runs do not use them): a first run on
    # another topic warms the JVM up, as the size runs' first pass does; its figures are dropped.
    warm_up = max(1, messages // 2)
    produce(bootstrap, f"{topic}-warm-up", warm_up)
    warm_up_paths = config.Paths.under(os.path.join(work, "consumer-warm-up"))
    consumer.run(spark, warm_up_paths, consumer.ConsumerConfig(bootstrap, f"{topic}-warm-up"))
    produce(bootstrap, topic, messages)
    paths = config.Paths.under(os.path.join(work, "consumer"))
    started = time.perf_counter()
    ingested = consumer.run(spark, paths, consumer.ConsumerConfig(bootstrap, topic))
    seconds = time.perf_counter() - started
    tool_rate = kafka_tool_rate(bootstrap, topic, messages)
    # Like the tool's, the consumer's rate counts from its first batch: the batches' own time
    # (query set-up, broker probe and topic-id lookup excluded); the whole run's rate is kept too.
    rate, wall_rate = ingested.rows / ingested.batch_seconds, messages / seconds
    print(f"consumer {rate:.0f} msg/s ({wall_rate:.0f} whole run), ConsumerPerformance {tool_rate:.0f} msg/s")
    return [
        {"metric": "consumer_msgs_per_s", "rows": messages, "value": round(rate), "unit": "msg/s"},
        {"metric": "consumer_run_msgs_per_s", "rows": messages, "value": round(wall_rate), "unit": "msg/s"},
        {"metric": "kafka_tool_msgs_per_s", "rows": messages, "value": round(tool_rate), "unit": "msg/s"},
        {"metric": "consumer_over_kafka_tool", "rows": messages, "value": round(rate / tool_rate, 3), "unit": "ratio"},
    ]


def kafka_tool_rate(bootstrap: str, topic: str, messages: int) -> float:
    """Kafka's own ConsumerPerformance over the topic's ``messages``: its rate (msg/s) from its first fetch."""
    java = os.path.join(
        subprocess.check_output([os.path.join(ROOT, "scripts", "java-home")], text=True).strip(), "bin", "java"
    )
    started = time.perf_counter()
    tool = subprocess.run(
        [
            java,
            "-cp",
            os.path.join(kafka_jars(), "*"),
            "org.apache.kafka.tools.ConsumerPerformance",
            "--bootstrap-server",
            bootstrap,
            "--topic",
            topic,
            "--messages",
            str(messages),
            "--timeout",
            "60000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    tool_seconds = time.perf_counter() - started
    # The tool prints its own rate, measured from its first fetch (JVM start excluded): use it.
    header, values = [line for line in tool.stdout.splitlines() if line.strip()][-2:]
    fields = dict(zip([h.strip() for h in header.split(",")], [v.strip() for v in values.split(",")], strict=False))
    return float(fields.get("nMsg.sec", messages / tool_seconds))


# --- report --------------------------------------------------------------------------------------


def machine() -> dict:
    java = subprocess.run(
        [
            os.path.join(
                subprocess.check_output([os.path.join(ROOT, "scripts", "java-home")], text=True).strip(), "bin", "java"
            ),
            "-version",
        ],
        capture_output=True,
        text=True,
    ).stderr.splitlines()[0]
    with open("/proc/meminfo") as handle:
        memory = int(handle.readline().split()[1]) / 2**20
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "java": java,
        "spark": pyspark.__version__,
        "kafka": os.path.basename(kafka_jars()).removeprefix("kafka-"),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="measurements per size, comma-separated")
    parser.add_argument("--consumer-messages", type=int, default=1_000_000)
    parser.add_argument(
        "--bootstrap-servers",
        default=None,
        help="broker for the consumer benchmark (default: a local broker started for the run)",
    )
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--report", default=REPORT, help="BENCHMARKS.md to write ('' for none)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)

    spark = build_session("meter-stream bench", jars=kafka_connector_jars(pyspark.__version__))
    work = args.work or tempfile.mkdtemp(prefix="meter-bench-")
    results: list[dict] = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    # A first pass on a small input warms the JVM up (JIT, class loading), so that no stage pays
    # for it in the figures; its results are dropped. No larger than the smallest size measured.
    bench_size(spark, work, min([WARM_UP_ROWS, *sizes]))
    breakdown = []
    for size in sizes:
        figures, times = bench_size(spark, work, size)
        results += figures
        breakdown = [f"Where the seconds go at {figures[0]['rows']:,} measurements, stage by stage:", ""]
        breakdown += [line for name in times.seconds for line in times.table(name)]
    cleaner_times = {r["rows"]: r["value"] for r in results if r["metric"] == "cleaner_seconds"}
    if len(cleaner_times) >= 2:
        small, large = min(cleaner_times), max(cleaner_times)
        results.append(
            {
                "metric": "scaling_10x",
                "rows": large,
                "value": round(cleaner_times[large] / cleaner_times[small], 3),
                "unit": "ratio",
            }
        )
    if args.consumer_messages:
        results += with_broker(args.bootstrap_servers, lambda b: bench_consumer(spark, work, args.consumer_messages, b))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(stages_file(args.results), "w") as handle:
        handle.write("\n".join(breakdown))
    save_results(args.results, results, args.report, owns=owns)
    shutil.rmtree(work, ignore_errors=True) if not args.work else None
    return 0


def owns(metric: str) -> bool:
    """Whether a metric is this benchmark's (the live ones are bench/live_bench.py's, the cluster ones
    bench/cluster_bench.py's)."""
    return not metric.startswith(("live_", "cluster_"))


def stages_file(results: str) -> str:
    """The stage-by-stage breakdown of the largest size, written next to the results and shown in the report."""
    return os.path.join(os.path.dirname(os.path.abspath(results)), "stages.md")


def save_results(path: str, results: list[dict], report: str, owns) -> None:
    """Replace the metrics a benchmark ``owns`` (a test of the name) in ``path`` with ``results``; rewrite the report.

    The other benchmark's metrics are kept; the caller's old ones go, also those it no longer measures.
    """
    kept = []
    if os.path.exists(path):
        with open(path) as handle:
            new = {r["metric"] for r in results}
            kept = [r for r in json.load(handle) if r["metric"] not in new and not owns(r["metric"])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(kept + results, handle, indent=2)
    if report:
        write_report(report, kept + results, machine(), stages_file(path))


def with_broker(bootstrap: str | None, action):
    if bootstrap:
        return action(bootstrap)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tests.conftest import free_port

    env = {
        **os.environ,
        "KAFKA_PORT": str(free_port()),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DATA_DIR": tempfile.mkdtemp(prefix="meter-bench-kafka-"),
    }
    script = os.path.join(ROOT, "scripts", "kafka-local")
    subprocess.run([script, "start"], env=env, check=True)
    try:
        return action(f"127.0.0.1:{env['KAFKA_PORT']}")
    finally:
        subprocess.run([script, "stop"], env=env, check=False)
        shutil.rmtree(env["KAFKA_DATA_DIR"], ignore_errors=True)


#: One line per metric: what it means (``<n>``: a series count, ``<h>``: a history length).
MEANINGS = {
    "processor_seconds": "the processor (`processor.run`): consumer_data to processed_data and quarantine_data",
    "processor_floor_seconds": "read the raw rows, parse the JSON with the same schema, shuffle by the collapse key "
    "(ranges of hour and series), write partitioned by hour",
    "processor_duckdb_seconds": "DuckDB: the same parse, collapse (latest t_report per measurement) and "
    "hour-partitioned write as SQL on the same files",
    "cleaner_seconds": "the cleaner (`cleaner.run`): processed_data to the 10-s grid in cleaned_data",
    "cleaner_floor_seconds": "read the processed rows, bring each series together in time order (the same shuffle "
    "and sort), generate exactly the output's slots (value of the measurement at or before, no flags), write "
    "partitioned by hour",
    "cleaner_duckdb_seconds": "DuckDB: the same gap fill (linear, one row per slot) as SQL on the same files",
    "checker_seconds": "the checker (`checker.run` without the tables and chart): every check and the JSON report",
    "checker_floor_seconds": "read cleaned_data and one per-series aggregation pass (count, min and max of the value "
    "and of the slot)",
    "checker_chart_seconds": "the checker's chart alone (8 series over their last 24 h)",
    "processor_over_floor": "processor_seconds / processor_floor_seconds",
    "processor_over_duckdb": "processor_seconds / processor_duckdb_seconds",
    "cleaner_over_floor": "cleaner_seconds / cleaner_floor_seconds",
    "cleaner_over_duckdb": "cleaner_seconds / cleaner_duckdb_seconds",
    "checker_over_floor": "checker_seconds / checker_floor_seconds",
    "processor_rows_per_s": "raw rows per second through the processor",
    "cleaner_rows_per_s": "measurements per second through the cleaner",
    "driver_peak_mib": "the largest driver JVM heap in use over a size's runs (garbage included)",
    "driver_data_peak_mib": "the most memory Spark held for data at once (execution and storage memory)",
    "scaling_10x": "cleaner_seconds at the largest size / at the smallest (10× the data)",
    "consumer_msgs_per_s": "the consumer's messages/s from a local broker into consumer_data, from its first batch",
    "consumer_run_msgs_per_s": "the same over the consumer's whole run (query start and broker probe included)",
    "kafka_tool_msgs_per_s": "Kafka's ConsumerPerformance tool on the same topic",
    "consumer_over_kafka_tool": "consumer_msgs_per_s / kafka_tool_msgs_per_s",
    "live_cycle_s_<h>": "four series, the live runner's median cycle after <h> of history",
    "live_cycle_<h>_over_<h>": "the median cycle after the longer history / after the shorter",
    "cluster_full_run_s_local2": "the pipeline's full run (processor, cleaner, checker; `exercises/pipeline.py "
    "--skip-consumer` under spark-submit, JVM start included) of 1 h at 100,000 series, `--master local[2]`, "
    "datastore on the local disk",
    "cluster_full_run_s_1w": "the same on the standalone cluster with 1 worker of 1 core, datastore on HDFS",
    "cluster_full_run_s_2w": "the same with 2 workers of 1 core each",
    "cluster_speedup_2w": "cluster_full_run_s_1w / cluster_full_run_s_2w",
    "cluster_<stage>_s_<run>": "the stage's seconds within the full run of <run> (`pipeline.py`'s log line)",
    "live_latency_p50_s": "four series: median seconds from t_measurement to its slot in cleaned_data",
    "live_latency_p95_s": "four series: 95th percentile of the same",
    "live_latency_p50_s_<n>": "<n> series, settled cycles: median seconds from t_measurement to cleaned_data",
    "live_latency_p95_s_<n>": "<n> series: 95th percentile of the same",
    "live_cycle_s_<n>": "<n> series: the median settled cycle",
    "live_msgs_per_s_<n>": "<n> series: messages per second the producer sent while live",
    "live_catch_up_s_<n>": "<n> series: seconds from the runner's start to a 10-minute backlog absorbed",
    "live_settle_s_<n>": "<n> series: seconds from the live producer's start to the first settled cycle "
    "(one that took in at most 1.5 rounds of the feed: the runner caught up with it)",
    "live_restart_s_<n>": "<n> series: seconds from a SIGKILL of the runner while a cycle was in flight to the "
    "next committed cycle of the restarted runner",
    "live_outage_recovery_s_<n>": "<n> series: seconds from the broker's return after a 2-minute outage to the end "
    "of the first cycle whose latency p95 is back within 1.5× the settled cycles' before the outage",
    "live_catch_up_ratio_<n>_<h>": "<n> series, the runner down for <h> while the producer went on: hours of "
    "backlog absorbed per hour of wall time, up to the first settled cycle",
    "live_catch_up_heap_mib_<n>_<h>": "the same run: the runner JVM's peak used heap (jstat, every 2 s) while it "
    "caught up",
    "live_steady_heap_mib_<n>_<h>": "the same run: the runner JVM's peak used heap over the six settled cycles after",
    "live_latency_p95_s_hour_close_<n>": "<n> series, live from an empty datastore until two closed hours were "
    "compacted in both outputs: latency p95 over the settled cycles up to the last swap",
    "live_latency_max_s_hour_close_<n>": "the same run: the largest latency of those cycles",
    "live_cycle_s_hour_close_<n>": "the same run: the median of those cycles",
    "live_hour_compacted_s_<n>": "the same run: the most seconds from the end of a closed hour to the commit that "
    "swapped it in compacted (either output)",
    "live_compactions_dropped_<n>": "the same run: merges of a closed hour dropped (a late measurement rewrote it "
    "meanwhile)",
    "live_soak_cycle_s_start_<n>": "<n> series, a producer clock a day in the past running 20× faster until now: "
    "the median of the first 10 cycles",
    "live_soak_cycle_s_end_<n>": "the same soak: the median of the last 10 cycles of the compressed day",
    "live_soak_cycle_end_over_start_<n>": "the same soak: the last cycles' median over the first ones'",
    "live_soak_heap_mib_start_<n>": "the same soak: the runner JVM's peak used heap over the first 10 cycles",
    "live_soak_heap_mib_end_<n>": "the same soak: the same over the last 10 cycles",
    "live_soak_files_consumer_data_start_<n>": "the same soak: parquet files in consumer_data after the first cycles",
    "live_soak_files_consumer_data_end_<n>": "the same, at the end of the compressed day",
    "live_soak_files_processed_data_start_<n>": "the same soak: parquet files in processed_data after the first cycles",
    "live_soak_files_processed_data_end_<n>": "the same, at the end of the compressed day",
    "live_soak_files_cleaned_data_start_<n>": "the same soak: parquet files in cleaned_data after the first cycles",
    "live_soak_files_cleaned_data_end_<n>": "the same, at the end of the compressed day",
    "live_soak_files_quarantine_data_start_<n>": "the same soak: parquet files in quarantine_data after the first "
    "cycles",
    "live_soak_files_quarantine_data_end_<n>": "the same, at the end of the compressed day",
    "live_soak_files_per_closed_hour_max_start_<n>": "the same soak: the most files in a closed hour of cleaned_data "
    "(the newest two hours left out), after the first cycles",
    "live_soak_files_per_closed_hour_max_end_<n>": "the same, at the end of the compressed day",
    "live_soak_sink_log_mib_start_<n>": "the same soak: consumer_data's sink log (_spark_metadata) after the first "
    "cycles",
    "live_soak_sink_log_mib_end_<n>": "the same, at the end of the compressed day",
    "live_compaction_s_spark_<n>": "a closed hour of cleaned_data at <n> series as cycles leave it (360 slots, 720 "
    "files) merged by Spark's read and write of its rows on half the task slots (the compactor where schemas differ); "
    "the faster of two runs, alternated with those of the copy",
    "live_compaction_s_copy_<n>": "the same hour merged by copying its files' row groups (`concatenate_parquet`, the "
    "compactor's way)",
    "live_compaction_cpu_s_spark_<n>": "the JVM's CPU seconds (user and system) of the Spark merge",
    "live_compaction_cpu_s_copy_<n>": "the JVM's CPU seconds of the copy",
    "live_compaction_copy_over_spark_<n>": "live_compaction_s_copy_<n> / live_compaction_s_spark_<n>",
}


def meaning(metric: str) -> str:
    """The line of ``MEANINGS`` for a metric, its series count or history length generalised."""
    for pattern, general in (
        (r"^cluster_(processor|cleaner|checker)_s_\w+$", "cluster_<stage>_s_<run>"),
        (r"^(live_\w+)_\d+_\d+[smhd]$", r"\1_<n>_<h>"),
        (r"^(.*)_\d+$", r"\1_<n>"),
        (r"^live_cycle_\w+_over_\w+$", "live_cycle_<h>_over_<h>"),
        (r"^live_cycle_s_\w+$", "live_cycle_s_<h>"),
        (r"^.*$", r"\g<0>"),
    ):
        if re.match(pattern, metric) and re.sub(pattern, general, metric) in MEANINGS:
            return MEANINGS[re.sub(pattern, general, metric)]
    return "?"


def write_report(path: str, results: list[dict], host: dict, stages: str | None = None) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {host['date']}: {host['cores']} cores, {host['memory_gib']} GiB, {host['java']}, "
        f"Spark {host['spark']} (local[*]), Kafka {host['kafka']}, Python {host['python']}. One run; "
        "every figure of a size comes from the same run on the same files, so ratios compare like with like.",
        "",
        "Reproduce: `make bench` (about 1 M and 10 M measurements, 1 M Kafka messages) and `make bench-live` "
        "(the live runner after 1 h and 24 h of history of four series, and at 4, 10,000 and 100,000 series; a "
        "kill and restart, a catch-up after downtime, a broker outage, two hours closing, a compressed day, "
        "the compaction of an hour both ways; "
        "`bench/live_bench.py --help` "
        "runs parts), and `make bench-cluster` (the full run of 1 h at 100,000 series on a local Spark standalone "
        "cluster of 1 and of 2 one-core workers with HDFS, and locally on the same two cores).",
        "",
        "| metric | rows | value | unit |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r['metric']} | {r['rows']:,} | {r['value']:,} | {r['unit']} |" for r in results]
    names = list(dict.fromkeys(r["metric"] for r in results))
    lines += ["", "What each metric measures:", "", "| metric | meaning |", "|---|---|"]
    lines += [f"| {name} | {meaning(name)} |" for name in names]
    if stages and os.path.exists(stages):
        with open(stages) as handle:
            lines += ["", handle.read().rstrip()]
    marker = "<!-- results above are rewritten by bench/harness.py; notes below are kept -->"
    notes = ""
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
        notes = text.split(marker, 1)[1] if marker in text else ""
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n\n" + marker + notes)


if __name__ == "__main__":
    sys.exit(main())
