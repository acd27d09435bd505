"""Brokers that require SASL/SCRAM, TLS and ACLs: clients work with exactly their rights, every access
failure fails fast naming its cause, and no secret appears in a file, a log or a command line."""

from __future__ import annotations

import glob
import os
import re
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from tests.conftest import free_port
from tests.helpers import ROOT, run_command, run_python, stop_runner, wait_for_cycles

pytestmark = pytest.mark.integration
SCRIPT = os.path.join(ROOT, "scripts", "kafka-local")
USER, PASSWORD = "meter-all", f"all-{uuid.uuid4().hex}"  # both roles on every topic (made at format time)
PIPELINE, PIPELINE_PASSWORD = "meter-pipeline", f"pipe-{uuid.uuid4().hex}"
PRODUCER, PRODUCER_PASSWORD = "meter-producer", f"prod-{uuid.uuid4().hex}"
#: The limit the issue sets for a failure to be reported.
FAIL_FAST_SECONDS = 60


class CommandLineWatch:
    """Samples every process's command line while it runs; keeps those that hold a secret."""

    def __init__(self, secrets) -> None:
        self.secrets = secrets  # a callable: the secrets change while a broker is formatted
        self.leaks: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            secrets = [s for s in self.secrets() if s]
            for path in glob.glob("/proc/[0-9]*/cmdline"):
                try:
                    with open(path, "rb") as handle:
                        line = handle.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                self.leaks += [f"{path}: {line[:120]}" for s in secrets if s in line]

    def __enter__(self) -> CommandLineWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Broker:
    port: int
    data: str
    env: dict  # the broker's own (for kafka-local)
    watch: CommandLineWatch | None

    def client(self, user=USER, password=PASSWORD, host="localhost", ca=None) -> dict:
        """A client's environment: SASL_SSL with SCRAM-SHA-256 as ``user``, trusting ``ca`` (default: its CA)."""
        return {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": f"{host}:{self.port}",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD": password,
            "KAFKA_SSL_CA_LOCATION": ca or os.path.join(self.data, "tls", "ca.pem"),
        }

    def secrets(self) -> list[str]:
        """The clients' passwords and the broker's own (broker, admin, keystore) once they exist."""
        own = []
        for path in glob.glob(os.path.join(self.data, "*.secret")):
            with open(path) as handle:
                own.append(handle.read().strip())
        return [PASSWORD, PIPELINE_PASSWORD, PRODUCER_PASSWORD, *own]

    def kafka_local(self, *args, password=None) -> None:
        env = {**self.env, **({"KAFKA_USER_PASSWORD": password} if password else {})}
        result = subprocess.run([SCRIPT, *args], env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr


def start_broker(data: str, auth: str) -> tuple[dict, subprocess.CompletedProcess]:
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_AUTH": auth,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DATA_DIR": data,
        "KAFKA_SASL_USERNAME": USER,
        "KAFKA_SASL_PASSWORD": PASSWORD,
    }
    started = subprocess.run([SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stderr
    return env, started


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A broker with SASL_SSL, SCRAM and ACLs, and two least-privilege users; command lines watched throughout."""
    broker = Broker(0, str(tmp_path_factory.mktemp("kafka-tls") / "broker"), {}, None)
    with CommandLineWatch(broker.secrets) as broker.watch:
        broker.env, _started = start_broker(broker.data, "scram-tls")
        broker.port = int(broker.env["KAFKA_PORT"])
        broker.kafka_local("add-user", PIPELINE, password=PIPELINE_PASSWORD)
        broker.kafka_local("add-user", PRODUCER, password=PRODUCER_PASSWORD)
        try:
            yield broker
        finally:
            subprocess.run([SCRIPT, "stop"], env=broker.env, check=False, timeout=120)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA certificate that did not sign the broker's (made with the JDK's keytool)."""
    folder = tmp_path_factory.mktemp("other-ca")
    java_home = run_command("scripts/java-home").stdout.strip()
    env = {**os.environ, "STORE_PASSWORD": uuid.uuid4().hex}
    keystore = ["-keystore", str(folder / "ca.p12"), "-storetype", "PKCS12", "-storepass:env", "STORE_PASSWORD"]
    keytool = os.path.join(java_home, "bin", "keytool")
    subprocess.run(
        [keytool, "-genkeypair", "-alias", "ca", "-keyalg", "RSA", "-dname", "CN=other CA", "-ext", "bc:c", *keystore],
        env=env,
        check=True,
        capture_output=True,
    )
    pem = folder / "ca.pem"
    subprocess.run(
        [keytool, "-exportcert", "-rfc", "-alias", "ca", "-file", str(pem), *keystore],
        env=env,
        check=True,
        capture_output=True,
    )
    return str(pem)


def test_keys_and_secrets_are_readable_by_their_owner_only(broker):
    private = ["tls/ca.p12", "tls/server.p12", "server.properties", "admin.properties"]
    private += [os.path.relpath(p, broker.data) for p in glob.glob(os.path.join(broker.data, "*.secret"))]
    assert len(private) == 7
    for name in private:
        mode = stat.S_IMODE(os.stat(os.path.join(broker.data, name)).st_mode)
        assert mode & 0o077 == 0, f"{name} has mode {mode:04o}"
    assert stat.S_IMODE(os.stat(broker.data).st_mode) == 0o700


def test_clients_without_tls_or_without_credentials_are_refused(broker):
    plain = {k: v for k, v in broker.client().items() if not k.startswith(("KAFKA_SASL", "KAFKA_SECURITY"))}
    assert run_python("test_your_docker_setup/reader.py", "--timeout", "3", env=plain).returncode == 2
    tls_only = {k: v for k, v in broker.client().items() if not k.startswith("KAFKA_SASL")}
    tls_only["KAFKA_SECURITY_PROTOCOL"] = "SSL"
    assert run_python("test_your_docker_setup/reader.py", "--timeout", "3", env=tls_only).returncode == 2


def test_producer_reader_pipeline_and_live_mode_work_over_tls_and_no_secret_appears_anywhere(broker, tmp_path):
    topic = f"secure-{uuid.uuid4().hex[:8]}"
    env = {**broker.client(), "KAFKA_TOPIC": topic}
    datastore = str(tmp_path / "datastore")
    outputs = []
    with CommandLineWatch(broker.secrets) as watch:
        produced = run_python("producer.py", "--backfill", "10m", "--seed", "4", "--quiet", env=env)
        outputs.append(produced.stdout + produced.stderr)
        assert produced.returncode == 0, produced.stderr
        read = run_python("test_your_docker_setup/reader.py", "--max-messages", "3", "--timeout", "20", env=env)
        outputs.append(read.stdout + read.stderr)
        assert read.returncode == 0 and read.stdout.count(topic) == 3
        piped = run_python("exercises/pipeline.py", "--verbose", "--datastore", datastore, env=env)
        outputs.append(piped.stdout + piped.stderr)
        assert piped.returncode == 0, piped.stderr[-3000:]
        assert "rows written" in piped.stderr
        runner = subprocess.Popen(
            [sys.executable, "exercises/pipeline.py", "--watch", "1", "--datastore", datastore],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert run_python("producer.py", "--backfill", "1m", "--seed", "5", "--quiet", env=env).returncode == 0
            wait_for_cycles(os.path.join(datastore, "reports", "live_cycles.json"), 1, runner)
        finally:
            if runner.poll() is None:
                outputs.append(stop_runner(runner))
    for script in ("producer.py", "test_your_docker_setup/reader.py", *glob.glob("exercises/*.py", root_dir=ROOT)):
        outputs.append(run_python(script, "--help", env=env, timeout=60).stdout)

    files = [p for p in glob.glob(f"{datastore}/**", recursive=True) if os.path.isfile(p)]
    assert any("/checkpoint_consumer/" in p for p in files) and any("/live_state/" in p for p in files)
    assert any("/reports/" in p for p in files)
    files += [p for pattern in ("*.log", "*.out") for p in glob.glob(os.path.join(broker.data, pattern))]
    for path in files:
        with open(path, "rb") as handle:
            outputs.append(handle.read().decode("utf-8", errors="replace"))
    secrets = broker.secrets()
    assert len(secrets) == 6
    leaks = [
        text[max(0, text.find(secret) - 80) : text.find(secret) + 40]
        for text in outputs
        for secret in secrets
        if secret in text
    ]
    assert leaks == []
    assert watch.leaks == [] and broker.watch is not None and broker.watch.leaks == []


@pytest.mark.parametrize("client", ["producer", "reader", "consumer"])
@pytest.mark.parametrize(
    ("cause", "words"),
    [
        ("wrong CA", "is not trusted"),
        ("hostname mismatch", "hostname mismatch"),
        ("wrong password", "authentication"),
    ],
)
def test_an_access_failure_fails_fast_with_a_message_that_names_its_cause(
    broker, other_ca, tmp_path, client, cause, words
):
    env = {
        "wrong CA": broker.client(ca=other_ca),
        "hostname mismatch": broker.client(host="127.0.0.1"),  # the certificate names localhost
        "wrong password": broker.client(password="not-the-password"),
    }[cause]
    command, code = {
        "producer": (["producer.py", "--backfill", "1m", "--quiet"], 1),
        "reader": (["test_your_docker_setup/reader.py", "--timeout", "5"], 2),
        "consumer": (["exercises/consumer.py", "--datastore", str(tmp_path)], 1),
    }[client]
    started = time.monotonic()
    result = run_python(*command, env=env, timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert words in result.stderr.lower(), result.stderr[-2000:]
    assert time.monotonic() - started < FAIL_FAST_SECONDS


def test_each_principal_has_exactly_its_rights_and_a_missing_right_fails_fast(broker, tmp_path):
    topic, other = f"acl-{uuid.uuid4().hex[:8]}", f"acl-other-{uuid.uuid4().hex[:8]}"
    broker.kafka_local("grant", "producer", PRODUCER, topic)
    broker.kafka_local("grant", "pipeline", PIPELINE, topic)
    as_producer = {**broker.client(PRODUCER, PRODUCER_PASSWORD), "KAFKA_TOPIC": topic}
    as_pipeline = {**broker.client(PIPELINE, PIPELINE_PASSWORD), "KAFKA_TOPIC": topic}

    produced = run_python("producer.py", "--backfill", "5m", "--seed", "6", "--quiet", env=as_producer)
    assert produced.returncode == 0, produced.stderr
    delivered = int(re.search(r"(\d+) delivered", produced.stderr).group(1))
    datastore = str(tmp_path / "datastore")
    ingested = run_python("exercises/consumer.py", "--datastore", datastore, env=as_pipeline)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert f"{delivered} rows written" in ingested.stderr
    # the producer may not read, the pipeline may not write
    read = run_python("test_your_docker_setup/reader.py", "--timeout", "10", env=as_producer, timeout=120)
    assert read.returncode == 2 and "not authorized" in read.stderr, read.stderr
    written = run_python("producer.py", "--backfill", "1m", "--quiet", env=as_pipeline, timeout=120)
    assert written.returncode == 1 and "not authorized to write" in written.stderr, written.stderr
    # a topic the pipeline has no right to: a clear failure at once, neither a hang nor an empty batch
    assert (
        run_python(
            "producer.py", "--backfill", "1m", "--quiet", env={**broker.client(), "KAFKA_TOPIC": other}
        ).returncode
        == 0
    )
    started = time.monotonic()
    refused = run_python(
        "exercises/consumer.py", "--topic", other, "--datastore", str(tmp_path / "other"), env=as_pipeline, timeout=120
    )
    assert refused.returncode == 1 and f"not authorized to read topic {other}" in refused.stderr, refused.stderr
    assert time.monotonic() - started < FAIL_FAST_SECONDS
    assert not glob.glob(str(tmp_path / "other" / "consumer_data" / "*.parquet"))


def test_scram_without_tls_requires_credentials_and_applies_acls(tmp_path):
    data = str(tmp_path / "broker")
    os.mkdir(data, 0o700)
    env, started = start_broker(data, "scram")
    try:
        assert "SASL/SCRAM-SHA-256 and ACLs required" in started.stdout
        client = {
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{env['KAFKA_PORT']}",
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "KAFKA_SASL_USERNAME": USER,
            "KAFKA_SASL_PASSWORD": PASSWORD,
            "KAFKA_TOPIC": "plain-sasl",
        }
        assert run_python("producer.py", "--backfill", "1m", "--quiet", env=client).returncode == 0
        read = run_python("test_your_docker_setup/reader.py", "--max-messages", "2", "--timeout", "20", env=client)
        assert read.returncode == 0 and read.stdout.count("plain-sasl") == 2
        stranger = {**client, "KAFKA_SASL_USERNAME": "nobody"}
        assert run_python("test_your_docker_setup/reader.py", "--timeout", "5", env=stranger).returncode == 2
    finally:
        subprocess.run([SCRIPT, "stop"], env=env, check=False, timeout=120)
