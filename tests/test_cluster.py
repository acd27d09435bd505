"""The pipeline on a real Spark standalone cluster and a real HDFS (scripts/spark-cluster, scripts/hdfs-local):
the same outputs as a local run, locks that hold across processes on HDFS, and file systems without atomic
rename refused or warned about."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyspark
import pytest
from compare_outputs import report_entries

from meter_stream import cleaner, config, kafka_client, locks, pipeline, storage
from meter_stream.locks import stage_lock
from meter_stream.storage import StageBusyError
from tests.conftest import free_port
from tests.helpers import ROOT, new_topic, run_command, run_python
from tests.test_live import SETTINGS, assert_same_outputs, run_batch

SPARK_SUBMIT = os.path.join(os.path.dirname(sys.executable), "spark-submit")


@contextmanager
def _running(script: str, variables: dict[str, str]) -> Iterator[None]:
    """One of the project's local services (scripts/hdfs-local, scripts/spark-cluster), started and stopped."""
    env, command = {**os.environ, **variables}, os.path.join(ROOT, "scripts", script)
    result = run_command(command, "start", env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield
    finally:
        run_command(command, "stop", env=env, timeout=120)


@pytest.fixture(scope="module")
def hdfs_env(tmp_path_factory) -> dict[str, str]:
    """The ports and folder of this module's HDFS (scripts/hdfs-local's variables)."""
    folder = str(tmp_path_factory.mktemp("hdfs"))
    return {"HDFS_PORT": str(free_port()), "HDFS_HTTP_PORT": str(free_port()), "HDFS_DATA_DIR": folder}


@pytest.fixture(scope="module")
def hdfs(hdfs_env) -> Iterator[str]:
    """A real HDFS (NameNode and DataNode) of this module's own; yields its root URI."""
    with _running("hdfs-local", hdfs_env):
        yield f"hdfs://127.0.0.1:{hdfs_env['HDFS_PORT']}"


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory) -> dict[str, str]:
    """The shape, ports and folder of this module's cluster (scripts/spark-cluster's variables)."""
    return {
        "SPARK_CLUSTER_PORT": str(free_port()),
        "SPARK_CLUSTER_WEBUI_PORT": str(free_port()),
        "SPARK_CLUSTER_WORKERS": "2",
        "SPARK_CLUSTER_WORKER_CORES": "1",
        "SPARK_CLUSTER_WORKER_MEMORY": "1g",
        "SPARK_CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster")),
    }


@pytest.fixture(scope="module")
def cluster(cluster_env) -> Iterator[str]:
    """A Spark standalone master and two workers of 1 core and 1 GiB each; yields the master URL."""
    with _running("spark-cluster", cluster_env):
        yield f"spark://127.0.0.1:{cluster_env['SPARK_CLUSTER_PORT']}"


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> str:
    """The meter_stream package as spark-submit ships it (``make package``)."""
    target = str(tmp_path_factory.mktemp("dist") / "meter_stream.zip")
    result = run_command("make", "--no-print-directory", "package", f"PACKAGE={target}")
    assert result.returncode == 0, result.stderr
    return target


def submit_command(master: str, package: str, script: str, *args: str) -> list[str]:
    """spark-submit of a stage script to ``master``, as README's cluster section shows it."""
    jars = sorted(os.path.join(folder, name) for folder in _connector_folders() for name in os.listdir(folder))
    return [
        SPARK_SUBMIT,
        "--master",
        master,
        "--executor-memory",
        "768m",
        "--py-files",
        package,
        "--jars",
        ",".join(jars),
        os.path.join("exercises", script),
        *args,
    ]


def _connector_folders() -> list[str]:
    cache = os.path.join(ROOT, ".cache", "jars")
    return [os.path.join(cache, name) for name in os.listdir(cache) if name.startswith("spark-kafka-")]


def submit_env(kafka: str, topic: str) -> dict:
    java_home = subprocess.run([os.path.join(ROOT, "scripts", "java-home")], capture_output=True, text=True)
    return {
        **os.environ,
        "JAVA_HOME": java_home.stdout.strip(),
        "PYSPARK_PYTHON": sys.executable,
        kafka_client.ENV_BOOTSTRAP_SERVERS: kafka,
        kafka_client.ENV_TOPIC: topic,
    }


@pytest.mark.integration
def test_the_stages_and_make_run_cluster_on_a_cluster_and_hdfs_give_the_outputs_of_a_local_run(
    spark, kafka, hdfs, hdfs_env, cluster, cluster_env, package, tmp_path
):
    topic = new_topic(kafka)
    env = submit_env(kafka, topic)
    feed = ["--backfill", "20m", "--seed", "7", "--quiet", "--malformed-share", "0.03", "--replay-share", "0.05"]
    assert run_python("producer.py", *feed, env=env).returncode == 0
    # make run-cluster on the running services: it starts none, backfills 10 more minutes, runs the one-JVM
    # runner on the cluster and locally, and compares the two
    local = config.Paths.under(str(tmp_path / "local"))
    overrides = {
        "BACKFILL": "10m",
        "SEED": "8",
        "CLUSTER_DATASTORE": f"{hdfs}/pipeline",
        "LOCAL_DATASTORE": str(tmp_path / "local"),
    }
    script = os.path.join(ROOT, "scripts", "run-cluster")
    result = run_command(script, env={**env, **hdfs_env, **cluster_env, **overrides}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "exit codes: cluster 0, local 0" in result.stdout
    assert "the same outputs" in result.stdout and "check report: the same" in result.stdout
    assert f"meter_stream.session INFO Spark {pyspark.__version__}, master {cluster}" in result.stdout
    assert " + quarantined 0 " not in result.stdout and " + quarantined " in result.stdout  # broken records too
    assert ": running " not in result.stdout  # it started nothing (and so stops nothing)

    stages = config.Paths.under(f"{hdfs}/stages")
    for script in ("consumer.py", "processor.py", "cleaner.py", "checker.py"):
        command = submit_command(cluster, package, script, "--datastore", f"{hdfs}/stages")
        result = run_command(*command, env=env, timeout=600)
        assert result.returncode == 0, (script, result.stdout[-3000:], result.stderr[-3000:])
        assert f"master {cluster}" in result.stdout
    for on_cluster in (stages, config.Paths.under(f"{hdfs}/pipeline")):
        assert_same_outputs(spark, on_cluster, local)
        assert report_entries(spark, on_cluster.reports) == report_entries(spark, local.reports)
        assert not storage.list_files(spark, on_cluster.processed_data + ".lock")  # locks released


def _child_python(submit: subprocess.Popen) -> int:
    """The pid of the Python driver that spark-submit started (it handles SIGTERM; the JVM would just die)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # by its script, not as any child: the JVM may start others (Hadoop runs shell commands)
        found = subprocess.run(
            ["pgrep", "-P", str(submit.pid), "-f", "pipeline.py"], capture_output=True, text=True
        ).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.5)
    raise AssertionError("spark-submit started no Python driver")


def _live_cycles(spark, paths: config.Paths) -> list[dict]:
    text = storage.read_text(spark, paths.reports + "/live_cycles.json")
    return [c for c in json.loads(text) if c["measurements"]] if text else []


def _wait(condition, process: subprocess.Popen, log_file, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, open(log_file).read()[-3000:]
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(1)


def _exit_code(process: subprocess.Popen, log_file, timeout: float) -> int:
    """The process's exit code; if it has not ended in time, it is killed and the test fails with its log."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)  # the Python driver, or it would outlive spark-submit
        process.kill()
        process.wait()
        pytest.fail(f"did not end within {timeout:.0f} s of SIGTERM:\n" + open(log_file).read()[-6000:])


@pytest.mark.integration
def test_the_live_mode_on_a_cluster_and_hdfs_ends_as_a_batch_run_of_what_it_consumed(
    spark, kafka, hdfs, cluster, package, tmp_path
):
    topic = new_topic(kafka)
    env = submit_env(kafka, topic)
    feed = ["--quiet", "--devices", "10", "--replay-share", "0.1", "--malformed-share", "0.03"]
    assert run_python("producer.py", "--backfill", "5m", "--seed", "5", *feed, env=env).returncode == 0
    producer = subprocess.Popen([sys.executable, "producer.py", "--interval", "1", *feed], cwd=ROOT, env=env)
    paths = config.Paths.under(f"{hdfs}/live")
    command = submit_command(cluster, package, "pipeline.py", "--watch", "2", "--datastore", f"{hdfs}/live")
    log_file = tmp_path / "live.log"
    with open(log_file, "w") as log:
        # spark-submit prints its Python driver's output (the stages' log lines) on its stdout
        runner = subprocess.Popen(
            [*command, "--expected-series", "all"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait(lambda: len(_live_cycles(spark, paths)) >= 3, runner, log_file)
        finally:
            producer.send_signal(signal.SIGTERM)
            assert producer.wait(timeout=60) == 0
        os.kill(_child_python(runner), signal.SIGTERM)  # finishes its cycle, then a last one takes what is left
        assert _exit_code(runner, log_file, timeout=300) == 0, open(log_file).read()[-3000:]
    text = log_file.read_text()
    assert f"master {cluster}" in text and "live: stopped after" in text
    settings = dataclasses.replace(SETTINGS, cleaner=cleaner.CleanerConfig(expected_series=None))
    batch, accounting = run_batch(spark, tmp_path, paths.consumer_data, settings)
    assert accounting.quarantined > 0 and accounting.duplicates > 0
    assert_same_outputs(spark, paths, batch)


# --- locks on HDFS ---------------------------------------------------------------------------------


@pytest.fixture
def runners() -> Iterator[Callable[[str, dict, Any], subprocess.Popen]]:
    """Start live runners (local master) on a datastore, each in a process group of its own; kill what is left."""
    started: list[subprocess.Popen] = []

    def start(datastore: str, env: dict, log_file) -> subprocess.Popen:
        command = [sys.executable, "exercises/pipeline.py", "--watch", "1", "--datastore", datastore]
        with open(log_file, "w") as log:
            started.append(subprocess.Popen(command, cwd=ROOT, env=env, stderr=log, start_new_session=True))
        return started[-1]

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.integration
def test_runners_on_hdfs_are_kept_apart_by_a_lease_that_a_killed_holder_loses_when_it_expires(
    spark, kafka, hdfs, runners, tmp_path
):
    topic = new_topic(kafka)
    lease = 60  # a second runner's Spark start must fit in it, on a machine busy with other tests
    env = {**submit_env(kafka, topic), locks.ENV_LEASE_SECONDS: str(lease)}
    assert run_python("producer.py", "--backfill", "3m", "--seed", "2", "--quiet", env=env).returncode == 0
    paths = config.Paths.under(f"{hdfs}/locks")
    holder = runners(f"{hdfs}/locks", env, tmp_path / "holder.log")
    _wait(lambda: len(_live_cycles(spark, paths)) >= 1, holder, tmp_path / "holder.log")

    second = run_python("exercises/pipeline.py", "--watch", "1", "--datastore", f"{hdfs}/locks", env=env)
    assert second.returncode == storage.EXIT_BUSY, second.stderr[-3000:]
    assert f"processed_data.lock is held by processor (pid {holder.pid} on" in second.stderr, second.stderr[-3000:]
    assert "renewed" in second.stderr

    os.killpg(holder.pid, signal.SIGKILL)  # no release: the lock files stay until their lease runs out
    holder.wait()
    killed = time.monotonic()
    try:  # refused while the lease runs; one that came after it would take over and run on
        soon = run_python(
            "exercises/pipeline.py", "--watch", "1", "--datastore", f"{hdfs}/locks", env=env, timeout=lease
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the check came after the lease: raise the lease")
    assert time.monotonic() - killed < lease, "the check came after the lease: raise the lease"
    assert soon.returncode == storage.EXIT_BUSY and f"pid {holder.pid} on" in soon.stderr, soon.stderr[-3000:]

    assert run_python("producer.py", "--backfill", "1m", "--seed", "3", "--quiet", env=env).returncode == 0
    time.sleep(max(0.0, lease + 1 - (time.monotonic() - killed)))
    log_file = tmp_path / "successor.log"
    successor = runners(f"{hdfs}/locks", env, log_file)
    _wait(lambda: "cycle 1: " in log_file.read_text(), successor, log_file)  # a cycle of its own, on the new rows
    successor.send_signal(signal.SIGTERM)
    assert successor.wait(timeout=180) == 0
    text = log_file.read_text()
    assert f"taking over {paths.processed_data}.lock: its holder, processor (pid {holder.pid} on" in text
    assert "live: going on after cycle" in text
    assert not storage.list_files(spark, f"{hdfs}/locks/*.lock*")  # released, and no stale copy left


@pytest.mark.integration
def test_a_lease_is_renewed_while_held_refuses_another_thread_and_takes_over_a_stale_one(spark, hdfs, monkeypatch):
    monkeypatch.setenv(locks.ENV_LEASE_SECONDS, "4")
    log = logging.getLogger("test")
    output = f"{hdfs}/lease/processed_data"
    lock_file = output + ".lock"
    with stage_lock(output, "processor", log, spark):
        first = _modified(spark, lock_file)
        time.sleep(2.5)
        assert _modified(spark, lock_file) > first  # renewed every lease / 4
        refusals = []

        def another_run():  # another thread holds nothing: it is refused like another process
            try:
                with stage_lock(output, "cleaner", log, spark):
                    refusals.append(None)
            except StageBusyError as error:
                refusals.append(str(error))

        thread = threading.Thread(target=another_run)
        thread.start()
        thread.join()
        assert refusals[0] is not None and "cleaner is already running" in refusals[0]
        assert "is held by processor (pid" in refusals[0]
    assert not storage.path_exists(spark, lock_file)  # released

    storage.write_text(spark, lock_file, "ghost (pid 1 on elsewhere)\n")
    fs, path = storage._fs_path(spark, lock_file)
    fs.setTimes(path, int((time.time() - 10) * 1000), -1)  # not renewed for 10 s, 2.5 leases
    with stage_lock(output, "processor", log, spark):
        text = storage.read_text(spark, lock_file) or ""
        assert text.startswith("processor (pid") and "ghost" not in text
    assert not storage.list_files(spark, f"{hdfs}/lease/*.lock*")


def _modified(spark, path: str) -> int:
    fs, hadoop_path = storage._fs_path(spark, path)
    return int(fs.getFileStatus(hadoop_path).getModificationTime())


# --- file systems without atomic rename ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "scheme"),
    [
        ("s3a://bucket/meters", "s3a"),
        ("S3://bucket/meters", "s3"),
        ("s3n://bucket/meters", "s3n"),
        ("gs://bucket/meters", "gs"),
        ("hdfs://namenode:8020/meters", None),
        ("abfss://data@account.dfs.core.windows.net/meters", None),
        ("file:///data/meters", None),
        ("./datastore", None),
    ],
)
def test_file_systems_without_atomic_rename_are_told_by_scheme(path, scheme):
    assert storage.without_atomic_rename(path) == scheme


@pytest.mark.parametrize("scheme", ["s3a", "gs"])
def test_the_live_mode_refuses_an_object_store_before_spark_starts(scheme, caplog):
    code = pipeline.main(["--watch", "5", "--skip-consumer", "--datastore", f"{scheme}://bucket/meters"])
    assert code == storage.EXIT_INPUT_MISSING
    assert f"{scheme}:// has neither" in caplog.text and "hdfs://" in caplog.text and "abfss://" in caplog.text
    # one folder elsewhere is enough to refuse
    code = pipeline.main(["--watch", "5", "--skip-consumer", "--cleaned-data", f"{scheme}://bucket/cleaned"])
    assert code == storage.EXIT_INPUT_MISSING


@pytest.mark.parametrize("scheme", ["s3a", "gs"])
def test_a_batch_stage_on_an_object_store_warns_what_is_not_atomic_and_runs_without_a_lock(scheme, caplog):
    log = logging.getLogger("test")
    with caplog.at_level(logging.WARNING), stage_lock(f"{scheme}://bucket/meters/processed_data", "processor", log):
        pass  # no Spark needed: there is nothing to take
    assert f"{scheme}:// has no atomic rename" in caplog.text
    assert "replaced by copying" in caplog.text and "run one stage at a time" in caplog.text


def test_the_lease_comes_from_the_environment_and_bad_values_are_refused(monkeypatch):
    monkeypatch.delenv(locks.ENV_LEASE_SECONDS, raising=False)
    assert locks.lease_seconds() == locks.DEFAULT_LEASE_SECONDS
    monkeypatch.setenv(locks.ENV_LEASE_SECONDS, "15")
    assert locks.lease_seconds() == 15
    for bad in ("soon", "0.5", "-3"):
        monkeypatch.setenv(locks.ENV_LEASE_SECONDS, bad)
        with pytest.raises(ValueError, match=locks.ENV_LEASE_SECONDS):
            locks.lease_seconds()
