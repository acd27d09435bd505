"""The checks' thresholds and figures: per-series figures of grid rows in one window pass and one aggregation.

``checker`` evaluates its checks on them (``series_metrics``) against the thresholds of ``CheckerConfig``;
the live runner keeps them per series and hour and carries a series' context (``CARRY_*``) from one
cycle's rows to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from meter_stream import config
from meter_stream import message as m
from meter_stream.contracts import MEASURED, MICROS, MISSING, QUALITY, Transform, per_series, to_micros


@dataclass(frozen=True)
class CheckerConfig:
    """Thresholds of the checks.

    Attributes:
        expected_series: (device_id, signal_name) that must be present; None skips that check.
        slot_seconds: the grid's slot length.
        bounds: plausible (low, high) values by signal name or by ``device/signal``; the series wins.
        default_bounds: bounds for a series that ``bounds`` does not name.
        max_filled_share: the largest share of filled slots in a series (error).
        max_filled_run: the longest run of consecutive filled slots (warn).
        max_missing_slots: the most slots flagged missing (warn).
        max_report_before_share: the largest share of measurements reported before their slot (warn).
        max_report_delay_seconds: the longest time from slot start to report (warn).
        max_flat_slots: the longest run of one unchanged value (warn).
        spike_window: how many previous slots a value is compared with.
        spike_sigmas: how many standard deviations from their mean make a spike.
        spike_min_deviation: a deviation smaller than this is never a spike.
        spike_min_relative: nor is one smaller than this share of the recent mean (after a flat
            stretch the spread is 0, and a small step is a change, not a spike).
        max_spikes: the most spikes per series (warn).
        max_series_in_report: per-series entries are listed for at most this many series (the
            worst first); every series still counts toward pass/fail.
    """

    expected_series: tuple[tuple[str, str], ...] | None = m.EXPECTED_SERIES
    slot_seconds: int = config.DEFAULT_SLOT_SECONDS
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    default_bounds: tuple[float, float] = (0.0, 1000.0)
    max_filled_share: float = 0.7
    max_filled_run: int = 30
    max_missing_slots: int = 0
    max_report_before_share: float = 0.0
    max_report_delay_seconds: float = 3600.0
    max_flat_slots: int = 60
    spike_window: int = 30
    spike_sigmas: float = 6.0
    spike_min_deviation: float = 1.0
    spike_min_relative: float = 0.5
    max_spikes: int = 0
    max_series_in_report: int = 100


def _bounds_column(config_: CheckerConfig, index: int) -> Column:
    """The low (index 0) or high (index 1) plausible bound of each row's series (``per_series``)."""
    bounds = {name: float(pair[index]) for name, pair in config_.bounds.items()}
    return per_series(bounds, float(config_.default_bounds[index]))


#: Figures of a part of a series (an hour, a live cycle's new rows) that add up over the parts...
SUMMED_FIGURES = (
    "slots",
    "measured",
    "filled",
    "missing_slots",
    "duplicate_slots",
    "irregular_steps",
    "negative_values",
    "out_of_bounds",
    "reported_before",
    "spikes",
    "null_keys",
)
#: ... and those whose largest part is the series' figure.
LARGEST_FIGURES = ("report_delay_seconds", "longest_filled_run", "longest_flat_run")
#: Optional input columns of ``annotate_rows``: what came before a series' first row, when the rows
#: continue a series (the live runner's new rows): its last slot and value, its last ``spike_window``
#: values (oldest first, nulls included) and the run of one unchanged value it ended with.
CARRY_SLOT = "_carry_slot"
CARRY_VALUE = "_carry_value"
CARRY_TAIL = "_carry_tail"
FLAT_CARRY = "_flat_carry"
_KEYS = (m.T_MEASUREMENT, m.DEVICE_ID, m.SIGNAL_NAME, QUALITY)


def annotate_rows(config_: CheckerConfig) -> Transform:
    """Return a transform: grid rows -> the same rows with what the figures need of their neighbours.

    One window per series ordered by slot gives each row its predecessor, the length of the
    filled run and of the flat run it ends, and the mean and spread of the previous
    ``spike_window`` values. A series' first row takes its predecessor, and the values before it,
    from the carried columns when they are given.
    """
    window = config_.spike_window

    def transform(rows: DataFrame) -> DataFrame:
        carried = {
            CARRY_SLOT: F.lit(None).cast("long"),
            CARRY_VALUE: F.lit(None).cast("double"),
            CARRY_TAIL: F.lit(None).cast("array<double>"),
            FLAT_CARRY: F.lit(0).cast("long"),
        }
        rows = rows.select("*", *[column.alias(name) for name, column in carried.items() if name not in rows.columns])
        ordered = Window.partitionBy(m.DEVICE_ID, m.SIGNAL_NAME).orderBy(m.T_MEASUREMENT)
        so_far = ordered.rowsBetween(Window.unboundedPreceding, Window.currentRow)
        slot = F.unix_micros(m.T_MEASUREMENT)
        value = F.col(m.VALUE)
        is_filled = ~F.col(QUALITY).isin(MEASURED, MISSING)
        recent_rows = ordered.rowsBetween(-window, -1)
        with_context = rows.select(
            "*",
            F.row_number().over(ordered).alias("_index"),
            (slot - F.coalesce(F.lag(slot).over(ordered), F.col(CARRY_SLOT))).alias("_spacing"),
            F.lag(value).over(ordered).alias("_lag_value"),
            F.count(value).over(recent_rows).alias("_recent_n"),
            F.sum(value).over(recent_rows).alias("_recent_sum"),
            F.sum(value * value).over(recent_rows).alias("_recent_squares"),
        )
        index = F.col("_index")
        count, mean, spread = _recent_statistics(window, index)
        previous_value = F.when(index == 1, F.col(CARRY_VALUE)).otherwise(F.col("_lag_value"))
        run_break = F.when(~is_filled, index).otherwise(0)
        last_change = F.max(F.when(~value.eqNullSafe(previous_value), index)).over(so_far)
        # Only against a full window of recent values: the first few values of a series say little.
        is_spike = (count >= window) & (F.abs(value - mean) > _spike_threshold(config_, mean, spread))
        return with_context.select(
            "*",
            (index - F.max(run_break).over(so_far)).alias("_filled_run"),
            F.when(last_change.isNull(), index + F.coalesce(F.col(FLAT_CARRY), F.lit(0)))
            .otherwise(index - last_change + 1)
            .alias("_flat_run"),
            F.coalesce(is_spike, F.lit(False)).alias("_spike"),
        )

    return transform


def _recent_statistics(window: int, index: Column) -> tuple[Column, Column, Column]:
    """Count, mean and spread of a row's previous ``window`` values (``_recent_*`` columns).

    A series' first rows' windows reach back into the carried values (nulls left out, as sums
    leave them).
    """
    from_tail = F.lit(window) - (index - 1)
    tail = F.filter(
        F.slice(F.col(CARRY_TAIL), F.greatest(F.size(CARRY_TAIL) - from_tail + 1, F.lit(1)), window),
        lambda x: x.isNotNull(),
    )
    reaches_tail = (index <= window) & F.col(CARRY_TAIL).isNotNull()

    def with_tail(here: Column, of_tail: Column) -> Column:
        return F.coalesce(here, F.lit(0)) + F.when(reaches_tail, of_tail).otherwise(0)

    count = with_tail(F.col("_recent_n"), F.size(tail))
    mean = F.try_divide(with_tail(F.col("_recent_sum"), F.aggregate(tail, F.lit(0.0), lambda a, x: a + x)), count)
    squares = with_tail(F.col("_recent_squares"), F.aggregate(tail, F.lit(0.0), lambda a, x: a + x * x))
    spread = F.sqrt(F.greatest(F.try_divide(squares, count) - mean * mean, F.lit(0.0)))
    return count, mean, spread


def _spike_threshold(config_: CheckerConfig, mean: Column, spread: Column) -> Column:
    """How far a value may be from the recent mean before it is a spike."""
    return F.greatest(
        spread * config_.spike_sigmas,
        F.abs(mean) * config_.spike_min_relative,
        F.lit(config_.spike_min_deviation),
    )


def series_figures(config_: CheckerConfig, *keys: str, extra: Sequence[Column] = ()) -> Transform:
    """Return a transform: annotated rows -> their figures per series (and ``keys``), and ``extra`` aggregates."""
    step_micros = to_micros(config_.slot_seconds)

    def transform(annotated: DataFrame) -> DataFrame:
        slot = F.unix_micros(m.T_MEASUREMENT)
        value = F.col(m.VALUE)
        measured = F.col(QUALITY) == MEASURED
        report_lag = F.unix_micros(m.T_REPORT) - slot
        return annotated.groupBy(m.DEVICE_ID, m.SIGNAL_NAME, *keys).agg(
            F.count(F.lit(1)).alias("slots"),
            F.count_if(measured).alias("measured"),
            F.count_if(~F.col(QUALITY).isin(MEASURED, MISSING)).alias("filled"),
            F.count_if(F.col(QUALITY) == MISSING).alias("missing_slots"),
            F.count_if(F.col("_spacing") == 0).alias("duplicate_slots"),
            # A repeated slot (spacing 0) is unique_slots' finding, not a hole in the grid.
            F.count_if(
                (F.col("_spacing") != step_micros) & (F.col("_spacing") != 0) | (F.pmod(slot, F.lit(step_micros)) != 0)
            ).alias("irregular_steps"),
            F.count_if(value < 0).alias("negative_values"),
            F.count_if((value < _bounds_column(config_, 0)) | (value > _bounds_column(config_, 1))).alias(
                "out_of_bounds"
            ),
            F.count_if(measured & (report_lag < 0)).alias("reported_before"),
            F.count_if("_spike").alias("spikes"),
            F.count_if(F.greatest(*[F.col(k).isNull() for k in _KEYS])).alias("null_keys"),
            (F.max(F.when(measured, report_lag)) / MICROS).alias("report_delay_seconds"),
            F.max("_filled_run").alias("longest_filled_run"),
            F.max(F.when(value.isNotNull(), F.col("_flat_run"))).alias("longest_flat_run"),
            *extra,
        )

    return transform


def summarize_figures(figures: DataFrame) -> DataFrame:
    """Return one row of metrics per series from figures of its parts (``series_figures``)."""
    return (
        figures.groupBy(m.DEVICE_ID, m.SIGNAL_NAME)
        .agg(
            *[F.sum(name).alias(name) for name in SUMMED_FIGURES],
            *[F.max(name).alias(name) for name in LARGEST_FIGURES],
        )
        .select(
            m.DEVICE_ID,
            m.SIGNAL_NAME,
            *SUMMED_FIGURES,
            (F.col("reported_before") / F.greatest(F.col("measured"), F.lit(1))).alias("report_before_share"),
            *[F.coalesce(F.col(name), F.lit(0)).alias(name) for name in LARGEST_FIGURES],
            (F.col("filled") / F.col("slots")).alias("filled_share"),
        )
    )


def series_metrics(config_: CheckerConfig) -> Transform:
    """Return a transform: cleaned_data -> one row of metrics per series (one window pass, one aggregation)."""

    def transform(cleaned: DataFrame) -> DataFrame:
        return cleaned.transform(annotate_rows(config_)).transform(series_figures(config_)).transform(summarize_figures)

    return transform
