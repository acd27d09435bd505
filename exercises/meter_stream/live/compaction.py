"""Compaction of closed hours: merged in the background, swapped in by a later cycle's commit."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from meter_stream import config
from meter_stream.contracts import (
    CLEANED_SCHEMA,
    PARTITION,
    PROCESSED_SCHEMA,
    to_micros,
)
from meter_stream.live.store import STAGING_SUFFIX, hour_of_micros, swap_hours
from meter_stream.storage import (
    concatenate_parquet,
    copy_file,
    delete_path,
    list_files,
    parquet_writer,
    write_parquet,
)

log = config.get_logger("live")


def compaction_tasks(cores: int) -> int:
    """A closed hour merged by Spark (files of differing schemas) is merged by this many tasks (one file
    each): half the task slots, at least one.

    Each task merges its share of the hour in one go (at 100,000 series, minutes), and a cycle's
    tasks wait for a free slot: with one task per core, a compaction held every slot and the cycles
    waited behind it (BENCHMARKS.md, "Settings").
    """
    return max(1, cores // 2)


@dataclass
class _Compaction:
    """One closed hour being compacted: the files it had when it started, and where they are merged to."""

    output: str
    hour: int
    files: list[str]
    staging: str
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class Compactor:
    """Compacts the closed hours that cycles appended to, one at a time, in the background or at once.

    A compaction takes the files of the oldest closed hour (of either output) as they are when it
    starts and merges them into a staging folder: their row groups copied into a few files
    (``concatenate_parquet``), or, where their schemas differ, read and written by Spark
    (``compaction_tasks``). A later cycle's
    commit swaps that folder in, undo-protected like any rewritten hour, with copies of the files
    that cycles appended to the hour meanwhile (stragglers: a few small files). Only when a late
    measurement rewrote the hour meanwhile (its files are not there any more) is the merged copy
    dropped and the hour compacted again later. An hour is closed once the newest slot less
    ``grace_seconds`` is in a later hour: most stragglers come before that.

    In the background (the runner), the merge runs in a thread of the session while cycles go on: an
    hour of 100,000 series is 36 M grid rows, which held a cycle up as long as it took when it ran
    inside the cycle. At once (``background=False``), the cycle that starts a compaction waits for
    it and swaps it in itself.
    """

    def __init__(self, background: bool, grace_seconds: float = 0.0) -> None:
        self.background = background
        self.grace_micros = to_micros(grace_seconds)
        self.running: _Compaction | None = None
        #: What the commits since ``take_events`` swapped in ("output hour") and how many merges they dropped.
        self.compacted: list[str] = []
        self.dropped = 0

    def take_events(self) -> dict[str, object]:
        """The hours compacted and the merges dropped since the last call (a cycle's ``live_cycles.json`` entry)."""
        events: dict[str, object] = {"compacted": self.compacted, "compactions_dropped": self.dropped}
        self.compacted, self.dropped = [], 0
        return events

    def step(
        self, spark: SparkSession, paths: config.Paths, open_hours: dict[str, list[int]], newest: int | None, cycle: int
    ) -> dict[str, list[int]]:
        """In a cycle's commit: swap in a finished compaction, start the next one; return the hours still open."""
        open_hours = self._finish(spark, paths, open_hours, cycle)
        if self.running is None and newest is not None:
            self.running = self._start(spark, paths, open_hours, hour_of_micros(newest - self.grace_micros))
            if self.running is not None and not self.background:
                self.running.done.wait()
                open_hours = self._finish(spark, paths, open_hours, cycle)
        return open_hours

    def close(self, spark: SparkSession) -> None:
        """Wait for a running compaction and drop what it merged (no cycle will swap it in)."""
        if self.running is not None:
            self.running.done.wait()
            delete_path(spark, self.running.staging)
            self.running = None

    def _start(
        self, spark: SparkSession, paths: config.Paths, open_hours: dict[str, list[int]], current: int
    ) -> _Compaction | None:
        closed = sorted((hour, output) for output, hours in open_hours.items() for hour in hours if hour < current)
        if not closed:
            return None
        hour, output = closed[0]
        path = getattr(paths, output)
        job = _Compaction(
            output, hour, data_files(spark, path, hour), f"{path}{STAGING_SUFFIX}compact-{PARTITION}={hour}"
        )
        delete_path(spark, job.staging)
        schema = PROCESSED_SCHEMA if output == "processed_data" else CLEANED_SCHEMA
        files = compaction_tasks(spark.sparkContext.defaultParallelism)

        def merge() -> None:
            try:
                # Row groups copied as they are where the files share a schema (most hours), else by Spark.
                if not concatenate_parquet(spark, job.files, f"{job.staging}/{PARTITION}={hour}"):
                    log.info("compaction of %s hour %d: files of differing schemas, merged by Spark", output, hour)
                    rows = spark.read.schema(schema).parquet(*job.files).withColumn(PARTITION, F.lit(hour).cast("long"))
                    writer = parquet_writer(rows.coalesce(files)).mode("overwrite").partitionBy(PARTITION)
                    write_parquet(writer, job.staging)
            except Exception as error:  # a late rewrite moved the files away: dropped, compacted later
                job.error = error
            finally:
                job.done.set()

        if self.background:
            threading.Thread(target=merge, name=f"compact-{output}-{hour}", daemon=True).start()
        else:
            merge()
        return job

    def _finish(
        self, spark: SparkSession, paths: config.Paths, open_hours: dict[str, list[int]], cycle: int
    ) -> dict[str, list[int]]:
        job = self.running
        if job is None or not job.done.is_set():
            return open_hours
        self.running = None
        path = getattr(paths, job.output)
        current = data_files(spark, path, job.hour)
        if job.error is not None or not set(job.files) <= set(current):
            reason = job.error or "a late measurement rewrote the hour meanwhile"
            log.info("compaction of %s hour %d dropped, to be done again: %s", job.output, job.hour, reason)
            delete_path(spark, job.staging)
            self.dropped += 1
            return open_hours
        # Files that cycles appended since the merge started go along as they are (a few small files).
        folder = f"{job.staging}/{PARTITION}={job.hour}"
        added = [file for file in current if file not in job.files]
        for file in added:
            copy_file(spark, file, f"{folder}/{file.rsplit('/', 1)[-1]}")
        swap_hours(spark, path, job.staging, [job.hour], cycle)
        log.info(
            "compacted %s hour %d (%d files, %d appended meanwhile)", job.output, job.hour, len(job.files), len(added)
        )
        self.compacted.append(f"{job.output} {job.hour}")
        return {name: [h for h in hours if (h, name) != (job.hour, job.output)] for name, hours in open_hours.items()}


def data_files(spark: SparkSession, output: str, hour: int) -> list[str]:
    return sorted(list_files(spark, f"{output}/{PARTITION}={hour}/*.parquet"))
