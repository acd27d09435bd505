"""pipeline: the stages in one session, stopping at the first failure with its exit code."""

from __future__ import annotations

import json
import os

from meter_stream import pipeline
from tests.helpers import ROOT

SAMPLE = os.path.join(ROOT, "example_data", "consumer_data_sample")


def test_runs_every_stage_on_the_shipped_sample(spark, tmp_path, capsys):
    datastore = tmp_path / "datastore"
    code = pipeline.main(["--skip-consumer", "--consumer-data", SAMPLE, "--datastore", str(datastore)])
    assert code == 0
    with open(datastore / "reports" / "check_report.json") as handle:
        report = json.load(handle)
    assert not [r for r in report if not r["passed"] and r["severity"] == "error"]
    assert (datastore / "reports" / "cleaned_series.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = capsys.readouterr().out
    assert "filled share" in summary and "device2/energy import" in summary


def test_stops_at_the_first_failing_stage_with_its_code(spark, tmp_path):
    datastore = tmp_path / "datastore"
    assert pipeline.main(["--skip-consumer", "--datastore", str(datastore)]) == 2
    assert not (datastore / "cleaned_data").exists()
    assert not (datastore / "reports").exists()


def test_an_error_check_fails_the_pipeline(spark, tmp_path):
    datastore = tmp_path / "datastore"
    args = ["--skip-consumer", "--consumer-data", SAMPLE, "--datastore", str(datastore), "--max-filled-share", "0.1"]
    assert pipeline.main(args) == 1
