#!/usr/bin/env python3
"""Make the class-data-sharing archive that the stages' JVMs start from (``.cache/spark-classes``).

Runs the batch stages once on the shipped sample in a JVM that writes, when it exits, every class it
loaded into an archive (``-XX:ArchiveClassesAtExit``); ``build_session`` then starts each stage's JVM
from it (``meter_stream.session.class_archive_options``). The archive is written beside its final name and
put there only once a JVM has started from it: a cut-off archive would crash the JVMs that map it.
Runs once per pyspark version; later calls find the archive and do nothing. Run by ``make setup``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "exercises")]

import pyspark  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

from meter_stream import jvm as meter_jvm  # noqa: E402
from meter_stream import pipeline  # noqa: E402
from meter_stream.session import LOG4J2_CONFIG, class_archive  # noqa: E402

SAMPLE = os.path.join(ROOT, "example_data", "consumer_data_sample")


def main() -> int:
    archive = class_archive(pyspark.__version__)
    if os.path.isfile(archive):
        return 0
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    partial = f"{archive}.partial"
    if os.path.exists(partial):
        os.remove(partial)
    print(f"make_class_archive: making {os.path.relpath(archive, ROOT)} (first run only)...", file=sys.stderr)
    options = f"-Dlog4j2.configurationFile={LOG4J2_CONFIG} -XX:ArchiveClassesAtExit={partial} -Xlog:cds*=off"
    # The session every stage of the pipeline below gets (build_session finds it running).
    builder = SparkSession.builder.master("local[*]").config("spark.ui.showConsoleProgress", "false")
    builder.config("spark.driver.extraJavaOptions", options).getOrCreate().sparkContext.setLogLevel("ERROR")
    # Quiet: the stages' tables, progress and warnings on the sample are not what make setup reports.
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(io.StringIO()):
        code = pipeline.main(["--skip-consumer", "--consumer-data", SAMPLE, "--datastore", os.path.join(work, "ds")])
    # The JVM writes the archive as it exits: it exits when its standard input closes.
    jvm = meter_jvm.jvm_process()
    SparkSession.builder.getOrCreate().stop()
    jvm.stdin.close()
    jvm.wait(timeout=300)
    if code != 0 or not os.path.isfile(partial):
        print(f"make_class_archive: no archive made (pipeline exit code {code})", file=sys.stderr)
        return 1
    java = os.path.join(os.environ.get("JAVA_HOME", ""), "bin", "java") if os.environ.get("JAVA_HOME") else "java"
    check = subprocess.run(
        [java, f"-XX:SharedArchiveFile={partial}", "-Xlog:cds*=off", "-version"], capture_output=True
    )
    if check.returncode != 0:
        os.remove(partial)
        print("make_class_archive: the archive made does not load; removed", file=sys.stderr)
        return 1
    os.replace(partial, archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
