"""cleaner: slot alignment, fill strategies, long gaps, catalog, configuration."""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest
from chispa import assert_approx_df_equality, assert_df_equality
from pyspark.sql import Observation

from meter_stream.cleaner import CleanerConfig, clean, parse_args, run, slot_counts
from meter_stream.contracts import CLEANED_SCHEMA, PROCESSED_SCHEMA
from meter_stream.session import local_frame
from tests.helpers import utc

IMPORT = ("device1", "energy import")


def processed(spark, rows, series=IMPORT):
    """processed_data rows from (t_measurement, value) pairs of one series; t_report 10 s earlier."""
    return local_frame(spark, [(utc(t), utc(t) - timedelta(seconds=10), *series, v) for t, v in rows], PROCESSED_SCHEMA)


def cleaned(spark, rows, series=IMPORT):
    """cleaned_data rows from (slot, t_report or None, value, quality) of one series."""
    return local_frame(
        spark,
        [
            (utc(slot), None if report is None else utc(report), *series, value, quality)
            for slot, report, value, quality in rows
        ],
        CLEANED_SCHEMA,
    )


def run_clean(spark, frame, **settings):
    """The cleaned grid of ``frame`` with every series accepted."""
    result, _unknown = clean(frame, CleanerConfig(**settings), None)
    return result


GAP = [("2024-05-22 09:00:01.5", 10.0), ("2024-05-22 09:00:41.5", 20.0)]  # slots 09:00:00 and 09:00:40


@pytest.mark.parametrize(
    ("method", "values", "flag"),
    [
        ("linear", [12.5, 15.0, 17.5], "interpolated"),
        ("forward_fill", [10.0, 10.0, 10.0], "forward_filled"),
        ("backward_fill", [20.0, 20.0, 20.0], "backward_filled"),
        ("nearest", [10.0, 10.0, 20.0], "nearest_filled"),
        ("zero", [0.0, 0.0, 0.0], "zero_filled"),
    ],
)
def test_fill_method_values_between_two_measurements(spark, method, values, flag):
    result = run_clean(spark, processed(spark, GAP), fill={"energy import": method})
    expected = cleaned(
        spark,
        [("2024-05-22 09:00:00", "2024-05-22 08:59:51.5", 10.0, "measured")]
        + [(f"2024-05-22 09:00:{10 * (i + 1)}", None, v, flag) for i, v in enumerate(values)]
        + [("2024-05-22 09:00:40", "2024-05-22 09:00:31.5", 20.0, "measured")],
    )
    assert_approx_df_equality(result, expected, precision=1e-9, ignore_row_order=True)


def test_slots_align_to_the_wall_clock_under_drift(spark):
    # ~10.02 s apart: the phase wanders from 9.98 s into the slot to the next slot's start.
    rows = [("2024-05-22 09:00:09.98", 1.0), ("2024-05-22 09:00:20.0", 2.0), ("2024-05-22 09:00:30.02", 3.0)]
    expected = cleaned(
        spark,
        [
            ("2024-05-22 09:00:00", "2024-05-22 08:59:59.98", 1.0, "measured"),
            ("2024-05-22 09:00:20", "2024-05-22 09:00:10", 2.0, "measured"),
            ("2024-05-22 09:00:30", "2024-05-22 09:00:20.02", 3.0, "measured"),
            ("2024-05-22 09:00:10", None, 1.5, "interpolated"),
        ],
    )
    assert_df_equality(run_clean(spark, processed(spark, rows)), expected, ignore_row_order=True)


def test_two_measurements_in_one_slot_keep_the_earliest(spark):
    rows = [("2024-05-22 09:00:00.5", 1.0), ("2024-05-22 09:00:09.9", 5.0), ("2024-05-22 09:00:10.1", 2.0)]
    expected = cleaned(
        spark,
        [
            ("2024-05-22 09:00:00", "2024-05-22 08:59:50.5", 1.0, "measured"),
            ("2024-05-22 09:00:10", "2024-05-22 09:00:00.1", 2.0, "measured"),
        ],
    )
    assert_df_equality(run_clean(spark, processed(spark, rows)), expected, ignore_row_order=True)


def test_gap_longer_than_the_limit_is_missing_not_invented(spark):
    rows = [("2024-05-22 09:00:00", 1.0), ("2024-05-22 09:00:40", 5.0)]  # a hole of 3 slots = 30 s
    result = run_clean(spark, processed(spark, rows), max_gap_seconds=20)
    expected = cleaned(
        spark,
        [("2024-05-22 09:00:00", "2024-05-22 08:59:50", 1.0, "measured")]
        + [(f"2024-05-22 09:00:{s}", None, None, "missing") for s in (10, 20, 30)]
        + [("2024-05-22 09:00:40", "2024-05-22 09:00:30", 5.0, "measured")],
    )
    assert_df_equality(result, expected, ignore_row_order=True)


def test_gap_as_long_as_the_limit_is_filled(spark):
    rows = [("2024-05-22 09:00:00", 1.0), ("2024-05-22 09:00:40", 5.0)]
    result = run_clean(spark, processed(spark, rows), max_gap_seconds=30)
    assert sorted(r.quality for r in result.collect()) == ["interpolated"] * 3 + ["measured"] * 2


def test_series_override_beats_signal_default_and_series_stay_apart(spark):
    frame = processed(spark, GAP).unionByName(processed(spark, GAP, ("device2", "energy import")))
    result = run_clean(spark, frame, fill={"energy import": "zero", "device2/energy import": "forward_fill"})
    filled = sorted((r.device_id, r.value, r.quality) for r in result.collect() if r.quality != "measured")
    assert filled == [("device1", 0.0, "zero_filled")] * 3 + [("device2", 10.0, "forward_filled")] * 3


def test_single_measurement_is_a_one_slot_grid(spark):
    result = run_clean(spark, processed(spark, [("2024-05-22 09:00:05", 7.0)]))
    expected = cleaned(spark, [("2024-05-22 09:00:00", "2024-05-22 08:59:55", 7.0, "measured")])
    assert_df_equality(result, expected)


def test_other_slot_length(spark):
    rows = [("2024-05-22 09:00:00", 0.0), ("2024-05-22 09:01:00", 6.0)]
    result = run_clean(spark, processed(spark, rows), slot_seconds=30)
    assert sorted((r.t_measurement.second + 60 * r.t_measurement.minute, r.value) for r in result.collect()) == [
        (0, 0.0),
        (30, 3.0),
        (60, 6.0),
    ]


def test_unknown_series_are_left_out_and_reported(spark, paths):
    frame = processed(spark, GAP).unionByName(processed(spark, GAP, ("test-device", "energy import")))
    frame.write.parquet(paths.processed_data)
    counts = run(spark, paths, CleanerConfig())
    assert counts["measured"] == 2 and counts["interpolated"] == 3
    assert {r.device_id for r in spark.read.parquet(paths.cleaned_data).collect()} == {"device1"}
    unknown = [(r.device_id, r.signal_name, r.rows) for r in spark.read.parquet(paths.unknown_series).collect()]
    assert unknown == [("test-device", "energy import", 2)]


def test_all_series_can_be_accepted(spark):
    frame = processed(spark, GAP, ("test-device", "energy import"))
    result, _ = clean(frame, CleanerConfig(expected_series=None), None)
    assert result.count() == 5


def test_unknown_fill_method_is_an_error_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="spline.*linear, forward_fill, backward_fill, nearest, zero"):
        CleanerConfig(fill={"energy import": "spline"})


def test_command_line_fill_overrides_and_rejects_unknown_methods(capsys):
    _args, _paths, config_ = parse_args(["--fill", "device1/energy import=nearest", "--max-gap-seconds", "60"])
    assert config_.method_for("device1", "energy import") == "nearest"
    assert config_.method_for("device2", "energy import") == "linear"
    assert config_.max_gap_seconds == 60
    with pytest.raises(SystemExit):
        parse_args(["--fill", "energy import=cubic"])
    assert "cubic" in capsys.readouterr().err


def test_observed_counts_equal_the_grid(spark):
    """The counts observed per span (not per slot) equal the cleaned rows counted by quality flag."""
    export = ("device2", "energy export")
    frame = (
        processed(spark, GAP)
        # Two in one slot (one kept), then a hole longer than max_gap: missing slots.
        .unionByName(processed(spark, [("2024-05-22 09:00:42", 1.0), ("2024-05-22 09:05:30", 2.0)]))
        .unionByName(processed(spark, [("2024-05-22 09:00:00", 1.0), ("2024-05-22 09:00:30", 4.0)], export))
    )
    flags = Observation("flags")
    grid, _unknown = clean(
        frame,
        CleanerConfig(fill={"energy export": "forward_fill"}, expected_series=None, max_gap_seconds=60),
        None,
        flags,
    )
    by_flag = {r.quality: r["count"] for r in grid.groupBy("quality").count().collect()}
    counts = slot_counts(flags)
    assert {flag: n for flag, n in counts.items() if flag not in ("series", "newest") and n} == by_flag
    assert by_flag == {"measured": 5, "interpolated": 3, "missing": 28, "forward_filled": 2}
    assert counts["series"] == 2
    assert counts["newest"] == utc("2024-05-22 09:05:30").replace(tzinfo=UTC)
