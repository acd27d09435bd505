"""Write simulated raw consumer data (the Kafka rows the consumer stores) without Kafka.

The rows have the consumer_data schema and come from the producer's own simulation, with holes,
clock drift, replays, malformed messages and one series outside the expected catalog. The shipped
sample in ``example_data/consumer_data_sample`` was made with the defaults; it has no
``_spark_metadata`` log, so it never collides with the consumer's own output and checkpoint.

Usage:
    python scripts/make_sample_data.py [--output example_data/consumer_data_sample] [--hours 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "exercises")]

import producer  # noqa: E402
from meter_stream import message as m  # noqa: E402

#: 2024-05-22 09:00:00 UTC, the day of the original feed.
SAMPLE_START = 1716368400.123456
UNKNOWN_SERIES = ("test-device", m.SIGNAL_IMPORT)


#: A consumer_data row: key, value, topic, partition, offset, timestamp, timestampType.
RawRow = tuple[bytes | None, bytes | None, str, int, int, datetime, int]


def raw_rows(payloads: Sequence[bytes | None], topic: str = m.DEFAULT_TOPIC, partitions: int = 1) -> list[RawRow]:
    """Return consumer_data rows for message values, offsets counted per partition.

    Messages go round-robin over the partitions; the Kafka timestamp is taken from the message's
    t_measurement where it has one (a broker would stamp the send time), else from the previous one.
    """
    rows: list[RawRow] = []
    offsets, stamp = [0] * partitions, datetime.fromtimestamp(SAMPLE_START, UTC)
    for index, value in enumerate(payloads):
        partition = index % partitions
        try:
            stamp = datetime.fromtimestamp(float(json.loads(value or b"")[m.T_MEASUREMENT]), UTC)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, OSError, RecursionError):
            pass
        rows.append((None, value, topic, partition, offsets[partition], stamp.replace(tzinfo=None), 0))
        offsets[partition] += 1
    return rows


def sample_payloads(hours: float, seed: int, start: float = SAMPLE_START) -> list[bytes]:
    """Return the message values of the sample: the four series plus one unknown series."""
    rounds = int(hours * 3600 // (producer.DEFAULT_INTERVAL + producer.DEFAULT_DRIFT))
    ranges = {**producer.VALUE_RANGES, UNKNOWN_SERIES: (0, 5)}
    return list(producer.simulate(start, rounds, seed, malformed_share=0.01, replay_share=0.02, value_ranges=ranges))


def main(argv: list[str] | None = None) -> int:
    """Write the sample; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(ROOT, "example_data", "consumer_data_sample"))
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    from meter_stream.contracts import RAW_SCHEMA
    from meter_stream.session import build_session

    spark = build_session("meter-stream sample data")
    rows = raw_rows(sample_payloads(args.hours, args.seed))
    spark.createDataFrame(rows, RAW_SCHEMA).coalesce(1).write.mode("overwrite").parquet(args.output)
    print(f"wrote {len(rows)} raw rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
