"""Compare two datastores' outputs row for row, e.g. a cluster run on HDFS against a local run.

    .venv/bin/python scripts/compare_outputs.py DATASTORE DATASTORE

Each datastore is a folder or a Hadoop URI (``hdfs://...``). For processed_data, quarantine_data,
cleaned_data and unknown_series it prints the rows of each and the rows only one of them holds
(Spark's ``exceptAll``: duplicates count), and it compares the check reports' entries. Exit 0 when
everything is the same, 1 when anything differs, 2 when an output is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pyspark.sql import SparkSession

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "exercises"))

from meter_stream import config, contracts, session, storage  # noqa: E402 (after the path above)

OUTPUTS = {
    "processed_data": contracts.PROCESSED_SCHEMA,
    "quarantine_data": contracts.QUARANTINE_SCHEMA,
    "cleaned_data": contracts.CLEANED_SCHEMA,
    "unknown_series": contracts.UNKNOWN_SERIES_SCHEMA,
}
log = config.get_logger("compare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a datastore root (folder or Hadoop URI)")
    parser.add_argument("second", help="the datastore root to compare it with")
    args = parser.parse_args(argv)
    spark = session.build_session("compare-outputs")
    first, second = config.Paths.under(args.first), config.Paths.under(args.second)
    return storage.exit_code_of(lambda: _compare(spark, first, second), log)


def _compare(spark: SparkSession, first: config.Paths, second: config.Paths) -> int:
    same = True
    print(f"{'output':<16} {'rows':>10} {'rows':>10} {'only in 1st':>12} {'only in 2nd':>12}")
    for name, schema in OUTPUTS.items():
        a = storage.read_output(spark, getattr(first, name), schema, log, "compare")
        b = storage.read_output(spark, getattr(second, name), schema, log, "compare")
        counts = [a.count(), b.count(), a.exceptAll(b).count(), b.exceptAll(a).count()]
        same = same and counts[2] == counts[3] == 0
        print(f"{name:<16} {counts[0]:>10} {counts[1]:>10} {counts[2]:>12} {counts[3]:>12}")
    reports = [report_entries(spark, paths.reports) for paths in (first, second)]
    print(f"check report: {'the same' if reports[0] == reports[1] else 'DIFFERENT'} ({len(reports[0])} checks)")
    same = same and reports[0] == reports[1]
    print("the same outputs" if same else "the outputs DIFFER")
    return 0 if same else 1


def report_entries(spark: SparkSession, reports: str) -> list[tuple[str, bool, str]]:
    """The check report's entries (name, passed, observed figures), in order; none without a report."""
    text = storage.read_text(spark, config.join_path(reports, "check_report.json"))
    checks = json.loads(text) if text else []
    return sorted((c["name"], c["passed"], json.dumps(c["observed"], sort_keys=True)) for c in checks)


if __name__ == "__main__":
    sys.exit(main())
