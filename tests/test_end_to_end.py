"""Batch stages end to end on raw consumer data made by the project's own simulation."""

from __future__ import annotations

import json
import os
import sys

import pytest

import checker
import cleaner
import processor
from make_sample_data import UNKNOWN_SERIES, sample_payloads
from producer import MALFORMED_PAYLOADS
from tests.helpers import raw_frame, run_command, run_python


def expected_accounting(payloads):
    """Count what the processor must find: malformed payloads, and replays (a copy right after)."""
    malformed = sum(p in MALFORMED_PAYLOADS for p in payloads)
    replays = sum(
        1 for before, p in zip(payloads, payloads[1:], strict=False) if p == before and p not in MALFORMED_PAYLOADS
    )
    return processor.Accounting(len(payloads), len(payloads) - malformed - replays, malformed, replays)


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
    # The feed's quirk (reports 10 s before the measurement) and the unknown series are warnings.
    assert {name for name, _ in failed} == {"report_before_measurement", "unknown_series"}
    cleaned = spark.read.parquet(paths.cleaned_data)
    assert {(r.device_id, r.signal_name) for r in cleaned.select("device_id", "signal_name").distinct().collect()} == {
        ("device1", "energy export"),
        ("device1", "energy import"),
        ("device2", "energy export"),
        ("device2", "energy import"),
    }
    unknown = [(r.device_id, r.signal_name) for r in spark.read.parquet(paths.unknown_series).collect()]
    assert unknown == [UNKNOWN_SERIES]


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
def test_shipped_sample_runs_through_the_scripts_with_spark_submit_and_python(tmp_path):
    datastore = str(tmp_path / "datastore")
    spark_submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    env = {**os.environ, "METER_DATASTORE": datastore, "PYSPARK_PYTHON": sys.executable}
    submitted = run_command(
        spark_submit,
        "--master",
        "local[1]",
        "exercises/processor.py",
        "--consumer-data",
        "example_data/consumer_data_sample",
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    # spark-submit forwards the Python driver's stderr to its stdout.
    assert "raw rows 1876 = processed 1828 + quarantined 13 + duplicates collapsed 35" in submitted.stdout
    assert "master local[1]" in submitted.stdout  # spark-submit's master wins over the local fallback
    for stage in ("cleaner", "checker"):
        result = run_python(f"exercises/{stage}.py", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(datastore, "reports", "check_report.json")) as handle:
        assert {entry["name"] for entry in json.load(handle)} >= {"schema", "regular_grid", "spikes"}


@pytest.mark.slow
def test_missing_input_is_a_clear_error(tmp_path):
    result = run_python("exercises/cleaner.py", "--datastore", str(tmp_path))
    assert result.returncode == 2
    assert "processed_data does not exist: run the processor first" in result.stderr
