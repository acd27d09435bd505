"""The runner behind ``pipeline.py --watch``: the start (a full run when there is no usable state), the
consumer in a thread, and a cycle whenever new raw files are committed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from meter_stream import check_figures, checker, cleaner, config, consumer, kafka_client, processor
from meter_stream import message as m
from meter_stream.contracts import (
    CLEANED_SCHEMA,
    MICROS,
    PARTITION,
    PROCESSED_SCHEMA,
    QUARANTINE_SCHEMA,
    to_micros,
)
from meter_stream.live.checks import write_unknown
from meter_stream.live.compaction import Compactor
from meter_stream.live.cycle import CycleResult, run_cycle
from meter_stream.live.store import (
    FIGURES,
    FIGURES_SCHEMA,
    KEYS,
    SERIES_STATE,
    SERIES_STATE_SCHEMA,
    Cursor,
    Settings,
    SinkPosition,
    commit_cursor,
    conform,
    hour_of_micros,
    new_raw_files,
    read_cursor,
    read_series_state,
    recover,
    remove_cycle_leftovers,
    state_folder,
    write_state,
)
from meter_stream.locks import stage_lock
from meter_stream.session import local_frame, one_row
from meter_stream.storage import (
    delete_path,
    make_folder,
    path_exists,
    read_partitioned,
    replace_output,
    write_text,
)

log = config.get_logger("live")


#: In reports: the live runner's recent cycles with their latency histograms.
LIVE_CYCLES = "live_cycles.json"
KEPT_CYCLES = 2000

#: A cycle takes at most this many raw rows (oldest first), so a backlog of any size is absorbed in bounded
#: cycles; the live consumer's micro-batches are capped at it too (BENCHMARKS.md, "Catch-up after downtime").
DEFAULT_MAX_ROWS_PER_CYCLE = 2_000_000
#: While the broker is away: seconds between reachability checks, doubling up to the last (a return is
#: noticed within it), and the first outage report repeated after this many seconds, then at doubling intervals.
OUTAGE_RETRY_SECONDS = (1.0, 15.0)
OUTAGE_REPORT_SECONDS = 60.0
#: An hour is compacted once the newest slot is this far past its end: the stragglers of a fleet's last
#: round of the hour have come by then, and a merge is not redone for each of them.
COMPACTION_GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class RunnerLimits:
    """How much a cycle takes at most, and how long a broker outage is waited out (None: no limit)."""

    max_rows_per_cycle: int | None = DEFAULT_MAX_ROWS_PER_CYCLE
    max_broker_outage_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_rows_per_cycle is not None and self.max_rows_per_cycle <= 0:
            raise ValueError("--max-rows-per-cycle must be positive")
        if self.max_broker_outage_seconds is not None and self.max_broker_outage_seconds <= 0:
            raise ValueError("--max-broker-outage must be positive")


def percentile(histogram: dict[float, int], share: float) -> float | None:
    """The bucket (upper edge) below which ``share`` of the counted latencies lie."""
    total = sum(histogram.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= share * total:
            return round(bucket + 0.1, 1)
    return None


@contextmanager
def runner_locks(spark: SparkSession, paths: config.Paths) -> Iterator[None]:
    """Hold the processor's, the cleaner's and the checker's locks: one runner per datastore, and no batch
    stage beside it (both refused with exit 3, naming the holder). Re-entrant within the thread."""
    with ExitStack() as stack:
        for path, stage in ((paths.processed_data, processor), (paths.cleaned_data, cleaner), (paths.reports, checker)):
            stack.enter_context(stage_lock(path, stage.STAGE, stage.log, spark))
        yield


def start(spark: SparkSession, paths: config.Paths, settings: Settings) -> Cursor:
    """Return the committed cursor to go on from, after repairing what an interrupted cycle left.

    Without a cursor made with these settings (first start, other settings, or a batch run
    replaced the outputs since: the state says nothing about them then), one full run first: the
    batch stages, then the state and the figures built from their outputs. Runs under
    ``runner_locks``, so a second runner never repairs the first one's cycle in flight.
    """
    with runner_locks(spark, paths):
        return _start(spark, paths, settings)


def _start(spark: SparkSession, paths: config.Paths, settings: Settings) -> Cursor:
    cursor = read_cursor(spark, paths)
    if cursor is not None and cursor.settings == settings.fingerprint and _outputs_match(spark, paths, cursor):
        log.info("live: going on after cycle %d", cursor.cycle)
        recover(spark, paths, cursor)
        # The interrupted cycle may have written it from its own state.
        write_unknown(spark, paths, settings.cleaner, read_series_state(spark, paths, cursor.cycle))
        return cursor
    delete_path(spark, paths.live_state)
    remove_cycle_leftovers(spark, paths)
    # Positions before the full run: a file that arrives during it is read twice, not missed.
    _files, positions = new_raw_files(spark, paths, {})
    if path_exists(spark, paths.consumer_data):
        log.info("live: no usable live state in %s: one full run first", paths.live_state)
        processor.run(spark, paths, settings.clock)
        cleaner.run(spark, paths, settings.cleaner)
        checker.run(spark, paths, settings.checker, show=False)
    state, figures, newest = initial_state(spark, paths, settings)
    if not path_exists(spark, paths.quarantine_data):  # cycles add to it only when they reject a row
        replace_output(local_frame(spark, [], QUARANTINE_SCHEMA), paths.quarantine_data, log)
    for output in (paths.processed_data, paths.cleaned_data):
        make_folder(spark, output)
        write_text(spark, config.join_path(output, LIVE_MARKER), "kept up to date by the live mode\n")
    write_state(state, paths, SERIES_STATE, 0)
    write_state(figures, paths, FIGURES, 0)
    clock_faults = checker.count_clock_faults(spark, paths) or {}
    cursor = Cursor(0, positions, settings.fingerprint, newest, {}, clock_faults)
    commit_cursor(spark, paths, cursor)
    return cursor


def _outputs_match(spark: SparkSession, paths: config.Paths, cursor: Cursor) -> bool:
    """Whether the outputs are still the ones the state describes (a batch run leaves no live marker)."""
    return path_exists(spark, state_folder(paths, SERIES_STATE, cursor.cycle)) and all(
        path_exists(spark, config.join_path(output, LIVE_MARKER))
        for output in (paths.processed_data, paths.cleaned_data)
    )


#: In processed_data and cleaned_data: written when the live state is built; a batch run replaces the
#: folder without it.
LIVE_MARKER = "_live"


def initial_state(
    spark: SparkSession, paths: config.Paths, settings: Settings
) -> tuple[DataFrame, DataFrame, int | None]:
    """Build the per-series state and the report window's figures from full outputs (after a full run)."""
    if not path_exists(spark, paths.cleaned_data):
        return local_frame(spark, [], SERIES_STATE_SCHEMA), local_frame(spark, [], FIGURES_SCHEMA), None
    processed = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA)
    counts = processed.groupBy(*KEYS).agg(F.count(F.lit(1)).alias("rows"), F.max(m.T_MEASUREMENT).alias("max_t"))
    cleaned = read_partitioned(spark, paths.cleaned_data, CLEANED_SCHEMA)
    step = to_micros(settings.cleaner.slot_seconds)
    window = settings.checker.spike_window
    slot = F.unix_micros(m.T_MEASUREMENT)
    ends = cleaned.groupBy(*KEYS).agg(F.max(slot).alias("last_slot"), F.max_by(m.VALUE, slot).alias("last_value"))
    tail = F.array_sort(F.collect_list(F.when(slot > F.col("last_slot") - window * step, F.struct(slot, m.VALUE))))
    grid = (
        cleaned.join(ends, KEYS)
        .groupBy(*KEYS, "last_slot", "last_value")
        .agg(
            F.max(F.when(~F.col(m.VALUE).eqNullSafe(F.col("last_value")), slot)).alias("_break"),
            F.min(slot).alias("_first"),
            tail.alias("_tail"),
        )
        .select(
            *KEYS,
            "last_slot",
            "last_value",
            ((F.col("last_slot") - F.coalesce("_break", F.col("_first") - step)) / step).cast("long").alias("flat_run"),
            F.transform("_tail", lambda x: x[m.VALUE]).alias("tail"),
        )
    )
    state = conform(counts.join(grid, KEYS, "full"), SERIES_STATE_SCHEMA)
    newest = one_row(ends.agg(F.max("last_slot")))[0]
    figures = local_frame(spark, [], FIGURES_SCHEMA)
    if newest is not None:
        since = hour_of_micros(newest - to_micros(settings.report_window_seconds))
        figures = (
            cleaned.where(F.col(PARTITION) >= since)
            .transform(check_figures.annotate_rows(settings.checker))
            .transform(check_figures.series_figures(settings.checker, PARTITION))
            .transform(lambda frame: conform(frame, FIGURES_SCHEMA))
        )
    return state, figures, newest


class LiveRunner:
    """The live mode behind ``--watch``: a continuous consumer and a cycle whenever it committed new files."""

    def __init__(
        self,
        spark: SparkSession,
        paths: config.Paths,
        settings: Settings,
        should_stop: Callable[[], bool],
        limits: RunnerLimits = RunnerLimits(),
    ) -> None:
        self.spark, self.paths, self.settings, self.limits = spark, paths, settings, limits
        self.should_stop = should_stop
        self.cycles: list[dict[str, Any]] = []
        self.consumer_errors: list[Exception] = []
        self.compactor = Compactor(background=True, grace_seconds=COMPACTION_GRACE_SECONDS)

    def start_consumer(self, config_: consumer.ConsumerConfig) -> threading.Thread:
        """Run the consumer (continuous: a batch every ``config_.interval_seconds``) in a thread of this session."""

        def consume() -> None:
            try:
                self._consume_through_outages(config_)
            except Exception as error:  # reported by the main loop, which then stops
                consumer.log.error("%s", error)
                self.consumer_errors.append(error)

        thread = threading.Thread(target=consume, name="consumer", daemon=True)
        thread.start()
        return thread

    def _consume_through_outages(self, config_: consumer.ConsumerConfig) -> None:
        """Run the consumer; when the broker goes away, wait for it with backoff and go on from the checkpoint.

        The outage is logged when it starts, again after ``OUTAGE_REPORT_SECONDS`` and then at doubling
        intervals, and when the broker is back. Cycles go on meanwhile with what was committed.

        Raises:
            consumer.ConsumerError: on a failure that is not an outage (access refused, ...), or an outage
                longer than ``limits.max_broker_outage_seconds``.
        """
        servers = config_.bootstrap_servers
        while not self.should_stop():
            try:
                consumer.run(self.spark, self.paths, config_, self.should_stop)
                return
            except (consumer.ConsumerError, ConnectionError) as error:
                if not broker_outage(error, servers):
                    raise
                cause = error
            since, wait = time.monotonic(), OUTAGE_RETRY_SECONDS[0]
            report = since + OUTAGE_REPORT_SECONDS
            log.warning(
                "live: the Kafka broker at %s is unreachable (%s); cycles go on, retrying", servers, str(cause)[:300]
            )
            while not kafka_client.reachable(servers):
                away = time.monotonic() - since
                limit = self.limits.max_broker_outage_seconds
                if limit is not None and away > limit:
                    raise consumer.ConsumerError(
                        f"the Kafka broker at {servers} has been unreachable for {away:.0f} s since the consumer "
                        f"failed (after the Kafka client's own retries), longer than --max-broker-outage ({limit:g} s)"
                    )
                if time.monotonic() >= report:
                    log.warning("live: the Kafka broker at %s is still unreachable after %.0f s", servers, away)
                    report = since + 2 * (report - since)
                if self._sleep(wait):
                    return
                wait = min(2 * wait, OUTAGE_RETRY_SECONDS[1])
            log.warning(
                "live: the Kafka broker at %s is back after %.0f s; reading on", servers, time.monotonic() - since
            )

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; return whether a stop was asked for meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.should_stop():
                return True
            time.sleep(min(0.5, seconds))
        return self.should_stop()

    def cycle(self, cursor: Cursor, files: list[str], positions: dict[str, SinkPosition]) -> Cursor:
        """Run one cycle under the stages' locks; log and keep its metrics; return the new cursor."""
        started, wall = time.monotonic(), time.time()
        with stage_lock(self.paths.processed_data, "processor", processor.log, self.spark):
            with stage_lock(self.paths.cleaned_data, "cleaner", cleaner.log, self.spark):
                cursor, result = run_cycle(
                    self.spark, self.paths, self.settings, cursor, files, positions, self.compactor
                )
        metrics = cycle_metrics(len(self.cycles) + 1, wall, time.monotonic() - started, result)
        metrics.update(self.compactor.take_events())
        self.cycles = [*self.cycles, metrics][-KEPT_CYCLES:]
        write_text(self.spark, config.join_path(self.paths.reports, LIVE_CYCLES), json.dumps(self.cycles) + "\n")
        log.info(
            "cycle %d: %d raw rows = %d new + %d quarantined (clock faults %d) + %d duplicates; "
            "latency p50 %s s, p95 %s s, max %s s; freshness %s s; checks exit %s; %.1f s "
            "(processor %.1f, cleaner %.1f, checker %.1f, report %.1f)",
            *(metrics[k] for k in ("cycle", "raw_rows", "processed", "quarantined", "clock_faults", "duplicates")),
            *(metrics[k] for k in ("latency_p50_s", "latency_p95_s", "latency_max_s", "freshness_s")),
            metrics["checker_exit_code"],
            *(metrics[k] for k in ("seconds", "processor_s", "cleaner_s", "checker_s", "report_s")),
        )
        return cursor


def broker_outage(error: Exception, bootstrap_servers: str) -> bool:
    """Whether the consumer failed because the broker is away (not because it refused access or another fault).

    The Kafka client's errors for an unreachable broker are timeouts; they also come while the broker
    is starting up again, when it accepts connections but does not answer yet.
    """
    if isinstance(error, consumer.AccessError):
        return False
    if isinstance(error, ConnectionError):
        return True
    text = str(error)
    return "Timeout" in text or "timed out" in text.lower() or not kafka_client.reachable(bootstrap_servers)


def cycle_metrics(number: int, wall: float, seconds: float, result: CycleResult) -> dict[str, Any]:
    """One entry of ``reports/live_cycles.json``."""
    histogram, accounting = result.latency_histogram, result.accounting
    return {
        "cycle": number,
        "at": datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        **{name: round(value, 2) for name, value in result.seconds.items()},
        "raw_rows": accounting.raw,
        "processed": accounting.processed,
        "quarantined": accounting.quarantined,
        "clock_faults": accounting.clock_faults,
        "duplicates": accounting.duplicates,
        "measurements": sum(histogram.values()),
        "latency_p50_s": percentile(histogram, 0.5),
        "latency_p95_s": percentile(histogram, 0.95),
        "latency_max_s": percentile(histogram, 1.0),
        "freshness_s": None if result.newest is None else round(time.time() - result.newest / MICROS, 1),
        "checker_exit_code": result.exit_code,
        "latency_histogram": {f"{bucket:.1f}": count for bucket, count in sorted(histogram.items())},
    }


def watch(
    spark: SparkSession,
    paths: config.Paths,
    settings: Settings,
    consumer_config: consumer.ConsumerConfig | None,
    should_stop: Callable[[], bool],
    limits: RunnerLimits = RunnerLimits(),
) -> int:
    """Run the live mode until ``should_stop()``; return the exit code.

    After ``start`` (a full run only when there is no usable state), the consumer runs continuously
    in a thread of this session (a batch every ``consumer_config.interval_seconds``; without
    ``consumer_config``, another process fills consumer_data). A cycle starts as soon as new raw
    files are committed, and takes at most ``limits.max_rows_per_cycle`` of them, oldest first; the
    consumer's micro-batches are capped at it too unless its config sets its own cap. A broker
    outage is waited out (``LiveRunner._consume_through_outages``). On SIGTERM or Ctrl-C the
    consumer ends after its batch, a last cycle takes what it wrote, and the run exits 0. The runner
    holds ``runner_locks`` all along.
    """
    if consumer_config is not None and consumer_config.max_offsets_per_trigger is None:
        consumer_config = replace(consumer_config, max_offsets_per_trigger=limits.max_rows_per_cycle)
    with runner_locks(spark, paths):
        return _watch(spark, paths, settings, consumer_config, should_stop, limits)


def _watch(
    spark: SparkSession,
    paths: config.Paths,
    settings: Settings,
    consumer_config: consumer.ConsumerConfig | None,
    should_stop: Callable[[], bool],
    limits: RunnerLimits,
) -> int:
    runner = LiveRunner(spark, paths, settings, should_stop, limits)
    cursor = start(spark, paths, settings)
    # A cycle's data is small: one shuffle partition per core, not Spark's default of 200. Set before the
    # runner's threads start (none changes a setting while another uses the session), restored at the end.
    shuffle_partitions = spark.conf.get(SHUFFLE_PARTITIONS)
    spark.conf.set(SHUFFLE_PARTITIONS, str(spark.sparkContext.defaultParallelism))
    try:
        return _cycles(spark, paths, runner, cursor, consumer_config)
    finally:
        spark.conf.set(SHUFFLE_PARTITIONS, shuffle_partitions or "200")


SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"


def _cycles(
    spark: SparkSession,
    paths: config.Paths,
    runner: LiveRunner,
    cursor: Cursor,
    consumer_config: consumer.ConsumerConfig | None,
) -> int:
    """The runner's loop: the consumer in a thread, a cycle whenever it committed new files."""
    thread = None if consumer_config is None else runner.start_consumer(consumer_config)
    log.info(
        "live: a cycle as soon as new raw data is committed%s; Ctrl-C stops",
        "" if consumer_config is None else f" (consumer every {consumer_config.interval_seconds:g} s)",
    )
    while True:
        finished = thread is None or not thread.is_alive()
        files, after = new_raw_files(spark, paths, cursor.positions, runner.limits.max_rows_per_cycle)
        if files:
            cursor = runner.cycle(cursor, files, after)
            continue
        if runner.consumer_errors:
            runner.compactor.close(spark)
            return 1
        if runner.should_stop() and finished:
            runner.compactor.close(spark)
            log.info("live: stopped after %d cycles", len(runner.cycles))
            return 0
        time.sleep(0.5)
