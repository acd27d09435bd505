"""checker: every check passing on a healthy grid and failing on data broken its way."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from meter_stream import message as m
from meter_stream.check_report import format_table
from meter_stream.checker import ERROR, WARN, Check, CheckerConfig, Result, check_cleaned, exit_code, run, verdicts
from meter_stream.contracts import CLEANED_SCHEMA, UNKNOWN_SERIES_SCHEMA
from meter_stream.session import local_frame

START = datetime(2024, 5, 22, 9, 0, 0)
RANGES = {
    ("device1", "energy export"): (50, 70),
    ("device1", "energy import"): (10, 20),
    ("device2", "energy export"): (80, 90),
    ("device2", "energy import"): (0, 10),
}


def healthy_rows(slots: int = 120) -> list[list]:
    """Four series on a complete 10-s grid; every third slot interpolated; reports 1 s after the slot."""
    rows = []
    for (device, signal), (low, high) in RANGES.items():
        for i in range(slots):
            slot = START + timedelta(seconds=10 * i)
            filled = i % 3 == 1
            value = float(low + (i * 7) % (high - low + 1))
            rows.append(
                [
                    slot,
                    None if filled else slot + timedelta(seconds=1),
                    device,
                    signal,
                    value,
                    "interpolated" if filled else "measured",
                ]
            )
    return rows


def results_of(spark, rows, unknown=None, **settings):
    frame = local_frame(spark, [tuple(r) for r in rows], CLEANED_SCHEMA)
    return check_cleaned(frame, unknown, CheckerConfig(**settings))


def failing(results):
    return {(r.name, r.series): r.observed for r in results if not r.passed}


def edit(rows, device, signal, index, **changes):
    """Change the index-th row of one series in place."""
    changed([index], **changes)([r for r in rows if r[2] == device and r[3] == signal])
    return rows


def test_healthy_grid_passes_every_check(spark):
    results = results_of(spark, healthy_rows())
    assert failing(results) == {}
    assert exit_code(results) == 0
    names = {r.name for r in results}
    assert names == {
        "schema",
        "keys_not_null",
        "expected_series_present",
        "unique_slots",
        "regular_grid",
        "value_not_negative",
        "value_within_bounds",
        "filled_share",
        "longest_filled_run",
        "missing_slots",
        "report_before_measurement",
        "report_delay",
        "flat_line",
        "spikes",
        "unknown_series",
    }
    assert len([r for r in results if r.name == "spikes"]) == 4


def test_wrong_schema_fails_alone(spark):
    frame = local_frame(spark, [tuple(r) for r in healthy_rows(3)], CLEANED_SCHEMA).drop("quality")
    results = check_cleaned(frame, None, CheckerConfig())
    assert [(r.name, r.passed, r.observed) for r in results] == [("schema", False, ["missing column quality"])]
    assert exit_code(results) == 1


#: Faults the checks over all series find: (check, what it observes, severity). All are in one run: each shows
#: in its own result and nowhere else.
WHOLE = [
    ("keys_not_null", 1, ERROR),  # a null quality
    ("expected_series_present", {"absent": ["device2/energy export"]}, ERROR),
    ("unknown_series", {"series": 1, "rows": {"test-device/energy import": 366}}, WARN),
]


@pytest.fixture(scope="module")
def whole_results(spark):
    """The results of one run over a grid with a null key and an expected series absent, and an unknown series."""
    rows = [r for r in healthy_rows() if (r[2], r[3]) != ("device2", "energy export")]
    unknown = local_frame(spark, [("test-device", "energy import", 366)], UNKNOWN_SERIES_SCHEMA)
    return results_of(spark, edit(rows, "device1", "energy import", 5, quality=None), unknown=unknown)


@pytest.mark.parametrize(("name", "observed", "severity"), WHOLE, ids=[w[0] for w in WHOLE])
def test_a_fault_over_all_series_fails_its_check_with_its_severity(whole_results, name, observed, severity):
    (result,) = [r for r in whole_results if r.name == name]
    assert (result.passed, result.observed, result.severity, result.series) == (False, observed, severity, None)


def test_faults_over_all_series_fail_nothing_else(whole_results):
    assert failing(whole_results) == {(name, None): observed for name, observed, _severity in WHOLE}
    assert exit_code(whole_results) == 1


def changed(indexes, **changes):
    """An edit that sets ``changes`` on the rows at ``indexes`` of a series (its rows, changed in place)."""

    def edit_rows(rows):
        columns = [f.name for f in CLEANED_SCHEMA.fields]
        for index in indexes:
            for name, value in changes.items():
                rows[index][columns.index(name)] = value
        return rows

    return edit_rows


def reported_early(rows):
    for row in rows:
        if row[1] is not None:
            row[1] = row[0] - timedelta(seconds=9.5)  # the producer quirk
    return rows


#: One series per way a per-series check fails: (its device, the edit of device1/energy import's healthy rows,
#: the checks it fails with what they observe, their severity). All are checked in one run beside the four
#: healthy series (the checks are per series: one series' fault must show in its own results only).
BROKEN = [
    ("duplicate_slot", lambda rows: [*rows, list(rows[10])], {"unique_slots": 1}, ERROR),
    ("hole_in_grid", lambda rows: rows[:10] + rows[11:], {"regular_grid": 1}, ERROR),
    ("negative", changed([9], value=-1.0), {"value_not_negative": 1, "value_within_bounds": 1}, ERROR),
    # the same value twice: beyond the bounds configured for one series, within the default ones of the other
    ("beyond_its_bounds", changed([9], value=25.0), {"value_within_bounds": 1}, ERROR),
    ("within_default_bounds", changed([9], value=25.0), {}, None),
    # 107 slots made filled + 4 filled already; runs of 9, shorter than max_filled_run
    (
        "filled",
        changed([i for i in range(119) if i % 10], quality="interpolated", t_report=None),
        {"filled_share": pytest.approx(111 / 120, abs=1e-4)},
        ERROR,
    ),
    # slots 20 and 54 stay measured
    (
        "long_filled_run",
        changed(range(21, 54), quality="forward_filled", t_report=None),
        {"longest_filled_run": 33},
        WARN,
    ),
    ("missing", changed([4], quality="missing", value=None, t_report=None), {"missing_slots": 1}, WARN),
    ("late_report", changed([0], t_report=START + timedelta(hours=2)), {"report_delay": 7200.0}, WARN),
    # a value the series has nowhere else, so that the run is exactly these slots
    ("flat_line", changed(range(30, 100), value=15.5), {"flat_line": 70}, WARN),
    ("spike", changed([60], value=400.0), {"spikes": 1}, WARN),
    ("reported_early", reported_early, {"report_before_measurement": 1.0}, WARN),
]


@pytest.fixture(scope="module")
def broken_results(spark):
    """The results of one run over the four healthy series and every series of ``BROKEN``."""
    rows = healthy_rows()
    for device, edit_rows, _fails, _severity in BROKEN:
        template = [
            [r[0], r[1], device, *r[3:]] for r in healthy_rows() if (r[2], r[3]) == ("device1", "energy import")
        ]
        rows += edit_rows(template)
    return results_of(spark, rows, bounds={"beyond_its_bounds/energy import": (0.0, 21.0)})


@pytest.mark.parametrize(
    ("device", "fails", "severity"), [(d, f, s) for d, _e, f, s in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_a_series_broken_one_way_fails_those_checks_alone_with_their_severity(broken_results, device, fails, severity):
    series = f"{device}/energy import"
    failed = [r for r in broken_results if r.series == series and not r.passed]
    assert {r.name: r.observed for r in failed} == fails
    assert {r.severity for r in failed} <= {severity}


def test_a_broken_series_fails_nothing_for_the_healthy_ones_or_the_whole(broken_results):
    broken = {f"{device}/energy import" for device, *_rest in BROKEN}
    assert {series for name, series in failing(broken_results)} <= broken
    assert exit_code(broken_results) == 1


def test_many_series_are_summarised_and_all_count(spark):
    rows = edit(healthy_rows(), "device2", "energy import", 9, value=-1.0)
    results = results_of(spark, rows, max_series_in_report=1)
    summary = [r for r in results if r.name == "value_not_negative" and r.series is None]
    assert [(s.passed, s.observed) for s in summary] == [(False, {"failing_series": 1, "series": 4})]
    listed = [r.series for r in results if r.name == "value_not_negative" and r.series]
    assert listed == ["device2/energy import"]


def test_run_writes_the_json_report_and_prints_a_table(spark, paths, capsys):
    local_frame(spark, [tuple(r) for r in healthy_rows(30)], CLEANED_SCHEMA).write.parquet(paths.cleaned_data)
    results = run(spark, paths, CheckerConfig())
    with open(f"{paths.reports}/check_report.json") as handle:
        report = json.load(handle)
    assert len(report) == len(results)
    assert set(report[0]) == {"name", "severity", "passed", "observed", "threshold", "series"}
    assert report[0]["series"] is None and report[0]["name"] == "schema"
    assert "expected_series_present" in capsys.readouterr().out
    assert format_table(results).splitlines()[0].split() == [
        "check",
        "severity",
        "series",
        "result",
        "observed",
        "threshold",
    ]


def test_expected_catalog_is_configurable(spark):
    rows = [r for r in healthy_rows() if r[2] == "device1"]
    assert failing(results_of(spark, rows, expected_series=(("device1", m.SIGNAL_EXPORT),))) == {}
    # a name given twice counts once, and only the absent ones are listed
    catalog = (("device1", m.SIGNAL_EXPORT), ("device1", m.SIGNAL_EXPORT), ("device7", m.SIGNAL_IMPORT))
    results = results_of(spark, rows, expected_series=catalog)
    assert failing(results) == {("expected_series_present", None): {"absent": [f"device7/{m.SIGNAL_IMPORT}"]}}
    assert sorted(r.series for r in results if r.name == "filled_share") == [
        f"device1/{m.SIGNAL_EXPORT}",
        f"device1/{m.SIGNAL_IMPORT}",
    ]


def test_verdicts_list_each_series_and_count_all_when_not_all_are_listed():
    checks = [Check("unique_slots", ERROR, "duplicate_slots", 0), Check("spikes", WARN, "spikes", 2)]
    listed = [
        {m.DEVICE_ID: "d1", m.SIGNAL_NAME: "s", "duplicate_slots": 1, "spikes": 2},
        {m.DEVICE_ID: "d2", m.SIGNAL_NAME: "s", "duplicate_slots": 0, "spikes": None},
    ]
    totals = {"series": 3, "unique_slots": 1, "spikes": 1}
    assert verdicts(checks, totals, listed) == [
        Result("unique_slots", ERROR, False, {"failing_series": 1, "series": 3}, 0),
        Result("unique_slots", ERROR, False, 1, 0, "d1/s"),
        Result("unique_slots", ERROR, True, 0, 0, "d2/s"),
        Result("spikes", WARN, False, {"failing_series": 1, "series": 3}, 2),
        Result("spikes", WARN, True, 2, 2, "d1/s"),
        Result("spikes", WARN, False, None, 2, "d2/s"),
    ]
    assert verdicts(checks, {"series": 2, "unique_slots": 1, "spikes": 1}, listed)[0].series == "d1/s"
