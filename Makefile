# meter-stream: `make run` runs the pipeline on a local Kafka broker, `make test` runs the tests.
# Both set everything up first (virtual environment, pinned packages, jars from Maven Central).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAVA_HOME := $(shell scripts/java-home)
export PATH := $(JAVA_HOME)/bin:$(PATH)
export PYSPARK_PYTHON := $(abspath $(PY))

# make test knob: TEST_WORKERS=2 (pytest-xdist processes; 0 runs the suite in this process)
# make run / make live knobs (see scripts/run-pipeline): BACKFILL=6h DATASTORE=./datastore KAFKA_PORT=9093
# WATCH=10 (make live: seconds between consumer batches)
# KAFKA_BOOTSTRAP_SERVERS=host:port (an existing broker instead of the local one) SEED=1
BACKFILL ?= 6h
DATASTORE ?= ./datastore
KAFKA_PORT ?= 9093
WATCH ?= 10
export BACKFILL DATASTORE KAFKA_PORT KAFKA_BOOTSTRAP_SERVERS SEED WATCH

.PHONY: run run-cluster live bench bench-live bench-cluster setup test test-fast lint format clean-data package help

help:
	@echo "make run     set up, start a local Kafka broker, backfill, run the four stages, stop it"
	@echo "make test    set up, check lint, format and types, and run the whole test suite (what CI runs)"
	@echo "make test-fast  the tests that need no broker, no subprocess and no SIGKILL; stops at the first failure"
	@echo "make setup   create .venv, install requirements.txt, fetch the jars, make the JVM class archive"
	@echo "make run-cluster  the pipeline on a local Spark standalone cluster and HDFS, compared with a local run (scripts/run-cluster)"
	@echo "make live    like make run, then keep every output fresh while a producer sends live; Ctrl-C stops"
	@echo "make bench   benchmarks (bench/results.json, BENCHMARKS.md); not part of make test"
	@echo "make bench-live  the live runner up to 100,000 series: latency, cycles, catch-up after downtime, a kill, a broker outage, two hours closing at 100,000 series, a compressed day, the compaction of an hour both ways (hours; bench/live_bench.py --help runs parts)"
	@echo "make bench-cluster  the full run of 1 h at 100,000 series on a local standalone cluster of 1 and 2 workers with HDFS, against local[2] (~30 min)"
	@echo "make lint    ruff check, ruff format check and the type check (mypy)"
	@echo "make package  dist/meter_stream.zip: the package that spark-submit ships with --py-files"

# The meter_stream package, alone, as spark-submit's --py-files takes it (README: On a cluster).
PACKAGE ?= dist/meter_stream.zip
package:
	mkdir -p "$(dir $(PACKAGE))"
	$(PYTHON) -c 'import pathlib, sys, zipfile; root = pathlib.Path("exercises"); \
	  files = [p for p in sorted(root.glob("meter_stream/**/*")) if p.is_file() and "__pycache__" not in p.parts]; \
	  archive = zipfile.ZipFile(sys.argv[1] + ".tmp", "w", zipfile.ZIP_DEFLATED); \
	  [archive.write(p, p.relative_to(root)) for p in files]; archive.close()' "$(PACKAGE)"
	mv "$(PACKAGE).tmp" "$(PACKAGE)"
	@echo "make package: $(PACKAGE)"

run: setup
	scripts/run-pipeline

live: setup
	scripts/run-pipeline --watch

# Knobs: BACKFILL, SEED, KAFKA_TOPIC, CLUSTER_DATASTORE, LOCAL_DATASTORE, EXECUTOR_MEMORY, and the
# variables of scripts/hdfs-local and scripts/spark-cluster (README: On a cluster).
run-cluster: setup
	scripts/run-cluster

bench: setup $(VENV)/.bench-installed
	$(PY) bench/harness.py

bench-live: setup $(VENV)/.bench-installed
	$(PY) bench/live_bench.py

bench-cluster: setup $(VENV)/.bench-installed
	$(PY) bench/cluster_bench.py

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r bench/requirements.txt
	touch $@

setup: $(VENV)/.installed .cache/jars/.fetched .cache/spark-classes/.made

# The class archive the stages' JVMs start from (a few seconds sooner each: BENCHMARKS.md); one per pyspark version.
# Without one (it says why) every JVM starts as before: not a reason to stop.
.cache/spark-classes/.made: $(VENV)/.installed .cache/jars/.fetched scripts/make_class_archive.py
	$(PY) scripts/make_class_archive.py || echo "make setup: going on without the class archive" >&2
	touch $@

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.cache/jars/.fetched: $(VENV)/.installed scripts/fetch-jars scripts/maven/*.xml
	scripts/fetch-jars
	touch $@

# The whole suite in TEST_WORKERS processes (pytest-xdist), each with its own SparkSession and broker: the
# broker and subprocess tests wait a good part of their time, which the other process uses (BENCHMARKS.md,
# "The test session"). make test-fast stays in one: it is all CPU, and two were slower.
TEST_WORKERS ?= 2
test: lint $(VENV)/.bench-installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

# The quick loop while changing code: one in-process SparkSession, no broker, a smaller hypothesis profile.
test-fast: setup $(VENV)/.bench-installed
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -x -q -m "not integration and not slow"

lint: setup $(VENV)/.bench-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-data: $(VENV)/.installed
	$(PY) scripts/clean_data.py "$(DATASTORE)"
