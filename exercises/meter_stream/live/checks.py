"""The live checks: the new grid rows' figures continued from each series' state, the running figures of the
report window, and the report."""

from __future__ import annotations

import time

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from meter_stream import check_figures, check_report, checker, cleaner, config
from meter_stream import message as m
from meter_stream.contracts import (
    PARTITION,
    UNKNOWN_SERIES_SCHEMA,
    to_micros,
)
from meter_stream.live.store import (
    FIGURES,
    FIGURES_SCHEMA,
    KEYS,
    REPLACES,
    SERIES_STATE_SCHEMA,
    Cursor,
    Settings,
    conform,
    hour_of_micros,
    read_figures,
    write_state,
)
from meter_stream.locks import stage_lock
from meter_stream.session import local_frame
from meter_stream.storage import (
    path_exists,
    replace_output,
)

log = config.get_logger("live")


def check_state(rows: DataFrame, settings: Settings) -> tuple[DataFrame, DataFrame]:
    """Annotate the cycle's grid rows (``cycle.Grid.rows``) for the checks; return (figures per series and
    hour, state updates).

    The state updates are, per series with new rows: its last slot and value, the flat run it ends
    with and the tail of its last ``spike_window`` values, from which the next cycle's checks go on.
    One aggregation per (series, hour) gives the figures and each hour's last slot, value, flat run
    and values; the updates come from those few rows per series (about half the time of two
    aggregations over persisted rows: BENCHMARKS.md, "Settings").
    """
    config_ = settings.checker
    window = config_.spike_window
    slot = F.unix_micros(m.T_MEASUREMENT)
    # The values in slot order, nulls included (a struct is never null); the last `window` of them.
    values = F.array_sort(F.collect_list(F.struct(slot.alias("slot"), F.col(m.VALUE).alias("value"))))
    hourly = (
        rows.transform(check_figures.annotate_rows(config_))
        .transform(
            check_figures.series_figures(
                config_,
                PARTITION,
                REPLACES,
                extra=[
                    F.max(slot).alias("_last_slot"),
                    F.max_by(m.VALUE, slot).alias("_last_value"),
                    F.max_by("_flat_run", slot).cast("long").alias("_last_flat_run"),
                    _last(values, window).alias("_values"),
                ],
            )
        )
        .persist()
    )
    figures = hourly.drop("_last_slot", "_last_value", "_last_flat_run", "_values")
    hours = F.array_sort(F.collect_list(F.struct(F.col("_last_slot"), F.col("_values"))))
    # Read once, by the state's merge: not persisted.
    updates = hourly.groupBy(*KEYS).agg(
        F.max("_last_slot").alias("last_slot"),
        F.max_by("_last_value", "_last_slot").alias("last_value"),
        F.max_by("_last_flat_run", "_last_slot").alias("flat_run"),
        _last(F.transform(F.flatten(F.transform(hours, lambda x: x["_values"])), lambda x: x["value"]), window).alias(
            "values"
        ),
        F.max(REPLACES).alias(REPLACES),
    )
    return figures, updates


def _last(items: Column, count: int) -> Column:
    """The last ``count`` elements of an array (all of a shorter one)."""
    return F.slice(items, F.greatest(F.size(items) - count + 1, F.lit(1)), count)


def update_figures(
    spark: SparkSession,
    paths: config.Paths,
    settings: Settings,
    cursor: Cursor,
    new: DataFrame,
    newest: int | None,
    cycle: int,
) -> DataFrame:
    """Write, and return, the running check figures per series and hour of the report window after this cycle.

    New rows' figures add to their (series, hour); a recomputed series' figures replace its old
    ones for the hours it was recomputed in (they cover those hours whole).
    """
    old = read_figures(spark, paths, cursor.cycle)
    replaced = new.where(F.col(REPLACES)).select(*KEYS, PARTITION)
    old = old.join(replaced, [*KEYS, PARTITION], "left_anti")
    newest = max(filter(None, [cursor.newest, newest]), default=None)
    merged = old.unionByName(new.drop(REPLACES))
    figures = merged.groupBy(*KEYS, PARTITION).agg(
        *[F.sum(name).alias(name) for name in check_figures.SUMMED_FIGURES],
        *[F.max(name).alias(name) for name in check_figures.LARGEST_FIGURES],
    )
    if newest is not None:
        since = hour_of_micros(newest - to_micros(settings.report_window_seconds))
        figures = figures.where(F.col(PARTITION) >= since)
    write_state(conform(figures, FIGURES_SCHEMA), paths, FIGURES, cycle)
    return read_figures(spark, paths, cycle)


#: The columns of ``check_state``'s updates besides the series keys.
GRID_UPDATES = ("last_slot", "last_value", "flat_run", "values", REPLACES)
#: The state's columns besides the series keys.
STATE_COLUMNS = tuple(name for name in SERIES_STATE_SCHEMA.fieldNames() if name not in KEYS)


def merge_state(state: DataFrame, processed: DataFrame, grid: DataFrame, window: int) -> DataFrame:
    """The per-series state after a cycle: the old rows with the processor's and the cleaner's updates.

    A grown series' tail is its old tail and the new values, the last ``window`` of them; a
    recomputed one's is its new values.
    """
    old = state.select(*KEYS, *[F.col(c).alias(f"old_{c}") for c in STATE_COLUMNS])
    gained = processed.select(*KEYS, F.col("rows").alias("new_rows"), F.col("max_t").alias("new_max_t"))
    grown = grid.select(*KEYS, F.lit(True).alias("_grown"), *[F.col(c).alias(f"new_{c}") for c in GRID_UPDATES])
    merged = old.join(gained, KEYS, "full").join(grown, KEYS, "full")
    none = F.array().cast("array<double>")
    carried = F.when(F.col(f"new_{REPLACES}"), none).otherwise(F.coalesce("old_tail", none))
    new = {
        "last_slot": F.col("new_last_slot"),
        "last_value": F.col("new_last_value"),
        "flat_run": F.col("new_flat_run"),
        "tail": _last(F.concat(carried, "new_values"), window),
    }
    return merged.select(
        *KEYS,
        (F.coalesce("old_rows", F.lit(0)) + F.coalesce("new_rows", F.lit(0))).alias("rows"),
        F.greatest("old_max_t", "new_max_t").alias("max_t"),
        *[F.when(F.col("_grown"), column).otherwise(F.col(f"old_{name}")).alias(name) for name, column in new.items()],
    )


def write_unknown(spark: SparkSession, paths: config.Paths, config_: cleaner.CleanerConfig, state: DataFrame) -> None:
    """Write unknown_series from the state: the series outside the catalog, with their rows (none without one)."""
    catalog = cleaner.catalog_frame(spark, config_)
    if catalog is None:
        if not path_exists(spark, paths.unknown_series):
            replace_output(local_frame(spark, [], UNKNOWN_SERIES_SCHEMA), paths.unknown_series, log)
        return
    unknown = state.join(F.broadcast(catalog), KEYS, "left_anti").where(F.col("rows") > 0).select(*KEYS, "rows")
    replace_output(unknown, paths.unknown_series, log)


def write_report(
    spark: SparkSession,
    paths: config.Paths,
    config_: check_figures.CheckerConfig,
    figures: DataFrame,
    written: DataFrame,
    clock_faults: dict[str, int],
) -> int:
    """Check the running figures of the report window, write the report; return the checker's exit code.

    Args:
        written: the cleaned_data rows this cycle wrote: the schema check is of their columns (the full
            run's checker checked the files before them).
        clock_faults: quarantine_data's rows per clock-fault reason.
    """
    with stage_lock(paths.reports, checker.STAGE, checker.log, spark):
        started = time.monotonic()
        problems = checker.schema_problems(written)
        observed = problems or "as declared (the rows this cycle wrote)"
        schema = check_report.Result("schema", checker.ERROR, not problems, observed, "cleaned_data contract")
        metrics = check_figures.summarize_figures(figures)
        results, _listed = checker.evaluate(metrics, checker.read_unknown(spark, paths), config_, [schema])
        results.append(checker.clock_fault_result(clock_faults))
        checker.log_outcome(results, checker.write_report(spark, paths, results), started)
        return checker.exit_code(results)
