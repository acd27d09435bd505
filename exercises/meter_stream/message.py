"""The measurement message format: one JSON object per Kafka message value.

This is the one definition of the field names shared by the producer, the reader and the stages.
It imports nothing but the standard library, so the producer's image needs no Spark.
"""

from __future__ import annotations

T_MEASUREMENT = "t_measurement"
T_REPORT = "t_report"
DEVICE_ID = "device_id"
SIGNAL_NAME = "signal_name"
VALUE = "value"

#: Field order of a message, as in ``example_data/measurement_values.json``.
FIELDS = (T_MEASUREMENT, T_REPORT, DEVICE_ID, SIGNAL_NAME, VALUE)

DEFAULT_TOPIC = "mytopic"
DEFAULT_BOOTSTRAP_SERVERS = "127.0.0.1:9093"

SIGNAL_IMPORT = "energy import"
SIGNAL_EXPORT = "energy export"

#: The series the pipeline expects by default: (device_id, signal_name).
EXPECTED_SERIES = (
    ("device1", SIGNAL_EXPORT),
    ("device1", SIGNAL_IMPORT),
    ("device2", SIGNAL_EXPORT),
    ("device2", SIGNAL_IMPORT),
)

#: Separator of a series' display name, ``device1/energy import``.
SERIES_SEPARATOR = "/"


def series_name(device_id: str, signal_name: str) -> str:
    """Return the display name of a series, ``device_id/signal_name``."""
    return f"{device_id}{SERIES_SEPARATOR}{signal_name}"


def parse_series_name(name: str) -> tuple[str, str]:
    """Split ``device_id/signal_name`` into its two parts.

    Raises:
        ValueError: when the name has no separator or an empty part.
    """
    device_id, sep, signal_name = name.partition(SERIES_SEPARATOR)
    if not sep or not device_id.strip() or not signal_name.strip():
        raise ValueError(f"series {name!r} is not of the form 'device_id/signal_name'")
    return device_id.strip(), signal_name.strip()


def make_message(
    t_measurement: float, t_report: float, device_id: str, signal_name: str, value: float
) -> dict[str, object]:
    """Return one measurement message as a dict with the fields in their canonical order."""
    return {
        T_MEASUREMENT: t_measurement,
        T_REPORT: t_report,
        DEVICE_ID: device_id,
        SIGNAL_NAME: signal_name,
        VALUE: value,
    }
