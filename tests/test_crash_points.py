"""Crash-point injection: the live mode killed at each file-system mutation in turn gives what a batch run gives.

For each scenario the harness runs one step of the live mode (a cycle, or a start with its full run) with the
storage mutation hook, which counts its mutations (writes, renames, exchanges, deletes, folders made) and
copies the datastore just before each: all that a SIGKILL there would leave, as the stages keep nothing else
across a restart. Then, for k = 1 .. that count, it restarts the live mode on the k-th copy and compares
everything with the uninterrupted run; from the last crash point that restores the state before the step
and from the last one after it, it runs the remaining cycles and compares with a batch run of the same input.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
from collections.abc import Callable

import pytest

from meter_stream import checker, cleaner, config, live, processor, storage
from meter_stream.contracts import (
    CLEANED_SCHEMA,
    PROCESSED_SCHEMA,
    QUARANTINE_SCHEMA,
    UNKNOWN_SERIES_SCHEMA,
)
from meter_stream.storage import read_output
from tests.helpers import Crash, Mutations, epoch, message, with_hook, write_step_files

T0 = epoch("2026-11-25 13:58:00")  # the steps cross from hour 13 into hour 14 at T0 + 120 s
A = ("device1", "energy import")
B = ("device2", "energy import")
C = ("device1", "energy export")
X = ("device9", "energy import")  # outside the catalog


def msg(series, seconds, value, report_lag=1.0):
    return message(T0 + seconds, T0 + seconds + report_lag, *series, value=value)


STEPS = [
    # the start: two series in hour 13, one outside the catalog
    [msg(A, 0, 10), msg(A, 10, 11), msg(A, 20, 12), msg(B, 0, 50), msg(B, 20, 52), msg(X, 0, 1)],
    # appending: new measurements after each series' latest, a new series, a bad record
    [msg(A, 30, 13), msg(A, 50, 15), msg(B, 30, 53), msg(C, 10, 5), b"{"],
    # late: hour 13 rewritten in both outputs (a hole filled, a correction, a tie)
    [msg(A, 40, 14), msg(A, 10, 99, report_lag=5.0), msg(B, 10, 51), msg(B, 30, 60)],
    # into hour 14, with late data for hour 13 whose recomputed grid creates hour 14 by a swap; hour 13 closes
    [msg(A, 130, 20), msg(B, 25, 40), msg(B, 140, 70), msg(C, 20, 6), msg(X, 5, 2)],
    # appending in hour 14 while the closed hour 13 is compacted
    [msg(A, 140, 21), msg(B, 150, 71), msg(C, 130, 9)],
    # appending once more (the remaining cycle after most crashes), and nothing usable: quarantine files rolled
    [msg(A, 150, 22), msg(C, 140, 10), b"not json"],
    # a last bad record (the remaining cycle after the roll)
    [msg(A, 160, 23), b"[]"],
]

SETTINGS = live.Settings(cleaner.CleanerConfig(max_gap_seconds=60), checker.CheckerConfig(), 3600.0)
#: Settings that give the same outputs but another fingerprint: a start with them needs a full run.
OTHER_SETTINGS = dataclasses.replace(SETTINGS, clock=processor.ClockLimits(max_ahead_seconds=7200.0))
OUTPUTS = (
    ("processed_data", PROCESSED_SCHEMA),
    ("cleaned_data", CLEANED_SCHEMA),
    ("quarantine_data", QUARANTINE_SCHEMA),
    ("unknown_series", UNKNOWN_SERIES_SCHEMA),
)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A step of the live mode to crash at each of its mutations, and how the datastore reaches it.

    Attributes:
        name: what the step does.
        in_consumer_data: how many steps consumer_data holds at the first start (its full run's input).
        cycles_before: the cycles run before the step, one step each.
        start: the step is a start with ``OTHER_SETTINGS`` (a full run); else the next cycle.
        interrupted_before: before the step, one more cycle is killed before its commit (its undo
            folders left behind), and consumer_data gets every step so far, as the consumer wrote them.
        exchange: folders are exchanged in one step; else by renames, as on a file system without an
            exchange (HDFS).
        roll_fanout: quarantine files of one level merged once this many are there (``live.store.ROLL_FANOUT``).
    """

    name: str
    in_consumer_data: int
    cycles_before: int
    start: bool = False
    interrupted_before: bool = False
    exchange: bool = True
    roll_fanout: int = live.store.ROLL_FANOUT

    @property
    def steps_read(self) -> int:
        """How many steps the live mode has read when the step starts (the step reads the next one)."""
        return self.in_consumer_data + self.cycles_before + self.interrupted_before

    @property
    def last_step(self) -> int:
        """The step of the remaining cycle after the crashed one."""
        return self.steps_read + (0 if self.start else 1)


SCENARIOS = [
    Scenario("an appending cycle", 1, 0),
    Scenario("a cycle with late data that rewrites hours", 1, 1),
    Scenario("a cycle into a new hour with late data for the previous one", 1, 2),
    Scenario("a cycle into a new hour, its hours swapped by renames (HDFS)", 1, 2, exchange=False),
    Scenario("a cycle that compacts a closed hour", 1, 3),
    Scenario("a cycle that rolls quarantine files", 1, 4, roll_fanout=2),
    Scenario("the start-up full run", 2, 0, start=True),
    Scenario("a full run after a killed cycle left its undo folders", 1, 2, start=True, interrupted_before=True),
]


def outputs(spark, paths: config.Paths) -> dict[str, list[tuple]]:
    """Every output's rows, sorted, as text (the outputs that exist)."""
    found = {}
    for folder, schema in OUTPUTS:
        if not os.path.exists(getattr(paths, folder)):
            continue
        frame = read_output(spark, getattr(paths, folder), schema, cleaner.log, "test")
        found[folder] = sorted(tuple(str(v) for v in r) for r in frame.collect())
    return found


def live_state(spark, paths: config.Paths) -> dict[str, object]:
    """What the live mode carries to its next cycle: the cursor, the per-series state, the running figures."""
    cursor = live.read_cursor(spark, paths)
    return {
        "cursor": cursor.to_json(),
        "series": sorted(map(str, live.store.read_series_state(spark, paths, cursor.cycle).collect())),
        "figures": sorted(map(str, live.read_figures(spark, paths, cursor.cycle).collect())),
    }


def leftovers(root: str, cycle: int) -> list[str]:
    """Files and folders that no committed state explains: undo, staging, older state, later cycles' files."""
    found = []
    keep = {f"cursor-{cycle:010d}.json", f"series-{cycle}", f"figures-{cycle}"}
    for folder, folders, files in os.walk(root):
        relative = os.path.relpath(folder, root)
        for name in folders + files:
            if re.search(r"\.undo-|\.staging|\.previous", name):
                found.append(os.path.join(relative, name))
            tagged = re.match(rf"{live.CYCLE_TAG}(\d+)-", name)
            if tagged and int(tagged.group(1)) > cycle:
                found.append(os.path.join(relative, name))
        if relative == "live_state":
            found += [name for name in folders + files if name not in keep and not name.startswith(".")]
    return found


@pytest.fixture(scope="module")
def inputs(spark, tmp_path_factory):
    """The step files, and a function giving a batch run's outputs over the first n of them (the oracle)."""
    folder = tmp_path_factory.mktemp("crash-inputs")
    files = write_step_files(spark, str(folder / "raw"), STEPS)
    batches: dict[int, dict] = {}

    def batch(steps: int) -> dict[str, list[tuple]]:
        if steps not in batches:
            raw = str(folder / f"raw-{steps}")
            os.makedirs(raw)
            for file in files[:steps]:
                shutil.copy(file, raw)
            paths = dataclasses.replace(config.Paths.under(str(folder / f"batch-{steps}")), consumer_data=raw)
            processor.run(spark, paths)
            cleaner.run(spark, paths, SETTINGS.cleaner)
            batches[steps] = outputs(spark, paths)
        return batches[steps]

    return files, batch


def settings_of(scenario: Scenario) -> live.Settings:
    return OTHER_SETTINGS if scenario.start else SETTINGS


def reach(spark, paths: config.Paths, scenario: Scenario, files: list[str]) -> live.Cursor | None:
    """Bring a new datastore to just before the scenario's step; return the committed cursor (None: none yet)."""
    os.makedirs(paths.consumer_data)
    for file in files[: scenario.in_consumer_data]:
        shutil.copy(file, paths.consumer_data)
    if scenario.start and scenario.cycles_before == 0 and not scenario.interrupted_before:
        return None
    cursor = live.start(spark, paths, SETTINGS)
    for step in range(scenario.in_consumer_data, scenario.in_consumer_data + scenario.cycles_before):
        cursor = live.run_cycle(spark, paths, SETTINGS, cursor, [files[step]], {})[0]
    if scenario.interrupted_before:
        step = scenario.steps_read - 1
        root = os.path.dirname(paths.cleaned_data)
        shutil.copytree(root, root + ".kept")
        counted = Mutations()
        with_hook(counted, lambda: live.run_cycle(spark, paths, SETTINGS, cursor, [files[step]], {}))
        shutil.rmtree(root)
        os.rename(root + ".kept", root)
        commit = next(k for k, seen in enumerate(counted.seen, 1) if "/cursor-" in seen)
        with pytest.raises(Crash):
            with_hook(Mutations(commit), lambda: live.run_cycle(spark, paths, SETTINGS, cursor, [files[step]], {}))
        assert [name for name in os.listdir(root) if ".undo-" in name]
        for file in files[scenario.in_consumer_data : scenario.steps_read]:
            shutil.copy(file, paths.consumer_data)
    return cursor


def run_step(spark, paths: config.Paths, scenario: Scenario, files: list[str], cursor) -> live.Cursor:
    """Run the scenario's step: a start, or one cycle."""
    if scenario.start:
        return live.start(spark, paths, OTHER_SETTINGS)
    return live.run_cycle(spark, paths, SETTINGS, cursor, [files[scenario.steps_read]], {})[0]


def run_remaining(spark, paths: config.Paths, scenario: Scenario, files: list[str], cursor) -> live.Cursor:
    """The cycles after ``cursor`` up to the scenario's last step; return the last cursor."""
    # After a start at the step, cycle 1 reads the step after those in consumer_data; else the numbering goes on.
    first = scenario.steps_read if scenario.start else scenario.in_consumer_data
    for step in range(first + cursor.cycle, scenario.last_step + 1):
        cursor, result = live.run_cycle(spark, paths, settings_of(scenario), cursor, [files[step]], {})
        assert result.accounting.balanced()
    return cursor


@dataclasses.dataclass(frozen=True)
class State:
    """What a later cycle reads: the datastore's files (names and sizes; without checksums, locks, reports and
    raw input), the committed cursor, the unknown series (rewritten at each start); and ``rows``, when
    asked: the rows of the outputs and of the live state."""

    files: list[tuple[str, int]]
    masked_files: list[str]
    cursor: str | None
    unknown: list[tuple] | None
    rows: Callable[[], tuple]


def state_of(spark, paths: config.Paths, root: str) -> State:
    cursor = live.read_cursor(spark, paths)
    return State(
        files(root),
        [re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "*", name) for name, _size in files(root)],
        cursor and cursor.to_json(),
        outputs(spark, paths).get("unknown_series") if os.path.exists(paths.unknown_series) else None,
        lambda: (outputs(spark, paths), cursor and live_state(spark, paths)),
    )


def files(root: str) -> list[tuple[str, int]]:
    found = []
    for folder, _folders, names in os.walk(root):
        relative = os.path.relpath(folder, root)
        if relative.split(os.sep)[0] in ("reports", "consumer_data", "unknown_series"):
            continue
        found += [
            (os.path.join(relative, name), os.path.getsize(os.path.join(folder, name)))
            for name in names
            if not name.endswith((".crc", ".lock"))
        ]
    return sorted(found)


def assert_same_state(spark, paths: config.Paths, root: str, expected: State, expected_rows: tuple, where: str):
    """The datastore is in ``expected``'s state: the same files; or, where writes ran again (a full run), files
    laid out alike (their write ids masked) with the same rows. A data file is written once under a name
    unique to its write, so the same name and size is the same content."""
    found = state_of(spark, paths, root)
    assert (found.cursor, found.unknown) == (expected.cursor, expected.unknown), where
    if found.files != expected.files:
        assert found.masked_files == expected.masked_files, where
        assert found.rows() == expected_rows, where


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_kill_at_every_mutation_then_a_restart_gives_what_an_uninterrupted_run_and_a_batch_run_give(
    spark, tmp_path, inputs, scenario, capsys, monkeypatch
):
    """Each crash point is the datastore as the step left it just before that mutation (copied there). The
    restart from it must give exactly the state before the step (its recover undid the cycle) or after it
    (the cycle had committed, or the start's full run ran again): the same rows, live state and files. From
    the last crash point of each kind the remaining cycles run, and the outputs are a batch run's."""
    inputs_, batch = inputs
    if not scenario.exchange:
        for module in (storage, live.store):
            monkeypatch.setattr(module, "exchange_paths", lambda *_paths: False)
    monkeypatch.setattr(live.store, "ROLL_FANOUT", scenario.roll_fanout)
    root, snapshots = str(tmp_path / "live"), str(tmp_path / "crash-points")
    paths = config.Paths.under(root)
    cursor = reach(spark, paths, scenario, inputs_)
    before = state_of(spark, paths, root)
    before_rows = before.rows()
    counted = Mutations(root=root, snapshots=snapshots)
    step_cursor = with_hook(counted, lambda: run_step(spark, paths, scenario, inputs_, cursor))
    after = state_of(spark, paths, root)
    after_rows = after.rows()
    final = run_remaining(spark, paths, scenario, inputs_, step_cursor)
    expected = (outputs(spark, paths), live_state(spark, paths))
    assert expected[0] == batch(scenario.last_step + 1)
    assert not leftovers(root, final.cycle)
    assert len(counted.seen) > 5, counted.seen

    kinds: dict[str, int] = {}
    for crash_at, mutation in enumerate(counted.seen, 1):
        where = f"killed before mutation {crash_at} of {len(counted.seen)}: {mutation}"
        shutil.rmtree(root)
        shutil.copytree(os.path.join(snapshots, str(crash_at)), root)
        restarted = live.start(spark, paths, settings_of(scenario))
        kind = "after" if restarted.cycle == step_cursor.cycle else "before"
        expected_state, expected_rows = (after, after_rows) if kind == "after" else (before, before_rows)
        assert_same_state(spark, paths, root, expected_state, expected_rows, where)
        kinds[kind] = crash_at
    for kind, crash_at in sorted(kinds.items()):
        shutil.rmtree(root)
        shutil.copytree(os.path.join(snapshots, str(crash_at)), root)
        final = run_remaining(spark, paths, scenario, inputs_, live.start(spark, paths, settings_of(scenario)))
        where = f"killed before mutation {crash_at} (restart gave the state {kind} the step), cycles run to the end"
        assert (outputs(spark, paths), live_state(spark, paths)) == expected, where
        assert not leftovers(root, final.cycle), where
    with capsys.disabled():
        restored = sum(1 for k in range(1, len(counted.seen) + 1) if k <= kinds.get("before", 0))
        print(
            f"\n{scenario.name}: {len(counted.seen)} crash points, each restarted and compared "
            f"({restored} back to the state before the step, {len(counted.seen) - restored} to the state after it)"
        )


class Reader:
    """A reader of processed_data and cleaned_data at each instant between two mutations (the storage hook):
    it lists each output's hours and reads their files, as a query listing the folders would."""

    def __init__(self, paths: config.Paths) -> None:
        self.outputs = {"processed_data": paths.processed_data, "cleaned_data": paths.cleaned_data}
        self.seen: dict[str, dict[str, int]] = {name: {} for name in self.outputs}
        self.instants = 0

    def __call__(self, kind: str, path: str) -> None:
        import duckdb  # a benchmark dependency; make test installs it

        self.instants += 1
        for name, output in self.outputs.items():
            hours = sorted(h for h in os.listdir(output) if h.startswith("hour=")) if os.path.isdir(output) else []
            counts = {}
            keys: list[tuple] = []
            for hour in hours:
                data = sorted(glob.glob(os.path.join(output, hour, "*.parquet")))
                rows = (
                    duckdb.sql(f"SELECT device_id, signal_name, t_measurement FROM read_parquet({data!r})").fetchall()
                    if data
                    else []
                )
                counts[hour], keys = len(rows), keys + rows
            where = f"{name} before {kind} {path}"
            assert len(keys) == len(set(keys)), f"a (series, time) twice in {where}"
            for hour, count in self.seen[name].items():
                assert counts.get(hour, 0) >= count, f"{hour} missing or shrunk in {where}"
            self.seen[name] = counts


def test_a_reader_at_every_instant_of_the_cycles_sees_each_hour_whole_never_missing_never_twice(
    spark, tmp_path, inputs
):
    """Between every two mutations of a start and of cycles that append, rewrite hours for late data, create
    an hour by a swap and compact a closed hour, each output's hours are all there, none shrunk, and no
    (series, time) is listed twice. And no session-wide setting changed."""
    files_, _batch = inputs
    paths = config.Paths.under(str(tmp_path / "live"))
    os.makedirs(paths.consumer_data)
    shutil.copy(files_[0], paths.consumer_data)
    reader = Reader(paths)

    def start_and_cycles():
        cursor = live.start(spark, paths, SETTINGS)
        for step in files_[1:]:
            cursor = live.run_cycle(spark, paths, SETTINGS, cursor, [step], {})[0]
        return cursor

    settings_before = dict(spark.conf.getAll)
    assert with_hook(reader, start_and_cycles).cycle == len(STEPS) - 1
    assert reader.instants > 100 and all(reader.seen.values())
    # the stages and cycles change no session-wide setting (other threads of the live mode share the session)
    assert dict(spark.conf.getAll) == settings_before
