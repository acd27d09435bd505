"""Live mode: incremental cycles give what a batch run gives; the runner against a live producer."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cleaner
import processor
from common import config
from common.spark import (
    CLEANED_SCHEMA,
    PROCESSED_SCHEMA,
    QUARANTINE_SCHEMA,
    RAW_SCHEMA,
    UNKNOWN_SERIES_SCHEMA,
    read_output,
)
from make_sample_data import raw_rows
from tests.helpers import ROOT, epoch, message, run_python, utc
from tests.test_consumer import new_topic

T0 = epoch("2026-11-25 13:59:00")  # the first steps cross into the next hour partition
A = ("device1", "energy import")
B = ("device2", "energy import")
C = ("device1", "energy export")  # appears only later
X = ("device9", "energy import")  # outside the catalog
CONFIG = cleaner.CleanerConfig(max_gap_seconds=60)


def msg(series, seconds, value, report_lag=1.0):
    return message(T0 + seconds, T0 + seconds + report_lag, *series, value=value)


STEPS = [
    # measurements with a hole, a second series, an unknown series
    [msg(A, 0, 10), msg(A, 10, 11), msg(A, 20, 12), msg(A, 50, 15), msg(B, 0, 50), msg(B, 30, 53), msg(X, 0, 1)],
    # new measurements after the end, across the hour
    [msg(A, 60, 16), msg(A, 70, 17), msg(B, 40, 54)],
    # a late measurement inside a filled hole; a correction (later report); a tie (same report)
    [msg(A, 30, 30), msg(A, 10, 99, report_lag=5.0), msg(B, 30, 60)],
    # a series back after a hole longer than max_gap; a new series; one before a series' start
    [msg(A, 200, 20), msg(C, 100, 5), msg(C, 120, 7), msg(B, -20, 48)],
    # nothing usable
    [b"not json", b"", b'{"t_measurement": 1}'],
    # the unknown series again, and more
    [msg(X, 10, 2), msg(A, 210, 21), msg(C, 130, 8)],
]


def write_steps(spark, folder):
    """Write each step as one raw file in ``folder`` (offsets continue across steps); return the files."""
    rows, files = raw_rows([payload for step in STEPS for payload in step]), []
    for index, step in enumerate(STEPS):
        start = sum(len(s) for s in STEPS[:index])
        staging = os.path.join(folder + ".tmp", str(index))
        spark.createDataFrame(rows[start : start + len(step)], RAW_SCHEMA).coalesce(1).write.parquet(staging)
        (name,) = [f for f in os.listdir(staging) if f.endswith(".parquet")]
        os.makedirs(folder, exist_ok=True)
        os.rename(os.path.join(staging, name), os.path.join(folder, f"step-{index}.parquet"))
        files.append([os.path.join(folder, f"step-{index}.parquet")])
    return files


def rows(spark, path, schema):
    frame = read_output(spark, path, schema, cleaner.log, "test")
    return sorted(tuple(str(v) for v in r) for r in frame.collect())


def assert_same_outputs(spark, live, batch):
    for folder, schema in (
        ("processed_data", PROCESSED_SCHEMA),
        ("cleaned_data", CLEANED_SCHEMA),
        ("quarantine_data", QUARANTINE_SCHEMA),
        ("unknown_series", UNKNOWN_SERIES_SCHEMA),
    ):
        assert rows(spark, getattr(live, folder), schema) == rows(spark, getattr(batch, folder), schema), folder


def test_cycles_give_what_a_batch_run_gives(spark, tmp_path):
    files = write_steps(spark, str(tmp_path / "raw"))
    live = config.Paths.under(str(tmp_path / "live"))
    for index, step_files in enumerate(files):
        changes = processor.process_new(spark, live, step_files)
        cleaner.clean_changes(spark, live, CONFIG, changes.measurements, changes.series_rows)
        assert changes.accounting.balanced()
        if index == 0:
            # the hole in A is filled as soon as the measurement after it arrived; nothing after it yet
            a = [r for r in rows(spark, live.cleaned_data, CLEANED_SCHEMA) if r[2:4] == A]
            assert [r[5] for r in a] == ["measured"] * 3 + ["interpolated"] * 2 + ["measured"]

    batch = dataclasses.replace(config.Paths.under(str(tmp_path / "batch")), consumer_data=str(tmp_path / "raw"))
    accounting = processor.run(spark, batch)
    cleaner.run(spark, batch, CONFIG)

    assert accounting.raw == sum(len(step) for step in STEPS)
    assert_same_outputs(spark, live, batch)
    cleaned = rows(spark, live.cleaned_data, CLEANED_SCHEMA)
    assert ("missing" in {r[5] for r in cleaned if r[2:4] == A}) and any(r[2:4] == C for r in cleaned)
    assert str(utc("2026-11-25 13:58:40")) in {r[0] for r in cleaned if r[2:4] == B}


def wait_for_cycles(path, count, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as handle:
                cycles = [c for c in json.load(handle) if c["measurements"]]
            if len(cycles) >= count:
                return cycles
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(1)
    raise AssertionError(f"fewer than {count} cycles in time")


@pytest.mark.integration
def test_live_runner_stopped_by_sigterm_leaves_what_a_batch_run_gives(spark, kafka, tmp_path):
    topic = new_topic(kafka)
    env = {**os.environ, config.ENV_BOOTSTRAP_SERVERS: kafka, config.ENV_TOPIC: topic}
    feed = ["--quiet", "--replay-share", "0.1", "--malformed-share", "0.05"]
    assert run_python("producer.py", "--backfill", "5m", "--seed", "3", *feed, env=env).returncode == 0
    producer = subprocess.Popen([sys.executable, "producer.py", "--interval", "1", *feed], cwd=ROOT, env=env)
    live = config.Paths.under(str(tmp_path / "live"))
    runner = subprocess.Popen(
        [sys.executable, "exercises/pipeline.py", "--watch", "2", "--datastore", str(tmp_path / "live")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        cycles = wait_for_cycles(os.path.join(live.reports, "live_cycles.json"), 4, runner)
    finally:
        producer.send_signal(signal.SIGTERM)
        assert producer.wait(timeout=60) == 0
    runner.send_signal(signal.SIGTERM)
    _out, err = runner.communicate(timeout=180)

    assert runner.returncode == 0, err[-3000:]
    assert "SIGTERM received" in err and "live: stopped after" in err
    with open(os.path.join(live.processed_data, "_live_state.json")) as handle:
        assert json.load(handle)["in_progress"] is False
    assert all(c["latency_p95_s"] is not None and c["freshness_s"] is not None for c in cycles)
    batch = dataclasses.replace(config.Paths.under(str(tmp_path / "batch")), consumer_data=live.consumer_data)
    accounting = processor.run(spark, batch)
    cleaner.run(spark, batch, cleaner.CleanerConfig())
    assert accounting.quarantined > 0 and accounting.duplicates > 0
    assert_same_outputs(spark, live, batch)
