"""Benchmarks: processor, cleaner and consumer against their Spark floors, DuckDB and Kafka's own tool.

For each size (measurements), on the same generated files and in the same run:
- processor and cleaner: wall time and rows/s (the stage's own ``run``);
- their floors, the work any correct implementation must do: for the processor, read the raw rows,
  parse the JSON with the same schema and write; for the cleaner, read the processed rows,
  repartition by series, sort within partitions and write (every write here uses the stages'
  Parquet options, ``PARQUET_OPTIONS``);
- the cleaner's output write alone: its finished output read and written again, partitioned by
  hour (the part of its time that grows with the filled slots, which its floor does not write);
- DuckDB: the same gap fill (linear, one row per slot) as SQL on the same processed files;
- the driver's peak JVM heap in use, and the peak of the memory Spark held for data.
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
from pyspark.sql import functions as F  # noqa: E402

import cleaner  # noqa: E402
import consumer  # noqa: E402
import processor  # noqa: E402
from common import config  # noqa: E402
from common import message as m  # noqa: E402
from common.contracts import CLEANED_SCHEMA, PARTITION, PROCESSED_SCHEMA, RAW_SCHEMA  # noqa: E402
from common.session import build_session, kafka_connector_jars  # noqa: E402
from common.storage import parquet_writer, read_partitioned  # noqa: E402

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
        F.current_timestamp().alias("timestamp"),
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


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def processor_floor(spark, source: str, target: str) -> None:
    raw = spark.read.schema(RAW_SCHEMA).parquet(source)
    parsed = raw.select(F.from_json(F.col("value").cast("string"), processor.MESSAGE_SCHEMA).alias("msg"))
    parquet_writer(parsed.select("msg.*")).mode("overwrite").parquet(target)


def cleaner_floor(spark, source: str, target: str) -> None:
    keys = [m.DEVICE_ID, m.SIGNAL_NAME]
    rows = spark.read.schema(PROCESSED_SCHEMA).parquet(source)
    parquet_writer(rows.repartition(*keys).sortWithinPartitions(*keys, m.T_MEASUREMENT)).mode("overwrite").parquet(
        target
    )


def output_write(spark, source: str, target: str) -> None:
    """The write every cleaner does, with no logic: its finished output read and written again as the
    cleaner writes it (partitioned by hour). The cleaner writes more rows than it reads (the filled
    slots), so this part of its time grows with the holes, not with the input the floor writes."""
    parquet_writer(read_partitioned(spark, source, CLEANED_SCHEMA)).mode("overwrite").partitionBy(PARTITION).parquet(
        target
    )


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


def duckdb_gap_fill(source: str, target: str) -> None:
    import duckdb

    connection = duckdb.connect()
    connection.execute(f"SET threads = {os.cpu_count()}")
    connection.execute(DUCKDB_GAP_FILL.format(source=source, target=target))
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
        jvm = spark.sparkContext._jvm
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


def bench_size(spark, work: str, rows: int) -> list[dict]:
    folder = os.path.join(work, f"size-{rows}")
    shape = generate(spark, folder, rows)
    paths = config.Paths.under(folder)
    n = shape["rows"]
    spark.catalog.clearCache()
    results = {}
    sampler = MemorySampler(spark).__enter__()
    results["processor_seconds"] = timed(lambda: processor.run(spark, paths))
    results["processor_floor_seconds"] = timed(
        lambda: processor_floor(spark, paths.consumer_data, os.path.join(folder, "floor_processor"))
    )
    # The cleaner reads the generated processed shape (every series accepted), not the processor's output.
    generated = config.Paths.under(folder, processed_data=os.path.join(folder, "processed_data"))
    clean_config = cleaner.CleanerConfig(expected_series=None)
    results["cleaner_seconds"] = timed(lambda: cleaner.run(spark, generated, clean_config))
    results["cleaner_floor_seconds"] = timed(
        lambda: cleaner_floor(spark, generated.processed_data, os.path.join(folder, "floor_cleaner"))
    )
    results["cleaner_output_write_seconds"] = timed(
        lambda: output_write(spark, generated.cleaned_data, os.path.join(folder, "rewritten_cleaned"))
    )
    results["duckdb_seconds"] = timed(
        lambda: duckdb_gap_fill(generated.processed_data, os.path.join(folder, "duckdb_cleaned.parquet"))
    )
    sampler.__exit__()
    results["driver_peak_mib"] = sampler.used_peak_mib
    results["driver_data_peak_mib"] = sampler.data_peak_mib
    print(f"size {n}: " + ", ".join(f"{k} {v:.1f}" for k, v in results.items()), flush=True)
    rows_out = [
        {"metric": k, "rows": n, "value": round(v, 3), "unit": "MiB" if "mib" in k else "s"} for k, v in results.items()
    ]
    for name, over in (
        ("processor_over_floor", ("processor_seconds", "processor_floor_seconds")),
        ("cleaner_over_floor", ("cleaner_seconds", "cleaner_floor_seconds")),
        ("cleaner_over_duckdb", ("cleaner_seconds", "duckdb_seconds")),
        ("cleaner_output_write_over_floor", ("cleaner_output_write_seconds", "cleaner_floor_seconds")),
    ):
        rows_out.append(
            {"metric": name, "rows": n, "value": round(results[over[0]] / results[over[1]], 3), "unit": "ratio"}
        )
    for stage in ("processor", "cleaner"):
        rows_out.append(
            {
                "metric": f"{stage}_rows_per_s",
                "rows": n,
                "value": round(n / results[f"{stage}_seconds"]),
                "unit": "rows/s",
            }
        )
    shutil.rmtree(folder, ignore_errors=True)
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
    tool_rate = float(fields.get("nMsg.sec", messages / tool_seconds))
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
    results = []
    # A first pass on a small input warms the JVM up (JIT, class loading), so that no stage pays
    # for it in the figures; its results are dropped.
    bench_size(spark, work, 20_000)
    for size in [int(s) for s in args.sizes.split(",") if s]:
        results += bench_size(spark, work, size)
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
    save_results(args.results, results, args.report)
    shutil.rmtree(work, ignore_errors=True) if not args.work else None
    return 0


def save_results(path: str, results: list[dict], report: str) -> None:
    """Replace the given metrics in ``path`` (others, from the other benchmark, are kept); rewrite the report."""
    kept = []
    if os.path.exists(path):
        with open(path) as handle:
            new = {r["metric"] for r in results}
            kept = [r for r in json.load(handle) if r["metric"] not in new]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(kept + results, handle, indent=2)
    if report:
        write_report(report, kept + results, machine())


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


def write_report(path: str, results: list[dict], host: dict) -> None:
    lines = [
        "# Benchmarks",
        "",
        f"Measured on {host['date']}: {host['cores']} cores, {host['memory_gib']} GiB, {host['java']}, "
        f"Spark {host['spark']} (local[*]), Kafka {host['kafka']}, Python {host['python']}. One run; "
        "every figure of a size comes from the same run on the same files, so ratios compare like with like.",
        "",
        "Reproduce: `make bench` (about 1 M and 10 M measurements, 1 M Kafka messages) and `make bench-live` "
        "(the live runner after 1 h and 24 h of history of four series, and at 4, 10,000 and 100,000 series; "
        "about 45 minutes).",
        "",
        "| metric | rows | value | unit |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {r['metric']} | {r['rows']:,} | {r['value']:,} | {r['unit']} |" for r in results]
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
