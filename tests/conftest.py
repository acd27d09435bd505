"""One SparkSession for the whole test session, and a fresh datastore layout per test."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pyspark
import pytest
from hypothesis import settings
from pyspark.sql import SparkSession

from meter_stream import config
from meter_stream.session import (
    CODEGEN_CACHE,
    LOCAL_MODE_DEFAULTS,
    QUERY_OVERHEAD,
    SESSION_SETTINGS,
    class_archive_options,
    kafka_connector_jars,
)
from tests.helpers import ROOT

# Fuzzed inputs: 40 examples in the full suite, 5 in make test-fast (HYPOTHESIS_PROFILE=fast).
settings.register_profile("full", max_examples=40)
settings.register_profile("fast", max_examples=5)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))

#: The in-process tests evaluate expressions without generated code: their data is a few rows, and compiling
#: each query's code cost more than it saved (BENCHMARKS.md, "The test session"). The stage scripts the slow
#: tests start keep code generation, as in production; Spark gives the same results either way.
#: (``factoryMode`` is an internal setting, the one Spark's own test suites use: check it on a pyspark upgrade.)
INTERPRETED = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}
#: The test session's JVM collects garbage with the serial collector: its heap is small and its work a long row
#: of small queries, where G1's concurrent threads only compete with them (BENCHMARKS.md, "The test session").
#: The stage scripts keep the JVM's default collector (their heaps hold millions of rows).
SERIAL_GC = "-XX:+UseSerialGC"


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """A local session: 2 cores, UTC, few shuffle partitions, no UI, no generated code; the stages' code cache
    (what little is still generated), overhead settings and class archive; the serial garbage collector."""
    session = (
        SparkSession.builder.master("local[2]")
        .appName("meter-stream tests")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.log.structuredLogging.enabled", "false")
        .config(*CODEGEN_CACHE)
        .config("spark.jars", ",".join(kafka_connector_jars(pyspark.__version__)))
        .config("spark.driver.extraJavaOptions", " ".join([*class_archive_options(pyspark.__version__), SERIAL_GC]))
        .config(
            map={
                **QUERY_OVERHEAD,
                **SESSION_SETTINGS,
                **LOCAL_MODE_DEFAULTS,
                **INTERPRETED,
                **{k: v for k, v in (item.split("=", 1) for item in os.environ.get("XTEST_CONF", "").split() if item)},
            }
        )
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def paths(tmp_path) -> config.Paths:
    """The standard datastore layout in a fresh temporary folder."""
    return config.Paths.under(str(tmp_path / "datastore"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def kafka(tmp_path_factory) -> Iterator[str]:
    """A real local Kafka broker for the test session; yields its bootstrap servers."""
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(port),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DATA_DIR": str(tmp_path_factory.mktemp("kafka")),
    }
    script = os.path.join(ROOT, "scripts", "kafka-local")
    subprocess.run([script, "start"], env=env, check=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop"], env=env, check=False, timeout=120)


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which the test may stop and start."""
    env = {
        **os.environ,
        "KAFKA_PORT": str(free_port()),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_DATA_DIR": str(tmp_path / "kafka"),
    }
    script = os.path.join(ROOT, "scripts", "kafka-local")

    def control(action):
        subprocess.run([script, action], env=env, check=True, timeout=180, capture_output=True)

    control("start")
    try:
        yield f"127.0.0.1:{env['KAFKA_PORT']}", control
    finally:
        control("stop")
