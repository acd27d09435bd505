"""Datastore layout and command-line options shared by the stages (pure Python, no Spark).

Every option that differs between a laptop and production has a command-line flag and an
environment-variable fallback; ``--help`` names both.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields

from meter_stream import message as m

ENV_DATASTORE = "METER_DATASTORE"
DEFAULT_DATASTORE = "./datastore"

#: Standard folders under the datastore root: field name -> (folder, what it holds).
FOLDERS = {
    "consumer_data": ("consumer_data", "raw Kafka rows written by the consumer"),
    "checkpoint_consumer": ("checkpoint_consumer", "the consumer's streaming checkpoint"),
    "processed_data": ("processed_data", "typed, deduplicated measurements"),
    "quarantine_data": ("quarantine_data", "raw records the processor rejected, with a reason"),
    "cleaned_data": ("cleaned_data", "the regular grid per series, holes filled and flagged"),
    "unknown_series": ("unknown_series", "series outside the expected catalog, seen by the cleaner"),
    "reports": ("reports", "the checker's report and chart"),
    "live_state": ("live_state", "the live mode's cursor, per-series state and running check figures"),
}


@dataclass(frozen=True)
class Paths:
    """Resolved locations of every stage folder (local paths or Hadoop URIs such as s3a://)."""

    consumer_data: str
    checkpoint_consumer: str
    processed_data: str
    quarantine_data: str
    cleaned_data: str
    unknown_series: str
    reports: str
    live_state: str

    @classmethod
    def under(cls, root: str, **overrides: str | None) -> Paths:
        """Return the standard layout under ``root``, with any folder overridden on its own."""
        values = {}
        for field in fields(cls):
            override = overrides.get(field.name)
            values[field.name] = override or join_path(root, FOLDERS[field.name][0])
        return cls(**values)


def join_path(root: str, name: str) -> str:
    """Join a folder name to a root that may be a local path or a URI."""
    return f"{root.rstrip('/')}/{name}"


def env_var_for(folder: str) -> str:
    """Return the environment variable that overrides one stage folder, e.g. METER_CLEANED_DATA."""
    return f"METER_{folder.upper()}"


def env_default(env_var: str, default: str | None) -> str | None:
    """Return the environment variable's value when it is set and not empty, else ``default``."""
    value = os.environ.get(env_var, "")
    return value if value.strip() else default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults (except empty ones) and keep the module docstring's line breaks in ``--help``."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def make_parser(description: str) -> argparse.ArgumentParser:
    """Return an argument parser whose help starts with a stage's docstring."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Spark's own INFO logging (otherwise WARN and above)",
    )
    return parser


def add_datastore_options(parser: argparse.ArgumentParser, folders: tuple[str, ...]) -> None:
    """Add ``--datastore`` and one override flag per folder a stage uses."""
    group = parser.add_argument_group("datastore")
    group.add_argument(
        "--datastore",
        default=env_default(ENV_DATASTORE, DEFAULT_DATASTORE),
        help=f"root folder or URI of the datastore [env {ENV_DATASTORE}]",
    )
    for folder in folders:
        env_var = env_var_for(folder)
        group.add_argument(
            "--" + folder.replace("_", "-"),
            dest=folder,
            default=env_default(env_var, None),
            help=f"{FOLDERS[folder][1]}; default DATASTORE/{FOLDERS[folder][0]} [env {env_var}]",
        )


ALL_SERIES = "all"
DEFAULT_SLOT_SECONDS = 10
ENV_EXPECTED_SERIES = "METER_EXPECTED_SERIES"
ENV_SLOT_SECONDS = "METER_SLOT_SECONDS"


def add_series_options(parser: argparse.ArgumentParser) -> None:
    """Add the options the cleaner and the checker share: the series catalog and the slot length."""
    group = parser.add_argument_group("series")
    group.add_argument(
        "--expected-series",
        default=env_default(ENV_EXPECTED_SERIES, None),
        help="comma-separated device/signal series expected in the feed, or 'all' to accept every series "
        f"(default: device1 and device2 x energy import/export) [env {ENV_EXPECTED_SERIES}]",
    )
    group.add_argument(
        "--slot-seconds",
        type=int,
        default=env_default(ENV_SLOT_SECONDS, None),
        help=f"length of a grid slot in seconds (default {DEFAULT_SLOT_SECONDS}) [env {ENV_SLOT_SECONDS}]",
    )


def parse_expected_series(
    names: str | Sequence[str] | None, default: tuple[tuple[str, str], ...] | None
) -> tuple[tuple[str, str], ...] | None:
    """Return the catalog for ``--expected-series``: a tuple of (device_id, signal_name), or None for 'all'.

    Args:
        names: comma-separated text, a list of ``device/signal`` names, 'all', or None for ``default``.
        default: the catalog when ``names`` is None.

    Raises:
        ValueError: on a name that is not ``device/signal``.
    """
    if names is None:
        return default
    if names == ALL_SERIES:
        return None
    items = names.split(",") if isinstance(names, str) else names
    return tuple(m.parse_series_name(name) for name in items if name.strip())


def parse_duration(text: str) -> float:
    """Return seconds for a duration such as ``90``, ``90s``, ``15m``, ``6h`` or ``2d``.

    Raises:
        ValueError: when the text is not such a duration.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 6h or 2d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def paths_from_args(args: argparse.Namespace) -> Paths:
    """Return the stage folders named by parsed ``add_datastore_options`` arguments."""
    overrides = {name: getattr(args, name, None) for name in FOLDERS}
    return Paths.under(args.datastore, **overrides)


def get_logger(stage: str) -> logging.Logger:
    """Return the stage's logger, printing ``time stage level message`` lines to stderr."""
    logger = logging.getLogger(f"meter_stream.{stage}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class StopRequest:
    """Turns true on SIGTERM or Ctrl-C (SIGINT), so a long run can finish its current step and exit 0.

    Spark's JVM ignores SIGINT (PySpark starts it so), so Ctrl-C reaches only this handler.
    """

    def __init__(self, log: logging.Logger) -> None:
        self.requested = False
        self._log = log
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if not self.requested:
            self._log.info("%s received: stopping after the current step", signal.Signals(signum).name)
        self.requested = True

    def __call__(self) -> bool:
        return self.requested
