"""A broker that requires SASL/SCRAM: clients authenticate from the environment, secrets stay secret."""

from __future__ import annotations

import glob
import os
import subprocess
import time
import uuid

import pytest

from tests.conftest import free_port
from tests.helpers import ROOT, run_python

pytestmark = pytest.mark.integration
USER = "meter-pipeline"
PASSWORD = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory):
    """A broker requiring SCRAM-SHA-256; yields (bootstrap servers, client environment, data dir)."""
    data = tmp_path_factory.mktemp("kafka-scram")
    port = free_port()
    credentials = {"KAFKA_SASL_USERNAME": USER, "KAFKA_SASL_PASSWORD": PASSWORD}
    broker_env = {
        **os.environ,
        **credentials,
        "KAFKA_AUTH": "scram",
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DATA_DIR": str(data),
    }
    script = os.path.join(ROOT, "scripts", "kafka-local")
    started = subprocess.run([script, "start"], env=broker_env, capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    client_env = {
        **os.environ,
        **credentials,
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
    }
    try:
        yield client_env, data, started.stdout + started.stderr
    finally:
        subprocess.run([script, "stop"], env=broker_env, check=False, timeout=120)


def run(args, env, timeout=300):
    return run_python(*args, env=env, timeout=timeout)


def test_plaintext_clients_are_refused(secured_broker):
    client_env, _data, _out = secured_broker
    plain = {k: v for k, v in client_env.items() if not k.startswith(("KAFKA_SASL", "KAFKA_SECURITY"))}
    result = run(["test_your_docker_setup/reader.py", "--timeout", "3"], plain)
    assert result.returncode == 2


def test_clients_authenticate_and_the_password_appears_nowhere(secured_broker, tmp_path):
    client_env, data, broker_output = secured_broker
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    outputs = [broker_output]
    produced = run(["producer.py", "--backfill", "10m", "--seed", "4", "--topic", topic, "--quiet"], client_env)
    outputs.append(produced.stdout + produced.stderr)
    assert produced.returncode == 0, produced.stderr
    read = run(
        ["test_your_docker_setup/reader.py", "--topic", topic, "--max-messages", "3", "--timeout", "20"], client_env
    )
    outputs.append(read.stdout + read.stderr)
    assert read.returncode == 0 and read.stdout.count(topic) == 3
    datastore = str(tmp_path / "datastore")
    piped = run(["exercises/pipeline.py", "--verbose", "--topic", topic, "--datastore", datastore], client_env)
    outputs.append(piped.stdout + piped.stderr)
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert "rows written" in piped.stderr

    for script in ("producer.py", "test_your_docker_setup/reader.py", *glob.glob("exercises/*.py", root_dir=ROOT)):
        outputs.append(run([script, "--help"], client_env, timeout=60).stdout)
    files = [
        p for pattern in ("**/*.log", "**/*.out", "**/*.json") for p in glob.glob(f"{data}/{pattern}", recursive=True)
    ]
    files += glob.glob(f"{datastore}/reports/*")
    assert files
    for path in files:
        with open(path, "rb") as handle:
            outputs.append(handle.read().decode("utf-8", errors="replace"))
    leaks = [text[max(0, text.find(PASSWORD) - 80) : text.find(PASSWORD) + 40] for text in outputs if PASSWORD in text]
    assert leaks == []


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["producer.py", "--backfill", "1m", "--quiet"], 1),
        (["test_your_docker_setup/reader.py", "--timeout", "5"], 2),
        (["exercises/consumer.py", "--datastore", "{tmp}"], 1),
    ],
    ids=["producer", "reader", "consumer"],
)
def test_wrong_password_fails_fast_with_an_authentication_error(secured_broker, tmp_path, args, code):
    client_env, _data, _out = secured_broker
    wrong = {**client_env, "KAFKA_SASL_PASSWORD": "not-the-password"}
    started = time.monotonic()
    result = run([a.replace("{tmp}", str(tmp_path)) for a in args], wrong, timeout=120)
    assert result.returncode == code
    assert "authentication" in result.stderr.lower()
    assert time.monotonic() - started < 60
