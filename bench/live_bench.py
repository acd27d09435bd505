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

Results replace the live_* entries of ``bench/results.json`` (the others are kept) and the table of
``BENCHMARKS.md``.

Usage:
    python bench/live_bench.py [--sizes 4,10000,100000] [--live-minutes 3] [--histories 1h=3,24h=4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, *(os.path.join(ROOT, folder) for folder in ("exercises", "scripts", "bench"))]

import harness  # noqa: E402

import producer  # noqa: E402
from meter_stream import (  # noqa: E402
    config,
    kafka_client,
    live,  # noqa: E402
)

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

    def start_producer(self) -> subprocess.Popen:
        return subprocess.Popen(
            [PYTHON, "producer.py", "--quiet", *self.fleet], cwd=ROOT, env=self.env, stderr=subprocess.PIPE, text=True
        )

    def stop_producer(self, process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=120)
        self.delivered += delivered(err)

    def start_runner(self) -> subprocess.Popen:
        command = [PYTHON, "exercises/pipeline.py", "--watch", str(TRIGGER["seconds"]), "--datastore", self.datastore]
        with open(f"{self.datastore}.log", "a") as log:  # the runner's own log, next to its datastore
            return subprocess.Popen([*command, *self.catalog], cwd=ROOT, env=self.env, stderr=log)

    def cycles(self) -> list[dict]:
        path = os.path.join(self.datastore, "reports", live.LIVE_CYCLES)
        if not os.path.exists(path):
            return []
        with open(path) as handle:
            return json.load(handle)


def delivered(stderr: str) -> int:
    """The producer's count of delivered messages, from its last line."""
    return int(stderr.rsplit("producer: ", 1)[1].split()[0])


def stop(process: subprocess.Popen, what: str) -> None:
    process.send_signal(signal.SIGTERM)
    if process.wait(timeout=900) != 0:
        raise RuntimeError(f"{what} exited with {process.returncode}")


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"the live runner exited with {process.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.5)


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
    parser.add_argument("--bootstrap-servers", default=None, help="broker (default: a local one for the run)")
    parser.add_argument("--results", default=harness.RESULTS)
    parser.add_argument("--report", default=harness.REPORT, help="BENCHMARKS.md to write ('' for none)")
    args = parser.parse_args(argv)
    TRIGGER["seconds"] = args.trigger
    SETTLED["cycles"] = args.settled_cycles
    runs = [(h, float(mins)) for h, _, mins in (item.partition("=") for item in args.histories.split(",") if item)]
    sizes = [int(size) for size in args.sizes.split(",") if size]
    work = tempfile.mkdtemp(prefix="meter-bench-live-")

    def measure(bootstrap: str) -> list[dict]:
        results = history_figures({h: run_history(bootstrap, work, h, mins) for h, mins in runs}, runs)
        for size in sizes:
            results += run_fleet(bootstrap, work, size, args.live_minutes, args.history, args.backlog)
        return results

    harness.save_results(
        args.results,
        harness.with_broker(args.bootstrap_servers, measure),
        args.report,
        owns=lambda metric: not harness.owns(metric),
    )
    return 0


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
