"""consumer under faults: SIGKILL mid-ingest, broker restarts and outages, a recreated topic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from meter_stream.consumer import ConsumerConfig, run
from meter_stream.consumer import log as consumer_log
from meter_stream.raw_input import read_raw
from tests.helpers import ROOT, new_topic, produce

pytestmark = pytest.mark.integration


def offsets_read_as_the_processor_reads(spark, paths):
    rows = read_raw(spark, paths.consumer_data, consumer_log).select("partition", "offset").collect()
    return sorted((r.partition, r.offset) for r in rows)


def start_consumer(kafka, topic, paths, max_offsets, *extra):
    return subprocess.Popen(
        [
            sys.executable,
            "exercises/consumer.py",
            "--bootstrap-servers",
            kafka,
            "--topic",
            topic,
            "--datastore",
            os.path.dirname(paths.consumer_data),
            "--max-offsets-per-trigger",
            str(max_offsets),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_batches(paths, count, process, timeout=240):
    """Return once the sink log has ``count`` batches (while ``process`` still runs)."""
    sink_log = os.path.join(paths.consumer_data, "_spark_metadata")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(sink_log) and sum(name.isdigit() for name in os.listdir(sink_log)) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.1)
    raise AssertionError("the consumer wrote too few batches in time")


def test_sigkill_mid_ingest_then_rerun_lands_every_offset_once(spark, kafka, paths):
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"m%d" % i} for i in range(20_000)])
    victim = start_consumer(kafka, topic, paths, max_offsets=1_000)
    wait_for_batches(paths, 3, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert offsets_read_as_the_processor_reads(spark, paths) != [(0, i) for i in range(20_000)]

    run(spark, paths, ConsumerConfig(kafka, topic, max_offsets_per_trigger=5_000))

    assert offsets_read_as_the_processor_reads(spark, paths) == [(0, i) for i in range(20_000)]


def test_broker_restarted_between_runs_resumes_from_the_checkpoint(spark, own_broker, paths):
    kafka, control = own_broker
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"before-%d" % i} for i in range(300)])
    run(spark, paths, ConsumerConfig(kafka, topic))
    control("stop")
    control("start")
    produce(kafka, topic, [{"value": b"after-%d" % i} for i in range(200)])

    second = run(spark, paths, ConsumerConfig(kafka, topic))

    assert second.rows == 200
    assert offsets_read_as_the_processor_reads(spark, paths) == [(0, i) for i in range(500)]


MESSAGES = 100_000


def test_broker_stopped_during_a_run_fails_it_and_the_next_run_completes(spark, own_broker, paths):
    kafka, control = own_broker
    topic = new_topic(kafka)
    # 200 batches to go when the broker stops after the second: the run cannot finish first (it fails if it does)
    produce(kafka, topic, [{"value": b"m%d" % i} for i in range(MESSAGES)])
    victim = start_consumer(kafka, topic, paths, max_offsets=500)
    wait_for_batches(paths, 2, victim)
    stopped = time.monotonic()
    control("stop")
    _out, err = victim.communicate(timeout=300)
    assert victim.returncode == 1 and "failed" in err, f"exit {victim.returncode}: {err[-2000:]}"
    assert time.monotonic() - stopped < 180
    control("start")

    run(spark, paths, ConsumerConfig(kafka, topic))

    assert offsets_read_as_the_processor_reads(spark, paths) == [(0, i) for i in range(MESSAGES)]


def recreate(kafka, topic):
    admin = AdminClient({"bootstrap.servers": kafka})
    admin.delete_topics([topic])[topic].result(timeout=30)
    deadline = time.monotonic() + 30
    while topic in admin.list_topics(timeout=10).topics and time.monotonic() < deadline:
        time.sleep(0.5)
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)


def raw_values(spark, paths):
    return sorted(bytes(r.value) for r in read_raw(spark, paths.consumer_data, consumer_log).collect())


@pytest.mark.parametrize("new_messages", [5, 25], ids=["offsets-go-back", "offsets-pass-the-old-end"])
def test_recreated_topic_is_read_again_from_its_start(spark, kafka, paths, caplog, new_messages):
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"old-%d" % i} for i in range(20)])
    first = run(spark, paths, ConsumerConfig(kafka, topic))
    recreate(kafka, topic)
    produce(kafka, topic, [{"value": b"new-%d" % i} for i in range(new_messages)])

    with caplog.at_level("WARNING", logger=consumer_log.name):
        recreated = run(spark, paths, ConsumerConfig(kafka, topic))
    produce(kafka, topic, [{"value": b"newer-%d" % i} for i in range(30)])
    after = run(spark, paths, ConsumerConfig(kafka, topic))

    assert (first.generation, recreated.generation, after.generation) == (0, 1, 1)
    assert f"topic {topic} was deleted and recreated" in caplog.text
    assert (recreated.rows, after.rows) == (new_messages, 30)
    assert os.path.isdir(os.path.join(paths.consumer_data, "generation-1", "_spark_metadata"))
    expected = [b"old-%d" % i for i in range(20)] + [b"new-%d" % i for i in range(new_messages)]
    assert raw_values(spark, paths) == sorted(expected + [b"newer-%d" % i for i in range(30)])


def test_topic_recreated_during_a_run_is_read_again_by_the_next(spark, kafka, paths):
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"old-%d" % i} for i in range(20)])
    process = start_consumer(kafka, topic, paths, max_offsets=1)
    wait_for_batches(paths, 2, process)
    recreate(kafka, topic)
    produce(kafka, topic, [{"value": b"new-%d" % i} for i in range(5)])
    _out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    after = run(spark, paths, ConsumerConfig(kafka, topic))

    assert f"topic {topic} was deleted and recreated" in err
    assert after.generation == 1 and after.rows == 0
    values = raw_values(spark, paths)
    # Old messages read before the topic went are kept; every new one arrives (some possibly twice).
    assert set(values) >= {b"new-%d" % i for i in range(5)}
    assert set(values) <= {b"old-%d" % i for i in range(20)} | {b"new-%d" % i for i in range(5)}


def wait_for_offsets(spark, paths, count, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(paths.consumer_data) and len(offsets_read_as_the_processor_reads(spark, paths)) >= count:
            return
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.5)
    raise AssertionError(f"fewer than {count} offsets arrived in time")


def test_continuous_run_keeps_reading_and_stops_cleanly_on_sigterm(spark, kafka, paths):
    topic = new_topic(kafka)
    process = start_consumer(kafka, topic, paths, 40, "--continuous", "--interval", "1")
    produce(kafka, topic, [{"value": b"m-%d" % i} for i in range(100)])
    wait_for_offsets(spark, paths, 100, process)
    produce(kafka, topic, [{"value": b"m-%d" % i} for i in range(100, 300)])
    wait_for_batches(paths, 4, process)
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=120)

    assert process.returncode == 0, err[-2000:]
    assert time.monotonic() - stopped < 60
    assert "SIGTERM received" in err
    batches = {
        name: {int(n) for n in os.listdir(os.path.join(paths.checkpoint_consumer, name)) if n.isdigit()}
        for name in ("offsets", "commits")
    }
    assert max(batches["offsets"]) == max(batches["commits"])  # stopped between batches
    rerun = run(spark, paths, ConsumerConfig(kafka, topic))
    # Whatever the stopped run had not read, the next one reads; nothing twice.
    assert offsets_read_as_the_processor_reads(spark, paths) == [(0, i) for i in range(300)]
    assert rerun.rows < 300
