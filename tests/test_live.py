"""Live mode: incremental cycles give what a batch run gives; the runner against a live producer."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
from pyspark.sql import types as T

from make_sample_data import raw_rows
from meter_stream import check_figures, checker, cleaner, config, jvm, kafka_client, live, processor, raw_input, storage
from meter_stream.contracts import (
    CLEANED_SCHEMA,
    PROCESSED_SCHEMA,
    QUARANTINE_SCHEMA,
    RAW_SCHEMA,
    UNKNOWN_SERIES_SCHEMA,
    hour_value,
)
from meter_stream.locks import stage_lock
from meter_stream.session import local_frame
from meter_stream.storage import StageBusyError, read_output, read_text_tail
from tests.helpers import (
    ROOT,
    Crash,
    Mutations,
    epoch,
    message,
    new_topic,
    produce,
    run_python,
    stop_runner,
    utc,
    wait_for_cycles,
    with_hook,
    write_step_files,
)

T0 = epoch("2026-11-25 13:59:00")  # the first steps cross into the next hour partition
A = ("device1", "energy import")
B = ("device2", "energy import")
C = ("device1", "energy export")  # appears only later
D = ("device2", "energy export")
X = ("device9", "energy import")  # outside the catalog
CONFIG = cleaner.CleanerConfig(max_gap_seconds=60)


def msg(series, seconds, value, report_lag=1.0):
    return message(T0 + seconds, T0 + seconds + report_lag, *series, value=value)


STEPS = [
    # measurements with a hole, a second series, an unknown series
    [msg(A, 0, 10), msg(A, 10, 11), msg(A, 20, 12), msg(A, 50, 15), msg(B, 0, 50), msg(B, 30, 53), msg(X, 0, 1)]
    + [msg(D, 0, 1), msg(D, 22, 3), msg(D, 40, 5)],
    # new measurements after the end, across the hour
    [msg(A, 60, 16), msg(A, 70, 17), msg(B, 40, 54)],
    # a late measurement inside a filled hole; a correction (later report); a tie (same report); a late
    # one earlier in its slot than the stored one, which changes the slot's value and the fill before it
    [msg(A, 30, 30), msg(A, 10, 99, report_lag=5.0), msg(B, 30, 60), msg(D, 21, 9)],
    # a series back after a hole longer than max_gap; a new series; one before a series' start; a bad record and
    # the unknown series again: every kind of write a cycle makes (the step the test interrupts)
    [msg(A, 200, 20), msg(C, 100, 5), msg(C, 120, 7), msg(B, -20, 48), b"{", msg(X, 5, 1.5)],
    # nothing usable
    [b"not json", b"", b'{"t_measurement": 1}'],
    # the unknown series once more, and more
    [msg(X, 10, 2), msg(A, 210, 21), msg(C, 130, 8)],
]


def write_steps(spark, folder):
    """Write each step as one raw file in ``folder``; return the files, a list of one per cycle."""
    return [[file] for file in write_step_files(spark, folder, STEPS)]


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


SETTINGS = live.Settings(CONFIG, checker.CheckerConfig(), 3600.0)


def run_batch(spark, tmp_path, raw, settings=SETTINGS):
    batch = dataclasses.replace(config.Paths.under(str(tmp_path / "batch")), consumer_data=raw)
    accounting = processor.run(spark, batch)
    cleaner.run(spark, batch, settings.cleaner)
    return batch, accounting


@dataclasses.dataclass(frozen=True)
class Steps:
    """The raw files of STEPS, one list per cycle, and a batch run's outputs over all of them."""

    files: list[list[str]]
    batch: config.Paths
    accounting: processor.Accounting


@pytest.fixture(scope="module")
def steps(spark, tmp_path_factory) -> Steps:
    """STEPS written once for the module's tests, which only read them (the batch run is the oracle)."""
    folder = tmp_path_factory.mktemp("steps")
    files = write_steps(spark, str(folder / "raw"))
    batch, accounting = run_batch(spark, folder, str(folder / "raw"))
    return Steps(files, batch, accounting)


#: The step whose cycle is interrupted once before its commit (see STEPS).
INTERRUPTED = 3


def test_cycles_one_interrupted_and_redone_give_what_a_batch_run_gives_and_check_figures_what_the_checker_gives(
    spark, tmp_path, monkeypatch, steps
):
    paths = config.Paths.under(str(tmp_path / "live"))
    # short check windows, so that the figures carried from cycle to cycle matter
    settings = dataclasses.replace(SETTINGS, checker=checker.CheckerConfig(spike_window=3, max_flat_slots=2))
    cursor = live.start(spark, paths, settings)
    for index, step_files in enumerate(steps.files):
        if index == INTERRUPTED:
            # It rewrites hours of both outputs, quarantines, adds to an unknown series, writes its state, then
            # dies before its commit; the next start undoes all of it and the cycle is redone.
            with monkeypatch.context() as patch:
                patch.setattr(live.cycle, "commit_cursor", _killed)
                with pytest.raises(RuntimeError):
                    live.run_cycle(spark, paths, settings, cursor, step_files, {})
            assert live.read_cursor(spark, paths).cycle == cursor.cycle
            cursor = live.start(spark, paths, settings)
        cursor, result = live.run_cycle(spark, paths, settings, cursor, step_files, {})
        assert result.accounting.balanced() and result.accounting.raw == len(STEPS[index])
        if index == 0:
            # the hole in A is filled as soon as the measurement after it arrived; nothing after it yet
            a = [r for r in rows(spark, paths.cleaned_data, CLEANED_SCHEMA) if r[2:4] == A]
            assert [r[5] for r in a] == ["measured"] * 3 + ["interpolated"] * 2 + ["measured"]

    assert steps.accounting.raw == sum(len(step) for step in STEPS)
    assert_same_outputs(spark, paths, steps.batch)
    assert not leftovers(tmp_path / "live")
    cleaned = rows(spark, paths.cleaned_data, CLEANED_SCHEMA)
    assert ("missing" in {r[5] for r in cleaned if r[2:4] == A}) and any(r[2:4] == C for r in cleaned)
    assert str(utc("2026-11-25 13:58:40")) in {r[0] for r in cleaned if r[2:4] == B}
    # the hour the first steps began in was closed by later ones and compacted; the open one was not
    closed, current = (os.listdir(os.path.join(paths.cleaned_data, f"hour={h}")) for h in (2026112513, 2026112514))
    assert not any(name.startswith(live.CYCLE_TAG) for name in closed)
    assert any(name.startswith(live.CYCLE_TAG) for name in current)
    assert cursor.cycle == len(STEPS) and not cursor.open_hours.get("cleaned_data", [0]).count(2026112513)

    # the running figures (grown and recomputed series alike) are the batch checker's over the same rows
    figures = live.read_figures(spark, paths, cursor.cycle).transform(check_figures.summarize_figures)
    cleaned_frame = read_output(spark, paths.cleaned_data, CLEANED_SCHEMA, cleaner.log, "test")
    batch = cleaned_frame.transform(check_figures.series_metrics(settings.checker))
    assert sorted(map(tuple, figures.collect())) == sorted(map(tuple, batch.select(*figures.columns).collect()))


def _killed(*_args):
    raise RuntimeError("killed")


def start_feed(kafka, options, seed):
    """A new topic with 5 minutes of backfill (replays mixed in) and a producer sending every second."""
    env = {**os.environ, kafka_client.ENV_BOOTSTRAP_SERVERS: kafka, kafka_client.ENV_TOPIC: new_topic(kafka)}
    feed = ["--quiet", "--replay-share", "0.1", *options]
    assert run_python("producer.py", "--backfill", "5m", "--seed", str(seed), *feed, env=env).returncode == 0
    return env, subprocess.Popen([sys.executable, "producer.py", "--interval", "1", *feed], cwd=ROOT, env=env)


def stop_producer(producer):
    producer.send_signal(signal.SIGTERM)
    assert producer.wait(timeout=60) == 0


def wait_for(condition, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.01)


def uncommitted_files(paths):
    """The processed_data files that a cycle appended and has not committed (tagged for a later cycle)."""
    tagged = glob.glob(os.path.join(paths.processed_data, "*", f"{live.CYCLE_TAG}*"))
    cursors = sorted(glob.glob(os.path.join(paths.live_state, "cursor-*.json")))  # read after the files
    committed = int(os.path.basename(cursors[-1])[len("cursor-") : -len(".json")]) if cursors else 0
    return [file for file in tagged if int(os.path.basename(file).split("-")[1]) > committed]


def leftovers(folder):
    """Staging and undo folders a cycle left behind."""
    return [name for name in os.listdir(folder) if ".undo-" in name or ".staging-" in name]


@pytest.mark.integration
def test_live_runner_killed_mid_cycle_repairs_then_stops_on_sigterm_leaving_what_a_batch_run_gives(
    spark, kafka, tmp_path
):
    env, producer = start_feed(kafka, ["--devices", "20", "--malformed-share", "0.05"], seed=4)
    paths = config.Paths.under(str(tmp_path / "live"))
    command = [sys.executable, "exercises/pipeline.py", "--watch", "1", "--datastore", str(tmp_path / "live")]
    command += ["--expected-series", "all"]
    cycles_file = os.path.join(paths.reports, "live_cycles.json")
    try:
        for _attempt in range(3):
            victim = subprocess.Popen(
                command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            wait_for_cycles(cycles_file, 1, victim)
            # killed while a cycle has added files it has not committed yet
            wait_for(lambda: uncommitted_files(paths), victim)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            interrupted = uncommitted_files(paths)  # empty if the cycle committed before the kill: once more
            if interrupted:
                break
        assert interrupted, "three kills all landed after a cycle's commit"
        os.remove(cycles_file)  # the next runner's cycles only
        runner = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        # its first cycle goes on from the repaired state; the batch run below checks what it left
        cycles = wait_for_cycles(cycles_file, 1, runner)
    finally:
        stop_producer(producer)
    err = stop_runner(runner)

    assert "live: going on after cycle" in err
    # recover removed what the killed cycle had added (the redo wrote its own files, tagged for the same cycle)
    assert all(f"removing file:{file}, written by the interrupted cycle" in err for file in interrupted)
    assert not set(interrupted) & set(glob.glob(os.path.join(paths.processed_data, "*", "cycle-*")))
    assert "SIGTERM received" in err and "live: stopped after" in err
    assert not leftovers(tmp_path / "live")
    assert all(c["latency_p95_s"] is not None and c["freshness_s"] is not None for c in cycles)
    settings = dataclasses.replace(SETTINGS, cleaner=cleaner.CleanerConfig(expected_series=None))
    batch, accounting = run_batch(spark, tmp_path, paths.consumer_data, settings)
    assert accounting.quarantined > 0 and accounting.duplicates > 0
    assert_same_outputs(spark, paths, batch)


def _measurements(series_count, start, rounds):
    """Kafka messages of ``series_count`` series, a round every 10 s from epoch ``start``: (series, slot) unique."""
    return [
        {"value": message(start + 10 * r, start + 10 * r + 1, f"device{d}", "energy import", value=r)}
        for r in range(rounds)
        for d in range(series_count)
    ]


@pytest.mark.integration
def test_live_runner_waits_out_a_broker_outage_and_one_with_a_limit_exits_1(spark, own_broker, tmp_path):
    kafka, control = own_broker
    env = {**os.environ, kafka_client.ENV_BOOTSTRAP_SERVERS: kafka, kafka_client.ENV_TOPIC: new_topic(kafka)}
    start = (time.time() // 10) * 10 - 600
    produce(kafka, env[kafka_client.ENV_TOPIC], _measurements(4, start, 6))

    def runner(name, *options):
        command = [sys.executable, "exercises/pipeline.py", "--watch", "1", "--datastore", str(tmp_path / name)]
        log = open(tmp_path / f"{name}.log", "w")  # a file: the Kafka client logs much while the broker is away
        return subprocess.Popen([*command, *options], cwd=ROOT, env=env, stderr=log, text=True), log

    waiting, waiting_log = runner("waiting")
    limited, limited_log = runner("limited", "--max-broker-outage", "5")
    try:
        for name, process in (("waiting", waiting), ("limited", limited)):
            wait_for_cycles(str(tmp_path / name / "reports" / "live_cycles.json"), 1, process)
        control("stop")
        # the limited one gives up once the outage is noticed and has lasted 5 s; the other one waits
        assert limited.wait(timeout=400) == 1
        log_of = lambda name: (tmp_path / f"{name}.log").read_text()  # noqa: E731
        assert "longer than --max-broker-outage (5 s)" in log_of("limited")
        wait_for(lambda: "is unreachable" in log_of("waiting"), waiting, timeout=400)
        time.sleep(5)
        control("start")
        produce(kafka, env[kafka_client.ENV_TOPIC], _measurements(4, start + 60, 6))
        wait_for(lambda: _processed_count(spark, tmp_path / "waiting") == 48, waiting, timeout=300)
    finally:
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(timeout=180) == 0
        waiting_log.close()
        limited_log.close()
    text = log_of("waiting")
    assert text.count("is unreachable") == 1 and "is back after" in text, text[-3000:]
    rows = spark.read.parquet(str(tmp_path / "waiting" / "processed_data")).select("device_id", "t_measurement")
    assert rows.count() == rows.distinct().count() == 48  # nothing lost, nothing twice


def _processed_count(spark, datastore):
    cursors = glob.glob(str(datastore / "live_state" / "cursor-*.json"))
    return spark.read.parquet(str(datastore / "processed_data")).count() if cursors else 0


# --- the protocol's pieces -------------------------------------------------------------------------


def _commit_to_sink_log(folder, batch, files, compact=False):
    """Write one file-sink log file as Spark's file sink does: a version line, then one JSON line per file."""
    log = folder / "_spark_metadata"
    log.mkdir(parents=True, exist_ok=True)
    entries = [
        {"path": f"file://{folder}/{name}", "size": 1, "isDir": False, "modificationTime": modified, "action": "add"}
        for name, modified in files
    ]
    (log / (f"{batch}.compact" if compact else str(batch))).write_text("\n".join(["v1", *map(json.dumps, entries)]))


def test_cursor_gives_each_committed_file_once_across_compact_log_files(spark, tmp_path):
    folder = tmp_path / "consumer_data"
    _commit_to_sink_log(folder, 0, [("a.parquet", 100)])
    _commit_to_sink_log(folder, 1, [("b.parquet", 200)])
    files, position = live.new_sink_files(spark, str(folder), live.SinkPosition())
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.parquet", "b.parquet"]
    assert position == live.SinkPosition(1, 200)
    # a compact log file repeats the files before it; only the new one is new
    _commit_to_sink_log(folder, 2, [("a.parquet", 100), ("b.parquet", 200), ("c.parquet", 300)], compact=True)
    files, after = live.new_sink_files(spark, str(folder), position)
    assert [f.rsplit("/", 1)[-1] for f in files] == ["c.parquet"] and after == live.SinkPosition(2, 300)
    assert live.new_sink_files(spark, str(folder), after) == ([], after)


def test_a_long_compact_log_file_is_read_from_its_end_as_far_as_new_files_go(spark, tmp_path, monkeypatch):
    folder = tmp_path / "consumer_data"
    names = [(f"part-{i:05d}.parquet", 1000 + i) for i in range(3000)]
    _commit_to_sink_log(folder, 9, names, compact=True)
    monkeypatch.setattr(raw_input, "COMPACT_TAIL_BYTES", 1000)  # a few lines: the tail grows until far enough
    read = []
    monkeypatch.setattr(raw_input, "read_text_tail", lambda *args: read.append(args[2]) or read_text_tail(*args))
    for since in (3990, 2000, -1):
        files, after = live.new_sink_files(spark, str(folder), live.SinkPosition(8, since))
        assert [f.rsplit("/", 1)[-1] for f in files] == [name for name, modified in names if modified > since]
        assert after == live.SinkPosition(9, 3999)
    assert read[0] == 1000 and max(read) >= (tmp_path / "consumer_data/_spark_metadata/9.compact").stat().st_size


def test_a_cycle_takes_the_oldest_files_up_to_its_cap_and_the_next_cycles_the_rest(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    folder = tmp_path / "consumer_data"
    steps = [[msg(A, 10 * (3 * step + i), float(i)) for i in range(3)] for step in range(4)]  # 3 rows a file
    write_step_files(spark, str(folder), steps)
    _commit_to_sink_log(folder, 0, [("step-0.parquet", 100)])
    _commit_to_sink_log(folder, 1, [("step-1.parquet", 200), ("step-2.parquet", 200)])  # one batch, one time
    every = [("step-0.parquet", 100), ("step-1.parquet", 200), ("step-2.parquet", 200), ("step-3.parquet", 300)]
    _commit_to_sink_log(folder, 2, every, compact=True)

    def take(since, cap):
        files, after = live.new_raw_files(spark, paths, since, cap)
        return [f.rsplit("/", 1)[-1] for f in files], after

    position = {}
    taken = []
    for expected in (["step-0.parquet"], ["step-1.parquet", "step-2.parquet"], ["step-3.parquet"], []):
        files, position = take(position, 4)  # the files of one time go together, even above the cap
        assert files == expected
        taken += files
    assert position == {".": live.SinkPosition(2, 300)}
    assert take({}, None)[0] == take({}, 100)[0] == sorted(taken)
    assert take({".": live.SinkPosition(1, 200)}, 1)[0] == ["step-3.parquet"]  # a single batch: taken whole


def test_cursor_round_trips_through_its_json():
    cursor = live.Cursor(7, {".": live.SinkPosition(3, 1234)}, "settings", 1_700_000_000_000_000, {"cleaned_data": [1]})
    assert live.Cursor.from_json(cursor.to_json()) == cursor


def micros(seconds):
    """Epoch microseconds ``seconds`` after T0."""
    return int((T0 + seconds) * 1_000_000)


def test_late_series_are_recomputed_from_the_anchor_near_or_far_else_from_their_late_slot(spark):
    """``recompute_regions``: the last measured slot within max_gap + slot before the late one, else the last
    one before it at all, else the late slot itself."""
    stored = {A: [0, 10], B: [0], D: [40]}
    processed = local_frame(
        spark,
        [
            (*series, hour_value(datetime.fromtimestamp(T0 + s, UTC)), micros(s))
            for series, ts in stored.items()
            for s in ts
        ],
        "device_id string, signal_name string, hour long, slot long",
    )
    # earliest late measurement per series (epoch micros): A's slot 40 s after its anchor, B 100 s after (more than
    # max_gap + slot = 70 s), D before its first stored slot; A's is mid-slot, so its slot is the one recomputed
    since = {A: micros(55), B: micros(100), D: micros(30)}
    late = local_frame(
        spark, [(*series, t) for series, t in since.items()], "device_id string, signal_name string, since long"
    )
    regions = live.late.recompute_regions(processed, late, CONFIG)
    starts = {(r.device_id, r.signal_name): r.start for r in regions.collect()}
    assert starts == {A: micros(10), B: micros(0), D: micros(30)}
    # without a series that needs the far look-up
    regions = live.late.recompute_regions(processed, late.where("device_id = 'device1'"), CONFIG)
    assert [r.start for r in regions.collect()] == [micros(10)]


HOURLY = T.StructType([*PROCESSED_SCHEMA.fields, T.StructField("hour", T.LongType())])


def _append(spark, paths, hour, cycle, series, seconds, value):
    """One file of one processed row in ``hour``, as a cycle appends it."""
    at = datetime.fromtimestamp(T0 + seconds, UTC).replace(tzinfo=None)
    frame = local_frame(spark, [(at, at, *series, value, hour)], HOURLY)
    live.append_files(frame.coalesce(1), paths.processed_data, cycle)


def _values(spark, paths):
    return sorted(r.value for r in spark.read.parquet(paths.processed_data).collect())


def test_compaction_leaves_half_the_task_slots_to_the_cycles():
    assert [live.compaction.compaction_tasks(cores) for cores in (1, 2, 3, 16)] == [1, 1, 1, 8]


def test_compaction_in_the_background_swaps_in_the_merged_hour_with_what_cycles_appended_meanwhile(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    hour, later = 2026112513, 2026112514
    newest = int((T0 + 3600) * 1_000_000)  # in the later hour: the first one is closed
    for cycle in (1, 2, 3):
        _append(spark, paths, hour, cycle, A, 10 * cycle, float(cycle))
    folder = f"{paths.processed_data}/hour={hour}"
    before = sorted(os.listdir(folder))
    compactor = live.Compactor(background=True)
    open_hours = {"processed_data": [hour, later], "cleaned_data": []}
    # the first cycle starts the merge; a cycle after it has finished swaps it in
    assert compactor.step(spark, paths, open_hours, newest, 4) == open_hours
    compactor.running.done.wait()
    assert compactor.step(spark, paths, open_hours, newest, 5) == {"processed_data": [later], "cleaned_data": []}
    after = [name for name in os.listdir(folder) if name.endswith(".parquet")]
    assert len(after) <= spark.sparkContext.defaultParallelism < len(before) and not set(after) & set(before)
    assert _values(spark, paths) == [1.0, 2.0, 3.0]
    assert os.listdir(f"{paths.processed_data}{live.UNDO_SUFFIX}5") == [f"hour={hour}"]  # kept until the commit

    # a file added to the hour while it is merged goes along as it is: nothing dropped, the hour compacted
    _append(spark, paths, hour, 6, B, 40, 4.0)
    compactor.step(spark, paths, {"processed_data": [hour], "cleaned_data": []}, newest, 7)
    compactor.running.done.wait()
    _append(spark, paths, hour, 7, B, 50, 5.0)
    assert compactor.step(spark, paths, {"processed_data": [hour], "cleaned_data": []}, newest, 8) == {
        "processed_data": [],
        "cleaned_data": [],
    }
    names = [name for name in os.listdir(folder) if name.endswith(".parquet")]
    assert len(names) <= spark.sparkContext.defaultParallelism + 1 and f"{live.CYCLE_TAG}00000007" in str(names)
    assert not set(names) & set(after)
    assert leftovers(str(tmp_path)) == [f"processed_data{live.UNDO_SUFFIX}5", f"processed_data{live.UNDO_SUFFIX}8"]
    assert _values(spark, paths) == [1.0, 2.0, 3.0, 4.0, 5.0]
    # what a cycle's entry of live_cycles.json says, and then nothing until the next compaction
    events = {"compacted": [f"processed_data {hour}"] * 2, "compactions_dropped": 0}
    assert compactor.take_events() == events
    assert compactor.take_events() == {"compacted": [], "compactions_dropped": 0}


def _row_groups(spark, path: str) -> int:
    java = jvm.gateway(spark)
    hadoop_path = java.org.apache.hadoop.fs.Path(path)
    reader = java.org.apache.parquet.hadoop.ParquetFileReader.open(
        java.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(hadoop_path, jvm.hadoop_configuration(spark))
    )
    try:
        return reader.getRowGroups().size()
    finally:
        reader.close()


def test_compaction_copies_the_row_groups_of_files_of_one_schema_and_merges_others_by_spark(
    spark, tmp_path, monkeypatch
):
    paths = config.Paths.under(str(tmp_path))
    hour = 2026112513
    for cycle in (1, 2, 3):
        _append(spark, paths, hour, cycle, A, 10 * cycle, float(cycle))
    files = live.compaction.data_files(spark, paths.processed_data, hour)
    monkeypatch.setattr(storage, "CONCATENATE_FILES", 2)
    assert storage.concatenate_parquet(spark, files, str(tmp_path / "merged"))
    merged = sorted(glob.glob(str(tmp_path / "merged" / "*.parquet")))
    # one merged file per two sources, holding their row groups as they were: nothing rewritten
    assert [_row_groups(spark, file) for file in merged] == [2, 1]
    rows = spark.read.schema(PROCESSED_SCHEMA).parquet(*merged)
    assert sorted(r.value for r in rows.collect()) == [1.0, 2.0, 3.0]

    # a file of another schema (an extra column) among them: not concatenated, the hour merged by Spark
    at = datetime.fromtimestamp(T0 + 40, UTC).replace(tzinfo=None)
    other = T.StructType([*HOURLY.fields, T.StructField("note", T.StringType())])
    live.append_files(local_frame(spark, [(at, at, *B, 4.0, hour, "x")], other), paths.processed_data, 4)
    files = live.compaction.data_files(spark, paths.processed_data, hour)
    assert not storage.concatenate_parquet(spark, files, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    compactor, newest = live.Compactor(background=False), int((T0 + 3600) * 1_000_000)
    open_hours = compactor.step(spark, paths, {"processed_data": [hour], "cleaned_data": []}, newest, 5)
    assert open_hours == {"processed_data": [], "cleaned_data": []}
    assert _values(spark, paths) == [1.0, 2.0, 3.0, 4.0]
    assert compactor.take_events() == {"compacted": [f"processed_data {hour}"], "compactions_dropped": 0}


def test_compaction_waits_for_the_grace_after_the_hour_and_redoes_an_hour_a_late_rewrite_replaced(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    hour = 2026112513
    for cycle in (1, 2):
        _append(spark, paths, hour, cycle, A, 10 * cycle, float(cycle))
    open_hours = {"processed_data": [hour], "cleaned_data": []}
    end = int((T0 + 60) * 1_000_000)  # the end of the hour
    compactor = live.Compactor(background=True, grace_seconds=60)
    assert compactor.step(spark, paths, open_hours, end + 59_000_000, 3) == open_hours and compactor.running is None
    compactor.step(spark, paths, open_hours, end + 60_000_000, 4)
    compactor.running.done.wait()
    # a late measurement rewrote the hour (other files) meanwhile: the merge is dropped, the hour stays open
    folder = f"{paths.processed_data}/hour={hour}"
    for name in os.listdir(folder):
        if name.endswith(".parquet"):
            os.rename(os.path.join(folder, name), os.path.join(folder, "rewritten-" + name))
        else:
            os.remove(os.path.join(folder, name))
    assert compactor.step(spark, paths, open_hours, end + 70_000_000, 5) == open_hours
    compactor.running.done.wait()
    assert compactor.step(spark, paths, open_hours, end + 80_000_000, 6) == {"processed_data": [], "cleaned_data": []}
    assert _values(spark, paths) == [1.0, 2.0]
    assert compactor.take_events() == {"compacted": [f"processed_data {hour}"], "compactions_dropped": 1}


def test_a_kill_at_each_mutation_of_a_compaction_swap_with_stragglers_then_recovery_loses_and_doubles_nothing(
    spark, tmp_path
):
    hour, newest = 2026112513, int((T0 + 3600) * 1_000_000)
    open_hours = {"processed_data": [hour], "cleaned_data": []}

    def merged_with_a_straggler(root):
        """Cycles 1-3 appended, a compaction merged them; cycle 4 appended a straggler and committed."""
        paths = config.Paths.under(root)
        for cycle in (1, 2, 3):
            _append(spark, paths, hour, cycle, A, 10 * cycle, float(cycle))
        compactor = live.Compactor(background=True)
        compactor.step(spark, paths, open_hours, newest, 4)
        compactor.running.done.wait()
        _append(spark, paths, hour, 4, B, 40, 4.0)
        return paths, compactor

    def swap(paths, compactor):  # in cycle 5's commit
        return lambda: compactor.step(spark, paths, open_hours, newest, 5)

    counted = Mutations()
    with_hook(counted, swap(*merged_with_a_straggler(str(tmp_path / "counted"))))
    assert any(seen.startswith("copy ") for seen in counted.seen)
    for crash_at in range(1, len(counted.seen) + 1):
        root = str(tmp_path / f"killed-{crash_at}")
        paths, compactor = merged_with_a_straggler(root)
        with pytest.raises(Crash):
            with_hook(Mutations(crash_at), swap(paths, compactor))
        assert _values(spark, paths) == [1.0, 2.0, 3.0, 4.0], counted.seen[crash_at - 1]  # what a reader sees
        live.store.recover(spark, paths, live.Cursor(4, {}, "settings"))  # cycle 5 never committed
        assert _values(spark, paths) == [1.0, 2.0, 3.0, 4.0] and not leftovers(root), counted.seen[crash_at - 1]


def test_quarantine_files_are_rolled_by_levels_keeping_every_row_once_and_the_file_count_bounded(
    spark, tmp_path, monkeypatch
):
    """Cycles that each append a quarantine file: fewer than the fan-out of each level stays, merged files carry
    the next level, the top level is not merged further, the merged files wait in the cycle's undo folder."""
    monkeypatch.setattr(live.store, "ROLL_FANOUT", 2)
    monkeypatch.setattr(live.store, "ROLL_TOP_LEVEL", 2)
    output = str(tmp_path / "quarantine_data")
    for cycle in range(1, 10):
        row = [(f"bad {cycle}", "not_json", "meters", 0, cycle)]
        frame = local_frame(spark, row, QUARANTINE_SCHEMA).coalesce(1)
        live.store.append_files(frame, output, cycle, partitioned=False)
        live.store.roll_files(spark, output, QUARANTINE_SCHEMA, cycle)
        undo = f"{output}{live.store.UNDO_SUFFIX}{cycle}"
        # a roll moved what it merged aside: two level-0 files at every even cycle, two level-1 ones every fourth
        assert len(glob.glob(f"{undo}/rolled-*.parquet")) == (2 if cycle % 2 == 0 else 0) + (2 if cycle % 4 == 0 else 0)
        shutil.rmtree(undo, ignore_errors=True)  # the commit's cleanup
        names = sorted(os.path.basename(f) for f in glob.glob(f"{output}/*.parquet"))
        levels = [live.store._level_of(name) for name in names]
        assert levels.count(0) == cycle % 2 and levels.count(1) == (cycle // 2) % 2 and levels.count(2) == cycle // 4
        offsets = [r.offset for r in spark.read.schema(QUARANTINE_SCHEMA).parquet(output).collect()]
        assert sorted(offsets) == list(range(1, cycle + 1))
    assert len(names) == 3  # of nine cycles' files: one level 0, two at the top


def test_cycles_quarantine_clock_faulty_meters_as_a_batch_run_does_and_report_them(spark, tmp_path):
    """Clock faults among normal series in live cycles: quarantined with their reasons, nothing else changed."""
    arrival = datetime.fromtimestamp(T0 + 100, UTC).replace(tzinfo=None)
    day = 86_400
    steps = [
        [msg(A, 0, 10), msg(A, 10, 11), msg(B, 0, 50)],
        # a clock reset to 2000-01-01 and to 1970, months and a year ahead, among A's and B's next measurements
        [message(946_684_800.0, 946_684_801.0, *A, value=1), msg(A, 20, 12), message(0.0, 1.0, *B, value=2)]
        + [msg(B, 10, 51), message(T0 + 120 * day, T0 + 120 * day, *A, value=3), msg(A, 30, 13)]
        + [message(T0 + 365 * day, T0 + 365 * day, *B, value=4)],
    ]
    rows = raw_rows([payload for step in steps for payload in step])
    rows = [(*row[:5], arrival, row[6]) for row in rows]
    files = []
    for index, step in enumerate(steps):
        start = sum(len(s) for s in steps[:index])
        folder = str(tmp_path / "raw" / f"step-{index}")
        local_frame(spark, rows[start : start + len(step)], RAW_SCHEMA).coalesce(1).write.parquet(folder)
        files.append([os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet")])
    paths = config.Paths.under(str(tmp_path / "live"))
    cursor = live.start(spark, paths, SETTINGS)
    for step_files in files:
        cursor, result = live.run_cycle(spark, paths, SETTINGS, cursor, step_files, {})
    assert result.accounting == processor.Accounting(7, 3, 4, 0, clock_faults=4)

    local_frame(spark, rows, RAW_SCHEMA).write.parquet(str(tmp_path / "all"))
    batch, accounting = run_batch(spark, tmp_path, str(tmp_path / "all"))
    assert accounting == processor.Accounting(10, 6, 4, 0, clock_faults=4)
    assert_same_outputs(spark, paths, batch)
    faults = {"implausible_timestamp:t_measurement": 1, "ahead_of_arrival:t_measurement": 2}
    faults["beyond_lateness_horizon:t_measurement"] = 1
    assert cursor.clock_faults == faults
    with open(os.path.join(paths.reports, checker.REPORT_FILE)) as handle:
        (clock,) = [r for r in json.load(handle) if r["name"] == "clock_faults"]
    assert (clock["passed"], clock["observed"]) == (False, {"rows": 4, **faults})


def test_commit_adds_a_cursor_file_the_newest_wins_and_older_ones_go_only_after_it(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    for cycle in (4, 5):
        live.store.commit_cursor(spark, paths, live.Cursor(cycle, {}, "settings"))
    # a crash after the commit, before its cleanup: both are there, and the newest is the committed one
    names = [f.rsplit("/", 1)[-1] for f in live.cursor_files(spark, paths)]
    assert names == ["cursor-0000000004.json", "cursor-0000000005.json"]
    assert live.read_cursor(spark, paths).cycle == 5
    # a cursor being written (not yet renamed into place) is not a committed one
    (tmp_path / "live_state" / "cursor-0000000006.json.staging").write_text("{")
    assert live.read_cursor(spark, paths).cycle == 5
    live.store.cleanup(spark, paths, 5)
    assert [f.rsplit("/", 1)[-1] for f in live.cursor_files(spark, paths)] == ["cursor-0000000005.json"]


def test_a_runner_is_refused_beside_a_batch_stage_and_holds_off_batch_stages_while_it_runs(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    held, release = threading.Event(), threading.Event()

    def batch_stage_running():
        with stage_lock(paths.cleaned_data, cleaner.STAGE, cleaner.log):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=batch_stage_running)
    holder.start()
    held.wait(60)
    try:
        with pytest.raises(StageBusyError, match="cleaner is already running"):
            live.watch(spark, paths, SETTINGS, None, lambda: True)
        assert not os.path.exists(paths.live_state)  # refused before it read or changed anything
    finally:
        release.set()
        holder.join()

    refusals = []

    def try_batch_stages():
        for path, stage in ((paths.processed_data, processor), (paths.reports, checker)):
            try:
                with stage_lock(path, stage.STAGE, stage.log):
                    refusals.append(None)
            except StageBusyError as error:
                refusals.append(str(error))

    def stop_after_trying():
        thread = threading.Thread(target=try_batch_stages)
        thread.start()
        thread.join()
        return True

    assert live.watch(spark, paths, SETTINGS, None, stop_after_trying) == 0
    assert [r is not None and "is already running" in r for r in refusals] == [True, True]


def test_an_hour_that_an_interrupted_cycle_created_by_a_swap_is_removed_by_recover(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    hour, new_hour = 2026112513, 2026112514
    _append(spark, paths, hour, 1, A, 10, 1.0)
    # cycle 2 rewrites the stored hour and creates the next one (late data for the first, new data in the second)
    staging = str(tmp_path / "staging")
    for h, seconds, value in ((hour, 20, 2.0), (new_hour, 3600, 3.0)):
        at = datetime.fromtimestamp(T0 + seconds, UTC).replace(tzinfo=None)
        local_frame(spark, [(at, at, *A, value, h)], HOURLY).write.mode("append").partitionBy("hour").parquet(staging)
    live.store.swap_hours(spark, paths.processed_data, staging, [hour, new_hour], 2)
    assert _values(spark, paths) == [2.0, 3.0]
    # it dies before its commit: the restart finds cycle 1 committed
    live.store.recover(spark, paths, live.Cursor(1, {}, "settings"))
    assert _values(spark, paths) == [1.0]
    assert sorted(os.listdir(paths.processed_data)) == [f"hour={hour}"] and not leftovers(str(tmp_path))


def test_hours_swapped_three_times_in_one_cycle_are_put_back_by_recover(spark, tmp_path):
    paths = config.Paths.under(str(tmp_path))
    hour, new_hour = 2026112513, 2026112514
    _append(spark, paths, hour, 1, A, 10, 1.0)
    for attempt in range(3):  # e.g. a rewrite, then a compaction of the same hours, within cycle 2
        staging = str(tmp_path / f"staging-{attempt}")
        for h, seconds in ((hour, 20), (new_hour, 3600)):
            at = datetime.fromtimestamp(T0 + seconds, UTC).replace(tzinfo=None)
            row = (at, at, *A, 10.0 + attempt, h)
            local_frame(spark, [row], HOURLY).write.mode("append").partitionBy("hour").parquet(staging)
        live.store.swap_hours(spark, paths.processed_data, staging, [hour, new_hour], 2)
    assert _values(spark, paths) == [12.0, 12.0]
    live.store.recover(spark, paths, live.Cursor(1, {}, "settings"))
    assert _values(spark, paths) == [1.0]
    assert sorted(os.listdir(paths.processed_data)) == [f"hour={hour}"] and not leftovers(str(tmp_path))
