"""consumer: a real Kafka broker into consumer_data, exactly once; failures are clear and bounded."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from meter_stream import checker, cleaner, kafka_client, processor
from meter_stream.consumer import ConsumerConfig, ProgressSummary, config_from_args, run
from meter_stream.contracts import RAW_SCHEMA
from meter_stream.kafka_client import client_options
from meter_stream.raw_input import CheckpointMismatchError
from tests.helpers import new_topic, produce, run_python


def consumed(spark, paths):
    return spark.read.schema(RAW_SCHEMA).parquet(paths.consumer_data)


@pytest.mark.integration
def test_every_message_lands_once_with_the_kafka_schema(spark, kafka, paths):
    topic = new_topic(kafka)
    values = [f'{{"n": {i}}}'.encode() for i in range(50)]
    produce(kafka, topic, [{"value": v} for v in values])

    result = run(spark, paths, ConsumerConfig(kafka, topic))

    rows = consumed(spark, paths).collect()
    assert result.rows == 50 and result.end_offsets == {topic: {"0": 50}}
    assert spark.read.parquet(paths.consumer_data).schema == RAW_SCHEMA
    assert sorted(bytes(r.value) for r in rows) == sorted(values)
    assert sorted((r.partition, r.offset) for r in rows) == [(0, i) for i in range(50)]
    assert {(r.topic, r.timestampType, r.key) for r in rows} == {(topic, 0, None)}


@pytest.mark.integration
def test_reruns_add_only_new_messages(spark, kafka, paths):
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"first-%d" % i} for i in range(30)])
    run(spark, paths, ConsumerConfig(kafka, topic))
    produce(kafka, topic, [{"value": b"second-%d" % i} for i in range(20)])

    second = run(spark, paths, ConsumerConfig(kafka, topic))
    files_after_second = sorted(os.listdir(paths.consumer_data))
    third = run(spark, paths, ConsumerConfig(kafka, topic))

    offsets = [r.offset for r in consumed(spark, paths).collect()]
    assert second.rows == 20 and third.rows == 0
    assert sorted(offsets) == list(range(50))
    assert sorted(os.listdir(paths.consumer_data)) == files_after_second


@pytest.mark.integration
def test_partitions_keys_headers_and_null_values(spark, kafka, paths):
    topic = new_topic(kafka, partitions=3)
    messages = [{"value": b"v%d" % i, "key": b"k%d" % i, "partition": i % 3} for i in range(12)]
    messages += [
        {"value": b"with-headers", "headers": [("source", b"test")], "partition": 1},
        {"value": None, "key": b"tombstone", "partition": 2},
    ]
    produce(kafka, topic, messages)

    run(spark, paths, ConsumerConfig(kafka, topic))

    rows = consumed(spark, paths).collect()
    assert len(rows) == 14 and len({(r.partition, r.offset) for r in rows}) == 14
    assert {r.partition for r in rows} == {0, 1, 2}
    by_key = {None if r.key is None else bytes(r.key): r for r in rows}
    assert bytes(by_key[b"k4"].value) == b"v4" and by_key[b"k4"].partition == 1
    assert by_key[b"tombstone"].value is None
    assert bytes(by_key[None].value) == b"with-headers"


@pytest.mark.integration
def test_small_triggers_make_several_batches(spark, kafka, paths):
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"%d" % i} for i in range(50)])
    result = run(spark, paths, ConsumerConfig(kafka, topic, max_offsets_per_trigger=20))
    assert (result.batches, result.rows) == (3, 50)
    assert consumed(spark, paths).count() == 50


@pytest.mark.integration
def test_missing_checkpoint_beside_existing_output_is_refused(spark, kafka, paths):
    topic = new_topic(kafka)
    produce(kafka, topic, [{"value": b"x"}])
    run(spark, paths, ConsumerConfig(kafka, topic))
    os.rename(paths.checkpoint_consumer, paths.checkpoint_consumer + ".lost")
    produce(kafka, topic, [{"value": b"y"}])
    with pytest.raises(CheckpointMismatchError, match="silently skip the new batches"):
        run(spark, paths, ConsumerConfig(kafka, topic))
    assert consumed(spark, paths).count() == 1


@pytest.mark.slow
def test_unreachable_broker_fails_fast_with_a_clear_message(tmp_path):
    started = time.monotonic()
    result = run_python(
        "exercises/consumer.py", "--bootstrap-servers", "127.0.0.1:9", "--datastore", str(tmp_path), timeout=180
    )
    assert result.returncode == 1
    assert "cannot reach the Kafka broker at 127.0.0.1:9" in result.stderr
    assert time.monotonic() - started < 90


def test_credentials_become_a_jaas_config_and_properties_win():
    options = client_options(
        {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "meter",
            "sasl.password": 's3cr"et',
        },
        {"ssl.endpoint.identification.algorithm": ""},
    )
    assert options == {
        "kafka.security.protocol": "SASL_PLAINTEXT",
        "kafka.sasl.mechanism": "SCRAM-SHA-256",
        "kafka.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="meter" password="s3cr\\"et";',
        "kafka.ssl.endpoint.identification.algorithm": "",
    }
    with pytest.raises(ValueError, match="KAFKA_SASL_PASSWORD"):
        client_options({"sasl.username": "meter"}, {})


@pytest.mark.integration
def test_producer_backfill_through_every_stage(spark, kafka, paths):
    topic = new_topic(kafka)
    produced = run_python(
        "producer.py",
        "--backfill",
        "30m",
        "--seed",
        "2",
        "--topic",
        topic,
        "--bootstrap-servers",
        kafka,
        "--quiet",
        timeout=120,
    )
    assert produced.returncode == 0, produced.stderr
    delivered = int(produced.stderr.split("producer: ")[1].split()[0])

    ingest = run(spark, paths, ConsumerConfig(kafka, topic))
    accounting = processor.run(spark, paths)
    cleaner.run(spark, paths, cleaner.CleanerConfig())
    results = checker.run(spark, paths, checker.CheckerConfig())

    assert ingest.rows == delivered == accounting.raw == accounting.processed
    assert checker.exit_code(results) == 0


@pytest.mark.integration
def test_empty_topic_flows_through_every_stage_and_each_says_so(spark, kafka, paths, caplog):
    topic = new_topic(kafka)
    with caplog.at_level("INFO"):
        assert run(spark, paths, ConsumerConfig(kafka, topic)).rows == 0
        assert processor.run(spark, paths) == processor.Accounting(0, 0, 0, 0)
        counts = cleaner.run(spark, paths, cleaner.CleanerConfig())
        results = checker.run(spark, paths, checker.CheckerConfig())
    assert sum(counts.values()) == 0
    assert checker.exit_code(results) == 1
    assert "holds no raw rows" in caplog.text and "no expected series" in caplog.text


def test_config_refuses_numbers_that_are_not_positive():
    with pytest.raises(ValueError, match="--max-offsets-per-trigger must be positive"):
        ConsumerConfig(max_offsets_per_trigger=0)
    with pytest.raises(ValueError, match="--interval must be positive"):
        ConsumerConfig().continuous(0)
    assert ConsumerConfig(topic="t").continuous(2.5) == ConsumerConfig(topic="t", interval_seconds=2.5)


def test_config_from_options_reads_properties_and_keeps_secrets_out_of_its_repr(tmp_path, monkeypatch):
    properties = tmp_path / "client.properties"
    properties.write_text("# comment\nsasl.jaas.config=secret-jaas\nssl.truststore.location=/ca.pem\n")
    properties.chmod(0o600)
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    args = SimpleNamespace(
        bootstrap_servers="b:9092",
        topic="meters",
        kafka_properties=str(properties),
        max_offsets_per_trigger="500",
        continuous=True,
        interval="5",
        group_id_prefix="utility-meters",
    )
    config_ = config_from_args(args)
    assert config_ == ConsumerConfig(
        "b:9092",
        "meters",
        {
            "kafka.security.protocol": "SASL_SSL",
            "kafka.sasl.jaas.config": "secret-jaas",
            "kafka.ssl.truststore.location": "/ca.pem",
        },
        max_offsets_per_trigger=500,
        interval_seconds=5.0,
        group_id_prefix="utility-meters",
    )
    assert "secret-jaas" not in repr(config_)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_properties_file_other_users_may_access_is_refused_with_how_to_fix_it(tmp_path, mode):
    properties = tmp_path / "client.properties"
    properties.write_text("sasl.jaas.config=secret-jaas\n")
    properties.chmod(mode)
    with pytest.raises(ValueError, match=f"mode {mode:04o}.*chmod 600 {properties}"):
        kafka_client.read_properties(str(properties))
    result = run_python("exercises/consumer.py", "--kafka-properties", str(properties), "--datastore", str(tmp_path))
    assert result.returncode == 1 and f"chmod 600 {properties}" in result.stderr
    assert "secret-jaas" not in result.stderr
    properties.chmod(0o600)
    assert kafka_client.read_properties(str(properties)) == {"sasl.jaas.config": "secret-jaas"}


def _progress(batch, rows, start, end, ms=100, run="run-1"):
    source = SimpleNamespace(startOffset=start, endOffset=end)
    return SimpleNamespace(
        runId=run, batchId=batch, numInputRows=rows, sources=[source], durationMs={"triggerExecution": ms}
    )


def test_summary_counts_batches_with_rows_once_and_finds_offsets_that_went_back():
    first = _progress(0, 10, None, '{"t": {"0": 10}}')
    second = _progress(1, 0, '{"t": {"0": 10}}', '{"t": {"0": 10}}')
    summary = ProgressSummary()
    summary.add([first, second])
    # Spark's recent reports, polled again: the batches already added are not counted twice
    summary.add([second, _progress(0, 3, '{"t": {"0": 10}}', '{"t": {"0": 3}}', ms=50, run="run-2")])
    result = summary.result(generation=2)
    assert (result.batches, result.rows, result.end_offsets) == (2, 13, {"t": {"0": 3}})
    assert result.rewound == (("t", "0", 10, 3),)
    assert (result.generation, result.batch_seconds) == (2, 0.15)
