"""processor: parsing, quarantine, replay collapse, accounting, robust raw reads."""

from __future__ import annotations

import json
import logging
import os

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from meter_stream.contracts import PROCESSED_SCHEMA, QUARANTINE_SCHEMA, RAW_SCHEMA
from meter_stream.processor import (
    Accounting,
    ClockLimits,
    collapse_replays,
    parse_measurements,
    run,
    select_quarantine,
)
from meter_stream.raw_input import read_raw
from meter_stream.session import local_frame
from tests.helpers import message, raw_frame, raw_frame_arriving, utc

T = 1716369246.734911
GOOD = message(T, T - 10)


def quarantine_of(spark, payloads):
    return select_quarantine(parse_measurements(raw_frame(spark, payloads)))


def processed_of(spark, payloads):
    return collapse_replays(parse_measurements(raw_frame(spark, payloads)))


def test_numbers_and_numeric_strings_parse_to_exact_typed_columns(spark):
    payloads = [
        message(T, T - 10, "device1", "energy import", 12),
        message(str(T), str(T - 10), "device2", "energy export", "84.5"),
    ]
    expected = local_frame(
        spark,
        [
            (utc("2024-05-22 09:14:06.734911"), utc("2024-05-22 09:13:56.734911"), "device1", "energy import", 12.0),
            (utc("2024-05-22 09:14:06.734911"), utc("2024-05-22 09:13:56.734911"), "device2", "energy export", 84.5),
        ],
        PROCESSED_SCHEMA,
    )
    assert_df_equality(processed_of(spark, payloads), expected, ignore_row_order=True)


ROUNDING = [
    ("1716369246", "2024-05-22 09:14:06"),
    ("1716369246.000001", "2024-05-22 09:14:06.000001"),
    ("1716369246.999999", "2024-05-22 09:14:06.999999"),
    ("1716369246.7349112", "2024-05-22 09:14:06.734911"),
    ("1716369246.7349118", "2024-05-22 09:14:06.734912"),
    ("1716369246.9999997", "2024-05-22 09:14:07"),
    ("946684800.0000004", "2000-01-01 00:00:00"),
]


@pytest.fixture(scope="module")
def rounded(spark):
    """Every ROUNDING time parsed in one run (a series each, so that none collapses): per series, its row."""
    payloads = [message(sent, sent, f"device{index}") for index, (sent, _) in enumerate(ROUNDING)]
    return {row.device_id: row for row in processed_of(spark, payloads).collect()}


@pytest.mark.parametrize(
    ("index", "stored"), [(i, stored) for i, (_, stored) in enumerate(ROUNDING)], ids=[s for s, _ in ROUNDING]
)
def test_times_round_to_the_nearest_microsecond(rounded, index, stored):
    row = rounded[f"device{index}"]
    assert row.t_measurement == row.t_report == utc(stored)


def test_example_file_parses_to_the_four_expected_series(spark):
    with open(os.path.join(os.path.dirname(__file__), "..", "example_data", "measurement_values.json")) as handle:
        payloads = [json.dumps(item).encode() for item in json.load(handle)]
    processed = processed_of(spark, payloads)
    assert sorted((r.device_id, r.signal_name) for r in processed.collect()) == [
        ("device1", "energy export"),
        ("device1", "energy import"),
        ("device2", "energy export"),
        ("device2", "energy import"),
    ]
    assert quarantine_of(spark, payloads).count() == 0


BAD_RECORDS = [
    (None, "empty_value"),
    (b"", "empty_value"),
    (b"   ", "empty_value"),
    (b"not json", "malformed_json"),
    (b"\xff\xfe\x00garbage", "invalid_utf8"),
    (b'{"t_measurement": 17163', "malformed_json"),
    (b"[1, 2]", "not_a_json_object"),
    (b"42", "not_a_json_object"),
    (b'"text"', "not_a_json_object"),
    (b'{"t_report": 1716369236.7, "device_id": "d", "signal_name": "s", "value": 1}', "missing_field:t_measurement"),
    (b'{"t_measurement": 1716369246.7, "device_id": "d", "signal_name": "s", "value": 1}', "missing_field:t_report"),
    (
        b'{"t_measurement": 1716369246.7, "t_report": 1716369236.7, "signal_name": "s", "value": 1}',
        "missing_field:device_id",
    ),
    (
        b'{"t_measurement": 1716369246.7, "t_report": 1716369236.7, "device_id": "", "signal_name": "s", "value": 1}',
        "missing_field:device_id",
    ),
    (
        b'{"t_measurement": 1716369246.7, "t_report": 1716369236.7, "device_id": "d", "value": 1}',
        "missing_field:signal_name",
    ),
    (
        b'{"t_measurement": 1716369246.7, "t_report": 1716369236.7, "device_id": "d", "signal_name": "s"}',
        "missing_field:value",
    ),
    (
        b'{"t_measurement": null, "t_report": 1716369236.7, "device_id": "d", "signal_name": "s", "value": 1}',
        "missing_field:t_measurement",
    ),
    (message("yesterday", T), "unparseable_timestamp:t_measurement"),
    (message(T, [1]), "unparseable_timestamp:t_report"),
    (message(T * 1000, T), "implausible_timestamp:t_measurement"),
    (message(T * 1_000_000, T), "implausible_timestamp:t_measurement"),
    (message(T, 0), "implausible_timestamp:t_report"),
    (message(T, -T), "implausible_timestamp:t_report"),
    (message(T, T, value="twelve"), "non_numeric_value"),
    (message(T, T, value=True), "non_numeric_value"),
    (message(T, T, value={"kWh": 1}), "non_numeric_value"),
    (message(T, T, value="NaN"), "non_finite_value"),
    (message(T, T, value="-Infinity"), "non_finite_value"),
    (GOOD.replace(b'"value": 12', b'"value": NaN'), "non_finite_value"),
    (GOOD.replace(b'"value": 12', b'"value": 1e400'), "non_finite_value"),
]


@pytest.fixture(scope="module")
def bad_records(spark):
    """GOOD and every BAD_RECORDS payload parsed in one run (offsets 0, 1, ...): (quarantine rows, valid rows)."""
    parsed = parse_measurements(raw_frame(spark, [GOOD, *(payload for payload, _ in BAD_RECORDS)]))
    quarantined = select_quarantine(parsed)
    assert quarantined.schema == QUARANTINE_SCHEMA
    valid = [tuple(row) for row in parsed.where("reason IS NULL").select(*PROCESSED_SCHEMA.fieldNames()).collect()]
    return [tuple(row) for row in quarantined.collect()], valid


def test_only_the_good_record_among_the_bad_ones_is_processed(spark, bad_records):
    quarantine, valid = bad_records
    assert valid == [tuple(processed_of(spark, [GOOD]).first())]
    assert sorted(row[-1] for row in quarantine) == list(range(1, len(BAD_RECORDS) + 1))  # each bad one once


@pytest.mark.parametrize(
    ("offset", "reason"), [(i + 1, r) for i, (_, r) in enumerate(BAD_RECORDS)], ids=[r for _, r in BAD_RECORDS]
)
def test_bad_record_is_quarantined_with_reason_and_kafka_coordinates(bad_records, offset, reason):
    payload = BAD_RECORDS[offset - 1][0]
    raw_text = None if payload is None else payload.decode("utf-8", errors="replace")
    assert [row for row in bad_records[0] if row[-1] == offset] == [(raw_text, reason, "mytopic", 0, offset)]


def test_replays_collapse_to_the_latest_report(spark):
    payloads = [
        message(T, T - 10, value=12),
        message(T, T - 10, value=12),  # at-least-once delivery: the same message again
        message(T, T - 5, value=13),  # a correction, reported later
        message(T + 10, T, value=14),
    ]
    expected = local_frame(
        spark,
        [
            (utc("2024-05-22 09:14:06.734911"), utc("2024-05-22 09:14:01.734911"), "device1", "energy import", 13.0),
            (utc("2024-05-22 09:14:16.734911"), utc("2024-05-22 09:14:06.734911"), "device1", "energy import", 14.0),
        ],
        PROCESSED_SCHEMA,
    )
    assert_df_equality(processed_of(spark, payloads), expected, ignore_row_order=True)


def test_same_time_on_another_series_is_not_a_replay(spark):
    payloads = [
        message(T, T - 10, "device1"),
        message(T, T - 10, "device2"),
        message(T, T - 10, "device1", "energy export"),
    ]
    assert processed_of(spark, payloads).count() == 3


def test_run_accounts_for_every_raw_row(spark, paths):
    payloads = [GOOD, GOOD, message(T + 10, T), b"not json", None, message(T + 20, T + 10, value="x")]
    raw_frame(spark, payloads).write.parquet(paths.consumer_data)
    accounting = run(spark, paths)
    assert accounting == Accounting(raw=6, processed=2, quarantined=3, duplicates=1)
    assert spark.read.parquet(paths.processed_data).count() == 2
    assert spark.read.parquet(paths.quarantine_data).count() == 3


def test_run_on_empty_consumer_data_writes_empty_outputs(spark, paths):
    local_frame(spark, [], RAW_SCHEMA).write.parquet(paths.consumer_data)
    assert run(spark, paths) == Accounting(raw=0, processed=0, quarantined=0, duplicates=0)
    assert spark.read.schema(PROCESSED_SCHEMA).parquet(paths.processed_data).count() == 0


def _write_sink_log(folder, files, logged_root):
    """A file-sink log as Spark writes it, naming files under ``logged_root``."""
    os.makedirs(folder / "_spark_metadata")
    lines = ["v1"] + [
        json.dumps(
            {
                "path": f"file://{logged_root}/{name}",
                "size": os.path.getsize(folder / name),
                "isDir": False,
                "modificationTime": 0,
                "blockReplication": 1,
                "blockSize": 33554432,
                "action": "add",
            }
        )
        for name in files
    ]
    (folder / "_spark_metadata" / "0").write_text("\n".join(lines))


def test_copied_consumer_data_with_foreign_sink_log_reads_the_files_present(spark, tmp_path, caplog):
    folder = tmp_path / "consumer_data"
    raw_frame(spark, [GOOD, message(T + 10, T)]).coalesce(1).write.parquet(str(folder))
    files = [f for f in os.listdir(folder) if f.endswith(".parquet")]
    _write_sink_log(folder, files, "/machine/that/wrote/it/consumer_data")
    log = logging.getLogger("test.read_raw")
    with caplog.at_level(logging.WARNING, logger="test.read_raw"):
        rows = read_raw(spark, str(folder), log).collect()
    assert sorted(r.offset for r in rows) == [0, 1]
    assert "not there" in caplog.text


def test_sink_log_that_matches_is_used_and_leaves_out_uncommitted_files(spark, tmp_path):
    folder = tmp_path / "consumer_data"
    raw_frame(spark, [GOOD]).coalesce(1).write.parquet(str(folder))
    committed = [f for f in os.listdir(folder) if f.endswith(".parquet")]
    _write_sink_log(folder, committed, str(folder))
    raw_frame(spark, [message(T + 10, T)]).coalesce(1).write.mode("append").parquet(str(folder))  # a failed batch
    rows = read_raw(spark, str(folder), logging.getLogger("test")).collect()
    assert [r.offset for r in rows] == [0]


def test_copied_folder_reads_only_the_files_its_log_names(spark, tmp_path):
    folder = tmp_path / "consumer_data"
    raw_frame(spark, [GOOD]).coalesce(1).write.parquet(str(folder))
    committed = [f for f in os.listdir(folder) if f.endswith(".parquet")]
    _write_sink_log(folder, committed, "/machine/that/wrote/it/consumer_data")
    raw_frame(spark, [message(T + 10, T)]).coalesce(1).write.mode("append").parquet(str(folder))  # a failed batch
    rows = read_raw(spark, str(folder), logging.getLogger("test")).collect()
    assert [r.offset for r in rows] == [0]


# --- clock faults: judged against the record's arrival at the broker --------------------------------

ARRIVAL = 1_764_072_000.0  # 2025-11-25 12:00:00 UTC
DAY = 86_400.0
CLOCK_CASES = [
    (ARRIVAL - 5, None),  # the usual report delay
    (ARRIVAL + 3500, None),  # a clock a little ahead
    (ARRIVAL - 6 * DAY, None),  # a backfill of days
    (946_684_800.0, "beyond_lateness_horizon:t_measurement"),  # a clock reset to 2000-01-01
    (0.0, "implausible_timestamp:t_measurement"),  # a clock reset to 1970
    (ARRIVAL - 8 * DAY, "beyond_lateness_horizon:t_measurement"),
    (ARRIVAL + 2 * 3600, "ahead_of_arrival:t_measurement"),
    (ARRIVAL + 120 * DAY, "ahead_of_arrival:t_measurement"),  # months ahead
    (ARRIVAL + 365 * DAY, "ahead_of_arrival:t_measurement"),  # a year ahead
]


@pytest.fixture(scope="module")
def clock_reasons(spark):
    """Each CLOCK_CASES measurement (a series each) arriving at ARRIVAL, parsed with the default limits."""
    payloads = [message(t, t + 1, f"meter{index}") for index, (t, _) in enumerate(CLOCK_CASES)]
    parsed = parse_measurements(raw_frame_arriving(spark, payloads, ARRIVAL))
    return {row.offset: row.reason for row in parsed.select("offset", "reason").collect()}


@pytest.mark.parametrize(("index", "reason"), list(enumerate(r for _, r in CLOCK_CASES)))
def test_a_measurement_is_judged_by_its_distance_from_its_arrival(clock_reasons, index, reason):
    assert clock_reasons[index] == reason


def test_clock_limits_are_settings_and_a_record_without_arrival_time_is_not_judged(spark):
    payloads = [message(ARRIVAL - 2 * 3600, ARRIVAL), message(ARRIVAL + 600, ARRIVAL)]
    tight = ClockLimits(max_ahead_seconds=60, max_lateness_seconds=3600)
    parsed = parse_measurements(raw_frame_arriving(spark, payloads, ARRIVAL), tight)
    assert [r.reason for r in parsed.orderBy("offset").collect()] == [
        "beyond_lateness_horizon:t_measurement",
        "ahead_of_arrival:t_measurement",
    ]
    unknown_arrival = raw_frame_arriving(spark, payloads, ARRIVAL).withColumn("timestamp", F.lit(None))
    assert [r.reason for r in parse_measurements(unknown_arrival, tight).collect()] == [None, None]
    with pytest.raises(ValueError, match="positive"):
        ClockLimits(max_ahead_seconds=0)


def test_run_counts_clock_faults_among_the_quarantined(spark, paths):
    payloads = [message(ARRIVAL - 5, ARRIVAL), message(946_684_800.0, ARRIVAL), b"not json"]
    raw_frame_arriving(spark, payloads, ARRIVAL).write.parquet(paths.consumer_data)
    assert run(spark, paths) == Accounting(raw=3, processed=1, quarantined=2, duplicates=0, clock_faults=1)
