"""Check a Kafka broker: read the measurement topic and print each parsed message.

Connects with confluent-kafka, reads from the earliest offset (new consumer group) and prints one
line per message: partition, offset and the parsed measurement (or why it does not parse). Stops
after ``--max-messages`` or when nothing arrives for ``--timeout`` seconds; Ctrl-C stops cleanly.
Exit code 0 when it read something, 1 when it read nothing, 2 when the broker cannot be reached.

Security options come from the environment: KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM,
KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_CA_LOCATION.

Usage:
    python test_your_docker_setup/reader.py [--bootstrap-servers 127.0.0.1:9093] [--topic mytopic]
        [--max-messages 10] [--timeout 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "exercises"))

from meter_stream import (
    config,  # noqa: E402
    kafka_client,  # noqa: E402
)
from meter_stream import message as m  # noqa: E402

BROKER_CHECK_SECONDS = 10.0


def describe(value: bytes | None) -> str:
    """Return a message value as one readable line."""
    if value is None:
        return "(null value)"
    try:
        parsed = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return f"not JSON: {value[:80]!r}"
    if not isinstance(parsed, dict):
        return f"not a JSON object: {value[:80]!r}"
    return " ".join(f"{field}={parsed.get(field)!r}" for field in m.FIELDS)


def _broker_problem(consumer: Any, errors: kafka_client.KafkaClientErrors) -> str | None:
    """Return why the broker cannot be used (unreachable, authentication), or None when it can."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + BROKER_CHECK_SECONDS
    while True:
        try:
            consumer.list_topics(timeout=1.0)
            return None
        except KafkaException as error:
            consumer.poll(0.2)  # serves the error callbacks, which hold an authentication failure
            if errors.fatal:
                return errors.fatal
            if time.monotonic() >= deadline:
                return f"cannot reach it: {error.args[0].str()}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bootstrap-servers",
        default=config.env_default(kafka_client.ENV_BOOTSTRAP_SERVERS, m.DEFAULT_BOOTSTRAP_SERVERS),
        help=f"Kafka brokers [env {kafka_client.ENV_BOOTSTRAP_SERVERS}] (default %(default)s)",
    )
    parser.add_argument(
        "--topic",
        default=config.env_default(kafka_client.ENV_TOPIC, m.DEFAULT_TOPIC),
        help=f"topic [env {kafka_client.ENV_TOPIC}] (default %(default)s)",
    )
    parser.add_argument("--group", default=None, help="consumer group (default: a new one, so it reads from the start)")
    parser.add_argument("--max-messages", type=int, default=None, help="stop after this many messages")
    parser.add_argument("--timeout", type=float, default=None, help="stop after this many seconds without a message")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Read and print messages; return the exit code."""
    from confluent_kafka import Consumer

    args = parse_args(argv)
    security = kafka_client.kafka_security_from_env()
    errors = kafka_client.KafkaClientErrors(args.bootstrap_servers, security)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap_servers,
            "group.id": args.group or f"meter-stream-reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "logger": kafka_client.silent_logger(),
            "error_cb": errors,
            **security,
        }
    )
    cause = _broker_problem(consumer, errors)
    if cause:
        print(f"reader: Kafka broker at {args.bootstrap_servers}: {cause}", file=sys.stderr)
        consumer.close()
        return 2
    consumer.subscribe([args.topic])
    count, last_message = 0, time.monotonic()
    try:
        while args.max_messages is None or count < args.max_messages:
            msg = consumer.poll(1.0)
            if msg is None:
                if args.timeout is not None and time.monotonic() - last_message >= args.timeout:
                    break
                continue
            if (error := msg.error()) is not None:
                if error.code() in kafka_client.AUTHORIZATION_ERROR_CODES:
                    print(
                        f"reader: not authorized to read topic {args.topic} ({error.str()}): the user needs Read "
                        "and Describe on it and Read on its consumer group",
                        file=sys.stderr,
                    )
                    return 2
                print(f"reader: {error.str()}", file=sys.stderr)
                continue
            count, last_message = count + 1, time.monotonic()
            print(f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: {describe(msg.value())}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    print(f"reader: {count} messages from {args.topic}", file=sys.stderr)
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main())
