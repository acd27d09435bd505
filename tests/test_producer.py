"""The measurement simulator: the original feed's four series and a fleet (no broker needed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import producer
from meter_stream import message as m
from tests.helpers import ROOT


def test_default_series_are_the_original_feeds_four():
    assert sorted(producer.VALUE_RANGES) == sorted(m.EXPECTED_SERIES)


def test_fleet_device_ids_sort_by_number_and_each_meter_has_both_signals():
    ranges = producer.fleet_value_ranges(12)
    devices = sorted({device for device, _signal in ranges})
    assert devices == [f"meter{n:06d}" for n in range(1, 13)]
    assert set(ranges) == {(d, s) for d in devices for s in (m.SIGNAL_EXPORT, m.SIGNAL_IMPORT)}
    assert list(ranges) == sorted(ranges)  # the order they are sent in is the order they sort in


def test_fleet_ids_widen_beyond_a_million_meters_and_still_sort():
    ranges = producer.fleet_value_ranges(1_000_000)
    first, last = next(iter(ranges))[0], next(reversed(ranges))[0]
    assert (first, last) == ("meter0000001", "meter1000000") and first < last


def test_fleet_values_stay_in_the_original_ranges_but_differ_per_meter():
    ranges = producer.fleet_value_ranges(500)
    exports = {band for (_d, s), band in ranges.items() if s == m.SIGNAL_EXPORT}
    imports = {band for (_d, s), band in ranges.items() if s == m.SIGNAL_IMPORT}
    assert all(50 <= low and high <= 90 for low, high in exports) and len(exports) > 10
    assert all(0 <= low and high <= 20 for low, high in imports) and len(imports) > 5


def test_fleet_of_no_meters_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        producer.fleet_value_ranges(0)


def test_simulated_messages_are_the_message_format_with_values_in_range():
    ranges = producer.fleet_value_ranges(20)
    payloads = list(producer.simulate(1_716_369_246.734911, 30, seed=5, value_ranges=ranges))
    messages = [json.loads(p) for p in payloads]
    # the bytes are what encode() makes of the same message
    assert all(producer.encode(msg) == p for msg, p in zip(messages, payloads, strict=True))
    assert all(list(msg) == list(m.FIELDS) for msg in messages)
    for msg in messages:
        low, high = ranges[(msg[m.DEVICE_ID], msg[m.SIGNAL_NAME])]
        assert low <= msg[m.VALUE] <= high and isinstance(msg[m.VALUE], int)
        assert msg[m.T_REPORT] == pytest.approx(msg[m.T_MEASUREMENT] + producer.REPORT_LAG_SECONDS)
    # each series sends about half of the 30 rounds (skip probability 1/2)
    assert 0.4 < len(messages) / (30 * len(ranges)) < 0.6
    times = sorted({msg[m.T_MEASUREMENT] for msg in messages})
    assert times[1] - times[0] == pytest.approx(producer.DEFAULT_INTERVAL + producer.DEFAULT_DRIFT)


def test_simulation_is_reproducible_with_a_seed():
    ranges = producer.fleet_value_ranges(5)
    first = list(producer.simulate(1_700_000_000.0, 10, seed=3, value_ranges=ranges, replay_share=0.2))
    assert first == list(producer.simulate(1_700_000_000.0, 10, seed=3, value_ranges=ranges, replay_share=0.2))
    assert first != list(producer.simulate(1_700_000_000.0, 10, seed=4, value_ranges=ranges, replay_share=0.2))


def test_replays_and_malformed_messages_are_mixed_in_when_asked():
    payloads = list(producer.simulate(1_700_000_000.0, 200, seed=1, malformed_share=0.1, replay_share=0.1))
    malformed = [p for p in payloads if p in producer.MALFORMED_PAYLOADS]
    repeats = sum(a == b for a, b in zip(payloads, payloads[1:], strict=False) if a not in producer.MALFORMED_PAYLOADS)
    assert malformed and repeats


def test_devices_option_is_checked():
    with pytest.raises(SystemExit):
        producer.parse_args(["--devices", "0"])
    assert producer.parse_args(["--devices", "7"]).devices == 7


def test_producer_runs_with_only_the_files_its_docker_image_copies(tmp_path):
    with open(os.path.join(ROOT, "Dockerfile")) as handle:
        copies = [line.split()[1:] for line in handle if line.startswith("COPY ")]
    for *sources, target in copies:
        os.makedirs(tmp_path / target, exist_ok=True)
        for source in sources:
            shutil.copy(os.path.join(ROOT, source), tmp_path / target)
    result = subprocess.run(
        [sys.executable, "producer.py", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"--bootstrap-servers", result.stdout)


def test_feed_clock_runs_faster_from_the_past_until_it_reaches_now(monkeypatch):
    wall = {"now": 1_000_000.0}
    monkeypatch.setattr(producer.time, "time", lambda: wall["now"])
    clock = producer.FeedClock(since=3600, speed=20)
    assert clock.now() == 1_000_000 - 3600 and clock.speed_now() == 20
    wall["now"] += 90  # 30 minutes of feed time in 90 s
    assert clock.now() == 1_000_000 - 3600 + 1800 and clock.speed_now() == 20
    wall["now"] += 100  # caught up: real time from here on
    assert clock.now() == wall["now"] and clock.speed_now() == 1
