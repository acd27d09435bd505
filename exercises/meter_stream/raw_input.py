"""consumer_data's layout: one file-sink output per topic generation, and how to read it.

The consumer chooses the generation it writes (``choose_generation``) and checks that its sink and
checkpoint agree; the processor and the live runner read every generation (``read_raw``), also when
the folder was copied from another machine.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from meter_stream import config
from meter_stream.contracts import RAW_SCHEMA
from meter_stream.session import local_frame
from meter_stream.storage import (
    SINK_LOG,
    StageInputError,
    list_files,
    local_path,
    path_exists,
    read_text,
    read_text_tail,
    write_text,
)

GENERATION_PREFIX = "generation-"
#: In the consumer's checkpoint folder: the topic's id and the current generation (``choose_generation``).
GENERATION_STATE = "generation.json"


class CheckpointMismatchError(ValueError):
    """consumer_data's sink log is ahead of the consumer's checkpoint; the message says how to fix it."""


def generation_folder(root: str, generation: int) -> str:
    """The folder of a consumer generation: the root itself for 0, ``ROOT/generation-N`` after.

    The consumer starts a new generation (new output folder and checkpoint) when its topic was
    deleted and recreated, since Spark cannot rewind a checkpointed Kafka source.
    """
    return root if generation == 0 else f"{root.rstrip('/')}/{GENERATION_PREFIX}{generation}"


def read_raw(spark: SparkSession, path: str, log: logging.Logger) -> DataFrame:
    """Read consumer_data, every generation of it, robust to a log written on another machine.

    Generation 0 is the folder itself, later ones its ``generation-N`` subfolders (see
    ``generation_folder``); each is a file-sink output read as ``_read_sink_output`` says.

    Raises:
        StageInputError: when the folder does not exist.
    """
    if not path_exists(spark, path):
        raise StageInputError(f"{path} does not exist: run the consumer first (or point --consumer-data at raw data)")
    first, *later = generation_folders(spark, path)
    frame = _read_sink_output(spark, first, log, nested=not later)
    for folder in later:
        frame = frame.unionByName(_read_sink_output(spark, folder, log, nested=True))
    return frame


def generation_folders(spark: SparkSession, path: str) -> list[str]:
    """consumer_data's generation folders, oldest first: the folder itself, then ``generation-N``."""
    later = {
        int(match.group(1)): folder
        for folder in list_files(spark, f"{path.rstrip('/')}/{GENERATION_PREFIX}*", folders=True)
        if (match := re.search(rf"/{GENERATION_PREFIX}(\d+)$", folder))
    }
    return [path] + [folder for _generation, folder in sorted(later.items())]


def _read_sink_output(spark: SparkSession, path: str, log: logging.Logger, nested: bool) -> DataFrame:
    """Read one file-sink output folder.

    With a file-sink log, Spark reads only the files the log names: right on the machine that wrote
    them (files of failed batches are left out), but a copied folder's log names absolute paths that
    do not exist here, and Spark then reads nothing at all. So: when every file the log names is
    present, Spark reads through the log; otherwise the files present whose names the log lists are
    read (with a warning), and when the log lists none of them, every parquet file present. Without a
    log, every parquet file in the folder is read, and in its subfolders too when ``nested``.
    """
    reader = spark.read.schema(RAW_SCHEMA)
    sink_log = f"{path.rstrip('/')}/{SINK_LOG}"
    glob_path = f"{path.rstrip('/')}/*.parquet"
    if not path_exists(spark, sink_log):
        if nested:
            return reader.parquet(path)
        present = list_files(spark, glob_path)
        return reader.parquet(*present) if present else local_frame(spark, [], RAW_SCHEMA)
    # One spelling per file: file:///x and file:/x are the same local file.
    logged = {local_path(name) or name for name in _sink_log_files(spark, sink_log)}
    # A glob is not a folder, so Spark lists the files instead of reading the log.
    present_by_local = {local_path(f) or f: f for f in list_files(spark, glob_path)}
    if logged <= present_by_local.keys():
        return reader.parquet(path)
    logged_names = {name.rsplit("/", 1)[-1] for name in logged}
    matched = [f for local, f in present_by_local.items() if local.rsplit("/", 1)[-1] in logged_names]
    log.warning(
        "%s: %d of the %d files named by its %s log are not there (was the folder copied from "
        "another machine?); reading the %d files present%s",
        path,
        len(logged - present_by_local.keys()),
        len(logged),
        SINK_LOG,
        len(matched) or len(present_by_local),
        " that the log names" if matched else "",
    )
    if not present_by_local:
        return local_frame(spark, [], RAW_SCHEMA)
    return reader.parquet(*(matched or present_by_local.values()))


def _sink_log_files(spark: SparkSession, sink_log: str) -> set[str]:
    """The files a file-sink log adds, over its batch and compact files."""
    return {
        entry["path"]
        for log_file in list_files(spark, f"{sink_log}/*")
        if re.fullmatch(r"\d+(\.compact)?", log_file.rsplit("/", 1)[-1])
        for entry in sink_log_entries(spark, log_file)
    }


def sink_log_entries(spark: SparkSession, log_file: str) -> list[dict[str, Any]]:
    """The ``add`` entries of one file-sink log file: JSON lines after a version line.

    Read in the driver through Hadoop: the log is metadata (a line per file written), and Spark's
    own readers skip folders whose names start with an underscore.
    """
    return _add_entries((read_text(spark, log_file) or "").splitlines())


def _add_entries(lines: list[str]) -> list[dict[str, Any]]:
    entries = []
    for line in lines:
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("action") == "add" and entry.get("path"):
                entries.append(entry)
    return entries


#: The tail of a compact sink log file read first for the files after a position (``sink_log_entries_after``).
COMPACT_TAIL_BYTES = 1 << 20


def sink_log_entries_after(spark: SparkSession, log_file: str, modified_ms: int) -> list[dict[str, Any]]:
    """The ``add`` entries of a sink log file whose files were modified after ``modified_ms``.

    A compact log file lists every file the sink ever wrote, oldest batch first, and grows with the
    output (about 17,000 lines a day for the live consumer): it is read from its end, a growing
    tail at a time, until the tail reaches back to files of ``modified_ms`` or before.
    """
    size = COMPACT_TAIL_BYTES
    while True:
        text, whole = read_text_tail(spark, log_file, size)
        lines = text.splitlines()
        entries = _add_entries(lines if whole else lines[1:])
        if whole or (entries and int(entries[0]["modificationTime"]) <= modified_ms):
            return [entry for entry in entries if int(entry["modificationTime"]) > modified_ms]
        size *= 4


# --- the consumer's side ------------------------------------------------------------------------


def choose_generation(
    spark: SparkSession, paths: config.Paths, topic: str, current_id: str | None, log: logging.Logger
) -> int:
    """Return the generation to ingest into: a new one when the topic was recreated since the last run.

    Spark cannot rewind a checkpointed Kafka source: after a topic is deleted and recreated, it
    would skip the new topic's messages up to the old offsets. So the consumer keeps the topic's id
    with the checkpoint; when the id changes, it starts generation N+1, a new checkpoint and output
    subfolder (``generation_folder``) read from the new topic's earliest offset. The processor reads
    every generation. The record is written before the stream starts, so a failed run resumes the
    same generation.
    """
    state_path = f"{paths.checkpoint_consumer.rstrip('/')}/{GENERATION_STATE}"
    text = read_text(spark, state_path)
    state = json.loads(text) if text else {}
    generation = int(state.get("generation", 0))
    recorded = state.get("topic_id") if state.get("topic") == topic else None
    if current_id is None or current_id == recorded:
        return generation
    if recorded is not None:
        generation += 1
        log.warning(
            "topic %s was deleted and recreated (its id changed from %s to %s): reading it "
            "from its earliest offset into %s, with the checkpoint %s. What was ingested from the old topic "
            "stays in %s.",
            topic,
            recorded,
            current_id,
            generation_folder(paths.consumer_data, generation),
            generation_folder(paths.checkpoint_consumer, generation),
            paths.consumer_data,
        )
    state = {"topic": topic, "topic_id": current_id, "generation": generation}
    write_text(spark, state_path, json.dumps(state, indent=2) + "\n")
    return generation


def _latest_batch(spark: SparkSession, folder: str) -> int:
    """The highest batch id among a streaming log folder's files (``N`` or ``N.compact``); -1 if none."""
    ids = [
        int(match.group(1))
        for name in list_files(spark, f"{folder}/*")
        if (match := re.fullmatch(r"(\d+)(\.compact)?", name.rsplit("/", 1)[-1]))
    ]
    return max(ids, default=-1)


def check_sink_matches_checkpoint(spark: SparkSession, output: str, checkpoint: str) -> None:
    """Refuse to run when the file sink would silently skip the next batches.

    The parquet sink skips every batch whose id is not above the latest one in its
    ``_spark_metadata`` log. After a crash between the sink's log and the checkpoint's commit, the
    log is one batch ahead of the commits: Spark runs that batch again from its offsets log and the
    sink rightly skips it (its files are written). But when the log is ahead of the checkpoint's
    offsets log (the checkpoint was deleted, or belongs to other output), new data would be dropped
    without a word.

    Raises:
        CheckpointMismatchError: naming both folders and how to fix it.
    """
    sink_batch = _latest_batch(spark, f"{output.rstrip('/')}/{SINK_LOG}")
    if sink_batch < 0:
        return
    planned = _latest_batch(spark, f"{checkpoint.rstrip('/')}/offsets")
    if sink_batch > planned:
        raise CheckpointMismatchError(
            f"{output} holds a {SINK_LOG} log up to batch {sink_batch}, but the checkpoint "
            f"{checkpoint} has planned only up to batch {planned} (missing, or made for "
            "other output); Spark would silently skip the new batches. Restore the checkpoint that belongs "
            "to this output, or move the output aside (or point --consumer-data and --checkpoint-consumer "
            "at new folders) and consume again from the earliest offset."
        )
