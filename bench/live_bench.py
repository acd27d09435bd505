"""Live benchmark (``make bench-live``): latency, cycle time and catch-up of the live runner, up to a fleet.

Two parts, each on a fresh topic of the local broker, with ``exercises/pipeline.py --watch 10``:

History (the brief's four series): the producer backfills 1 h and 24 h of history, then sends a round
every 10 s while the runner runs for a few minutes:

- ``live_cycle_s_1h``, ``live_cycle_s_24h``: median cycle time with that much history behind it,
  and ``live_cycle_24h_over_1h``, the last over the first;
- ``live_latency_p50_s``, ``live_latency_p95_s``: seconds from each measurement's t_measurement to
  its appearance in cleaned_data, over the longest run.

Fleet (``--sizes``, series; 4 is the brief's feed, larger sizes are ``producer.py --devices N/2``
with ``--expected-series all``): 1 h of history ending 10 minutes ago is backfilled and taken in by
the runner's full run; the runner is stopped, the last 10 minutes are backfilled as a backlog, and
the runner is started again: ``live_catch_up_s_<n>`` is the time from its start until a cycle has
taken in the whole backlog. Then a producer sends live for ``--live-minutes`` (and until
``--settled-cycles`` settled cycles were made): ``live_settle_s_<n>`` is the time from its start
until the runner has caught up with it (the first cycle that took in at most 1.5 rounds of the
feed; the cycles before it fill the hole the quiet producer left during the catch-up, see
``settled``), and ``live_latency_p50_s_<n>``, ``live_latency_p95_s_<n>``, ``live_cycle_s_<n>``
(median) and ``live_msgs_per_s_<n>`` (raw rows taken in per second) come from the settled cycles'
own figures (``reports/live_cycles.json``).
Finally every measurement sent is looked for in the outputs (DuckDB): each one in processed_data,
the first of each slot in cleaned_data as measured with its value, no (series, slot) twice; the
benchmark fails otherwise.

Faults and time (each part's options in ``--help``): a kill mid-cycle and the restart, a catch-up after
hours of downtime, a broker outage, a run across closing hours (``live_*_hour_close_<n>``: latency
while closed hours are compacted, how long after its end each was swapped in, merges dropped) and a
compressed day (``live_soak_*``); and the compaction of a closed hour at 100,000 series, Spark's merge
against the row groups copied, side by side (``live_compaction_*``).

Results replace the live_* entries of ``bench/results.json`` (the others are kept) and the table of
``BENCHMARKS.md``.

Usage:
    python bench/live_bench.py [--sizes 4,10000,100000] [--live-minutes 3] [--histories 1h=3,24h=4]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, *(os.path.join(ROOT, folder) for folder in ("exercises", "scripts", "bench"))]

from pyspark.sql import functions as F  # noqa: E402

import harness  # noqa: E402
import producer  # noqa: E402
from meter_stream import (  # noqa: E402
    config,
    jvm,
    kafka_client,
    live,
    session,
    storage,
)
from meter_stream import message as m  # noqa: E402
from meter_stream.contracts import CLEANED_SCHEMA, QUALITY  # noqa: E402

PYTHON = sys.executable
#: The --watch interval of the runs (--trigger).
TRIGGER = {"seconds": 10.0}
#: How much longer than asked a live run may go on for its cycles on a loaded machine (``keep_live``).
GRACE_SECONDS = 600.0


class Feed:
    """A fresh topic and how to run the producer and the live runner on it for one size."""

    def __init__(self, bootstrap: str, work: str, series: int, name: str) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        self.topic = f"bench-live-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(self.topic, 1, 1)])[self.topic].result(timeout=30)
        self.env = {**os.environ, kafka_client.ENV_BOOTSTRAP_SERVERS: bootstrap, kafka_client.ENV_TOPIC: self.topic}
        self.datastore = os.path.join(work, name)
        self.fleet = [] if series == 4 else ["--devices", str(series // 2)]
        self.catalog = [] if series == 4 else ["--expected-series", "all"]
        self.delivered = 0

    def backfill(self, history: str, until: str = "0", seed: int = 1) -> int:
        """Send ``history`` ending ``until`` ago; return how many messages were delivered."""
        done = subprocess.run(
            [
                PYTHON,
                "producer.py",
                "--backfill",
                history,
                "--until",
                until,
                "--quiet",
                "--seed",
                str(seed),
                *self.fleet,
            ],
            cwd=ROOT,
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        count = delivered(done.stderr)
        self.delivered += count
        return count

    def start_producer(self, *options: str) -> subprocess.Popen:
        return subprocess.Popen(
            [PYTHON, "producer.py", "--quiet", *self.fleet, *options],
            cwd=ROOT,
            env=self.env,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop_producer(self, process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=120)
        self.delivered += delivered(err)

    def start_runner(self) -> subprocess.Popen:
        """Start the live runner in a process group of its own (``kill_runner`` kills it with its JVM)."""
        command = [PYTHON, "exercises/pipeline.py", "--watch", str(TRIGGER["seconds"]), "--datastore", self.datastore]
        with open(f"{self.datastore}.log", "a") as log:  # the runner's own log, next to its datastore
            return subprocess.Popen(
                [*command, *self.catalog], cwd=ROOT, env=self.env, stderr=log, start_new_session=True
            )

    def cycles(self) -> list[dict]:
        path = os.path.join(self.datastore, "reports", live.LIVE_CYCLES)
        if not os.path.exists(path):
            return []
        with open(path) as handle:
            return json.load(handle)


def delivered(stderr: str) -> int:
    """The producer's count of delivered messages, from its summary line (delivery errors may follow it)."""
    return int(re.findall(r"producer: (\d+) delivered", stderr)[-1])


def stop(process: subprocess.Popen, what: str) -> None:
    process.send_signal(signal.SIGTERM)
    if process.wait(timeout=900) != 0:
        raise RuntimeError(f"{what} exited with {process.returncode}")


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 3600, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"the live runner exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f} s")
        time.sleep(poll)


def end_of(cycle: dict) -> float:
    return datetime.fromisoformat(cycle["at"]).timestamp() + cycle["seconds"]


def run_history(bootstrap: str, work: str, history: str, minutes: float) -> list[dict]:
    """Backfill ``history`` of the four series, run the runner and a live producer for ``minutes``; its cycles."""
    feed = Feed(bootstrap, work, 4, f"history-{history}")
    feed.backfill(history)
    sender = feed.start_producer()
    runner = feed.start_runner()
    # history_figures drops the first cycle (it takes the start-up backlog).
    keep_live(feed, runner, minutes, lambda cycles: bool(with_measurements(cycles[1:])))
    feed.stop_producer(sender)
    stop(runner, f"the live runner ({history} of history)")
    return feed.cycles()


def keep_live(feed: Feed, runner: subprocess.Popen, minutes: float, enough: Callable[[list[dict]], bool]) -> None:
    """Let the runner go on for ``minutes``, and further until ``enough(its cycles)``: a loaded machine makes
    fewer, longer cycles (at most GRACE_SECONDS more).
    """
    deadline = time.monotonic() + minutes * 60
    while runner.poll() is None and time.monotonic() < deadline + GRACE_SECONDS:
        if time.monotonic() >= deadline and enough(feed.cycles()):
            return
        time.sleep(1)


def with_measurements(cycles: list[dict]) -> list[dict]:
    return [c for c in cycles if c["measurements"]]


#: The live figures of a fleet size come from at least this many settled cycles (``settled``; --settled-cycles).
SETTLED = {"cycles": 6}


def settled(live_cycles: list[dict], series: int) -> list[dict]:
    """The cycles from the first one that took in at most 1.5 rounds of the feed on (none: not caught up).

    The benchmark's producer is quiet while the runner catches up, so every series comes back after
    a hole as long as the catch-up: the first live cycles fill those holes (at 100,000 series, some
    2.5 M grid rows for a 4-minute catch-up), run long, and the cycles after them take in several
    rounds each until the runner has caught up with the feed. That is the catch-up's tail, not the
    steady state (a fleet that goes on sending leaves no such holes); ``live_settle_s_<n>`` times it.
    """
    round_rows = series * (1 - producer.DEFAULT_SKIP_PROBABILITY)
    for index, cycle in enumerate(live_cycles):
        if cycle["raw_rows"] <= 1.5 * round_rows:
            return live_cycles[index:]
    return []


def run_fleet(bootstrap: str, work: str, series: int, minutes: float, history: str, backlog: str) -> list[dict]:
    """Catch-up, live figures and the completeness check of one size (see the module docstring)."""
    feed = Feed(bootstrap, work, series, f"fleet-{series}")
    history_messages = take_in_history(feed, series, history, backlog)
    backlog_messages = feed.backfill(backlog, seed=2)
    print(f"{series} series: {backlog_messages} messages of backlog; runner started", flush=True)
    started = time.time()
    runner = feed.start_runner()

    def caught_up() -> bool:
        return sum(c["raw_rows"] for c in feed.cycles()) >= backlog_messages

    wait_for(caught_up, runner, "catch-up")
    catch_up = min(end_of(c) for c in feed.cycles() if sum_until(feed.cycles(), c) >= backlog_messages) - started
    caught = len(feed.cycles())
    sender, live_started = feed.start_producer(), time.time()

    def live_cycles(cycles: list[dict]) -> list[dict]:
        # The first live cycle may still hold the end of the backlog: not counted.
        return with_measurements(cycles[caught:])[1:]

    keep_live(feed, runner, minutes, lambda cycles: len(settled(live_cycles(cycles), series)) >= SETTLED["cycles"])
    feed.stop_producer(sender)
    # SIGTERM ends the consumer after its batch: what the topic still holds would wait for the next
    # start. The runner takes in every message sent before it is stopped, so all can be looked for.
    wait_for(
        lambda: sum(c["raw_rows"] for c in feed.cycles()) >= feed.delivered - history_messages,
        runner,
        "the last messages sent",
        timeout=GRACE_SECONDS,
    )
    stop(runner, "the live runner")
    after_catch_up = live_cycles(feed.cycles())
    if not after_catch_up:
        raise RuntimeError(f"no live cycle with measurements at {series} series")
    steady = settled(after_catch_up, series)
    if steady:
        settle = datetime.fromisoformat(steady[0]["at"]).timestamp() - live_started
    else:
        print(f"{series} series: the runner never caught up with the feed: every live cycle counted", flush=True)
        steady, settle = after_catch_up, None
    results = figures(series, steady, catch_up, settle)
    check_complete(feed.datastore, feed.delivered, series)
    return results


# --- faults: a kill, a broker outage, downtime ----------------------------------------------------


def committed_cycle(datastore: str) -> tuple[int, float]:
    """The last committed cycle and when its cursor file was written (epoch seconds); (-1, 0) before any."""
    folder = os.path.join(datastore, "live_state")
    cursors = sorted(name for name in _names(folder) if name.startswith("cursor-") and name.endswith(".json"))
    for name in reversed(cursors):  # the newest; an older one may be removed meanwhile
        try:
            return int(name[len("cursor-") : -len(".json")]), os.path.getmtime(os.path.join(folder, name))
        except OSError:
            continue
    return -1, 0.0


def cycle_in_flight(datastore: str) -> bool:
    """Whether a cycle has appended files to processed_data that it has not committed yet."""
    committed = committed_cycle(datastore)[0]
    for folder in _names(os.path.join(datastore, "processed_data")):
        for name in _names(os.path.join(datastore, "processed_data", folder)):
            if name.startswith(live.CYCLE_TAG) and int(name[len(live.CYCLE_TAG) :].split("-", 1)[0]) > committed:
                return True
    return False


def processed_rows(datastore: str) -> int:
    """The rows processed_data holds now (0 while a cycle moves files under the reader)."""
    import duckdb

    try:
        relation = duckdb.sql(f"select count(*) from read_parquet('{datastore}/processed_data/*/*.parquet')")
        assert relation is not None
        return int(relation.fetchall()[0][0])
    except (duckdb.Error, OSError):
        return 0


def finish(feed: Feed, runner: subprocess.Popen, sender: subprocess.Popen | None, series: int) -> None:
    """Stop the producer, let the runner take in every message delivered, stop it, check completeness."""
    if sender is not None:
        feed.stop_producer(sender)
    wait_for(lambda: processed_rows(feed.datastore) >= feed.delivered, runner, "the last messages", GRACE_SECONDS)
    stop(runner, "the live runner")
    check_complete(feed.datastore, feed.delivered, series)


def run_restart(bootstrap: str, work: str, series: int) -> list[dict]:
    """``live_restart_s_<n>``: from a SIGKILL of the runner while a cycle is in flight to the next committed cycle."""
    feed = Feed(bootstrap, work, series, f"restart-{series}")
    take_in_history(feed, series, "10m", "0")
    sender, runner = feed.start_producer(), feed.start_runner()
    wait_for(lambda: len(with_measurements(feed.cycles())) >= 3, runner, "three cycles")
    wait_for(lambda: cycle_in_flight(feed.datastore), runner, "a cycle in flight", poll=0.02)
    before = committed_cycle(feed.datastore)[0]
    os.killpg(runner.pid, signal.SIGKILL)
    killed = time.time()
    runner.wait()
    runner = feed.start_runner()
    wait_for(lambda: committed_cycle(feed.datastore)[0] > before, runner, "a cycle committed after the restart")
    seconds = committed_cycle(feed.datastore)[1] - killed
    print(f"{series} series: killed after cycle {before}; next commit {seconds:.1f} s after the kill", flush=True)
    finish(feed, runner, sender, series)
    return [{"metric": f"live_restart_s_{series}", "rows": series, "value": round(seconds, 1), "unit": "s"}]


class OwnBroker:
    """A local broker of the benchmark's own, which it stops and starts (``scripts/kafka-local``)."""

    def __init__(self) -> None:
        from tests.conftest import free_port

        self.env = {
            **os.environ,
            "KAFKA_PORT": str(free_port()),
            "KAFKA_CONTROLLER_PORT": str(free_port()),
            "KAFKA_DATA_DIR": tempfile.mkdtemp(prefix="meter-bench-kafka-"),
        }
        self.bootstrap = f"127.0.0.1:{self.env['KAFKA_PORT']}"

    def control(self, action: str) -> None:
        subprocess.run([os.path.join(ROOT, "scripts", "kafka-local"), action], env=self.env, check=True)


#: A cycle's latency p95 is back at steady state when it is at most this many times the settled cycles' median.
RECOVERED_P95 = 1.5


def run_outage(work: str, series: int, outage: float) -> list[dict]:
    """``live_outage_recovery_s_<n>``: from the broker's return after ``outage`` seconds away to the end of the
    first cycle with latency back at steady state (``RECOVERED_P95``)."""
    broker = OwnBroker()
    broker.control("start")
    try:
        feed = Feed(broker.bootstrap, work, series, f"outage-{series}")
        take_in_history(feed, series, "10m", "0")
        sender, runner = feed.start_producer(), feed.start_runner()
        wait_for(lambda: len(settled(with_measurements(feed.cycles())[1:], series)) >= 4, runner, "settled cycles")
        steady = statistics.median(
            c["latency_p95_s"] for c in settled(with_measurements(feed.cycles())[1:], series) if c["latency_p95_s"]
        )
        broker.control("stop")
        time.sleep(outage)
        broker.control("start")
        returned = time.time()

        def recovered() -> list[dict]:
            return [
                c
                for c in with_measurements(feed.cycles())
                if datetime.fromisoformat(c["at"]).timestamp() > returned
                and (c["latency_p95_s"] or 0) <= RECOVERED_P95 * steady
            ]

        wait_for(lambda: bool(recovered()), runner, "latency back at steady state", timeout=GRACE_SECONDS)
        seconds = end_of(recovered()[0]) - returned
        print(f"{series} series: steady p95 {steady} s; back {seconds:.1f} s after the broker returned", flush=True)
        finish(feed, runner, sender, series)
    finally:
        broker.control("stop")
        shutil.rmtree(broker.env["KAFKA_DATA_DIR"], ignore_errors=True)
    return [{"metric": f"live_outage_recovery_s_{series}", "rows": series, "value": round(seconds, 1), "unit": "s"}]


def jvm_of(pid: int) -> int | None:
    """The runner's JVM among ``pid``'s descendants (not the short-lived launcher JVM before it), or None."""
    children: dict[int, list[int]] = {}
    for entry in _names("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                command = handle.read().split(b"\0")
                # The launcher names SparkSubmit too, after its own main class; it exits at once.
                launcher = b"org.apache.spark.launcher.Main" in command
                if command[0].endswith(b"java") and b"org.apache.spark.deploy.SparkSubmit" in command and not launcher:
                    return child
        except OSError:
            pass
        todo += children.get(child, [])
    return None


class HeapSampler:
    """Samples the used heap (``jstat -gc``: survivor, eden and old generation) of ``runner``'s JVM every 2 s."""

    def __init__(self, runner: int) -> None:
        self.runner = runner
        self.samples: list[tuple[float, float]] = []  # (epoch seconds, used MiB)
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.done.wait(2.0):
            pid = jvm_of(self.runner)
            if pid is None:
                continue
            out = subprocess.run(["jstat", "-gc", str(pid)], capture_output=True, text=True).stdout.split()
            if len(out) > 2 and "EU" in out:
                header, values = out[: len(out) // 2], out[len(out) // 2 :]
                used = sum(float(values[header.index(name)]) for name in ("S0U", "S1U", "EU", "OU"))
                self.samples.append((time.time(), used / 1024))

    def peak(self, start: float, end: float) -> float | None:
        inside = [used for at, used in self.samples if start <= at <= end]
        return round(max(inside)) if inside else None


def run_catch_up(bootstrap: str, work: str, series: int, downtime: str) -> list[dict]:
    """``live_catch_up_ratio_<n>_<downtime>``: hours of backlog absorbed per hour of wall time after the runner
    was down for ``downtime`` while the producer went on, and the JVM's peak heap meanwhile and while steady."""
    feed = Feed(bootstrap, work, series, f"catch-up-{series}-{downtime}")
    take_in_history(feed, series, "10m", downtime)
    backlog_start = time.time() - config.parse_duration(downtime)
    backlog = feed.backfill(downtime, seed=2)
    print(f"{series} series: {backlog} messages of backlog ({downtime} down); runner started", flush=True)
    started = time.time()
    sender, runner = feed.start_producer(), feed.start_runner()
    heap = HeapSampler(runner.pid)

    def caught_up() -> list[dict]:
        cycles = with_measurements(feed.cycles())
        taken = [c for c in cycles if sum_until(cycles, c) >= backlog]
        return settled(cycles[cycles.index(taken[0]) + 1 :], series) if taken else []

    wait_for(lambda: bool(caught_up()), runner, "catch-up", timeout=6 * 3600)
    caught = end_of(caught_up()[0])
    wait_for(lambda: len(caught_up()) >= SETTLED["cycles"], runner, "settled cycles after the catch-up")
    heap.done.set()
    steady_heap = heap.peak(caught, end_of(caught_up()[-1]))
    ratio = (started - backlog_start) / (caught - started)
    cycle_rows = max(c["raw_rows"] for c in feed.cycles())
    print(
        f"{series} series: {downtime} of backlog absorbed in {caught - started:.0f} s ({ratio:.1f}x real time); "
        f"largest cycle {cycle_rows} raw rows; peak heap {heap.peak(started, caught)} MiB catching up, "
        f"{steady_heap} MiB steady",
        flush=True,
    )
    finish(feed, runner, sender, series)
    name = f"{series}_{downtime}"
    return [
        {"metric": f"live_catch_up_ratio_{name}", "rows": backlog, "value": round(ratio, 2), "unit": "ratio"},
        {
            "metric": f"live_catch_up_heap_mib_{name}",
            "rows": backlog,
            "value": heap.peak(started, caught),
            "unit": "MiB",
        },
        {"metric": f"live_steady_heap_mib_{name}", "rows": series, "value": steady_heap, "unit": "MiB"},
    ]


#: The soak's figures at its start and end come from this many cycles each.
SOAK_CYCLES = 10


def run_soak(bootstrap: str, work: str, series: int, span: str, speed: float) -> list[dict]:
    """``live_soak_*_<n>``: a producer whose clock starts ``span`` ago and runs ``speed`` times faster until it
    reaches now, and the runner from an empty datastore: how cycles, files, the sink log and the heap
    look at the start and at the end of the compressed span."""
    feed = Feed(bootstrap, work, series, f"soak-{series}")
    sender, runner = feed.start_producer("--since", span, "--speed", str(speed)), feed.start_runner()
    reached_now = time.time() + config.parse_duration(span) / (speed - 1)
    heap = HeapSampler(runner.pid)
    wait_for(lambda: len(with_measurements(feed.cycles())) >= SOAK_CYCLES, runner, "the first cycles")
    start = with_measurements(feed.cycles())[:SOAK_CYCLES]
    at_start = growth(feed.datastore)
    wait_for(lambda: time.time() >= reached_now, runner, "the end of the compressed span", timeout=48 * 3600, poll=5)
    end = with_measurements(feed.cycles())[-SOAK_CYCLES:]
    at_end = growth(feed.datastore)
    heap.done.set()
    finish(feed, runner, sender, series)
    start_s, end_s = (round(statistics.median(c["seconds"] for c in cycles), 2) for cycles in (start, end))
    start_heap = heap.peak(datetime.fromisoformat(start[0]["at"]).timestamp(), end_of(start[-1]))
    end_heap = heap.peak(datetime.fromisoformat(end[0]["at"]).timestamp(), end_of(end[-1]))
    print(f"{series} series, soak: cycles {start_s:.1f} s -> {end_s:.1f} s; {at_start} -> {at_end}", flush=True)
    figures = [
        ("live_soak_cycle_s_start", start_s, "s"),
        ("live_soak_cycle_s_end", end_s, "s"),
        ("live_soak_cycle_end_over_start", round(end_s / start_s, 2), "ratio"),
        ("live_soak_heap_mib_start", start_heap, "MiB"),
        ("live_soak_heap_mib_end", end_heap, "MiB"),
        *[(f"live_soak_{name}_start", value, unit) for name, (value, unit) in at_start.items()],
        *[(f"live_soak_{name}_end", value, unit) for name, (value, unit) in at_end.items()],
    ]
    return [
        {"metric": f"{name}_{series}", "rows": series, "value": value, "unit": unit} for name, value, unit in figures
    ]


def run_hour_close(bootstrap: str, work: str, series: int, hours: int, clock: list[str]) -> list[dict]:
    """``live_*_hour_close_<n>``: the runner from an empty datastore with a live producer (its clock set by
    ``clock``: producer options, none for real time) until ``hours`` closed hours were compacted in both
    outputs; latency over the settled cycles meanwhile, and when and how each closed hour was compacted."""
    feed = Feed(bootstrap, work, series, f"hour-close-{series}")
    sender, runner = feed.start_producer(*clock), feed.start_runner()

    def compacted() -> dict[str, dict[int, dict]]:
        """Per output, the hours compacted and the cycle whose commit swapped each in."""
        found: dict[str, dict[int, dict]] = {"processed_data": {}, "cleaned_data": {}}
        for cycle in feed.cycles():
            for entry in cycle.get("compacted", []):
                output, hour = entry.split()
                found[output].setdefault(int(hour), cycle)
        return found

    def closed() -> list[int]:
        both = compacted()
        return sorted(set(both["processed_data"]) & set(both["cleaned_data"]))[:hours]

    print(f"{series} series: live until {hours} closed hours are compacted", flush=True)
    wait_for(lambda: len(closed()) >= hours, runner, "closed hours compacted", timeout=(hours + 1) * 3600, poll=5)
    cycles = with_measurements(feed.cycles())
    last = max(end_of(cycle) for hour in closed() for cycle in (compacted()[o][hour] for o in compacted()))
    # up to the last swap; the settled ones (none with a producer clock running fast: all of them)
    upto = [c for c in cycles[1:] if end_of(c) <= last] or cycles[1:]
    steady = settled(upto, series) or upto
    histogram = merged_histogram(steady)
    delays = [
        end_of(compacted()[output][hour]) - (hour_start(hour) + 3600) for hour in closed() for output in compacted()
    ]
    dropped = sum(c.get("compactions_dropped", 0) for c in feed.cycles())
    finish(feed, runner, sender, series)
    results = [
        ("live_latency_p95_s_hour_close", sum(histogram.values()), live.percentile(histogram, 0.95), "s"),
        ("live_latency_max_s_hour_close", sum(histogram.values()), max(c["latency_max_s"] for c in steady), "s"),
        ("live_cycle_s_hour_close", len(steady), round(statistics.median(c["seconds"] for c in steady), 2), "s"),
        ("live_hour_compacted_s", len(delays), round(max(delays), 1), "s"),
        ("live_compactions_dropped", len(delays), dropped, "merges"),
    ]
    for name, _count, value, unit in results:
        print(f"{series} series: {name} = {value} {unit}", flush=True)
    return [
        {"metric": f"{name}_{series}", "rows": count, "value": value, "unit": unit}
        for name, count, value, unit in results
    ]


#: The compaction's two ways are each measured this often, alternated.
COMPACTION_ROUNDS = 2


def run_compaction(work: str, series: int, files: int) -> list[dict]:
    """``live_compaction_*_<n>``: a closed hour of cleaned_data as cycles leave it (``files`` files, each the
    next slots of every series) merged both ways the compactor has, alternated on the same files: Spark's read
    and write of the rows (on ``compaction_tasks`` tasks) and the row groups copied (``concatenate_parquet``);
    wall and JVM CPU seconds of each, and the merged rows counted against the hour's."""
    spark = session.build_session("meter-stream bench compaction")
    folder = os.path.join(work, f"compaction-{series}", "hour")
    slots = 360
    index = spark.range(series * slots)
    slot, series_index = F.col("id") % slots, (F.col("id") / slots).cast("long")
    at = F.timestamp_seconds(F.lit(harness.START) + slot * 10)
    rows = index.select(
        at.alias(m.T_MEASUREMENT),
        at.alias(m.T_REPORT),
        F.concat(F.lit("bench-device-"), (series_index / 2).cast("long").cast("string")).alias(m.DEVICE_ID),
        F.when(series_index % 2 == 0, m.SIGNAL_IMPORT).otherwise(m.SIGNAL_EXPORT).alias(m.SIGNAL_NAME),
        F.round(F.lit(1000.0) + series_index * 37.1 + slot * 0.0025, 3).alias(m.VALUE),
        F.when(F.abs(F.xxhash64("id")) % 3 == 0, "interpolated").otherwise("measured").alias(QUALITY),
        slot.alias("_slot"),
    )
    print(f"{series} series: writing an hour of grid rows in {files} files", flush=True)
    storage.parquet_writer(rows.repartitionByRange(files, "_slot").drop("_slot")).mode("overwrite").parquet(folder)
    sources = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    expected = spark.read.parquet(folder).count()
    pid = jvm.jvm_process().pid

    def spark_merge(target: str) -> None:
        merged = spark.read.schema(CLEANED_SCHEMA).parquet(*sources)
        tasks = live.compaction.compaction_tasks(spark.sparkContext.defaultParallelism)
        storage.parquet_writer(merged.coalesce(tasks)).mode("overwrite").parquet(target)

    def copy_merge(target: str) -> None:
        if not storage.concatenate_parquet(spark, sources, target):
            raise RuntimeError("the generated files differ in schema")

    figures: dict[str, list[tuple[float, float]]] = {"spark": [], "copy": []}
    for round_ in range(COMPACTION_ROUNDS):
        for way, merge in (("spark", spark_merge), ("copy", copy_merge)):
            target = os.path.join(work, f"compaction-{series}", f"{way}-{round_}")
            cpu, started = _cpu_seconds(pid), time.perf_counter()
            merge(target)
            figures[way].append((time.perf_counter() - started, _cpu_seconds(pid) - cpu))
            if (merged := spark.read.parquet(target).count()) != expected:
                raise RuntimeError(f"{way} merge: {merged} rows of {expected}")
            shutil.rmtree(target)
    shutil.rmtree(os.path.dirname(folder))
    best = {way: (min(w for w, _ in runs), min(c for _, c in runs)) for way, runs in figures.items()}
    print(f"{series} series: compaction of an hour ({expected} rows, {files} files): {best}", flush=True)
    results = [
        *[(f"live_compaction_s_{way}", round(wall, 2), "s") for way, (wall, _cpu) in best.items()],
        *[(f"live_compaction_cpu_s_{way}", round(cpu, 2), "s") for way, (_wall, cpu) in best.items()],
        ("live_compaction_copy_over_spark", round(best["copy"][0] / best["spark"][0], 3), "ratio"),
    ]
    return [
        {"metric": f"{name}_{series}", "rows": expected, "value": value, "unit": unit} for name, value, unit in results
    ]


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hour_start(hour: int) -> float:
    """The epoch seconds at which an hour partition (``yyyyMMddHH``, UTC) begins."""
    return datetime.strptime(str(hour), "%Y%m%d%H").replace(tzinfo=UTC).timestamp()


def growth(datastore: str) -> dict[str, tuple[float, str]]:
    """What grows with a run: parquet files per output, the most in one closed hour folder, the sink log's size."""
    found: dict[str, tuple[float, str]] = {}
    hours: dict[str, int] = {}
    for output in ("consumer_data", "processed_data", "cleaned_data", "quarantine_data"):
        count = 0
        for folder, _folders, names in os.walk(os.path.join(datastore, output)):
            files = [name for name in names if name.endswith(".parquet")]
            count += len(files)
            if output == "cleaned_data" and os.path.basename(folder).startswith("hour="):
                hours[os.path.basename(folder)] = len(files)
        found[f"files_{output}"] = (count, "files")
    # the newest two hours may still be open or compacting
    found["files_per_closed_hour_max"] = (max([hours[h] for h in sorted(hours)[:-2]] or [0]), "files")
    sink_log = os.path.join(datastore, "consumer_data", "_spark_metadata")
    size = sum(os.path.getsize(os.path.join(sink_log, name)) for name in _names(sink_log))
    found["sink_log_mib"] = (round(size / 2**20, 2), "MiB")
    return found


def take_in_history(feed: Feed, series: int, history: str, backlog: str) -> int:
    """Send ``history`` (ending ``backlog`` ago) and take it in as a new user would; return the messages sent.

    The consumer reads what the topic holds, and the runner's first start makes one full (batch) run
    of it; the runner is stopped after it and its cycles' file removed (the next runner's cycles only).
    """
    print(f"{series} series: backfilling {history} of history", flush=True)
    feed.backfill(history, until=backlog, seed=1)
    subprocess.run([PYTHON, "exercises/consumer.py", "--datastore", feed.datastore], cwd=ROOT, env=feed.env, check=True)
    runner = feed.start_runner()
    live_state = os.path.join(feed.datastore, "live_state")
    wait_for(lambda: any(f.startswith("cursor-") for f in _names(live_state)), runner, "full run")
    stop(runner, "the live runner after its full run")
    if os.path.exists(cycles := os.path.join(feed.datastore, "reports", live.LIVE_CYCLES)):
        os.remove(cycles)
    return feed.delivered


def _names(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def sum_until(cycles: list[dict], last: dict) -> int:
    return sum(c["raw_rows"] for c in cycles if c["cycle"] <= last["cycle"])


def merged_histogram(cycles: list[dict]) -> dict[float, int]:
    histogram: dict[float, int] = {}
    for cycle in cycles:
        for bucket, count in cycle["latency_histogram"].items():
            histogram[float(bucket)] = histogram.get(float(bucket), 0) + count
    return histogram


def figures(series: int, steady: list[dict], catch_up: float, settle: float | None) -> list[dict]:
    """The fleet metrics of one size from its steady cycles."""
    histogram = merged_histogram(steady)
    measured = sum(histogram.values())
    span = end_of(steady[-1]) - (end_of(steady[0]) - steady[0]["seconds"])
    rows = sum(c["raw_rows"] for c in steady)
    results = [
        ("live_latency_p50_s", measured, live.percentile(histogram, 0.5), "s"),
        ("live_latency_p95_s", measured, live.percentile(histogram, 0.95), "s"),
        ("live_cycle_s", len(steady), round(statistics.median(c["seconds"] for c in steady), 2), "s"),
        ("live_msgs_per_s", rows, round(rows / span, 1), "msg/s"),
        ("live_catch_up_s", series, round(catch_up, 1), "s"),
        ("live_settle_s", series, None if settle is None else round(settle, 1), "s"),
    ]
    for name, _count, value, unit in results:
        print(f"{series} series: {name} = {value} {unit}", flush=True)
    parts = ("processor_s", "cleaner_s", "checker_s", "report_s", "commit_s")
    medians = {part: statistics.median(c.get(part, 0) for c in steady) for part in parts}
    print(f"{series} series: median cycle parts {medians}", flush=True)
    return [
        {"metric": f"{name}_{series}", "rows": count, "value": value, "unit": unit}
        for name, count, value, unit in results
    ]


def check_complete(datastore: str, sent: int, series: int) -> None:
    """Fail unless every measurement sent is in processed_data and, first in its slot, in cleaned_data as measured."""
    import duckdb

    processed = os.path.join(datastore, "processed_data", "*", "*.parquet")
    cleaned = os.path.join(datastore, "cleaned_data", "*", "*.parquet")
    slot = "epoch_us(t_measurement) - epoch_us(t_measurement) % 10000000"
    relation = duckdb.sql(
        f"""
        with p as (
            select device_id, signal_name, value, {slot} as slot,
                   row_number() over (partition by device_id, signal_name, {slot} order by t_measurement) as nth
            from read_parquet('{processed}')
        ), c as (select device_id, signal_name, value, quality, epoch_us(t_measurement) as slot
                 from read_parquet('{cleaned}'))
        select (select count(*) from p),
               (select count(*) from p where nth = 1),
               (select count(*) from p join c on p.device_id = c.device_id and p.signal_name = c.signal_name
                    and p.slot = c.slot where p.nth = 1 and c.quality = 'measured' and c.value = p.value),
               (select count(*) - count(distinct (device_id, signal_name, slot)) from c)
        """
    )
    assert relation is not None  # a query, not a statement
    ((stored, firsts, measured, twice),) = relation.fetchall()
    print(
        f"{series} series: {sent} sent, {stored} in processed_data, {measured} of {firsts} first-in-slot "
        f"measured in cleaned_data, {twice} (series, slot) twice",
        flush=True,
    )
    if stored != sent or measured != firsts or twice:
        raise RuntimeError(f"{series} series: measurements lost or doubled (see the line above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--histories", default="1h=3,24h=4", help="HISTORY=MINUTES live, comma-separated ('' skips)")
    parser.add_argument("--sizes", default="4,10000,100000", help="fleet sizes in series, comma-separated ('' skips)")
    parser.add_argument("--live-minutes", type=float, default=3.0, help="minutes live per fleet size")
    parser.add_argument("--history", default="1h", help="history behind each fleet size")
    parser.add_argument("--backlog", default="10m", help="the backlog the runner catches up with per fleet size")
    parser.add_argument("--trigger", type=float, default=TRIGGER["seconds"], help="the runner's --watch interval")
    parser.add_argument(
        "--settled-cycles",
        type=int,
        default=SETTLED["cycles"],
        help="per fleet size, live at least until this many settled cycles were made (default %(default)s)",
    )
    parser.add_argument("--restart-sizes", default="100000", help="fleet sizes of the kill-and-restart run ('' skips)")
    parser.add_argument("--outage-sizes", default="10000", help="fleet sizes of the broker-outage run ('' skips)")
    parser.add_argument("--outage-seconds", type=float, default=120.0, help="how long the broker is away")
    parser.add_argument(
        "--catch-up", default="100000=1h,100000=3h", help="SIZE=DOWNTIME runs of the catch-up after downtime ('' skips)"
    )
    parser.add_argument(
        "--hour-close-sizes", default="100000", help="fleet sizes of the run across closing hours ('' skips)"
    )
    parser.add_argument("--hour-closes", type=int, default=2, help="how many closed hours it waits for")
    parser.add_argument(
        "--hour-close-clock",
        default="",
        help="producer options for its clock, e.g. '--since 2h --speed 60' (default: real time)",
    )
    parser.add_argument(
        "--compaction-sizes", default="100000", help="fleet sizes of the compaction of an hour, both ways ('' skips)"
    )
    parser.add_argument(
        "--compaction-files", type=int, default=720, help="files of that hour (a cycle's 2 files every 10 s)"
    )
    parser.add_argument("--soak-sizes", default="10000", help="fleet sizes of the compressed-time soak ('' skips)")
    parser.add_argument("--soak-span", default="1d", help="how far in the past the soak's producer clock starts")
    parser.add_argument("--soak-speed", type=float, default=20.0, help="how much faster its clock runs")
    parser.add_argument(
        "--only",
        action="store_true",
        help="a partial run: replace only the metrics it measures (by default every live_* metric is replaced)",
    )
    parser.add_argument("--bootstrap-servers", default=None, help="broker (default: a local one for the run)")
    parser.add_argument("--results", default=harness.RESULTS)
    parser.add_argument("--report", default=harness.REPORT, help="BENCHMARKS.md to write ('' for none)")
    args = parser.parse_args(argv)
    TRIGGER["seconds"] = args.trigger
    SETTLED["cycles"] = args.settled_cycles
    runs = [(h, float(mins)) for h, _, mins in (item.partition("=") for item in args.histories.split(",") if item)]
    sizes = _sizes(args.sizes)
    work = tempfile.mkdtemp(prefix="meter-bench-live-")

    def measure(bootstrap: str) -> list[dict]:
        results = history_figures({h: run_history(bootstrap, work, h, mins) for h, mins in runs}, runs)
        for size in sizes:
            results += run_fleet(bootstrap, work, size, args.live_minutes, args.history, args.backlog)
        for size in _sizes(args.restart_sizes):
            results += run_restart(bootstrap, work, size)
        for item in filter(None, args.catch_up.split(",")):
            size, _, downtime = item.partition("=")
            results += run_catch_up(bootstrap, work, int(size), downtime)
        for size in _sizes(args.outage_sizes):  # on a broker of its own
            results += run_outage(work, size, args.outage_seconds)
        for size in _sizes(args.hour_close_sizes):
            results += run_hour_close(bootstrap, work, size, args.hour_closes, args.hour_close_clock.split())
        for size in _sizes(args.soak_sizes):
            results += run_soak(bootstrap, work, size, args.soak_span, args.soak_speed)
        for size in _sizes(args.compaction_sizes):
            results += run_compaction(work, size, args.compaction_files)
        return results

    harness.save_results(
        args.results,
        harness.with_broker(args.bootstrap_servers, measure),
        args.report,
        owns=(lambda _metric: False) if args.only else (lambda metric: not harness.owns(metric)),
    )
    return 0


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",") if size]


def history_figures(cycles: dict[str, list[dict]], runs: list[tuple[str, float]]) -> list[dict]:
    """The four-series metrics: median cycle per history length, latency over the longest run."""
    results = []
    for history, _minutes in runs:
        steady = [c for c in cycles[history][1:] if c["measurements"]]
        if not steady:
            raise RuntimeError(f"no cycle with new measurements after {history} of history")
        rows = round(config.parse_duration(history) / producer.DEFAULT_INTERVAL * len(producer.VALUE_RANGES))
        median = statistics.median(c["seconds"] for c in steady)
        results.append({"metric": f"live_cycle_s_{history}", "rows": rows, "value": round(median, 2), "unit": "s"})
        print(f"{history} of history: {len(steady)} cycles, median {median:.2f} s", flush=True)
        cycles[history] = steady
    if not runs:
        return results
    longest = max(runs, key=lambda run: run[1])[0]
    histogram = merged_histogram(cycles[longest])
    for share, name in ((0.5, "live_latency_p50_s"), (0.95, "live_latency_p95_s")):
        value = live.percentile(histogram, share)
        results.append({"metric": name, "rows": sum(histogram.values()), "value": value, "unit": "s"})
    first, last = runs[0][0], runs[-1][0]
    if first != last:
        by_name = {r["metric"]: r for r in results}
        ratio = by_name[f"live_cycle_s_{last}"]["value"] / by_name[f"live_cycle_s_{first}"]["value"]
        name, rows = f"live_cycle_{last}_over_{first}", by_name[f"live_cycle_s_{last}"]["rows"]
        results.append({"metric": name, "rows": rows, "value": round(ratio, 3), "unit": "ratio"})
    return results


if __name__ == "__main__":
    sys.exit(main())
