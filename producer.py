"""Measurement producer: simulates meter series and sends them to Kafka.

Each round (every ``--interval`` seconds) every series sends one measurement with probability
1 - ``--skip-probability``, in the message format of ``example_data/measurement_values.json``:
integer values and a ``t_report`` 10 s before ``t_measurement``, as the original feed does. By
default the series are the original feed's four (device1 export 50-70, device1 import 10-20, device2
export 80-90, device2 import 0-10). ``--devices N`` simulates a fleet instead: N meters
``meter000001`` ... (zero-padded, so they sort by number), each with an ``energy export`` in a band of
20 within 50-90 and an ``energy import`` in a band of 10 within 0-20, the band differing per meter.

Live mode (default) runs until Ctrl-C or SIGTERM and flushes on exit. ``--backfill 6h`` sends that
much history at once (rounds spaced ``--interval`` + ``--drift`` apart, ending now, or ``--until``
that long ago) and exits.
``--malformed-share`` and ``--replay-share`` mix in broken messages and resent ones, for testing the
stages downstream. The exit code is 0 only when every message was delivered.

Usage:
    python producer.py [--bootstrap-servers HOST:PORT] [--topic T] [--backfill 6h --seed 1]
    python producer.py --devices 5000 --backfill 1h --quiet

Kafka client options (security) come from the environment: KAFKA_SECURITY_PROTOCOL,
KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_CA_LOCATION.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "exercises"))

from meter_stream import config, kafka_client  # noqa: E402
from meter_stream import message as m  # noqa: E402

#: Value range of each simulated series, as in the original feed.
#: (device_id, signal_name) -> the (low, high) range of its integer values.
ValueRanges = dict[tuple[str, str], tuple[int, int]]
VALUE_RANGES: ValueRanges = {
    ("device1", m.SIGNAL_EXPORT): (50, 70),
    ("device1", m.SIGNAL_IMPORT): (10, 20),
    ("device2", m.SIGNAL_EXPORT): (80, 90),
    ("device2", m.SIGNAL_IMPORT): (0, 10),
}
REPORT_LAG_SECONDS = -10.0  # t_report - t_measurement in the original feed
DEFAULT_INTERVAL = 10.0
DEFAULT_DRIFT = 0.02  # the original feed's rounds are ~10.02 s apart
DEFAULT_SKIP_PROBABILITY = 0.5
#: The sender serves delivery reports after this many messages.
POLL_EVERY = 1000

#: Payloads of the malformed messages ``--malformed-share`` mixes in; each is a quarantine case.
MALFORMED_PAYLOADS = (
    b"",
    b"not json",
    b"[1, 2, 3]",
    b'{"t_measurement": 1716369246.7, "device_id": "device1", "signal_name": "energy import"}',
    b'{"t_measurement": 1716369246734, "t_report": 1716369236.7, "device_id": "device1", '
    b'"signal_name": "energy import", "value": 12}',
    b'{"t_measurement": "yesterday", "t_report": 1716369236.7, "device_id": "device1", '
    b'"signal_name": "energy import", "value": 12}',
    b'{"t_measurement": 1716369246.7, "t_report": 1716369236.7, "device_id": "device1", '
    b'"signal_name": "energy import", "value": "twelve"}',
    b'{"t_measurement": 1716369246.7, "t_report": 1716369236.7, "device_id": "device1", '
    b'"signal_name": "energy import", "value": NaN}',
)


def encode(msg: dict[str, object]) -> bytes:
    """Return a message as the UTF-8 JSON bytes sent to Kafka."""
    return json.dumps(msg).encode("utf-8")


FLEET_DEVICE_PREFIX = "meter"


def fleet_value_ranges(devices: int) -> dict[tuple[str, str], tuple[int, int]]:
    """Value ranges of a simulated fleet of ``devices`` meters, two series each.

    Device ids are ``meter`` and the meter's number, zero-padded to at least six digits so that they
    sort by number. Each meter's export band (20 wide) lies within 50-90 and its import band (10
    wide) within 0-20, the original feed's ranges, shifted per meter so that series differ.

    Raises:
        ValueError: when ``devices`` is not positive.
    """
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, not {devices}")
    width = max(6, len(str(devices)))
    ranges = {}
    for number in range(1, devices + 1):
        device_id = f"{FLEET_DEVICE_PREFIX}{number:0{width}d}"
        export_low, import_low = 50 + number * 8 % 21, number * 3 % 11
        ranges[(device_id, m.SIGNAL_EXPORT)] = (export_low, export_low + 20)
        ranges[(device_id, m.SIGNAL_IMPORT)] = (import_low, import_low + 10)
    return ranges


def simulate_round(
    t_measurement: float,
    rng: random.Random,
    skip_probability: float,
    value_ranges: dict[tuple[str, str], tuple[int, int]] = VALUE_RANGES,
) -> list[dict[str, object]]:
    """Return the messages of one round: each series sends with probability 1 - skip_probability."""
    return [json.loads(payload) for payload in _round_payloads(t_measurement, rng, skip_probability, value_ranges)]


def _series_templates(value_ranges: dict[tuple[str, str], tuple[int, int]]) -> list[tuple[str, int, int]]:
    """Per series: the message text between the times and the value, and its value range."""
    templates = []
    for (device_id, signal_name), (low, high) in value_ranges.items():
        names = json.dumps({m.DEVICE_ID: device_id, m.SIGNAL_NAME: signal_name})[1:-1]
        templates.append((f'{names}, "{m.VALUE}": ', low, high - low + 1))
    return templates


def _round_payloads(
    t_measurement: float,
    rng: random.Random,
    skip_probability: float,
    value_ranges: dict[tuple[str, str], tuple[int, int]] | list[tuple[str, int, int]],
) -> Iterator[bytes]:
    """Yield one round's message values, the JSON text ``encode(make_message(...))`` gives.

    Built from per-series templates rather than a dict and ``json.dumps`` per message: a fleet
    backfill sends millions of messages, and this is about three times faster.
    """
    templates = _series_templates(value_ranges) if isinstance(value_ranges, dict) else value_ranges
    t = round(t_measurement, 6)
    head = f'{{"{m.T_MEASUREMENT}": {t!r}, "{m.T_REPORT}": {round(t + REPORT_LAG_SECONDS, 6)!r}, '
    draw = rng.random
    for middle, low, span in templates:
        if draw() < skip_probability:
            continue
        yield f"{head}{middle}{low + int(draw() * span)}}}".encode()


def simulate(
    start: float,
    rounds: int,
    seed: int | None = None,
    interval: float = DEFAULT_INTERVAL,
    drift: float = DEFAULT_DRIFT,
    skip_probability: float = DEFAULT_SKIP_PROBABILITY,
    malformed_share: float = 0.0,
    replay_share: float = 0.0,
    value_ranges: dict[tuple[str, str], tuple[int, int]] = VALUE_RANGES,
) -> Iterator[bytes]:
    """Yield the message values of ``rounds`` rounds starting at epoch ``start``.

    Rounds are ``interval + drift`` seconds apart. A share of the messages is followed by a copy
    (a replay) or replaced by a malformed payload.
    """
    rng = random.Random(seed)
    templates = _series_templates(value_ranges)
    for index in range(rounds):
        payloads = _round_payloads(start + index * (interval + drift), rng, skip_probability, templates)
        yield from _mix(payloads, rng, malformed_share, replay_share)


def _mix(payloads: Iterator[bytes], rng: random.Random, malformed_share: float, replay_share: float) -> Iterator[bytes]:
    """Replace a share of the payloads by malformed ones and follow a share by a copy (a replay)."""
    if malformed_share <= 0 and replay_share <= 0:
        yield from payloads
        return
    for payload in payloads:
        if rng.random() < malformed_share:
            yield rng.choice(MALFORMED_PAYLOADS)
            continue
        yield payload
        if rng.random() < replay_share:
            yield payload


def kafka_client_config(bootstrap_servers: str) -> dict[str, str]:
    """Return the confluent-kafka configuration, with security options from the environment."""
    return {"bootstrap.servers": bootstrap_servers, **kafka_client.kafka_security_from_env()}


class KafkaClientError(Exception):
    """The Kafka client reported an error that retrying will not fix (e.g. authentication)."""


class Sender:
    """Sends message values to one topic and counts delivery results."""

    def __init__(self, bootstrap_servers: str, topic: str):
        from confluent_kafka import Producer

        self.topic = topic
        self.delivered = 0
        self.failed = 0
        self.errors: set[str] = set()
        self.client_errors = kafka_client.KafkaClientErrors(bootstrap_servers, kafka_client.kafka_security_from_env())
        self._queued = 0
        self._producer = Producer(
            {
                **kafka_client_config(bootstrap_servers),
                "linger.ms": 20,
                # A fleet backfill is millions of small messages: larger batches and lz4 (cheap to
                # pack and unpack) keep the client, the broker and the consumer out of each other's way.
                "batch.size": 1_000_000,
                "compression.type": "lz4",
                "message.timeout.ms": 30000,
                "on_delivery": self._on_delivery,
                "error_cb": self.client_errors,
                "logger": kafka_client.silent_logger(),
            }
        )

    def _on_delivery(self, error: Any, _msg: Any) -> None:  # confluent_kafka types, untyped
        if error is None:
            self.delivered += 1
            return
        self.failed += 1
        self.errors.add(str(error))
        if self.client_errors.fatal is None and error.code() in kafka_client.AUTHORIZATION_ERROR_CODES:
            self.client_errors.fatal = (
                f"not authorized to write to topic {self.topic} ({error.str()}): the user needs Write and "
                "Describe on it (locally: scripts/kafka-local grant producer USER TOPIC)"
            )

    def _check(self) -> None:
        if self.client_errors.fatal:
            raise KafkaClientError(self.client_errors.fatal)

    def send(self, value: bytes) -> None:
        """Queue one message, waiting for room when the local queue is full.

        Raises:
            KafkaClientError: once the client reported an authentication or fatal error.
        """
        while True:
            try:
                self._producer.produce(self.topic, value)
                break
            except BufferError:
                self._check()
                self._producer.poll(0.5)
        self._queued += 1
        if self._queued % POLL_EVERY == 0:
            # Delivery reports and client errors are served in batches: once per message cost a third
            # of a fleet backfill's time.
            self._producer.poll(0)
            self._check()

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for outstanding deliveries; return how many are still undelivered.

        Stops early on an authentication or fatal error (see ``KafkaClientErrors``).
        """
        deadline = time.monotonic() + timeout
        remaining = self._producer.flush(0)
        while remaining and not self.client_errors.fatal and time.monotonic() < deadline:
            remaining = self._producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
        return remaining


def run_backfill(sender: Sender, args: argparse.Namespace, value_ranges: ValueRanges) -> None:
    """Send ``--backfill`` of history ending now."""
    from tqdm import tqdm

    spacing = args.interval + args.drift
    rounds = max(1, int(config.parse_duration(args.backfill) // spacing))
    start = time.time() - config.parse_duration(args.until) - (rounds - 1) * spacing
    expected = rounds * len(value_ranges) * (1 - args.skip_probability) * (1 + args.replay_share)
    messages = simulate(
        start,
        rounds,
        args.seed,
        args.interval,
        args.drift,
        args.skip_probability,
        args.malformed_share,
        args.replay_share,
        value_ranges,
    )
    with tqdm(total=int(expected), unit="msg", desc="backfill", disable=args.quiet, miniters=10_000) as progress:
        for count, value in enumerate(messages, 1):
            sender.send(value)
            if count % 10_000 == 0:
                progress.update(10_000)


def run_live(sender: Sender, args: argparse.Namespace, value_ranges: ValueRanges) -> None:
    """Send one round every ``--interval`` seconds until SIGTERM or Ctrl-C."""
    stop = {"now": False}

    def request_stop(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    rng = random.Random(args.seed)
    templates = _series_templates(value_ranges)
    clock = FeedClock(config.parse_duration(args.since), args.speed)
    next_round = time.monotonic()
    while not stop["now"]:
        payloads = _round_payloads(clock.now(), rng, args.skip_probability, templates)
        for value in _mix(payloads, rng, args.malformed_share, args.replay_share):
            sender.send(value)
        if not args.quiet:
            print(f"round sent: {sender.delivered} delivered, {sender.failed} failed so far", flush=True)
        next_round += args.interval / clock.speed_now()
        while not stop["now"] and time.monotonic() < next_round:
            sender.flush(0)
            time.sleep(min(0.2, max(0.0, next_round - time.monotonic())))


class FeedClock:
    """The live feed's clock: ``since`` seconds in the past at the start, running ``speed`` times faster than
    real time until it reaches now, then with it (a compressed past, e.g. a day in 72 minutes)."""

    def __init__(self, since: float, speed: float) -> None:
        self.speed = speed
        self.started, self.start = time.time(), time.time() - since

    def now(self) -> float:
        return min(time.time(), self.start + (time.time() - self.started) * self.speed)

    def speed_now(self) -> float:
        return self.speed if self.now() < time.time() else 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bootstrap-servers",
        default=config.env_default(kafka_client.ENV_BOOTSTRAP_SERVERS, m.DEFAULT_BOOTSTRAP_SERVERS),
        help="Kafka brokers [env KAFKA_BOOTSTRAP_SERVERS] (default %(default)s)",
    )
    parser.add_argument(
        "--topic",
        default=config.env_default(kafka_client.ENV_TOPIC, m.DEFAULT_TOPIC),
        help="topic [env KAFKA_TOPIC] (default %(default)s)",
    )
    parser.add_argument(
        "--backfill", metavar="DURATION", help="send this much history at once (90s, 15m, 6h, 2d) and exit"
    )
    parser.add_argument(
        "--until",
        metavar="DURATION",
        default="0",
        help="with --backfill: the history ends this long before now (default: now)",
    )
    parser.add_argument(
        "--since",
        metavar="DURATION",
        default="0",
        help="live: the feed's clock starts this long before now and runs --speed times faster until it "
        "reaches now (default: now)",
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="live with --since: how much faster than real time (default 1)"
    )
    parser.add_argument("--seed", type=int, help="random seed, for a reproducible run")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    _add_feed_arguments(parser)
    args = parser.parse_args(argv)
    try:
        for duration in (args.backfill or "0", args.until, args.since):
            config.parse_duration(duration)
    except ValueError as error:
        parser.error(str(error))
    if args.speed < 1.0:
        parser.error("--speed must be at least 1")
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be at least 1")
    for name in ("skip_probability", "malformed_share", "replay_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    return args


def _add_feed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that shape the simulated feed: the fleet, the rounds, and the faults mixed in."""
    parser.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="simulate a fleet of N meters with two series each (default: the original feed's four series)",
    )
    parser.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between rounds (default %(default)s)"
    )
    parser.add_argument(
        "--drift",
        type=float,
        default=DEFAULT_DRIFT,
        help="extra seconds per round in backfill, the feed's clock drift (default %(default)s)",
    )
    parser.add_argument(
        "--skip-probability",
        type=float,
        default=DEFAULT_SKIP_PROBABILITY,
        help="chance that a series skips a round (default %(default)s)",
    )
    parser.add_argument(
        "--malformed-share", type=float, default=0.0, help="share of messages replaced by malformed ones"
    )
    parser.add_argument("--replay-share", type=float, default=0.0, help="share of messages sent twice")


def main(argv: list[str] | None = None) -> int:
    """Run the producer; return 0 when every message was delivered."""
    args = parse_args(argv)
    value_ranges = VALUE_RANGES if args.devices is None else fleet_value_ranges(args.devices)
    sender = Sender(args.bootstrap_servers, args.topic)
    try:
        if args.backfill:
            run_backfill(sender, args, value_ranges)
        else:
            run_live(sender, args, value_ranges)
    except KafkaClientError:
        pass  # reported below
    finally:
        undelivered = sender.flush()
    if sender.client_errors.fatal:
        print(f"producer: stopped: {sender.client_errors.fatal}", file=sys.stderr)
    failed = sender.failed + undelivered
    print(f"producer: {sender.delivered} delivered, {failed} not delivered to {args.topic}", file=sys.stderr)
    for error in sorted(sender.errors)[:5]:
        print(f"producer: delivery error: {error}", file=sys.stderr)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
