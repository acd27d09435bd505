"""The data contracts between the stages: schemas, quality flags, the hour partition, per-series settings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from meter_stream import message as m
from meter_stream.session import local_frame

#: A step of a stage: one frame in, one out (``frame.transform(step)``).
Transform = Callable[[DataFrame], DataFrame]

# --- schemas -------------------------------------------------------------------------------------

#: Rows as the Kafka source delivers them; consumer_data keeps exactly these.
RAW_SCHEMA = T.StructType(
    [
        T.StructField("key", T.BinaryType()),
        T.StructField("value", T.BinaryType()),
        T.StructField("topic", T.StringType()),
        T.StructField("partition", T.IntegerType()),
        T.StructField("offset", T.LongType()),
        T.StructField("timestamp", T.TimestampType()),
        T.StructField("timestampType", T.IntegerType()),
    ]
)

#: processed_data: one typed row per measurement.
PROCESSED_SCHEMA = T.StructType(
    [
        T.StructField(m.T_MEASUREMENT, T.TimestampType()),
        T.StructField(m.T_REPORT, T.TimestampType()),
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField(m.VALUE, T.DoubleType()),
    ]
)

#: quarantine_data: a rejected raw record, why, and where it came from.
QUARANTINE_SCHEMA = T.StructType(
    [
        T.StructField("raw_value", T.StringType()),
        T.StructField("reason", T.StringType()),
        T.StructField("topic", T.StringType()),
        T.StructField("partition", T.IntegerType()),
        T.StructField("offset", T.LongType()),
    ]
)

#: quarantine_data reasons of a meter clock fault, which the processor sets and the checker counts: a
#: t_measurement outside 2000-2100 (a reset clock, or milliseconds sent as seconds), too far ahead of the
#: record's arrival at the broker (Kafka's ``timestamp``), or older than the lateness horizon before it.
REASON_IMPLAUSIBLE_TIMESTAMP = "implausible_timestamp:"  # followed by the field's name
REASON_AHEAD_OF_ARRIVAL = "ahead_of_arrival:" + m.T_MEASUREMENT
REASON_BEYOND_LATENESS = "beyond_lateness_horizon:" + m.T_MEASUREMENT
CLOCK_FAULT_REASONS = (REASON_IMPLAUSIBLE_TIMESTAMP + m.T_MEASUREMENT, REASON_AHEAD_OF_ARRIVAL, REASON_BEYOND_LATENESS)

QUALITY = "quality"

#: cleaned_data: one row per series and slot; t_measurement is the slot's start.
CLEANED_SCHEMA = T.StructType(
    [
        T.StructField(m.T_MEASUREMENT, T.TimestampType()),
        T.StructField(m.T_REPORT, T.TimestampType()),
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField(m.VALUE, T.DoubleType()),
        T.StructField(QUALITY, T.StringType()),
    ]
)

#: unknown_series: series outside the expected catalog, as the cleaner saw them.
UNKNOWN_SERIES_SCHEMA = T.StructType(
    [
        T.StructField(m.DEVICE_ID, T.StringType()),
        T.StructField(m.SIGNAL_NAME, T.StringType()),
        T.StructField("rows", T.LongType()),
    ]
)

#: The quality flags of cleaned_data: a measured slot, a slot filled by one of the cleaner's fill
#: methods (its flag says which), and a slot left empty because its hole is longer than ``max_gap``.
MEASURED = "measured"
INTERPOLATED = "interpolated"
FORWARD_FILLED = "forward_filled"
BACKWARD_FILLED = "backward_filled"
NEAREST_FILLED = "nearest_filled"
ZERO_FILLED = "zero_filled"
MISSING = "missing"
FILLED_FLAGS = (INTERPOLATED, FORWARD_FILLED, BACKWARD_FILLED, NEAREST_FILLED, ZERO_FILLED)
QUALITY_FLAGS = (MEASURED, *FILLED_FLAGS, MISSING)


# --- the hour partition --------------------------------------------------------------------------

#: processed_data and cleaned_data are partitioned by the UTC hour of t_measurement, so that a live
#: cycle rewrites only the hours new data touches: folders ``hour=2026112514`` (yyyyMMddHH). The
#: value is a number, not text: Spark sorts the rows by it before a partitioned write, and text
#: whose first characters are alike in every row sorts slowly (BENCHMARKS.md, "Settings").
PARTITION = "hour"
PARTITION_FORMAT = "yyyyMMddHH"


# --- time units: Spark's timestamps are microseconds since the epoch (UTC) ---------------------------

#: Microseconds in a second.
MICROS = 1_000_000
_HOUR_MICROS = 3600 * MICROS


def to_micros(seconds: float) -> int:
    """Seconds (a duration or epoch seconds) as whole microseconds."""
    return int(seconds * MICROS)


def utc_datetime(micros: int) -> datetime:
    """Epoch microseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(micros / MICROS, UTC)


def epoch_seconds(timestamp: Column) -> Column:
    """A timestamp column as epoch seconds (a double)."""
    return F.unix_micros(timestamp) / MICROS


def hour_of(timestamp: Column) -> Column:
    """The partition value of a timestamp: its UTC hour as the number yyyyMMddHH.

    Computed from the epoch microseconds with integer steps and the calendar of the day, not
    formatted as text and parsed back (half the time per row), and whatever the session's time zone.
    """
    micros = F.unix_micros(timestamp)
    # An exact multiple of an hour, so the division is exact.
    hours = ((micros - F.pmod(micros, F.lit(_HOUR_MICROS))) / F.lit(_HOUR_MICROS)).cast(T.LongType())
    day = F.date_from_unix_date(F.floor(hours / 24).cast(T.IntegerType()))
    return (
        F.year(day).cast(T.LongType()) * 1_000_000
        + F.month(day) * 10_000
        + F.dayofmonth(day) * 100
        + F.pmod(hours, F.lit(24))
    )


def hour_value(moment: datetime) -> int:
    """The partition value (``hour_of``) of an aware datetime."""
    return int(moment.astimezone(UTC).strftime("%Y%m%d%H"))


def with_hour(rows: DataFrame) -> DataFrame:
    """Add the partition column: the UTC hour (``hour_of``) of t_measurement."""
    return rows.withColumn(PARTITION, hour_of(F.col(m.T_MEASUREMENT)))


# --- series and per-series settings --------------------------------------------------------------

#: The columns that name a series.
SERIES_KEYS = [m.DEVICE_ID, m.SIGNAL_NAME]
#: A frame of series names: the catalog's schema.
SERIES_KEYS_SCHEMA = T.StructType([T.StructField(key, T.StringType()) for key in SERIES_KEYS])


def series_catalog(spark: SparkSession, series: Sequence[tuple[str, str]] | None) -> DataFrame | None:
    """A catalog of (device_id, signal_name) as a small frame, each series once; None for None (every series)."""
    if series is None:
        return None
    return local_frame(spark, sorted(set(series)), SERIES_KEYS_SCHEMA)


def per_series(settings: Mapping[str, object], default: object) -> Column:
    """Each row's setting: its series' (key ``device/signal``), else its signal's, else ``default``.

    Resolved with two lookups in literal maps (the settings are small), not per series in Python.
    """
    series = F.concat_ws(m.SERIES_SEPARATOR, m.DEVICE_ID, m.SIGNAL_NAME)
    by_series = {key: value for key, value in settings.items() if m.SERIES_SEPARATOR in key}
    by_signal = {key: value for key, value in settings.items() if m.SERIES_SEPARATOR not in key}
    lookups = [
        F.try_element_at(F.create_map(*[F.lit(x) for pair in mapping.items() for x in pair]), key)
        for mapping, key in ((by_series, series), (by_signal, F.col(m.SIGNAL_NAME)))
        if mapping
    ]
    return F.coalesce(*lookups, F.lit(default))
