"""The checker's presentation: its results and per-series summary as tables, and a chart of a few series.

The checks themselves are in ``checker.py``; this module only shows what they found.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pyspark.sql import DataFrame, Row
from pyspark.sql import functions as F

from meter_stream import config
from meter_stream import message as m
from meter_stream.contracts import MEASURED, MISSING, QUALITY, SERIES_KEYS_SCHEMA
from meter_stream.session import local_frame
from meter_stream.storage import write_bytes

log = config.get_logger("checker")


@dataclass
class Result:
    """One line of the report."""

    name: str
    severity: str
    passed: bool
    observed: object
    threshold: object
    series: str | None = None


CHART_FILE = "cleaned_series.png"
#: The chart shows at most this many series (by name) over the last CHART_HOURS of data.
CHART_SERIES = 8
CHART_HOURS = 24


def show(cleaned: DataFrame, listed: Sequence[Row], results: Sequence[Result], chart_path: str) -> None:
    """Print the per-series summary and the results, and draw the chart of the listed series to ``chart_path``."""
    if listed:
        print(format_summary(listed) + "\n")
        series = sorted((r[m.DEVICE_ID], r[m.SIGNAL_NAME]) for r in listed)[:CHART_SERIES]
        # The chart needs its points in the driver: a few series over a bounded time span.
        points = chart_points(cleaned, series).collect()
        draw_chart(points, lambda png: write_bytes(cleaned.sparkSession, chart_path, png))
        log.info("chart of %d series: %s", len(series), chart_path)
    print(format_table(results))


def format_table(results: Sequence[Result]) -> str:
    """Return the results as a fixed-width table."""
    header = ("check", "severity", "series", "result", "observed", "threshold")
    rows = [
        (
            r.name,
            r.severity,
            r.series or "-",
            "pass" if r.passed else "FAIL",
            json.dumps(r.observed, default=str)[:60],
            json.dumps(r.threshold, default=str)[:30],
        )
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def format_summary(listed: Sequence[Row]) -> str:
    """Return the per-series summary (slots, measured, filled, missing, share filled) as a table."""
    header = ("series", "slots", "measured", "filled", "missing", "filled share")
    rows = [
        (
            m.series_name(r[m.DEVICE_ID], r[m.SIGNAL_NAME]),
            r["slots"],
            r["measured"],
            r["filled"],
            r["missing_slots"],
            f"{r['filled_share']:.1%}",
        )
        for r in sorted(listed, key=lambda r: (r[m.DEVICE_ID], r[m.SIGNAL_NAME]))
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def chart_points(cleaned: DataFrame, series: list[tuple[str, str]]) -> DataFrame:
    """The rows the chart draws: the given series over the last CHART_HOURS of their data."""
    catalog = local_frame(cleaned.sparkSession, series, SERIES_KEYS_SCHEMA)
    chosen = cleaned.join(F.broadcast(catalog), on=[m.DEVICE_ID, m.SIGNAL_NAME], how="left_semi")
    newest = chosen.agg(F.max(m.T_MEASUREMENT).alias("newest"))
    return (
        chosen.crossJoin(newest)
        .where(F.col(m.T_MEASUREMENT) > F.col("newest") - F.expr(f"INTERVAL {CHART_HOURS} HOURS"))
        .select(m.DEVICE_ID, m.SIGNAL_NAME, m.T_MEASUREMENT, m.VALUE, QUALITY)
    )


def draw_chart(points: Sequence[Row], png_path_writer: Callable[[bytes], None]) -> None:
    """Draw one panel per series: measured dots, filled rings, missing stretches shaded.

    Args:
        points: rows of ``chart_points``, any order.
        png_path_writer: called with the PNG bytes.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    by_series: dict[str, list[Row]] = {}
    for row in sorted(points, key=lambda r: (r[m.DEVICE_ID], r[m.SIGNAL_NAME], r[m.T_MEASUREMENT])):
        by_series.setdefault(m.series_name(row[m.DEVICE_ID], row[m.SIGNAL_NAME]), []).append(row)
    figure, axes = plt.subplots(
        max(1, len(by_series)), 1, sharex=True, squeeze=False, figsize=(12, 2.2 * max(1, len(by_series)) + 0.8)
    )
    for axis, (name, rows) in zip(axes[:, 0], by_series.items(), strict=False):
        _draw_series(axis, name, rows)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncols=3)
    axes[-1, 0].xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))  # type: ignore[no-untyped-call]
    axes[-1, 0].set_xlabel("slot start (UTC)")
    figure.suptitle("cleaned_data: measured and filled values per series", fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    png_path_writer(buffer.getvalue())


def _draw_series(axis: Any, name: str, rows: list[Row]) -> None:
    """One panel: a series' values, measured dots, filled rings and missing stretches shaded."""
    times = [r[m.T_MEASUREMENT] for r in rows]
    axis.plot(times, [r[m.VALUE] for r in rows], color="0.75", linewidth=0.6, zorder=1)
    for flag, style in (
        ("measured", dict(marker="o", s=6, color="tab:blue", label="measured")),
        (
            "filled",
            dict(marker="o", s=10, facecolors="none", edgecolors="tab:orange", linewidths=0.7, label="filled"),
        ),
    ):
        chosen = [r for r in rows if (r[QUALITY] == MEASURED) == (flag == "measured") and r[QUALITY] != MISSING]
        axis.scatter([r[m.T_MEASUREMENT] for r in chosen], [r[m.VALUE] for r in chosen], zorder=2, **style)
    missing = [r[m.T_MEASUREMENT] for r in rows if r[QUALITY] == MISSING]
    for start, end in _stretches(missing):
        axis.axvspan(start, end, color="tab:red", alpha=0.15, label="missing" if start == missing[0] else None)
    filled_share = sum(r[QUALITY] not in (MEASURED, MISSING) for r in rows) / len(rows)
    axis.set_title(
        f"{name}: {len(rows)} slots, {filled_share:.0%} filled, {len(missing)} missing", loc="left", fontsize=9
    )
    axis.set_ylabel("value")
    axis.grid(alpha=0.3)


def _stretches(times: list[datetime], gap: timedelta | None = None) -> list[tuple[datetime, datetime]]:
    """Group sorted slot times into (first, last) runs of consecutive slots."""
    gap = gap or timedelta(seconds=60)
    runs: list[list[datetime]] = []
    for t in times:
        if runs and t - runs[-1][1] <= gap:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return [(a, b) for a, b in runs]
