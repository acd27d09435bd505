"""Small inputs for the tests (timestamps, messages, raw consumer rows), Kafka topics, and running project scripts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pyspark.sql import DataFrame, SparkSession

from make_sample_data import raw_rows
from meter_stream import storage
from meter_stream.contracts import RAW_SCHEMA
from meter_stream.session import local_frame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def utc(text: str) -> datetime:
    """A naive UTC datetime from ``YYYY-mm-dd HH:MM:SS[.ffffff]`` (Spark's TimestampType in UTC)."""
    return datetime.fromisoformat(text).replace(tzinfo=None)


def epoch(text: str) -> float:
    """Epoch seconds of a UTC ``YYYY-mm-dd HH:MM:SS[.ffffff]`` text."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def message(t_measurement, t_report, device_id="device1", signal_name="energy import", value=12) -> bytes:
    """A message value as the producer sends it."""
    return json.dumps(
        {
            "t_measurement": t_measurement,
            "t_report": t_report,
            "device_id": device_id,
            "signal_name": signal_name,
            "value": value,
        }
    ).encode()


def raw_frame(spark: SparkSession, payloads: list[bytes | None]) -> DataFrame:
    """Raw consumer rows (topic mytopic, partition 0, offsets 0..n-1) for message values."""
    return local_frame(spark, raw_rows(payloads), RAW_SCHEMA)


def raw_frame_arriving(spark: SparkSession, payloads: list[bytes | None], arrival: float) -> DataFrame:
    """Raw consumer rows as ``raw_frame`` gives, every one arriving at the broker at epoch ``arrival``."""
    stamp = datetime.fromtimestamp(arrival, UTC).replace(tzinfo=None)
    return local_frame(spark, [(*row[:5], stamp, row[6]) for row in raw_rows(payloads)], RAW_SCHEMA)


def run_command(*command: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command from the repo root and capture its text output."""
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_python(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a project script (``exercises/processor.py`` ...) with this Python."""
    return run_command(sys.executable, *args, env=env, timeout=timeout)


def new_topic(kafka: str, partitions: int = 1) -> str:
    """A new topic with a unique name on the broker ``kafka``."""
    topic = f"test-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka})  # keep it alive until the topic exists
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
    return topic


def produce(kafka: str, topic: str, messages: list[dict]) -> None:
    """Send messages (kwargs of Producer.produce) and wait until all are delivered."""
    producer = Producer({"bootstrap.servers": kafka})
    failures = []

    def delivered(error, _message) -> None:
        if error:
            failures.append(error)

    for msg in messages:
        producer.produce(topic, on_delivery=delivered, **msg)
    assert producer.flush(30) == 0 and not failures


def write_step_files(spark: SparkSession, folder: str, steps: list[list[bytes | None]]) -> list[str]:
    """Write each step (message values) as one raw parquet file in ``folder``, offsets going on across steps,
    as the consumer's batches would be; return the files, one per step."""
    rows, files = raw_rows([payload for step in steps for payload in step]), []
    for index, step in enumerate(steps):
        start = sum(len(s) for s in steps[:index])
        staging = os.path.join(folder + ".tmp", str(index))
        local_frame(spark, rows[start : start + len(step)], RAW_SCHEMA).coalesce(1).write.parquet(staging)
        (name,) = [f for f in os.listdir(staging) if f.endswith(".parquet")]
        os.makedirs(folder, exist_ok=True)
        os.rename(os.path.join(staging, name), os.path.join(folder, f"step-{index}.parquet"))
        files.append(os.path.join(folder, f"step-{index}.parquet"))
    return files


def wait_for_cycles(path, count, process, timeout=300):
    """Wait until the live report ``path`` lists ``count`` cycles with measurements; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as handle:
                cycles = [c for c in json.load(handle) if c["measurements"]]
            if len(cycles) >= count:
                return cycles
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(1)
    raise AssertionError(f"fewer than {count} cycles in time")


def stop_runner(runner):
    """Stop the live runner with SIGTERM; return its log after checking that it exited 0."""
    runner.send_signal(signal.SIGTERM)
    _out, err = runner.communicate(timeout=180)
    assert runner.returncode == 0, err[-3000:]
    return err


# --- crash injection ---------------------------------------------------------------------------


class Crash(BaseException):
    """A simulated kill: not an ``Exception``, so no handler in the project catches it."""


class Mutations:
    """The storage mutation hook: counts the mutations; crashes at the ``crash_at``-th one; or, given a
    ``snapshots`` folder, copies the datastore as it is before each one (all that a kill there leaves)."""

    def __init__(self, crash_at: int | None = None, root: str = "", snapshots: str = "") -> None:
        self.crash_at, self.root, self.snapshots = crash_at, root, snapshots
        self.seen: list[str] = []

    def __call__(self, kind: str, path: str) -> None:
        self.seen.append(f"{kind} {path}")
        if self.snapshots:
            shutil.copytree(self.root, os.path.join(self.snapshots, str(len(self.seen))))
        if len(self.seen) == self.crash_at:
            raise Crash(f"killed before mutation {self.crash_at}: {self.seen[-1]}")


def with_hook(hook: Mutations, action: Callable):
    storage.mutation_hook = hook
    try:
        return action()
    finally:
        storage.mutation_hook = None
