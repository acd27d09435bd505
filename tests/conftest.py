"""One SparkSession for the whole test session, and a fresh datastore layout per test."""

from __future__ import annotations

import pytest
from common import config
from pyspark.sql import SparkSession


@pytest.fixture(scope="session")
def spark() -> SparkSession:
    """A local session: 2 cores, UTC, few shuffle partitions, no UI."""
    session = (
        SparkSession.builder.master("local[2]")
        .appName("meter-stream tests")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.log.structuredLogging.enabled", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture
def paths(tmp_path) -> config.Paths:
    """The standard datastore layout in a fresh temporary folder."""
    return config.Paths.under(str(tmp_path / "datastore"))
