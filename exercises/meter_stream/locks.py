"""One run per output: an OS file lock on a local disk, a lease file on any other Hadoop file system.

A stage holds ``<output>.lock`` while it writes the output; the live runner holds the processor's,
the cleaner's and the checker's all along. A second run is refused (``StageBusyError``, exit 3) and
the message names the holder.

- **Local disk** (a plain path or ``file:``): ``flock``. The kernel releases it when its process
  ends, also on SIGKILL, so a killed run never blocks the next one.
- **HDFS, ADLS Gen2 and other Hadoop file systems**: the lock file is created only if absent (one
  atomic step there), names its holder and a token, and is renewed (its modification time set) every
  quarter lease. A lock not renewed for a whole lease (``METER_LOCK_LEASE_SECONDS``, default 60) is
  taken over: its holder is gone, e.g. SIGKILLed or its machine lost. Machines' clocks must agree to
  well within a lease (NTP). A holder that finds its lock taken over (it stalled for a whole lease)
  stops at once, before it can commit beside the new holder.
- **Object stores without atomic rename** (``s3a://``, ``gs://``): no lock; the stage says so
  (``storage.without_atomic_rename``).

The lock needs the file system's client, so on a Hadoop file system it is taken once the stage's
Spark session is up; a stage's ``main`` takes a local lock before it starts Spark.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from pyspark.sql import SparkSession

from meter_stream import jvm
from meter_stream.storage import EXIT_BUSY, StageBusyError, local_path, read_text, without_atomic_rename

ENV_LEASE_SECONDS = "METER_LOCK_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0
#: Renewals per lease: a holder misses three before another run may take its lock over.
RENEWALS_PER_LEASE = 4


class _HeldLocks(threading.local):
    """The lock files (absolute paths or URIs) that this thread holds (``stage_lock``)."""

    def __init__(self) -> None:
        self.files: set[str] = set()


_held_locks = _HeldLocks()


@contextmanager
def stage_lock(path: str, stage: str, log: logging.Logger, spark: SparkSession | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``PATH.lock`` while a stage writes ``path`` (see the module's text).

    A thread that holds the lock already (a stage's ``main`` takes it before Spark starts, so that
    a second run is refused at once, then calls ``run``, which takes it again) goes on under it. On a
    Hadoop file system without ``spark`` (before the session is up) nothing is taken yet: the call
    with the session takes it.

    Raises:
        StageBusyError: when another run holds the lock.
    """
    local = local_path(path)
    lock_file = (path if local is None else local).rstrip("/") + ".lock"
    key, held = (lock_file if local is None else os.path.abspath(lock_file)), _held_locks.files
    if key in held or (local is None and spark is None and not without_atomic_rename(path)):
        yield
        return
    release = None
    if local is not None:
        release = _take_flock(lock_file, stage).close  # closing releases the lock
    elif without_atomic_rename(path):
        log.warning(
            "%s:// has no atomic rename or create-if-absent: %s is replaced by copying, so a reader or a crash "
            "during the swap can find it partly replaced (a rerun repairs it), and no lock keeps a second run "
            "out: run one stage at a time (README: File systems)",
            without_atomic_rename(path),
            path,
        )
    else:
        assert spark is not None
        release = _Lease.take(spark, lock_file, stage, log).release
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        if release is not None:
            release()


def _holder_text(stage: str, extra: str = "") -> str:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{stage} (pid {os.getpid()} on {socket.gethostname()}, since {started}{extra})"


def _take_flock(lock_file: str, stage: str) -> IO[str]:
    """Take the flock on ``lock_file`` and write who holds it; return the open file that holds it."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
    handle = open(lock_file, "a+", encoding="utf-8")  # noqa: SIM115 (held until the stage ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StageBusyError(
            f"{stage} is already running: {lock_file} is held by {holder}; wait for that run to end"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(_holder_text(stage) + "\n")
    handle.flush()
    return handle


def lease_seconds() -> float:
    """The lease of a lock file on a Hadoop file system (``METER_LOCK_LEASE_SECONDS``)."""
    text = os.environ.get(ENV_LEASE_SECONDS, "")
    try:
        value = float(text) if text else DEFAULT_LEASE_SECONDS
    except ValueError:
        raise ValueError(f"{ENV_LEASE_SECONDS} must be a number of seconds, not {text!r}") from None
    if value < 1:
        raise ValueError(f"{ENV_LEASE_SECONDS} must be at least 1 second, not {text!r}")
    return value


class _Lease:
    """A lock file on a Hadoop file system, renewed by a thread while its holder runs."""

    def __init__(self, spark: SparkSession, lock_file: str, log: logging.Logger, lease: float) -> None:
        self.spark, self.lock_file, self.log, self.lease = spark, lock_file, log, lease
        self.path = jvm.gateway(spark).org.apache.hadoop.fs.Path(lock_file)
        self.fs: Any = self.path.getFileSystem(jvm.hadoop_configuration(spark))
        self.token = uuid.uuid4().hex
        self.stopped = threading.Event()

    @classmethod
    def take(cls, spark: SparkSession, lock_file: str, stage: str, log: logging.Logger) -> _Lease:
        lease = cls(spark, lock_file, log, lease_seconds())
        text = _holder_text(stage, f"; lease {lease.lease:g} s; token {lease.token}")
        for _ in range(5):  # another run may take it, or free it, between two of these steps
            if lease._create(text):
                thread = threading.Thread(target=lease._renew, name=f"lease {lock_file}", daemon=True)
                thread.start()
                return lease
            lease._take_over_if_stale(stage)
        raise StageBusyError(f"{stage}: {lock_file} changed hands repeatedly while it was being taken; try again")

    def _create(self, text: str) -> bool:
        """Create the lock file if it is absent (atomic on HDFS and ADLS Gen2); return whether this run did."""
        try:
            stream = self.fs.create(self.path, False)
        except Exception as error:  # Py4JJavaError: FileAlreadyExistsException, or a file being created
            if "AlreadyExists" in str(error) or "AlreadyBeingCreated" in str(error):
                return False
            raise
        try:
            stream.write(bytearray(text.encode("utf-8") + b"\n"))
        finally:
            stream.close()
        return True

    def _take_over_if_stale(self, stage: str) -> None:
        """Refuse when the lock's holder renewed it within the lease; otherwise move its file aside."""
        holder = (read_text(self.spark, self.lock_file) or "").strip()
        try:
            renewed = int(self.fs.getFileStatus(self.path).getModificationTime()) / 1000
        except Exception as error:
            if "FileNotFound" in str(error):
                return  # freed meanwhile: create again
            raise
        age = time.time() - renewed
        if age <= self.lease:
            raise StageBusyError(
                f"{stage} is already running: {self.lock_file} is held by {holder or 'another run'}, renewed "
                f"{max(age, 0):.0f} s ago; wait for that run to end (a run that is gone loses the lock "
                f"{self.lease:g} s after its last renewal)"
            )
        self.log.warning(
            "taking over %s: its holder, %s, has not renewed it for %.0f s (lease %g s)",
            self.lock_file,
            holder or "unknown",
            age,
            self.lease,
        )
        # Renamed aside, not deleted: only one run's rename of a name succeeds, and the one that moved a
        # lock that was taken meanwhile (not the stale one it read) can tell and put it back.
        aside_name = f"{self.lock_file}.stale-{self.token}"
        aside = jvm.gateway(self.spark).org.apache.hadoop.fs.Path(aside_name)
        if not self.fs.rename(self.path, aside):
            return
        if (read_text(self.spark, aside_name) or "").strip() != holder:
            self.fs.rename(aside, self.path)  # a fresh lock: back (fails only if a third run took it meanwhile)
            return
        self.fs.delete(aside, False)

    def _renew(self) -> None:
        """Set the lock file's modification time every quarter lease; stop the process if the lock was lost."""
        interval = self.lease / RENEWALS_PER_LEASE
        while not self.stopped.wait(interval):
            try:
                ours = self.token in (read_text(self.spark, self.lock_file) or "")
                if ours:
                    self.fs.setTimes(self.path, int(time.time() * 1000), -1)
            except Exception as error:  # the file system is away for a moment: the next renewal tries again
                if self.stopped.is_set():
                    return
                self.log.warning("could not renew %s: %s", self.lock_file, str(error).splitlines()[0])
                continue
            if not ours and not self.stopped.is_set():
                self.log.error(
                    "%s was taken over by another run (this one did not renew it for a whole lease of %g s): "
                    "stopping now, before it writes beside that run; a restart repairs what this one left",
                    self.lock_file,
                    self.lease,
                )
                logging.shutdown()
                os._exit(EXIT_BUSY)

    def release(self) -> None:
        """Stop renewing and delete the lock file if it is still this run's."""
        self.stopped.set()
        try:
            if self.token in (read_text(self.spark, self.lock_file) or ""):
                self.fs.delete(self.path, False)
        except Exception as error:  # a lock left behind is taken over after its lease
            self.log.warning("could not remove %s: %s", self.lock_file, str(error).splitlines()[0])
