"""Live benchmark (``make bench-live``): latency and cycle time of the live runner.

For each history length (1 h and 24 h by default), on a fresh topic of the local broker: the
producer backfills that much history, then sends a round every 10 s (as meters do) while
``exercises/pipeline.py --watch 10`` runs for a few minutes; then both are stopped with SIGTERM.
The runner's own per-cycle figures (``reports/live_cycles.json``) give:

- ``live_cycle_s_1h``, ``live_cycle_s_24h``: median cycle time with that much history behind it,
  and ``live_cycle_24h_over_1h``, the last over the first (target <= 1.5);
- ``live_latency_p50_s``, ``live_latency_p95_s``: seconds from each measurement's t_measurement to
  its appearance in cleaned_data, over the longest run (target p95 <= 30 s with a 10-s trigger).

The first cycle of a run (the backfilled backlog) is left out. Results replace the live_* entries
of ``bench/results.json`` (the others are kept) and the table of ``BENCHMARKS.md``.

Usage:
    python bench/live.py [--histories 1h=4,24h=10] [--bootstrap-servers HOST:PORT]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, *(os.path.join(ROOT, folder) for folder in ("exercises", "scripts", "bench"))]

import harness  # noqa: E402

import pipeline  # noqa: E402
import producer  # noqa: E402
from common import config  # noqa: E402

TRIGGER_SECONDS = 10


def run_live(bootstrap: str, work: str, history: str, minutes: float, trigger: float) -> list[dict]:
    """Backfill ``history``, run the live runner and a live producer for ``minutes``; return its cycles."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-live-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until the topic exists
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    env = {**os.environ, config.ENV_BOOTSTRAP_SERVERS: bootstrap, config.ENV_TOPIC: topic}
    python = sys.executable
    subprocess.run(
        [python, "producer.py", "--backfill", history, "--quiet", "--seed", "1"], cwd=ROOT, env=env, check=True
    )
    datastore = os.path.join(work, history)
    producer = subprocess.Popen([python, "producer.py", "--quiet"], cwd=ROOT, env=env)
    runner = subprocess.Popen(
        [python, "exercises/pipeline.py", "--watch", str(trigger), "--datastore", datastore],
        cwd=ROOT,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + minutes * 60
    while time.monotonic() < deadline and runner.poll() is None:
        time.sleep(1)
    producer.send_signal(signal.SIGTERM)
    producer.wait(timeout=60)
    runner.send_signal(signal.SIGTERM)
    if runner.wait(timeout=300) != 0:
        raise RuntimeError(f"the live runner exited with {runner.returncode} ({history} of history)")
    with open(os.path.join(datastore, "reports", pipeline.LIVE_CYCLES)) as handle:
        return json.load(handle)


def steady(cycles: list[dict]) -> list[dict]:
    """The cycles after the first (the backlog), that had measurements."""
    return [c for c in cycles[1:] if c["measurements"]]


def merged_histogram(cycles: list[dict]) -> dict[float, int]:
    histogram: dict[float, int] = {}
    for cycle in cycles:
        for bucket, count in cycle["latency_histogram"].items():
            histogram[float(bucket)] = histogram.get(float(bucket), 0) + count
    return histogram


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--histories", default="1h=4,24h=10", help="HISTORY=MINUTES live, comma-separated")
    parser.add_argument("--trigger", type=float, default=TRIGGER_SECONDS, help="the --watch interval")
    parser.add_argument("--bootstrap-servers", default=None, help="broker (default: a local one for the run)")
    parser.add_argument("--results", default=harness.RESULTS)
    parser.add_argument("--report", default=harness.REPORT, help="BENCHMARKS.md to write ('' for none)")
    args = parser.parse_args(argv)
    runs = [(h, float(mins)) for h, _, mins in (item.partition("=") for item in args.histories.split(","))]
    work = tempfile.mkdtemp(prefix="meter-bench-live-")
    cycles = harness.with_broker(
        args.bootstrap_servers,
        lambda bootstrap: {h: steady(run_live(bootstrap, work, h, mins, args.trigger)) for h, mins in runs},
    )
    results = []
    for history, _minutes in runs:
        if not cycles[history]:
            raise RuntimeError(f"no cycle with new measurements after {history} of history")
        rows = round(producer.parse_duration(history) / producer.DEFAULT_INTERVAL * len(producer.VALUE_RANGES))
        median = statistics.median(c["seconds"] for c in cycles[history])
        results.append({"metric": f"live_cycle_s_{history}", "rows": rows, "value": round(median, 2), "unit": "s"})
        print(f"{history} of history: {len(cycles[history])} cycles, median {median:.2f} s", flush=True)
    longest = max(runs, key=lambda run: run[1])[0]
    histogram = merged_histogram(cycles[longest])
    for share, name in ((0.5, "live_latency_p50_s"), (0.95, "live_latency_p95_s")):
        value = pipeline.percentile(histogram, share)
        results.append({"metric": name, "rows": sum(histogram.values()), "value": value, "unit": "s"})
    first, last = runs[0][0], runs[-1][0]
    if first != last:
        by_name = {r["metric"]: r for r in results}
        ratio = by_name[f"live_cycle_s_{last}"]["value"] / by_name[f"live_cycle_s_{first}"]["value"]
        name, rows = f"live_cycle_{last}_over_{first}", by_name[f"live_cycle_s_{last}"]["rows"]
        results.append({"metric": name, "rows": rows, "value": round(ratio, 3), "unit": "ratio"})
    harness.save_results(args.results, results, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
