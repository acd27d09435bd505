"""The shared module: layout, options, series names, safe output replacement."""

from __future__ import annotations

import logging
import os
import subprocess
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F

from meter_stream import config, jvm, storage
from meter_stream import message as m
from meter_stream.contracts import CLEANED_SCHEMA, PROCESSED_SCHEMA, RAW_SCHEMA, hour_of, hour_value
from meter_stream.raw_input import CheckpointMismatchError, check_sink_matches_checkpoint
from meter_stream.session import cached_for_the_block, local_frame, own_local_dir
from meter_stream.storage import PREVIOUS_SUFFIX, StageInputError, read_output, replace_output

log = logging.getLogger("test")


def test_paths_use_standard_folders_under_the_datastore():
    paths = config.Paths.under("s3a://bucket/meters/", cleaned_data="/elsewhere/cleaned")
    assert paths.consumer_data == "s3a://bucket/meters/consumer_data"
    assert paths.checkpoint_consumer == "s3a://bucket/meters/checkpoint_consumer"
    assert paths.quarantine_data == "s3a://bucket/meters/quarantine_data"
    assert paths.cleaned_data == "/elsewhere/cleaned"
    assert paths.reports == "s3a://bucket/meters/reports"


def test_datastore_option_falls_back_to_environment(monkeypatch):
    monkeypatch.setenv("METER_DATASTORE", "/data/meters")
    monkeypatch.setenv("METER_PROCESSED_DATA", "/fast/processed")
    parser = config.make_parser("test")
    config.add_datastore_options(parser, ("processed_data", "cleaned_data"))
    paths = config.paths_from_args(parser.parse_args([]))
    assert (paths.processed_data, paths.cleaned_data) == ("/fast/processed", "/data/meters/cleaned_data")
    explicit = config.paths_from_args(parser.parse_args(["--datastore", "/x", "--processed-data", "/y"]))
    assert (explicit.processed_data, explicit.cleaned_data) == ("/y", "/x/cleaned_data")


def test_series_names_round_trip_and_reject_malformed():
    assert m.parse_series_name(m.series_name("device1", "energy import")) == ("device1", "energy import")
    with pytest.raises(ValueError, match="device_id/signal_name"):
        m.parse_series_name("device1")


def test_replace_output_swaps_in_complete_data(spark, tmp_path):
    target = str(tmp_path / "out")
    replace_output(local_frame(spark, [(None, b"1", "t", 0, 1, None, 0)], RAW_SCHEMA), target, log)
    replace_output(local_frame(spark, [(None, b"2", "t", 0, 2, None, 0)], RAW_SCHEMA), target, log)
    values = [bytes(r.value) for r in read_output(spark, target, RAW_SCHEMA, log, "test").collect()]
    assert values == [b"2"]
    assert not (tmp_path / "out.staging").exists() and not (tmp_path / "out.previous").exists()


def test_replace_output_exchanges_the_old_output_with_the_new_in_one_step(spark, tmp_path, monkeypatch):
    target = str(tmp_path / "out")
    replace_output(local_frame(spark, [(None, b"1", "t", 0, 1, None, 0)], RAW_SCHEMA), target, log)
    seen = []
    monkeypatch.setattr(storage, "mutation_hook", lambda kind, path: seen.append(kind))
    replace_output(local_frame(spark, [(None, b"2", "t", 0, 2, None, 0)], RAW_SCHEMA), target, log)
    # never absent: no rename of the old output away before the new one is in place
    assert seen == ["write", "exchange", "delete"]


def test_exchange_paths_swaps_two_folders_and_refuses_what_is_not_local(spark, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from-a").write_text("a")
    (tmp_path / "b").mkdir()
    assert storage.exchange_paths(spark, str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.listdir(tmp_path / "b") == ["from-a"] and os.listdir(tmp_path / "a") == []
    assert not storage.exchange_paths(spark, "hdfs://namenode/a", "hdfs://namenode/b")
    with pytest.raises(OSError, match="could not exchange"):
        storage.exchange_paths(spark, str(tmp_path / "a"), str(tmp_path / "missing"))


@pytest.mark.parametrize("through_hadoop", [False, True], ids=["local", "hadoop FileContext"])
def test_write_bytes_replaces_a_file_by_one_rename_over_it(spark, tmp_path, monkeypatch, through_hadoop):
    target = str(tmp_path / "reports" / "report.json")
    write = storage._write_bytes_hadoop if through_hadoop else storage.write_bytes
    write(spark, target, b"first")
    seen = []
    monkeypatch.setattr(storage, "mutation_hook", lambda kind, path: seen.append(kind))
    write(spark, target, b"second")
    assert storage.read_text(spark, target) == "second"
    assert seen == ["write", "rename"]  # no delete of the old file first
    assert not [name for name in os.listdir(tmp_path / "reports") if "staging" in name]


def test_outputs_encode_report_times_and_values_plainly_and_names_with_a_dictionary(spark, tmp_path):
    import duckdb  # a benchmark dependency; make test installs it

    start = datetime(2024, 5, 22, tzinfo=UTC)
    times = [start + timedelta(seconds=10 * i) for i in range(2000)]
    rows = [(t, t + timedelta(seconds=1), f"device{i % 2}", m.SIGNAL_IMPORT, 7.0) for i, t in enumerate(times)]
    target = str(tmp_path / "out")
    replace_output(local_frame(spark, rows, PROCESSED_SCHEMA).coalesce(1), target, log)
    encodings = dict(
        duckdb.sql(f"SELECT path_in_schema, encodings FROM parquet_metadata('{target}/*.parquet')").fetchall()
    )
    # The values repeat here, and still get no dictionary: real values and report times are nearly unique.
    assert "DICTIONARY" not in encodings[m.VALUE] and "DICTIONARY" not in encodings[m.T_REPORT]
    assert "DICTIONARY" in encodings[m.DEVICE_ID] and "DICTIONARY" in encodings[m.T_MEASUREMENT]


def test_read_output_restores_previous_output_after_interrupted_swap(spark, tmp_path):
    target = str(tmp_path / "out")
    replace_output(local_frame(spark, [(None, b"1", "t", 0, 1, None, 0)], RAW_SCHEMA), target, log)
    (tmp_path / "out").rename(tmp_path / ("out" + PREVIOUS_SUFFIX))  # as a crash between the renames leaves it
    rows = read_output(spark, target, RAW_SCHEMA, log, "test").collect()
    assert [bytes(r.value) for r in rows] == [b"1"]


def test_read_output_names_the_stage_to_run_when_missing(spark, tmp_path):
    with pytest.raises(StageInputError, match="run the processor first"):
        read_output(spark, str(tmp_path / "nothing"), RAW_SCHEMA, log, "processor")


def test_local_frame_is_what_create_data_frame_gives_and_an_empty_one_starts_no_python_workers(spark):
    moment = datetime(2026, 11, 25, 13, 59, 59, 999999)
    cases = [
        (RAW_SCHEMA, [(None, b"{\x00\xff", "t", 0, 2**40, moment, 0), (b"k", b"", "", -1, 0, None, None)]),
        (
            CLEANED_SCHEMA,
            [(moment, None, "d\u00e9vice", "", v, "measured") for v in (float("nan"), float("inf"), -0.0, None)],
        ),
        (CLEANED_SCHEMA, [{m.DEVICE_ID: "device1", m.VALUE: 1.5, m.T_MEASUREMENT: moment}]),
        ("device_id string, hour long", [Row(device_id="device2", hour=None)]),
        (PROCESSED_SCHEMA, []),
        ("tail array<double>, tags map<string, bigint>", []),
    ]
    for schema, rows in cases:
        frame, created = local_frame(spark, rows, schema), spark.createDataFrame(rows, schema)
        assert frame.schema == created.schema
        assert sorted(map(repr, frame.collect())) == sorted(map(repr, created.collect()))
        if not rows:  # no partition, so no task, so no Python worker for a query over it
            assert frame.rdd.getNumPartitions() == 0 < created.rdd.getNumPartitions()
    with pytest.raises(TypeError, match="value"):
        local_frame(spark, [(moment, None, "device1", "energy import", "12", "measured")], CLEANED_SCHEMA)


def test_the_jvm_bridge_reaches_what_pyspark_has_no_public_form_for(spark, tmp_path):
    """Fails first when a pyspark upgrade changes the private attributes ``meter_stream.jvm`` uses."""
    java = jvm.gateway(spark)
    assert java.java.lang.System.currentTimeMillis() > 0
    path = java.org.apache.hadoop.fs.Path(str(tmp_path))
    assert path.getFileSystem(jvm.hadoop_configuration(spark)).exists(path)
    assert jvm.scala_context(spark).statusStore() is not None
    before = set(jvm.persisted_rdds(spark))
    frame = spark.range(10).localCheckpoint()
    assert len(set(jvm.persisted_rdds(spark)) - before) == 1
    assert frame.count() == 10
    assert jvm.jvm_process() is not None  # the test session's JVM was started by PySpark


def test_what_a_block_cached_is_released_when_it_ends_checkpoints_too_even_on_an_error(spark):
    def persisted():
        return set(jvm.persisted_rdds(spark))

    kept = spark.range(10).rdd.persist()
    kept.count()
    before = persisted()
    with pytest.raises(RuntimeError), cached_for_the_block(spark):
        checkpoint = spark.range(100).localCheckpoint()
        spark.range(50).persist().count()
        assert checkpoint.count() == 100 and len(persisted() - before) == 2
        raise RuntimeError("a failed cycle")
    assert persisted() == before
    kept.unpersist()


def test_hour_partition_value_is_the_utc_hour_as_a_number(spark):
    moment = datetime(2026, 11, 25, 23, 59, 59, 999999, tzinfo=UTC)
    row = local_frame(spark, [(moment,)], "t timestamp").select(hour_of(F.col("t")).alias("hour")).first()
    assert row.hour == 2026112523
    assert hour_value(moment) == 2026112523
    # An aware datetime elsewhere is converted to UTC first.
    assert hour_value(datetime(2026, 11, 26, 1, 30, tzinfo=timezone(timedelta(hours=2)))) == 2026112523
    # Around the epoch (negative microseconds), leap days, the ends of hours and centuries.
    moments = [
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1900, 3, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(2024, 2, 29, 13, 59, 59, 999999, tzinfo=UTC),
        datetime(2100, 2, 28, 23, 0, tzinfo=UTC),
        datetime(2100, 3, 1, 0, 30, tzinfo=UTC),
    ]
    rows = local_frame(spark, [(t,) for t in moments], "t timestamp").select(hour_of(F.col("t")).alias("hour"))
    assert [r.hour for r in rows.collect()] == [hour_value(t) for t in moments]
    assert hour_value(moments[0]) == 1969123123


def _log_files(folder, batches):
    folder.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        (folder / str(batch)).write_text("v1\n")


def test_sink_log_one_batch_ahead_of_the_commits_after_a_crash_is_fine_but_ahead_of_the_offsets_is_refused(
    spark, tmp_path
):
    output, checkpoint = tmp_path / "consumer_data", tmp_path / "checkpoint_consumer"
    _log_files(output / "_spark_metadata", [0, 1, 2])
    _log_files(checkpoint / "offsets", [0, 1, 2])
    _log_files(checkpoint / "commits", [0, 1])  # killed after the sink's log, before the commit
    check_sink_matches_checkpoint(spark, str(output), str(checkpoint))
    (checkpoint / "offsets" / "2").unlink()
    with pytest.raises(CheckpointMismatchError, match="planned only up to batch 1"):
        check_sink_matches_checkpoint(spark, str(output), str(checkpoint))


def test_a_stage_scratch_folder_is_its_own_and_those_of_killed_processes_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f"pid-{gone.pid}" / "blockmgr-1"
    left.mkdir(parents=True)
    (left / "shuffle_0_0_0.data").write_bytes(b"x" * 100)
    running = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f"pid-{running.pid}" / "blockmgr-2").mkdir(parents=True)
        own = own_local_dir(str(tmp_path))
        assert own == str(tmp_path / f"pid-{os.getpid()}") and os.path.isdir(own)
        assert sorted(os.listdir(tmp_path)) == sorted([f"pid-{running.pid}", f"pid-{os.getpid()}"])
    finally:
        running.kill()
        running.wait()
