"""Measurement producer: simulates the four meter series and sends them to Kafka.

Each round (every ``--interval`` seconds) every series sends one measurement with probability
1 - ``--skip-probability``, in the message format of ``example_data/measurement_values.json``:
integer values (device1 export 50-70, device1 import 10-20, device2 export 80-90, device2 import
0-10) and a ``t_report`` 10 s before ``t_measurement``, as the original feed does.

Live mode (default) runs until Ctrl-C or SIGTERM and flushes on exit. ``--backfill 6h`` sends that
much history at once (rounds spaced ``--interval`` + ``--drift`` apart, ending now) and exits.
``--malformed-share`` and ``--replay-share`` mix in broken messages and resent ones, for testing the
stages downstream. The exit code is 0 only when every message was delivered.

Usage:
    python producer.py [--bootstrap-servers HOST:PORT] [--topic T] [--backfill 6h --seed 1]

Kafka client options (security) come from the environment: KAFKA_SECURITY_PROTOCOL,
KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_CA_LOCATION.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "exercises"))

from common import config  # noqa: E402
from common import message as m  # noqa: E402

#: Value range of each simulated series, as in the original feed.
VALUE_RANGES = {
    ("device1", m.SIGNAL_EXPORT): (50, 70),
    ("device1", m.SIGNAL_IMPORT): (10, 20),
    ("device2", m.SIGNAL_EXPORT): (80, 90),
    ("device2", m.SIGNAL_IMPORT): (0, 10),
}
REPORT_LAG_SECONDS = -10.0  # t_report - t_measurement in the original feed
DEFAULT_INTERVAL = 10.0
DEFAULT_DRIFT = 0.02  # the original feed's rounds are ~10.02 s apart
DEFAULT_SKIP_PROBABILITY = 0.5

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


def encode(msg: dict) -> bytes:
    """Return a message as the UTF-8 JSON bytes sent to Kafka."""
    return json.dumps(msg).encode("utf-8")


def simulate_round(
    t_measurement: float,
    rng: random.Random,
    skip_probability: float,
    value_ranges: dict[tuple[str, str], tuple[int, int]] = VALUE_RANGES,
) -> list[dict]:
    """Return the messages of one round: each series sends with probability 1 - skip_probability."""
    messages = []
    for (device_id, signal_name), (low, high) in value_ranges.items():
        if rng.random() < skip_probability:
            continue
        t = round(t_measurement, 6)
        value = rng.randint(low, high)
        messages.append(m.make_message(t, round(t + REPORT_LAG_SECONDS, 6), device_id, signal_name, value))
    return messages


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
    for index in range(rounds):
        for msg in simulate_round(start + index * (interval + drift), rng, skip_probability, value_ranges):
            if rng.random() < malformed_share:
                yield rng.choice(MALFORMED_PAYLOADS)
                continue
            payload = encode(msg)
            yield payload
            if rng.random() < replay_share:
                yield payload


def parse_duration(text: str) -> float:
    """Return seconds for a duration such as ``90``, ``90s``, ``15m``, ``6h`` or ``2d``.

    Raises:
        ValueError: when the text is not such a duration.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90s, 15m, 6h or 2d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def kafka_client_config(bootstrap_servers: str) -> dict:
    """Return the confluent-kafka configuration, with security options from the environment."""
    return {"bootstrap.servers": bootstrap_servers, **config.kafka_security_from_env()}


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
        self.client_errors = config.KafkaClientErrors()
        self._producer = Producer(
            {
                **kafka_client_config(bootstrap_servers),
                "linger.ms": 20,
                "message.timeout.ms": 30000,
                "error_cb": self.client_errors,
                "logger": config.silent_logger(),
            }
        )

    def _on_delivery(self, error, _msg) -> None:
        if error is None:
            self.delivered += 1
        else:
            self.failed += 1
            self.errors.add(str(error))

    def _check(self) -> None:
        if self.client_errors.fatal:
            raise KafkaClientError(self.client_errors.fatal)

    def send(self, value: bytes) -> None:
        """Queue one message, waiting for room when the local queue is full.

        Raises:
            KafkaClientError: once the client reported an authentication or fatal error.
        """
        self._check()
        while True:
            try:
                self._producer.produce(self.topic, value=value, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.5)
        self._producer.poll(0)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for outstanding deliveries; return how many are still undelivered.

        Stops early on an authentication or fatal error (see ``KafkaClientErrors``).
        """
        deadline = time.monotonic() + timeout
        remaining = self._producer.flush(0)
        while remaining and not self.client_errors.fatal and time.monotonic() < deadline:
            remaining = self._producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
        return remaining


def run_backfill(sender: Sender, args: argparse.Namespace) -> None:
    """Send ``--backfill`` of history ending now."""
    from tqdm import tqdm

    spacing = args.interval + args.drift
    rounds = max(1, int(parse_duration(args.backfill) // spacing))
    start = time.time() - (rounds - 1) * spacing
    expected = rounds * len(VALUE_RANGES) * (1 - args.skip_probability) * (1 + args.replay_share)
    messages = simulate(
        start,
        rounds,
        args.seed,
        args.interval,
        args.drift,
        args.skip_probability,
        args.malformed_share,
        args.replay_share,
    )
    for value in tqdm(messages, total=int(expected), unit="msg", desc="backfill", disable=args.quiet):
        sender.send(value)


def run_live(sender: Sender, args: argparse.Namespace) -> None:
    """Send one round every ``--interval`` seconds until SIGTERM or Ctrl-C."""
    stop = {"now": False}

    def request_stop(_signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    rng = random.Random(args.seed)
    next_round = time.monotonic()
    while not stop["now"]:
        for value in simulate(
            time.time(), 1, rng.randrange(2**32), 0, 0, args.skip_probability, args.malformed_share, args.replay_share
        ):
            sender.send(value)
        if not args.quiet:
            print(f"round sent: {sender.delivered} delivered, {sender.failed} failed so far", flush=True)
        next_round += args.interval
        while not stop["now"] and time.monotonic() < next_round:
            sender.flush(0)
            time.sleep(min(0.2, max(0.0, next_round - time.monotonic())))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bootstrap-servers",
        default=config.env_default(config.ENV_BOOTSTRAP_SERVERS, m.DEFAULT_BOOTSTRAP_SERVERS),
        help="Kafka brokers [env KAFKA_BOOTSTRAP_SERVERS] (default %(default)s)",
    )
    parser.add_argument(
        "--topic",
        default=config.env_default(config.ENV_TOPIC, m.DEFAULT_TOPIC),
        help="topic [env KAFKA_TOPIC] (default %(default)s)",
    )
    parser.add_argument(
        "--backfill", metavar="DURATION", help="send this much history at once (90s, 15m, 6h, 2d) and exit"
    )
    parser.add_argument("--seed", type=int, help="random seed, for a reproducible run")
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
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    if args.backfill:
        try:
            parse_duration(args.backfill)
        except ValueError as error:
            parser.error(str(error))
    for name in ("skip_probability", "malformed_share", "replay_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the producer; return 0 when every message was delivered."""
    args = parse_args(argv)
    sender = Sender(args.bootstrap_servers, args.topic)
    try:
        if args.backfill:
            run_backfill(sender, args)
        else:
            run_live(sender, args)
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
