"""The benchmarks: tiny runs that keep `make bench` and `make bench-live` working, and their figures."""

from __future__ import annotations

import json

import pytest


@pytest.mark.integration
def test_benchmark_smoke_run_writes_every_metric(kafka, tmp_path):
    import harness as bench  # bench/harness.py

    results = tmp_path / "results.json"
    report = tmp_path / "BENCHMARKS.md"
    code = bench.main(
        [
            "--sizes",
            "3000,30000",
            "--consumer-messages",
            "2000",
            "--bootstrap-servers",
            kafka,
            "--results",
            str(results),
            "--report",
            str(report),
        ]
    )
    assert code == 0
    metrics = {(r["metric"], r["rows"] > 0) for r in json.loads(results.read_text())}
    expected = {
        f"{stage}_{part}"
        for stage, parts in (
            ("processor", ("seconds", "floor_seconds", "duckdb_seconds", "over_floor", "over_duckdb")),
            ("cleaner", ("seconds", "floor_seconds", "duckdb_seconds", "over_floor", "over_duckdb")),
            ("checker", ("seconds", "floor_seconds", "chart_seconds", "over_floor")),
        )
        for part in parts
    } | {
        "consumer_msgs_per_s",
        "kafka_tool_msgs_per_s",
        "consumer_over_kafka_tool",
        "scaling_10x",
        "driver_peak_mib",
    }
    assert {name for name, has_rows in metrics if has_rows} >= expected
    text = report.read_text()
    assert "| cleaner_over_floor |" in text
    # Every metric has its one line of meaning, and the largest size's stages are shown.
    assert "| ? |" not in text
    assert "**processor at 30,000**" in text and "| stage | started by |" in text


def test_stale_metrics_of_a_benchmark_go_and_the_other_benchmarks_stay(tmp_path):
    import harness as bench  # bench/harness.py

    results = tmp_path / "results.json"
    old = [{"metric": m, "rows": 1, "value": 1.0, "unit": "s"} for m in ("duckdb_seconds", "live_cycle_s_4")]
    results.write_text(json.dumps(old))
    bench.save_results(
        str(results), [{"metric": "cleaner_seconds", "rows": 2, "value": 2.0, "unit": "s"}], "", owns=bench.owns
    )
    assert [r["metric"] for r in json.loads(results.read_text())] == ["live_cycle_s_4", "cleaner_seconds"]


#: The fault runs of bench/live_bench.py at 40 series, short, each a test of its own (xdist spreads them).
FAULT_RUNS = {
    "restart": ["--restart-sizes", "40"],
    "catch-up": ["--catch-up", "40=2m"],
    "outage": ["--outage-sizes", "40", "--outage-seconds", "10"],
    "soak": ["--soak-sizes", "40", "--soak-span", "10m", "--soak-speed", "20"],
    # hours close every minute of the producer's fast clock
    "hour-close": ["--hour-close-sizes", "40", "--hour-close-clock=--since 2h --speed 60"],
    "compaction": ["--compaction-sizes", "40", "--compaction-files", "6"],
}
#: The options that skip every fault run (each test turns its own back on).
NO_FAULT_RUNS = [
    f"--{name}="
    for name in ("restart-sizes", "catch-up", "outage-sizes", "soak-sizes", "hour-close-sizes", "compaction-sizes")
]


@pytest.mark.integration
def test_live_benchmark_smoke_run_writes_its_metrics(kafka, tmp_path):
    import live_bench  # bench/live_bench.py

    results = tmp_path / "results.json"
    results.write_text('[{"metric": "cleaner_seconds", "rows": 1, "value": 1.0, "unit": "s"}]')
    report = tmp_path / "BENCHMARKS.md"
    # Short live minutes: each run goes on past them until it has the cycles its figures need (keep_live).
    # One history run (a second one is the same run again, ~50 s; the ratio of two is tested below).
    args = ["--histories", "10m=0.2", "--trigger", "2", "--bootstrap-servers", kafka]
    fleet = ["--sizes", "40", "--history", "10m", "--backlog", "2m", "--live-minutes", "0.2", "--settled-cycles", "1"]
    assert live_bench.main([*args, *fleet, *NO_FAULT_RUNS, "--results", str(results), "--report", str(report)]) == 0
    metrics = {r["metric"]: r["value"] for r in json.loads(results.read_text())}
    expected = {"live_cycle_s_10m", "live_latency_p50_s"}
    fleet_metrics = {f"live_{name}_40" for name in ("latency_p50_s", "latency_p95_s", "cycle_s", "msgs_per_s")}
    assert expected | fleet_metrics | {"live_catch_up_s_40", "live_latency_p95_s", "cleaner_seconds"} <= metrics.keys()
    assert metrics["live_settle_s_40"] is None or metrics["live_settle_s_40"] > 0
    assert 0 < metrics["live_latency_p50_s"] <= metrics["live_latency_p95_s"]
    assert 0 < metrics["live_latency_p50_s_40"] <= metrics["live_latency_p95_s_40"]
    assert metrics["live_catch_up_s_40"] > 0 and metrics["live_msgs_per_s_40"] > 0
    assert "| live_latency_p95_s |" in report.read_text()


@pytest.mark.integration
@pytest.mark.parametrize("run", FAULT_RUNS)
def test_live_benchmark_fault_runs_at_a_small_size_write_their_metrics(kafka, tmp_path, run):
    """The kill and restart, the catch-up after downtime, the broker outage (on a broker of its own), the run
    across closing hours and the compressed-time soak, each at 40 series and short, with their completeness
    checks."""
    import live_bench  # bench/live_bench.py

    results = tmp_path / "results.json"
    results.write_text('[{"metric": "live_cycle_s_1h", "rows": 1, "value": 5.0, "unit": "s"}]')
    args = ["--histories=", "--sizes=", "--trigger", "2", "--settled-cycles", "1", "--bootstrap-servers", kafka]
    output = ["--only", "--results", str(results), "--report", ""]
    assert live_bench.main([*args, *NO_FAULT_RUNS, *FAULT_RUNS[run], *output]) == 0
    metrics = {r["metric"]: r["value"] for r in json.loads(results.read_text())}
    assert metrics.pop("live_cycle_s_1h") == 5.0  # --only: the metrics it did not measure are kept
    if run == "restart":
        assert 0 < metrics["live_restart_s_40"] < 600
    elif run == "outage":
        assert 0 < metrics["live_outage_recovery_s_40"] < 600
    elif run == "catch-up":
        assert metrics["live_catch_up_ratio_40_2m"] > 0 and metrics["live_catch_up_heap_mib_40_2m"] > 0
    elif run == "compaction":
        assert metrics["live_compaction_s_spark_40"] > 0 and metrics["live_compaction_s_copy_40"] > 0
        assert metrics["live_compaction_cpu_s_copy_40"] >= 0 and metrics["live_compaction_copy_over_spark_40"] > 0
    elif run == "hour-close":
        assert 0 < metrics["live_latency_p95_s_hour_close_40"] <= metrics["live_latency_max_s_hour_close_40"]
        assert metrics["live_hour_compacted_s_40"] > 0 and metrics["live_compactions_dropped_40"] >= 0
    else:
        assert metrics["live_soak_cycle_s_start_40"] > 0 and metrics["live_soak_files_cleaned_data_end_40"] > 0
        assert metrics["live_soak_sink_log_mib_end_40"] >= metrics["live_soak_sink_log_mib_start_40"]
    assert metrics and all(name.startswith("live_") for name in metrics)


def test_history_figures_give_each_run_its_median_cycle_the_ratio_and_the_longest_run_latencies():
    import live_bench  # bench/live_bench.py

    def cycles(seconds, bucket):
        # the first cycle takes the start-up backlog and one without measurements: neither counts
        first = {"seconds": 99.0, "measurements": 5, "latency_histogram": {"90.0": 5}}
        idle = {"seconds": 50.0, "measurements": 0, "latency_histogram": {}}
        return [first, idle, *({"seconds": s, "measurements": 2, "latency_histogram": {bucket: 2}} for s in seconds)]

    runs = [("1h", 1.0), ("24h", 2.0)]
    results = live_bench.history_figures({"1h": cycles([2.0, 3.0, 4.0], "1.0"), "24h": cycles([5.0, 6.0], "2.5")}, runs)
    metrics = {r["metric"]: (r["rows"], r["value"]) for r in results}
    assert metrics["live_cycle_s_1h"] == (1440, 3.0) and metrics["live_cycle_s_24h"] == (34560, 5.5)
    assert metrics["live_cycle_24h_over_1h"] == (34560, round(5.5 / 3.0, 3))
    # latencies over the longest run only (24h: 4 measurements, all in the 2.5-s bucket)
    assert metrics["live_latency_p50_s"] == metrics["live_latency_p95_s"] == (4, 2.6)  # the bucket's upper edge
    only = live_bench.history_figures({"1h": cycles([2.0], "1.0")}, [("1h", 1.0)])
    assert not any(r["metric"].startswith("live_cycle_1h_over") for r in only)
