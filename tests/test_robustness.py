"""Surviving bad input, empty input, reruns, concurrent runs and SIGKILL (batch stages)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F

import clean_data
from make_sample_data import sample_payloads
from meter_stream import checker, cleaner, config, processor
from meter_stream import message as m
from meter_stream.contracts import PROCESSED_SCHEMA, RAW_SCHEMA
from meter_stream.locks import stage_lock
from meter_stream.session import local_frame
from meter_stream.storage import StageBusyError, read_output
from tests.helpers import ROOT, raw_frame, run_command, run_python

T = 1716369246.734911
REASON_PREFIXES = (
    "empty_value",
    "invalid_utf8",
    "malformed_json",
    "not_a_json_object",
    "missing_field:",
    "unparseable_timestamp:",
    "implausible_timestamp:",
    "non_numeric_value",
    "non_finite_value",
)

# --- fuzz ----------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
field_values = st.one_of(
    json_values, st.just(T), st.just(str(T)), st.just(T * 1000), st.just("device1"), st.just("NaN"), st.just(1e308)
)
messages = st.fixed_dictionaries({}, optional={field: field_values for field in m.FIELDS}).map(
    lambda d: json.dumps(d).encode()
)
deep = st.integers(min_value=1, max_value=3000).map(lambda n: b'{"value": ' + b"[" * n + b"]" * n + b"}")
huge = st.integers(min_value=300, max_value=5000).map(
    lambda n: b'{"t_measurement": 1' + b"0" * n + b', "t_report": 1, "device_id": "d", "signal_name": "s", "value": 1}'
)
payloads = st.lists(
    st.one_of(
        st.binary(max_size=60),
        messages,
        deep,
        huge,
        st.text(max_size=40).map(str.encode),
        st.none(),
        st.just(json.dumps(m.make_message(T, T - 10, "device1", "energy import", 3)).encode()),
    ),
    min_size=1,
    max_size=40,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(values=payloads)
def test_fuzzed_values_never_crash_and_every_row_is_accounted_for(spark, values):
    parsed = processor.parse_measurements(raw_frame(spark, values)).cache()
    processed = processor.collapse_replays(parsed)
    quarantine = processor.select_quarantine(parsed)
    valid = parsed.where(F.col("reason").isNull()).count()
    processed_rows = processed.collect()
    reasons = [r.reason for r in quarantine.collect()]
    parsed.unpersist()
    assert len(values) == len(processed_rows) + len(reasons) + (valid - len(processed_rows))
    assert len(reasons) + valid == len(values)
    assert all(r.startswith(REASON_PREFIXES) for r in reasons)
    assert all(None not in (r.t_measurement, r.t_report, r.device_id, r.signal_name, r.value) for r in processed_rows)


# --- empty and thin inputs -----------------------------------------------------------------------


def test_empty_processed_data_gives_an_empty_grid_and_the_checker_says_series_are_absent(spark, paths):
    local_frame(spark, [], PROCESSED_SCHEMA).write.parquet(paths.processed_data)
    counts = cleaner.run(spark, paths, cleaner.CleanerConfig())
    assert sum(counts.values()) == 0
    results = checker.run(spark, paths, checker.CheckerConfig())
    absent = next(r for r in results if r.name == "expected_series_present")
    assert len(absent.observed["absent"]) == 4 and checker.exit_code(results) == 1


@pytest.mark.slow
def test_missing_consumer_data_is_a_clear_error(tmp_path):
    result = run_python("exercises/processor.py", "--datastore", str(tmp_path))
    assert result.returncode == 2
    assert "consumer_data does not exist: run the consumer first" in result.stderr


# --- reruns --------------------------------------------------------------------------------------


def _sorted_rows(spark, path):
    return sorted(spark.read.parquet(path).collect(), key=lambda r: tuple(str(v) for v in r))


def test_every_stage_gives_identical_output_on_unchanged_input(spark, paths):
    raw_frame(spark, sample_payloads(hours=0.5, seed=11)).write.parquet(paths.consumer_data)
    runs = []
    for _ in range(2):
        processor.run(spark, paths)
        cleaner.run(spark, paths, cleaner.CleanerConfig())
        checker.run(spark, paths, checker.CheckerConfig(), show=False)  # the chart is not compared
        with open(f"{paths.reports}/check_report.json") as handle:
            report = handle.read()
        runs.append(
            (
                _sorted_rows(spark, paths.processed_data),
                _sorted_rows(spark, paths.quarantine_data),
                _sorted_rows(spark, paths.cleaned_data),
                report,
            )
        )
    assert runs[0] == runs[1]


# --- concurrent runs and SIGKILL -----------------------------------------------------------------


def _write_large_raw(spark, path, rows, spacing=10):
    """``rows`` raw rows of one series, ``spacing`` seconds apart (at 10 s, 20,000 rows span 56 hour partitions)."""
    value = F.format_string(
        '{"t_measurement": %d.5, "t_report": %d.5, "device_id": "device1", "signal_name": "energy import", '
        '"value": %d}',
        F.col("id") * spacing + 1716368400,
        F.col("id") * spacing + 1716368390,
        F.col("id") % 20,
    )
    (
        spark.range(rows)
        .select(
            F.lit(None).cast("binary").alias("key"),
            value.cast("binary").alias("value"),
            F.lit("mytopic").alias("topic"),
            F.lit(0).alias("partition"),
            F.col("id").alias("offset"),
            # arriving at the broker as they are measured
            F.timestamp_seconds(F.col("id") * spacing + 1716368400).alias("timestamp"),
            F.lit(0).alias("timestampType"),
        )
        .write.mode("append")
        .parquet(path)
    )


def _start_processor(datastore):
    return subprocess.Popen(
        [sys.executable, "exercises/processor.py", "--datastore", datastore],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lock(lock_file, timeout=120):
    """Return once another process holds the flock on lock_file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(lock_file):
            with open(lock_file) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(handle, fcntl.LOCK_UN)
                except BlockingIOError:
                    return
        time.sleep(0.2)
    raise AssertionError(f"nobody took {lock_file}")


def _wait_for_spark(process):
    """Return once ``process`` (a stage) logged that its SparkSession is up."""
    for line in process.stderr:
        if "meter_stream.session" in line:
            return
    raise AssertionError(f"the stage ended ({process.wait()}) before its SparkSession was up")


def test_lock_refuses_a_second_holder_and_names_the_lock_but_lets_its_holder_take_it_again(tmp_path):
    target = str(tmp_path / "processed_data")
    log = processor.log
    refused = []

    def second_holder():
        try:
            with stage_lock(target, "processor", log):
                pass
        except StageBusyError as error:
            refused.append(str(error))

    with stage_lock(target, "processor", log):
        with stage_lock(target, "processor", log):  # a stage's main holds it, then its run takes it again
            pass
        # still held after the inner block: another holder (another thread here, as another process) is refused
        thread = threading.Thread(target=second_holder)
        thread.start()
        thread.join()
    assert len(refused) == 1
    assert re.match(r"processor is already running: .*processed_data.lock is held by processor \(pid \d+", refused[0])
    with stage_lock(target, "processor", log):  # released when the first run ended
        pass


@pytest.mark.slow
def test_second_run_of_a_stage_is_refused_and_output_stays_intact(spark, tmp_path):
    datastore = str(tmp_path / "datastore")
    # The first run holds the lock from before its Spark starts; the second is refused before its own.
    _write_large_raw(spark, f"{datastore}/consumer_data", rows=20_000)
    first = _start_processor(datastore)
    _wait_for_lock(f"{datastore}/processed_data.lock")
    second = run_python("exercises/processor.py", "--datastore", datastore)
    assert first.wait(timeout=600) == 0
    assert second.returncode == 3
    assert "processor is already running" in second.stderr and "processed_data.lock" in second.stderr
    assert "meter_stream.session" not in second.stderr  # refused without starting Spark
    assert spark.read.parquet(f"{datastore}/processed_data").count() == 20_000


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["as its Spark starts", "while it writes its new output"])
def test_sigkill_leaves_the_previous_output_and_the_next_run_removes_what_the_killed_one_left(spark, tmp_path, moment):
    datastore = str(tmp_path / "datastore")
    paths = config.Paths.under(datastore)
    staging = f"{paths.processed_data}.staging"
    # 200,000 rows keep the killed run busy while it writes
    _write_large_raw(spark, paths.consumer_data, rows=200_000, spacing=1)
    processor.run(spark, paths)  # the previous output, written in this process
    _write_large_raw(spark, paths.consumer_data, rows=200_000, spacing=1)  # the same rows: replays

    victim = _start_processor(datastore)
    _wait_for_spark(victim)  # its run begins: it holds the lock from before
    if moment == "while it writes its new output":
        deadline = time.monotonic() + 300
        while not os.path.isdir(staging):
            assert victim.poll() is None and time.monotonic() < deadline, "the run wrote no staging output"
            time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    left = os.path.isdir(staging)
    assert left == (moment == "while it writes its new output")

    log = processor.log
    survivor = read_output(spark, paths.processed_data, PROCESSED_SCHEMA, log, "processor")
    assert survivor.count() == 200_000  # the previous output, or the new one once exchanged (the same rows)
    # The next run (here in this process) removes the staging output the kill left and writes its own.
    assert processor.run(spark, paths) == processor.Accounting(400_000, 200_000, 0, 200_000)
    assert spark.read.schema(RAW_SCHEMA).parquet(paths.consumer_data).count() == 400_000
    assert not os.path.exists(staging) and not os.path.exists(f"{paths.processed_data}.previous")


# --- operator safety -------------------------------------------------------------------------------


@pytest.mark.parametrize("datastore", ["", "  ", "/", "~", "missing", "home-like"])
def test_clean_data_refuses_what_is_not_a_datastore_and_removes_nothing(tmp_path, monkeypatch, capsys, datastore):
    home_like = tmp_path / "home-like"
    (home_like / "processed_data").mkdir(parents=True)
    (home_like / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    assert clean_data.main([os.path.expanduser(datastore)]) == 2
    assert "clean-data refused" in capsys.readouterr().err
    assert (home_like / "thesis.tex").exists() and (home_like / "processed_data").exists()


def test_clean_data_empties_a_datastore_with_what_interrupted_runs_left(tmp_path):
    datastore = tmp_path / "datastore"
    for name in ("consumer_data/_spark_metadata", "processed_data/hour=1", "cleaned_data.undo-3/hour=1", "live_state"):
        (datastore / name).mkdir(parents=True)
    (datastore / "processed_data.lock").write_text("")
    (datastore / "reports.staging").mkdir()
    assert clean_data.main([str(datastore)]) == 0
    assert datastore.is_dir() and not os.listdir(datastore)


def test_make_clean_data_with_an_empty_datastore_is_refused():
    result = run_command("make", "--no-print-directory", "clean-data", "DATASTORE=")
    assert result.returncode != 0 and "no datastore given" in result.stderr


SHOW_UI = """
import sys
sys.path.insert(0, "exercises")
from meter_stream.session import build_session
spark = build_session("ui-check")
print(spark.sparkContext.uiWebUrl.rsplit(":", 1)[1], spark.sparkContext.getConf().get("spark.ui.killEnabled"))
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as lines:
        print(lines.read())
"""


@pytest.mark.slow
def test_a_stage_session_serves_its_ui_on_loopback_only_with_kill_links_off():
    result = run_python("-c", SHOW_UI, env={k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"})
    assert result.returncode == 0, result.stderr[-2000:]
    first, *table = result.stdout.splitlines()
    port, kill_enabled = first.split()
    assert kill_enabled == "false"
    # /proc/net/tcp: "sl local_address rem_address st ...", addresses as hex IP:port, state 0A is LISTEN
    sockets = [line.split() for line in table if re.match(r"\s*\d+:", line)]
    listening = {fields[1] for fields in sockets if fields[3] == "0A"}
    ui = {address.rsplit(":", 1)[0] for address in listening if address.endswith(f":{int(port):04X}")}
    # 127.0.0.1 (in IPv4, or IPv4-mapped in IPv6), not every interface (0.0.0.0 or ::)
    assert ui and ui <= {"0100007F", "0000000000000000FFFF00000100007F"}, ui


@pytest.mark.parametrize(
    "variable, value",
    [
        ("KAFKA_PORT", "$(touch {marker})"),
        ("KAFKA_PORT", "1+1"),
        ("KAFKA_CONTROLLER_PORT", "70000"),
        ("KAFKA_HEAP", "1g -XX:OnError=touch {marker}"),
        ("KAFKA_AUTH", "scram;touch {marker}"),
        ("KAFKA_GROUP_ID_PREFIX", "x --operation All"),
    ],
)
def test_kafka_local_refuses_a_variable_that_is_not_what_it_should_be_and_runs_nothing(tmp_path, variable, value):
    marker = tmp_path / "ran"
    env = {**os.environ, "KAFKA_DATA_DIR": str(tmp_path / "kafka"), variable: value.format(marker=marker)}
    result = run_command("scripts/kafka-local", "status", env=env)
    assert result.returncode == 2 and variable in result.stderr
    assert not marker.exists()


def test_docker_compose_publishes_every_port_to_loopback_only():
    with open(os.path.join(ROOT, "docker-compose.yml")) as handle:
        text = handle.read()
    published = re.findall(r"^\s*ports:\n((?:\s*-\s*.+\n)+)", text, flags=re.M)
    entries = [re.sub(r"\s*#.*", "", line).strip(" -\"'") for block in published for line in block.splitlines()]
    assert entries  # the broker is published
    assert all(entry.startswith("127.0.0.1:") for entry in entries), entries


@pytest.mark.parametrize(
    "args, words",
    [
        (["add-user", "bob;touch {marker}"], "user name"),
        (["grant", "pipeline", "bob", "t --operation All"], "topic name"),
        (["grant", "admin", "bob", "t"], "pipeline or producer"),
    ],
)
def test_kafka_local_refuses_user_and_topic_names_it_would_pass_to_kafka_tools(tmp_path, args, words):
    marker = tmp_path / "ran"
    env = {**os.environ, "KAFKA_DATA_DIR": str(tmp_path / "kafka"), "KAFKA_AUTH": "scram", "KAFKA_USER_PASSWORD": "x"}
    result = run_command("scripts/kafka-local", *[a.format(marker=marker) for a in args], env=env)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert not marker.exists()


def test_kafka_local_stop_kills_only_its_own_broker_not_whatever_the_pid_file_names(tmp_path):
    data = tmp_path / "kafka"
    data.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (data / "kafka.pid").write_text(f"{bystander.pid}\n")
        env = {**os.environ, "KAFKA_DATA_DIR": str(data), "KAFKA_PORT": "39093"}
        result = run_command("scripts/kafka-local", "stop", env=env)
        assert result.returncode == 0 and "not running" in result.stdout
        assert bystander.poll() is None  # still alive
    finally:
        bystander.kill()
        bystander.wait()


def test_kafka_local_refuses_a_data_folder_that_others_may_write(tmp_path):
    data = tmp_path / "kafka"
    data.mkdir()
    data.chmod(0o777)
    result = run_command("scripts/kafka-local", "start", env={**os.environ, "KAFKA_DATA_DIR": str(data)})
    assert result.returncode == 2 and "writable by other users" in result.stderr
