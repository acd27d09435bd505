# meter-stream: `make run` runs the pipeline on a local Kafka broker, `make test` runs the tests.
# Both set everything up first (virtual environment, pinned packages, jars from Maven Central).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export JAVA_HOME := $(shell scripts/java-home)
export PATH := $(JAVA_HOME)/bin:$(PATH)
export PYSPARK_PYTHON := $(abspath $(PY))

# make run knobs (see scripts/run-pipeline): BACKFILL=6h DATASTORE=./datastore KAFKA_PORT=9093
# KAFKA_BOOTSTRAP_SERVERS=host:port (an existing broker instead of the local one) SEED=1
BACKFILL ?= 6h
DATASTORE ?= ./datastore
KAFKA_PORT ?= 9093
export BACKFILL DATASTORE KAFKA_PORT KAFKA_BOOTSTRAP_SERVERS SEED

.PHONY: run bench setup test lint format clean-data help

help:
	@echo "make run     set up, start a local Kafka broker, backfill, run the four stages, stop it"
	@echo "make test    set up and run the test suite"
	@echo "make setup   create .venv, install requirements.txt, fetch the jars"
	@echo "make bench   benchmarks (bench/results.json, BENCHMARKS.md); not part of make test"
	@echo "make lint    ruff check and format check"

run: setup
	scripts/run-pipeline

bench: setup $(VENV)/.bench-installed
	$(PY) bench/harness.py

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r bench/requirements.txt
	touch $@

setup: $(VENV)/.installed .cache/jars/.fetched

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

.cache/jars/.fetched: $(VENV)/.installed scripts/fetch-jars scripts/maven/*.xml
	scripts/fetch-jars
	touch $@

test: setup $(VENV)/.bench-installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-data:
	rm -rf $(DATASTORE)/*/ $(DATASTORE)/*.staging $(DATASTORE)/*.previous
