"""Kafka client settings shared by the consumer (Spark's Java client), the producer and the reader (librdkafka).

Pure Python: the broker, topic and security settings from the command line and the environment,
with secret values kept out of logs, and the reachability check run before Spark starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import time
from typing import Any

# --- settings ---------------------------------------------------------------------------------------

ENV_BOOTSTRAP_SERVERS = "KAFKA_BOOTSTRAP_SERVERS"
ENV_TOPIC = "KAFKA_TOPIC"
ENV_PROPERTIES_FILE = "KAFKA_PROPERTIES_FILE"

#: Environment variables with Kafka client security settings, and the client property each sets.
#: The same variables serve the producer, the reader (librdkafka) and the consumer (Java client).
KAFKA_SECURITY_ENV = {
    "KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "KAFKA_SASL_USERNAME": "sasl.username",
    "KAFKA_SASL_PASSWORD": "sasl.password",
    "KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
}

#: Words that mark a client property's value as secret: it is never printed.
SECRET_WORDS = ("password", "jaas", "secret", "token", "key")


def kafka_security_from_env() -> dict[str, str]:
    """Return the security properties set in the environment (librdkafka names)."""
    return {key: os.environ[env] for env, key in KAFKA_SECURITY_ENV.items() if os.environ.get(env, "").strip()}


def redact(properties: dict[str, str]) -> dict[str, str]:
    """Return client properties fit to print: secret values replaced by ``***``."""
    return {
        key: "***" if any(word in key.lower() for word in SECRET_WORDS) else value for key, value in properties.items()
    }


def read_properties(path: str) -> dict[str, str]:
    """Read a Java-style ``key=value`` properties file (``#`` and ``!`` start comments).

    The file may hold passwords, so it must be the user's alone (like ssh's private keys): one that
    other users may read or write is refused.

    Raises:
        ValueError: on a file other users may access, or a line without ``=`` or ``:``.
    """
    with open(path, encoding="utf-8") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise ValueError(
                f"{path} may be read or written by other users (mode {mode:04o}) and may hold passwords: "
                f"make it yours alone with: chmod 600 {path}"
            )
        properties = {}
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line[0] in "#!":
                continue
            separator = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
            if separator < 0:
                raise ValueError(f"{path}:{number}: not a key=value line")
            properties[line[:separator].strip()] = line[separator + 1 :].strip()
    return properties


class KafkaClientErrors:
    """``error_cb`` for the confluent-kafka clients: keeps the first error that retrying will not fix.

    Those are fatal errors, failed authentication and failed TLS handshakes. librdkafka retries them
    quietly until its timeouts; the producer and the reader stop at once instead and say why (for
    TLS: an untrusted certificate or a hostname mismatch, found by ``tls_problem``).
    """

    def __init__(self, bootstrap_servers: str = "", security: dict[str, str] | None = None) -> None:
        self.fatal: str | None = None
        self.bootstrap_servers = bootstrap_servers
        self.ca_location = (security or {}).get("ssl.ca.location")

    def __call__(self, error: Any) -> None:  # confluent_kafka.KafkaError, untyped
        if self.fatal is not None:
            return
        if error.code() == _SSL_ERROR_CODE:
            self.fatal = tls_problem(self.bootstrap_servers, self.ca_location) or f"TLS handshake failed: {error.str()}"
        elif error.fatal() or "authentication" in error.str().lower():
            self.fatal = error.str()


#: Kafka's error codes for a request the principal has no right to make (topic, group, cluster).
AUTHORIZATION_ERROR_CODES = (29, 30, 31)
#: librdkafka's code for a failed TLS handshake (``KafkaError._SSL``).
_SSL_ERROR_CODE = -181
#: OpenSSL's verify results for a certificate that does not name the host or IP address connected to.
_NAME_MISMATCH_CODES = (62, 64)


def tls_problem(bootstrap_servers: str, ca_location: str | None, timeout: float = 10.0) -> str | None:
    """Return why a TLS connection to the brokers fails, in words that name the cause; None when it works.

    A handshake with Python's ``ssl``, verifying the certificate against ``ca_location`` (a PEM file;
    None: the system's CAs) and the host name as the Kafka clients do. Unreachable servers are skipped:
    ``wait_until_reachable`` reports those.
    """
    try:
        context = ssl.create_default_context(cafile=ca_location)
    except (OSError, ssl.SSLError) as error:
        return f"cannot load the CA certificate {ca_location} (KAFKA_SSL_CA_LOCATION): {error}"
    for host, port in _servers(bootstrap_servers):
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw:
                with context.wrap_socket(raw, server_hostname=host):
                    return None
        except ssl.SSLCertVerificationError as error:
            if error.verify_code in _NAME_MISMATCH_CODES:
                return (
                    f"TLS hostname mismatch: the certificate of the broker at {host}:{port} does not name "
                    f"{host} ({error.verify_message}); connect with a name the certificate holds"
                )
            return (
                f"TLS: the certificate of the broker at {host}:{port} is not trusted by "
                f"{ca_location or 'the system CAs'} ({error.verify_message}); set KAFKA_SSL_CA_LOCATION "
                "to the CA certificate that signed it"
            )
        except ssl.SSLError as error:
            return f"TLS handshake with the broker at {host}:{port} failed: {error}"
        except (OSError, ValueError):
            continue
    return None


def _servers(bootstrap_servers: str) -> list[tuple[str, int]]:
    """(host, port) of each server in a ``host:port[,host:port]`` list; unparsable ones are left out."""
    servers = []
    for server in bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if port.isdigit():
            servers.append((host.strip("[]") or "localhost", int(port)))
    return servers


def silent_logger() -> logging.Logger:
    """A logger that keeps librdkafka's own retry messages off the screen."""
    logger = logging.getLogger("meter_stream.kafka_client")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    return logger


# --- Spark's Java client ---

#: Client timeouts that make an unreachable broker fail the run within about a minute (the
#: client defaults wait several minutes).
TIMEOUT_OPTIONS = {
    "kafka.request.timeout.ms": "15000",
    "kafka.default.api.timeout.ms": "30000",
    "kafka.socket.connection.setup.timeout.ms": "5000",
    "kafka.socket.connection.setup.timeout.max.ms": "10000",
    "fetchOffset.numRetries": "2",
    "fetchOffset.retryIntervalMs": "1000",
    # An executor waiting on a broker that went away fails the batch after this, not after 2 min.
    "kafkaConsumer.pollTimeoutMs": "30000",
}
#: Larger polls for the stream's consumers (Spark's consumers are assigned partitions, not in a
#: group, so a long poll loop cannot cause a rebalance). The client's default of 500 records per poll
#: halves the throughput (BENCHMARKS.md, "Settings"). ``--kafka-properties`` can override it.
FETCH_OPTIONS = {"kafka.max.poll.records": "10000"}
_JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


#: How long ``wait_until_reachable`` tries before it gives up.
REACHABLE_WAIT_SECONDS = 15.0


def client_options(env_security: dict[str, str], properties: dict[str, str]) -> dict[str, str]:
    """Return the Spark Kafka source's ``kafka.*`` client options for the security settings.

    Args:
        env_security: librdkafka-style settings from the environment (``sasl.username`` ...).
        properties: Java client properties from a file; they win over the environment.

    Raises:
        ValueError: when a username is given without a password or with an unknown mechanism.
    """
    options = {}
    for key in ("security.protocol", "sasl.mechanism"):
        if key in env_security:
            options[f"kafka.{key}"] = env_security[key]
    if "ssl.ca.location" in env_security:
        options["kafka.ssl.truststore.type"] = "PEM"
        options["kafka.ssl.truststore.location"] = env_security["ssl.ca.location"]
    if "sasl.username" in env_security:
        mechanism = env_security.get("sasl.mechanism", "PLAIN").upper()
        if mechanism not in _JAAS_MODULES or "sasl.password" not in env_security:
            raise ValueError(
                f"KAFKA_SASL_USERNAME needs KAFKA_SASL_PASSWORD and a mechanism of {', '.join(_JAAS_MODULES)}"
            )
        user = json.dumps(env_security["sasl.username"])
        password = json.dumps(env_security["sasl.password"])
        options["kafka.sasl.jaas.config"] = f"{_JAAS_MODULES[mechanism]} required username={user} password={password};"
    for key, value in properties.items():
        options[key if key.startswith("kafka.") else f"kafka.{key}"] = value
    return options


def reachable(bootstrap_servers: str) -> bool:
    """Whether one bootstrap server accepts TCP connections now."""
    for host, port in _servers(bootstrap_servers):
        try:
            with socket.create_connection((host, port), timeout=3):
                return True
        except OSError:
            continue
    return False


def wait_until_reachable(bootstrap_servers: str, wait_seconds: float = REACHABLE_WAIT_SECONDS) -> None:
    """Return once one bootstrap server accepts TCP connections.

    Raises:
        ConnectionError: when none does within ``wait_seconds``.
    """
    deadline = time.monotonic() + wait_seconds
    while not reachable(bootstrap_servers):
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"cannot reach the Kafka broker at {bootstrap_servers} (tried for {wait_seconds:.0f} s); "
                "is it running? Locally: scripts/kafka-local start"
            )
        time.sleep(1)
