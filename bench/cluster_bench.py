"""Scale-out: the full run of 1 h at 100,000 series on a Spark standalone cluster with 1 and 2 workers.

One run, on the same generated raw rows (``harness.measurements``, thinned to half the slots, about
18 M measurements for 1 h at 100,000 series, as the producer's feed):
- ``cluster_full_run_s_local2``: ``exercises/pipeline.py --skip-consumer`` submitted with
  ``--master local[2]`` on a local-disk datastore: the baseline on the same two cores;
- ``cluster_full_run_s_1w`` and ``_2w``: the same submitted to ``scripts/spark-cluster`` with 1 and
  with 2 workers of 1 core each, the datastore on ``scripts/hdfs-local``;
- ``cluster_speedup_2w``: ``_1w`` / ``_2w``; per run, the processor's, cleaner's and checker's seconds.
The processor, cleaner and checker over the hour are the work of the live mode's start-up full run.
Every run must account for every raw row and write as many processed and grid rows as the baseline.

Usage:
    python bench/cluster_bench.py [--series 100000] [--minutes 60] [--workers 1,2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, *(os.path.join(ROOT, folder) for folder in ("exercises", "scripts", "tests", "bench"))]

from pyspark.sql import functions as F  # noqa: E402

from harness import RESULTS, measurements, raw_rows, save_results  # noqa: E402
from meter_stream import config  # noqa: E402
from meter_stream.contracts import CLEANED_SCHEMA, PROCESSED_SCHEMA  # noqa: E402
from meter_stream.session import build_session  # noqa: E402
from tests.conftest import free_port  # noqa: E402

SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")
#: Memory each 1-core worker gives its executor, and the driver's (it holds no data).
EXECUTOR_MEMORY, DRIVER_MEMORY = "6g", "2g"
STAGES = ("processor", "cleaner", "checker")


def owns(metric: str) -> bool:
    """Whether a metric is this benchmark's."""
    return metric.startswith("cluster_")


class Service:
    """One of the project's local services (``scripts/hdfs-local``, ``scripts/spark-cluster``) with its own ports."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.script, self.env = os.path.join(ROOT, "scripts", script), {**os.environ, **env}

    def __enter__(self) -> Service:
        subprocess.run([self.script, "start"], env=self.env, check=True)
        return self

    def __exit__(self, *_exc: object) -> None:
        subprocess.run([self.script, "stop"], env=self.env, check=False)


def generate(spark, raw: str, copy: str, series: int, minutes: int) -> int:
    """Write the raw rows of ``series`` series over ``minutes`` to ``raw`` and the same files' rows to ``copy``;
    return their number."""
    typed = measurements(spark, series, minutes * 6)
    # measurements() keeps two slots in three; keeping three in four of those gives the producer's one in two.
    half = typed.where(F.abs(F.xxhash64("id", F.lit(7))) % 4 != 0)
    raw_rows(half).write.mode("overwrite").parquet(raw)
    spark.read.parquet(raw).write.mode("overwrite").parquet(copy)  # the same rows, not generated again
    return int(spark.read.parquet(raw).count())


def full_run(master: str, raw: str, datastore: str, log_file: str) -> dict[str, float]:
    """Submit the pipeline from the raw rows ``raw`` into ``datastore``; return its wall seconds and each stage's."""
    command = [
        SPARK_SUBMIT,
        "--master",
        master,
        "--driver-memory",
        DRIVER_MEMORY,
        "--executor-memory",
        EXECUTOR_MEMORY,
        "--py-files",
        os.path.join(ROOT, "dist", "meter_stream.zip"),
        os.path.join(ROOT, "exercises", "pipeline.py"),
        "--skip-consumer",
        "--consumer-data",
        raw,
        "--expected-series",
        "all",
        "--datastore",
        datastore,
    ]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    started = time.monotonic()
    with open(log_file, "w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stderr=log, stdout=log).returncode
    seconds = {"full_run": time.monotonic() - started}
    text = open(log_file).read()
    if code not in (0, 1):  # 1: a check of severity error failed, which a generated feed may do
        raise RuntimeError(f"the pipeline on {master} ended with exit code {code}; see {log_file}")
    for stage in STAGES:
        found = re.search(rf"{stage} finished with exit code \d+ in ([\d.]+) s", text)
        if not found:
            raise RuntimeError(f"no {stage} time in {log_file}")
        seconds[stage] = float(found.group(1))
    accounting = re.search(r"raw rows (\d+) = processed (\d+) \+ quarantined (\d+).*duplicates collapsed (\d+)", text)
    read, processed, quarantined, duplicates = (int(n) for n in accounting.groups()) if accounting else (1, 0, 0, 0)
    if quarantined or read != processed + duplicates:
        raise RuntimeError(f"the processor did not account for every generated row as valid; see {log_file}")
    return seconds


def output_rows(spark, datastore: str) -> tuple[int, int]:
    """The rows of processed_data and cleaned_data (the runs must agree)."""
    paths = config.Paths.under(datastore)
    return (
        spark.read.schema(PROCESSED_SCHEMA).parquet(paths.processed_data).count(),
        spark.read.schema(CLEANED_SCHEMA).parquet(paths.cleaned_data).count(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--minutes", type=int, default=60, help="history of each series")
    parser.add_argument("--workers", default="1,2", help="cluster sizes to measure, comma-separated")
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--report", default=os.path.join(ROOT, "BENCHMARKS.md"), help="'' for none")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="meter-cluster-bench-")
    subprocess.run(["make", "--no-print-directory", "package"], cwd=ROOT, check=True, capture_output=True)
    hdfs_env = {"HDFS_PORT": str(free_port()), "HDFS_HTTP_PORT": str(free_port()), "HDFS_DATA_DIR": f"{work}/hdfs"}
    results: list[dict] = []
    try:
        with Service("hdfs-local", hdfs_env):
            hdfs = f"hdfs://127.0.0.1:{hdfs_env['HDFS_PORT']}/bench"
            spark = build_session("meter-stream cluster bench")
            local = f"{work}/local"
            rows = generate(spark, f"{local}/consumer_data", f"{hdfs}/consumer_data", args.series, args.minutes)
            spark.stop()  # its cores are the runs' now
            print(f"cluster bench: {rows:,} raw rows of {args.series:,} series over {args.minutes} min", flush=True)
            runs = {"local2": full_run("local[2]", f"{local}/consumer_data", local, f"{work}/local2.log")}
            for workers in [int(w) for w in args.workers.split(",") if w]:
                runs[f"{workers}w"] = _on_cluster(work, workers, f"{hdfs}/{workers}w", f"{hdfs}/consumer_data")
            results = _metrics(runs, rows)
            spark = build_session("meter-stream cluster bench")
            expected = output_rows(spark, local)
            for name in runs:
                if name != "local2" and output_rows(spark, f"{hdfs}/{name}") != expected:
                    raise RuntimeError(f"the {name} run wrote other row counts than the local run: {expected}")
            spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for result in results:
        print(f"{result['metric']:<32} {result['value']:>10} {result['unit']}")
    save_results(args.results, results, args.report, owns=owns)
    return 0


def _on_cluster(work: str, workers: int, datastore: str, raw: str) -> dict[str, float]:
    """The full run on a fresh cluster of ``workers`` 1-core workers, reading ``raw``."""
    port = free_port()
    env = {
        "SPARK_CLUSTER_PORT": str(port),
        "SPARK_CLUSTER_WEBUI_PORT": str(free_port()),
        "SPARK_CLUSTER_WORKERS": str(workers),
        "SPARK_CLUSTER_WORKER_CORES": "1",
        "SPARK_CLUSTER_WORKER_MEMORY": EXECUTOR_MEMORY,
        "SPARK_CLUSTER_DIR": f"{work}/cluster-{workers}w",
    }
    with Service("spark-cluster", env):
        return full_run(f"spark://127.0.0.1:{port}", raw, datastore, f"{work}/{workers}w.log")


def _metrics(runs: dict[str, dict[str, float]], rows: int) -> list[dict]:
    results = [
        {"metric": f"cluster_{part}_s_{name}", "rows": rows, "value": round(seconds, 1), "unit": "s"}
        for name, run in runs.items()
        for part, seconds in run.items()
    ]
    if "1w" in runs and "2w" in runs:
        speedup = runs["1w"]["full_run"] / runs["2w"]["full_run"]
        results.append({"metric": "cluster_speedup_2w", "rows": rows, "value": round(speedup, 2), "unit": "ratio"})
    return results


if __name__ == "__main__":
    sys.exit(main())
