"""Late measurements in a live cycle: merged into the processed hours they fall in, and the grid of their
series recomputed from the measurement before them, the hours it touches rewritten."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from meter_stream import cleaner, config, processor
from meter_stream import message as m
from meter_stream.contracts import CLEANED_SCHEMA, PARTITION, PROCESSED_SCHEMA, RAW_SCHEMA, to_micros, with_hour
from meter_stream.live.store import KEYS, hour_of_micros, rewrite_hours
from meter_stream.session import one_row
from meter_stream.storage import read_partitioned


def merge_late(
    spark: SparkSession,
    paths: config.Paths,
    late: DataFrame,
    appended: DataFrame,
    late_hours: list[int],
    updates: DataFrame,
    cycle: int,
) -> DataFrame:
    """Rewrite the hours late measurements fall in, collapsed with their stored rows; return the updates.

    The cycle's fresh measurements in those hours go into the rewrite instead of being appended.
    The returned per-series updates (rows gained, latest t_measurement) count the rewrite in.
    """
    stored = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA, late_hours).drop(PARTITION)
    kafka = [F.lit(None).cast(RAW_SCHEMA[c].dataType).alias(c) for c in ("topic", "partition", "offset")]
    candidates = (
        stored.select("*", *kafka)
        .unionByName(appended.where(F.col(PARTITION).isin(*late_hours)).drop(PARTITION).select("*", *kafka))
        .withColumn("reason", F.lit(None).cast("string"))
        .unionByName(late.select(*PROCESSED_SCHEMA.fieldNames(), "topic", "partition", "offset", "reason"))
    )
    merged = processor.collapse_replays(candidates, with_partition=True).localCheckpoint()
    # Counted before the swap: afterwards the stored files are in the undo folder.
    delta = (
        merged.groupBy(*KEYS)
        .agg(F.count(F.lit(1)).alias("rows"))
        .join(stored.groupBy(*KEYS).agg(F.count(F.lit(1)).alias("old")), KEYS, "full")
        .select(*KEYS, (F.coalesce("rows", F.lit(0)) - F.coalesce("old", F.lit(0))).alias("rows"))
        .localCheckpoint()
    )
    rewrite_hours(merged, paths.processed_data, late_hours, cycle)
    late_max = late.groupBy(*KEYS).agg(F.max(m.T_MEASUREMENT).alias("max_t"))
    updates = (
        updates.join(appended.where(F.col(PARTITION).isin(*late_hours)).groupBy(*KEYS).count(), KEYS, "left")
        .select(*KEYS, (F.col("rows") - F.coalesce("count", F.lit(0))).alias("rows"), "max_t")
        .unionByName(delta.withColumn("max_t", F.lit(None).cast("timestamp")))
        .unionByName(late_max.withColumn("rows", F.lit(0).cast("long")))
        .groupBy(*KEYS)
        .agg(F.sum("rows").alias("rows"), F.max("max_t").alias("max_t"))
    )
    return updates


def recompute_late(
    spark: SparkSession,
    paths: config.Paths,
    config_: cleaner.CleanerConfig,
    late: DataFrame,
    grown: DataFrame,
    cycle: int,
) -> tuple[DataFrame, list[int], int | None]:
    """Recompute the grid of series with late measurements and rewrite the hours it touches.

    Each series is recomputed from its anchor (``recompute_regions``) to its end. The rewritten
    hours keep the other series' rows and get the cycle's grown rows for them.

    Returns:
        The rewritten hours' rows (cleaned columns and hour), the hours, and the newest recomputed slot
        (epoch micros).
    """
    slot = cleaner.slot_start(F.unix_micros(m.T_MEASUREMENT), to_micros(config_.slot_seconds))
    processed = read_partitioned(spark, paths.processed_data, PROCESSED_SCHEMA).withColumn("slot", slot)
    regions = recompute_regions(processed, late, config_)
    start = one_row(regions.agg(F.min("start")))[0]
    changed = (
        processed.where(F.col(PARTITION) >= hour_of_micros(start))
        .join(regions, KEYS)
        .where(F.col("slot") >= F.col("start"))
        .select(*PROCESSED_SCHEMA.fieldNames())
    )
    recomputed = with_hour(cleaner.clean(changed, config_, None)[0]).persist()
    # The hours the recomputed slots fall in, with the newest slot of each: a handful, not data.
    ends = recomputed.groupBy(PARTITION).agg(F.max(F.unix_micros(m.T_MEASUREMENT))).collect()
    hours = sorted(hour for hour, _newest in ends)
    kept = (
        read_partitioned(spark, paths.cleaned_data, CLEANED_SCHEMA, hours)
        .join(regions, KEYS, "left")
        .where(F.col("start").isNull() | (F.unix_micros(m.T_MEASUREMENT) < F.col("start")))
        .select(*CLEANED_SCHEMA.fieldNames(), PARTITION)
    )
    content = kept.unionByName(recomputed).unionByName(grown.where(F.col(PARTITION).isin(*hours))).localCheckpoint()
    rewrite_hours(content, paths.cleaned_data, hours, cycle)
    return content, hours, max((newest for _hour, newest in ends), default=None)


def recompute_regions(processed: DataFrame, late: DataFrame, config_: cleaner.CleanerConfig) -> DataFrame:
    """Per series with late measurements, the slot its grid is recomputed from (``start``): its anchor.

    The anchor is the last measured slot before the series' earliest late one, looked for in the
    last ``max_gap + slot`` seconds first and only for a series without one there in all of
    ``processed`` (rows with their ``slot``); without any, the late slot itself.
    """
    lookback = to_micros(config_.max_gap_seconds + config_.slot_seconds)
    # From the start of the slot of the earliest late measurement: its slot may change its value.
    late = late.withColumn("since", cleaner.slot_start(F.col("since"), to_micros(config_.slot_seconds)))
    # Scalars that bound the partitions read: one aggregate row.
    earliest = one_row(late.agg(F.min("since")))[0]
    anchors = (
        processed.where(F.col(PARTITION) >= hour_of_micros(earliest - lookback))
        .join(late, KEYS)
        .where((F.col("slot") < F.col("since")) & (F.col("slot") >= F.col("since") - lookback))
        .groupBy(*KEYS)
        .agg(F.max("slot").alias("anchor"))
    )
    regions = late.join(anchors, KEYS, "left")
    far = regions.where(F.col("anchor").isNull()).select(*KEYS, "since").persist()
    if not far.isEmpty():
        far_anchors = (
            processed.join(far, KEYS)
            .where(F.col("slot") < F.col("since"))
            .groupBy(*KEYS)
            .agg(F.max("slot").alias("far"))
        )
        regions = regions.join(far_anchors, KEYS, "left").withColumn("anchor", F.coalesce("anchor", "far"))
    return regions.select(*KEYS, F.coalesce("anchor", "since").alias("start")).persist()
