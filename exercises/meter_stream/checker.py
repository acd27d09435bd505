"""Stage 4, checker: data-quality checks on cleaned_data, with a report and an exit code.

Reads ``cleaned_data`` (and ``unknown_series`` from the cleaner), runs the checks below and writes
``reports/check_report.json``: a list of {name, severity, passed, observed, threshold, series}
(series is null for global checks). Prints the same as a table. Exit code 1 when a check of
severity ``error`` fails, else 0 (2 when the input is missing).

Checks (severity): schema, keys_not_null, expected_series_present (error); per series
unique_slots, regular_grid, value_not_negative, value_within_bounds, filled_share (error);
longest_filled_run, missing_slots, report_before_measurement, report_delay, flat_line, spikes
(warn); unknown_series, clock_faults (warn: measurements the processor quarantined because their
meter's clock was off, counted by reason from ``quarantine_data``). Thresholds are options; the
defaults pass on a healthy feed and fail on broken data. t_report is compared with the slot start
(cleaned t_measurement).

Usage:
    python exercises/checker.py --datastore DIR
    spark-submit exercises/checker.py --datastore DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from meter_stream import check_report, config
from meter_stream import message as m
from meter_stream.check_figures import CheckerConfig, series_metrics
from meter_stream.check_report import Result
from meter_stream.contracts import (
    CLEANED_SCHEMA,
    CLOCK_FAULT_REASONS,
    PARTITION,
    QUARANTINE_SCHEMA,
    SERIES_KEYS,
    UNKNOWN_SERIES_SCHEMA,
    series_catalog,
)
from meter_stream.locks import stage_lock
from meter_stream.session import build_session, one_row
from meter_stream.storage import (
    StageInputError,
    exit_code_of,
    path_exists,
    recover_output,
    write_text,
)

STAGE = "checker"
log = config.get_logger(STAGE)

ERROR = "error"
WARN = "warn"
SEVERITIES = (ERROR, WARN)
REPORT_FILE = "check_report.json"


@dataclass(frozen=True)
class Check:
    """One per-series check: a series passes when its ``metric`` is at most ``threshold``."""

    name: str
    severity: str
    metric: str
    threshold: float

    @property
    def passes(self) -> Column:
        """Whether a row of ``check_figures.series_metrics`` passes (a missing metric fails)."""
        return F.coalesce(F.col(self.metric) <= F.lit(self.threshold), F.lit(False))


def series_checks(config_: CheckerConfig) -> list[Check]:
    """Return the per-series checks on the columns of ``check_figures.series_metrics``."""
    c = config_
    return [
        Check("unique_slots", ERROR, "duplicate_slots", 0),
        Check("regular_grid", ERROR, "irregular_steps", 0),
        Check("value_not_negative", ERROR, "negative_values", 0),
        Check("value_within_bounds", ERROR, "out_of_bounds", 0),
        Check("filled_share", ERROR, "filled_share", c.max_filled_share),
        Check("longest_filled_run", WARN, "longest_filled_run", c.max_filled_run),
        Check("missing_slots", WARN, "missing_slots", c.max_missing_slots),
        Check("report_before_measurement", WARN, "report_before_share", c.max_report_before_share),
        Check("report_delay", WARN, "report_delay_seconds", c.max_report_delay_seconds),
        Check("flat_line", WARN, "longest_flat_run", c.max_flat_slots),
        Check("spikes", WARN, "spikes", c.max_spikes),
    ]


def schema_problems(cleaned: DataFrame) -> list[str]:
    """Return how a DataFrame's columns differ from the cleaned_data contract (empty when equal)."""
    expected = {f.name: f.dataType.simpleString() for f in CLEANED_SCHEMA.fields}
    actual = {f.name: f.dataType.simpleString() for f in cleaned.schema.fields}
    problems = [f"missing column {name}" for name in expected if name not in actual]
    problems += [f"unexpected column {name}" for name in actual if name not in expected]
    problems += [
        f"{name} is {actual[name]}, expected {kind}"
        for name, kind in expected.items()
        if name in actual and actual[name] != kind
    ]
    return problems


# --- running the checks --------------------------------------------------------------------------


def _round(value: object) -> object:
    return round(value, 4) if isinstance(value, float) else value


def check_cleaned(cleaned: DataFrame, unknown: DataFrame | None, config_: CheckerConfig) -> list[Result]:
    """Run every check; return the report's results (global ones first)."""
    return check_and_summarize(cleaned, unknown, config_)[0]


def check_and_summarize(
    cleaned: DataFrame, unknown: DataFrame | None, config_: CheckerConfig
) -> tuple[list[Result], list[Row]]:
    """Run every check; return the results and the metrics rows of the series listed in them."""
    problems = schema_problems(cleaned)
    results = [Result("schema", ERROR, not problems, problems or "as declared", "cleaned_data contract")]
    if problems:
        return results, []
    return evaluate(cleaned.transform(series_metrics(config_)), unknown, config_, results)


def evaluate(
    metrics: DataFrame, unknown: DataFrame | None, config_: CheckerConfig, results: list[Result] | None = None
) -> tuple[list[Result], list[Row]]:
    """Evaluate the checks on per-series metrics (``check_figures.summarize_figures``); return results and listed rows.

    Args:
        results: results to go first (the schema check).
    """
    results = list(results or [])
    checks = series_checks(config_)
    metrics = metrics.select(
        "*",
        *[check.passes.alias(f"_pass_{check.name}") for check in checks],
        sum((F.when(check.passes, 0).otherwise(1) for check in checks), F.lit(0)).alias("_failures"),
    ).persist()
    try:
        totals = one_row(
            metrics.agg(
                F.count(F.lit(1)).alias("series"),
                F.coalesce(F.sum("null_keys"), F.lit(0)).alias("null_keys"),
                *[F.count_if(~F.col(f"_pass_{c.name}")).alias(c.name) for c in checks],
            )
        )
        results.append(Result("keys_not_null", ERROR, totals["null_keys"] == 0, totals["null_keys"], 0))
        results.append(_expected_series_result(metrics, config_))
        listed = metrics.orderBy(F.desc("_failures"), m.DEVICE_ID, m.SIGNAL_NAME).take(config_.max_series_in_report)
    finally:
        metrics.unpersist()
    results += verdicts(checks, totals.asDict(), [row.asDict() for row in listed])
    results.append(_unknown_series_result(unknown))
    return results, listed


def verdicts(checks: Sequence[Check], totals: Mapping[str, int], listed: Sequence[Mapping[str, Any]]) -> list[Result]:
    """The per-series results: each check for each listed series, and a count over all when not all are listed.

    Args:
        checks: the per-series checks (``series_checks``).
        totals: ``series`` (how many series were checked) and, per check name, how many failed it.
        listed: the metrics rows (``check_figures.series_metrics``) of the series to list, in the report's order.
    """
    results = []
    for check in checks:
        if totals["series"] > len(listed):
            observed = {"failing_series": totals[check.name], "series": totals["series"]}
            results.append(Result(check.name, check.severity, totals[check.name] == 0, observed, check.threshold))
        for row in listed:
            value = row[check.metric]
            results.append(
                Result(
                    check.name,
                    check.severity,
                    value is not None and value <= check.threshold,
                    _round(value),
                    check.threshold,
                    m.series_name(row[m.DEVICE_ID], row[m.SIGNAL_NAME]),
                )
            )
    return results


def _expected_series_result(metrics: DataFrame, config_: CheckerConfig) -> Result:
    expected = series_catalog(metrics.sparkSession, config_.expected_series)
    if expected is None or config_.expected_series is None:
        return Result("expected_series_present", ERROR, True, "not checked (all series accepted)", None)
    absent = expected.join(metrics, on=SERIES_KEYS, how="left_anti").take(1000)
    names = sorted(m.series_name(r[m.DEVICE_ID], r[m.SIGNAL_NAME]) for r in absent)
    return Result(
        "expected_series_present",
        ERROR,
        not names,
        {"absent": names},
        f"{len(set(config_.expected_series))} expected series",
    )


def _unknown_series_result(unknown: DataFrame | None) -> Result:
    if unknown is None:
        return Result("unknown_series", WARN, True, "no unknown_series output from the cleaner", 0)
    top = unknown.orderBy(F.desc("rows"), m.DEVICE_ID, m.SIGNAL_NAME).take(20)
    count = unknown.count() if len(top) == 20 else len(top)
    observed = {"series": count, "rows": {m.series_name(r[m.DEVICE_ID], r[m.SIGNAL_NAME]): r["rows"] for r in top}}
    return Result("unknown_series", WARN, count == 0, observed, 0)


def clock_fault_result(counts: Mapping[str, int] | None) -> Result:
    """The clock_faults check: the quarantined measurements whose meter's clock was off, by reason.

    Args:
        counts: rows per clock-fault reason (``count_clock_faults``), or None without quarantine_data.
    """
    if counts is None:
        return Result("clock_faults", WARN, True, "no quarantine_data from the processor", 0)
    by_reason = {reason: counts.get(reason, 0) for reason in CLOCK_FAULT_REASONS}
    total = sum(by_reason.values())
    return Result("clock_faults", WARN, total == 0, {"rows": total, **by_reason}, 0)


def count_clock_faults(spark: SparkSession, paths: config.Paths) -> dict[str, int] | None:
    """Rows per clock-fault reason in quarantine_data (one aggregate row); None when it does not exist."""
    recover_output(spark, paths.quarantine_data, log)
    if not path_exists(spark, paths.quarantine_data):
        return None
    quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(paths.quarantine_data)
    row = one_row(
        quarantine.agg(*[F.count_if(F.col("reason") == reason).alias(reason) for reason in CLOCK_FAULT_REASONS])
    )
    return {reason: int(row[reason]) for reason in CLOCK_FAULT_REASONS}


def exit_code(results: list[Result]) -> int:
    """Return 1 when an error-severity check failed, else 0."""
    return 1 if any(not r.passed and r.severity == ERROR for r in results) else 0


def run(spark: SparkSession, paths: config.Paths, config_: CheckerConfig, show: bool = True) -> list[Result]:
    """Check cleaned_data, write the JSON report (and with ``show``, print the tables and draw the chart).

    Args:
        show: print the summary and results tables and draw the chart.
    """
    with stage_lock(paths.reports, STAGE, log, spark):
        started = time.monotonic()
        recover_output(spark, paths.cleaned_data, log)
        if not path_exists(spark, paths.cleaned_data):
            raise StageInputError(f"{paths.cleaned_data} does not exist: run the cleaner first")
        # Read with the schema stored in the files, so that the schema check sees what is there.
        # The partition column is layout, not contract.
        cleaned = spark.read.parquet(paths.cleaned_data).drop(PARTITION)
        results, listed = check_and_summarize(cleaned, read_unknown(spark, paths), config_)
        results.append(clock_fault_result(count_clock_faults(spark, paths)))
        report_path = write_report(spark, paths, results)
        if show:
            check_report.show(cleaned, listed, results, config.join_path(paths.reports, check_report.CHART_FILE))
        log_outcome(results, report_path, started)
        return results


def read_unknown(spark: SparkSession, paths: config.Paths) -> DataFrame | None:
    """The cleaner's unknown_series output, or None when there is none."""
    if not path_exists(spark, paths.unknown_series):
        return None
    return spark.read.schema(UNKNOWN_SERIES_SCHEMA).parquet(paths.unknown_series)


def write_report(spark: SparkSession, paths: config.Paths, results: list[Result]) -> str:
    """Write the results as ``reports/check_report.json``; return its path."""
    report_path = config.join_path(paths.reports, REPORT_FILE)
    write_text(spark, report_path, json.dumps([asdict(r) for r in results], indent=2, default=str))
    return report_path


def log_outcome(results: list[Result], report_path: str, started: float) -> None:
    """Log one line: how many checks passed and failed, where the report is, how long it took."""
    failed = [r for r in results if not r.passed]
    log.info(
        "%d checks: %d passed, %d failed (%d errors); report %s (%.1f s)",
        len(results),
        len(results) - len(failed),
        len(failed),
        sum(r.severity == ERROR for r in failed),
        report_path,
        time.monotonic() - started,
    )


def _parse_bounds(items: list[str] | None) -> dict[str, tuple[float, float]]:
    bounds = {}
    for item in items or []:
        name, sep, limits = item.partition("=")
        low, sep2, high = limits.partition(":")
        if not sep or not sep2:
            raise ValueError(f"--bounds {item!r} is not of the form NAME=LOW:HIGH")
        bounds[name.strip()] = (float(low), float(high))
    return bounds


#: Numeric thresholds settable on the command line: name, type, help.
_THRESHOLD_OPTIONS = (
    ("max_filled_share", float, "largest share of filled slots per series (error)"),
    ("max_filled_run", int, "longest run of filled slots (warn)"),
    ("max_missing_slots", int, "most slots flagged missing per series (warn)"),
    ("max_report_before_share", float, "largest share of measurements reported before their slot (warn)"),
    ("max_report_delay_seconds", float, "longest delay from slot start to report (warn)"),
    ("max_flat_slots", int, "longest run of one unchanged value (warn)"),
    ("spike_window", int, "previous slots a value is compared with"),
    ("spike_sigmas", float, "standard deviations from their mean that make a spike"),
    ("spike_min_deviation", float, "smallest deviation that can be a spike"),
    ("spike_min_relative", float, "smallest deviation, as a share of the recent mean, that can be a spike"),
    ("max_spikes", int, "most spikes per series (warn)"),
    ("max_series_in_report", int, "per-series entries listed for at most this many series"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the checker's thresholds (the series options come from the shared module)."""
    defaults = CheckerConfig()
    group = parser.add_argument_group("thresholds")
    group.add_argument(
        "--bounds",
        action="append",
        metavar="NAME=LOW:HIGH",
        help="plausible values for a signal name or device/signal series; repeatable "
        f"(default {defaults.default_bounds[0]}:{defaults.default_bounds[1]} for every series)",
    )
    for name, kind, text in _THRESHOLD_OPTIONS:
        group.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=text)


def config_from_args(args: argparse.Namespace) -> CheckerConfig:
    """Build the checker's configuration from parsed arguments.

    Raises:
        ValueError: on a malformed ``--bounds`` or series name.
    """
    return CheckerConfig(
        expected_series=config.parse_expected_series(args.expected_series, m.EXPECTED_SERIES),
        slot_seconds=args.slot_seconds or config.DEFAULT_SLOT_SECONDS,
        bounds=_parse_bounds(args.bounds),
        **{name: getattr(args, name) for name, _kind, _text in _THRESHOLD_OPTIONS},
    )


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, config.Paths, CheckerConfig]:
    """Parse the command line into (args, paths, checker configuration)."""
    parser = config.make_parser(__doc__)
    config.add_datastore_options(parser, ("cleaned_data", "unknown_series", "reports"))
    config.add_series_options(parser)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        checker_config = config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    return args, config.paths_from_args(args), checker_config


def main(argv: list[str] | None = None) -> int:
    """Run the checker from the command line; return the exit code."""
    args, paths, checker_config = parse_args(argv)

    def check() -> int:
        with stage_lock(paths.reports, STAGE, log):  # a second run is refused before Spark starts
            spark = build_session("meter-stream checker", verbose=args.verbose)
            return exit_code(run(spark, paths, checker_config))

    return exit_code_of(check, log)


if __name__ == "__main__":
    sys.exit(main())
