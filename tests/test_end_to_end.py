"""Batch stages end to end on raw consumer data made by the project's own simulation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from pyspark.sql import functions as F

from make_sample_data import SAMPLE_START, UNKNOWN_SERIES, raw_rows, sample_payloads
from meter_stream import checker, cleaner, processor
from meter_stream.contracts import RAW_SCHEMA
from meter_stream.session import local_frame
from producer import MALFORMED_PAYLOADS
from tests.helpers import ROOT, message, raw_frame, run_command, run_python


def expected_accounting(payloads):
    """Count what the processor must find: malformed payloads, and replays (a copy right after)."""
    malformed = sum(p in MALFORMED_PAYLOADS for p in payloads)
    replays = sum(
        1 for before, p in zip(payloads, payloads[1:], strict=False) if p == before and p not in MALFORMED_PAYLOADS
    )
    # Of the malformed payloads, one has its measurement time in milliseconds: a clock fault.
    clock_faults = sum(b'"t_measurement": 1716369246734,' in p for p in payloads)
    return processor.Accounting(len(payloads), len(payloads) - malformed - replays, malformed, replays, clock_faults)


def test_processor_cleaner_checker_on_simulated_feed(spark, paths):
    payloads = sample_payloads(hours=1, seed=3)
    raw_frame(spark, payloads).write.parquet(paths.consumer_data)

    assert processor.run(spark, paths) == expected_accounting(payloads)
    counts = cleaner.run(spark, paths, cleaner.CleanerConfig())
    # The checks only: the tables and the chart are tested with the runner and the checker's own run.
    results = checker.run(spark, paths, checker.CheckerConfig(), show=False)

    assert checker.exit_code(results) == 0
    assert counts["missing"] == 0 and counts["measured"] > 0 and counts["interpolated"] > 0
    failed = {(r.name, r.series) for r in results if not r.passed}
    # The feed's quirk (reports 10 s before the measurement), the unknown series and its millisecond clock are
    # warnings.
    assert {name for name, _ in failed} == {"report_before_measurement", "unknown_series", "clock_faults"}
    cleaned = spark.read.parquet(paths.cleaned_data)
    assert {(r.device_id, r.signal_name) for r in cleaned.select("device_id", "signal_name").distinct().collect()} == {
        ("device1", "energy export"),
        ("device1", "energy import"),
        ("device2", "energy export"),
        ("device2", "energy import"),
    }
    unknown = [(r.device_id, r.signal_name) for r in spark.read.parquet(paths.unknown_series).collect()]
    assert unknown == [UNKNOWN_SERIES]


DAY = 86_400.0
#: Meters with broken clocks (one series of the normal feed): reset to 2000-01-01 and to 1970, months and a
#: year ahead; each arrives 15 minutes into the feed.
CLOCK_FAULTS = [946_684_800.0, 0.0, SAMPLE_START + 120 * DAY, SAMPLE_START + 365 * DAY]


def test_clock_faulty_meters_among_normal_ones_are_quarantined_and_the_run_passes(spark, paths):
    payloads = sample_payloads(hours=0.5, seed=3)
    faulty = [message(t, t + 1, "device1", "energy import", 15) for t in CLOCK_FAULTS]
    arrival = datetime.fromtimestamp(SAMPLE_START + 900, UTC).replace(tzinfo=None)
    rows = raw_rows(payloads + faulty)
    rows[len(payloads) :] = [(*row[:5], arrival, row[6]) for row in rows[len(payloads) :]]
    local_frame(spark, rows, RAW_SCHEMA).write.parquet(paths.consumer_data)

    normal = expected_accounting(payloads)
    assert processor.run(spark, paths) == processor.Accounting(
        normal.raw + 4, normal.processed, normal.quarantined + 4, normal.duplicates, normal.clock_faults + 4
    )
    cleaner.run(spark, paths, cleaner.CleanerConfig())
    results = checker.run(spark, paths, checker.CheckerConfig(), show=False)

    assert checker.exit_code(results) == 0
    (clock,) = [r for r in results if r.name == "clock_faults"]
    assert (clock.passed, clock.severity) == (False, checker.WARN)
    assert clock.observed == {
        "rows": 4 + normal.clock_faults,
        "implausible_timestamp:t_measurement": 1 + normal.clock_faults,
        "ahead_of_arrival:t_measurement": 2,
        "beyond_lateness_horizon:t_measurement": 1,
    }
    quarantine = spark.read.parquet(paths.quarantine_data).where(F.col("offset") >= len(payloads))
    assert sorted((r.offset - len(payloads), r.reason) for r in quarantine.collect()) == [
        (0, "beyond_lateness_horizon:t_measurement"),
        (1, "implausible_timestamp:t_measurement"),
        (2, "ahead_of_arrival:t_measurement"),
        (3, "ahead_of_arrival:t_measurement"),
    ]
    # the faulty meter's series keeps its real span: the feed's half hour, on the grid
    series = spark.read.parquet(paths.cleaned_data).where("device_id = 'device1' AND signal_name = 'energy import'")
    first, last, slots = series.agg(F.min("t_measurement"), F.max("t_measurement"), F.count(F.lit(1))).first()
    assert (last - first).total_seconds() < 1800 and slots == (last - first).total_seconds() / 10 + 1


def test_checker_fails_when_a_series_stops_reporting(spark, paths):
    payloads = [p for p in sample_payloads(hours=0.5, seed=5) if b'"device2", "signal_name": "energy export"' not in p]
    raw_frame(spark, payloads).write.parquet(paths.consumer_data)
    processor.run(spark, paths)
    cleaner.run(spark, paths, cleaner.CleanerConfig())
    results = checker.run(spark, paths, checker.CheckerConfig())
    assert checker.exit_code(results) == 1
    absent = next(r for r in results if r.name == "expected_series_present")
    assert absent.observed == {"absent": ["device2/energy export"]}


@pytest.mark.parametrize("stage", ["processor", "cleaner", "checker"])
def test_stage_help_names_options_and_environment(stage):
    result = run_python(f"exercises/{stage}.py", "--help")
    assert result.returncode == 0
    assert "--datastore" in result.stdout and "METER_DATASTORE" in result.stdout and "Usage:" in result.stdout


@pytest.mark.slow
def test_shipped_sample_runs_through_the_scripts_with_spark_submit_and_the_package_alone_and_python(tmp_path):
    """spark-submit runs a stage script with the package from ``make package`` as its only project code."""
    datastore = str(tmp_path / "datastore")
    made = run_command("make", "--no-print-directory", "package", f"PACKAGE={tmp_path / 'meter_stream.zip'}")
    assert made.returncode == 0, made.stderr
    alone = tmp_path / "submit"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "exercises", "processor.py"), alone)  # the script, without its folder's package
    spark_submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    env = {**os.environ, "METER_DATASTORE": datastore, "PYSPARK_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    consumer_data = os.path.join(ROOT, "example_data", "consumer_data_sample")
    submitted = subprocess.run(
        [spark_submit, "--master", "local[1]", "--py-files", str(tmp_path / "meter_stream.zip")]
        + [str(alone / "processor.py"), "--consumer-data", consumer_data],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    # spark-submit forwards the Python driver's stderr to its stdout.
    assert (
        "raw rows 1876 = processed 1828 + quarantined 13 (clock faults 2) + duplicates collapsed 35" in submitted.stdout
    )
    assert "master local[1]" in submitted.stdout  # spark-submit's master wins over the local fallback
    for stage in ("cleaner", "checker"):
        result = run_python(f"exercises/{stage}.py", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(datastore, "reports", "check_report.json")) as handle:
        assert {entry["name"] for entry in json.load(handle)} >= {"schema", "regular_grid", "spikes"}


def test_the_package_alone_holds_every_stage_and_the_live_mode(tmp_path):
    made = run_command("make", "--no-print-directory", "package", f"PACKAGE={tmp_path / 'meter_stream.zip'}")
    assert made.returncode == 0, made.stderr
    code = (
        "import meter_stream\n"
        "from meter_stream import checker, cleaner, consumer, pipeline, processor\n"
        "from meter_stream.live import runner\n"
        "print(meter_stream.__file__, processor.main, runner.LiveRunner)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tmp_path / "meter_stream.zip")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(str(tmp_path / "meter_stream.zip"))


@pytest.mark.slow
def test_missing_input_is_a_clear_error(tmp_path):
    result = run_python("exercises/cleaner.py", "--datastore", str(tmp_path))
    assert result.returncode == 2
    assert "processed_data does not exist: run the processor first" in result.stderr
