"""The live mode's protocol (``pipeline.py --watch``): cycles that cost what their new data costs.

Read top to bottom, one module each: ``store`` (1, 2, 4), ``cycle`` (3), ``late`` (3's late measurements),
``checks`` (the checker's part of 3), ``compaction`` (5), ``runner`` (6).

1. **Cursor.** consumer_data is a file-sink output; the files its log committed after the cursor
   are a cycle's input (``new_raw_files``).
2. **State** (``live_state/``, next to the outputs): ``cursor-N.json`` (the last committed cycle, the
   raw positions after it, the settings it ran with, the newest slot, the hours still open) and, per
   series, one row in ``series-<cycle>/``: its processed rows and latest t_measurement (the
   processor's), its last grid slot and value, the tail of grid values and the flat run the checks
   continue from (the cleaner's and the checker's). ``figures-<cycle>/`` holds the running check
   figures per series and hour. A cycle reads the state instead of searching the outputs.
3. **A cycle** (``run_cycle``): parse the new raw rows once; a measurement later than its series'
   latest is *appended* to processed_data, and the grid grows from the series' last slot (kept in
   the state) to its newest measurement; a measurement at or before the series' latest is *late*:
   the hours it falls in are rewritten (processed_data), and its series' grid is recomputed from the
   measurement before it (cleaned_data), as a batch run would. The checks run on the new grid rows
   with what their series ended with carried from the state, and the running figures of the report
   window are summed up.
4. **Files.** Appended files are named ``cycle-<N>-...`` inside their hour folder; a rewritten hour
   folder, marked as cycle N's, is exchanged with the old one in one step (``swap_hours``), the old
   one kept in ``<output>.undo-<N>`` until the cycle is committed. The commit is one atomic step, the
   rename of a new ``cursor-N.json`` into place (the newest wins; older ones are removed after it); on
   start, ``recover`` undoes what an uncommitted cycle left (its tagged files, its swapped hours, told
   apart by their marks), so a SIGKILL at any mutation loses nothing and a reader never sees an hour
   missing or a (series, slot) twice (``tests/test_crash_points.py``).
5. **Compaction.** Hours that cycles appended to are compacted once they are closed (older than the
   newest slot's hour): one hour per cycle, a few files each.
6. **The runner** (``watch``): a full run when there is no usable state, then the consumer in a
   thread and a cycle whenever new raw files are committed.

Spark's own machinery, considered: its file-stream source could replace the cursor (it reads a
file sink's log too), but consumer_data has one folder per topic generation, each a file-sink output
of its own, and a cycle's input, state and outputs must commit together: one cursor over the logs,
committed with the state, does both. ``transformWithStateInPandas`` would keep the per-series state
with exactly-once checkpoints, but calls Python once per series and micro-batch (tens of thousands
of calls per cycle at fleet sizes) and does not cover the rewrite of hours for late data; the state
here is a small parquet table (one row per series) joined in Spark with native functions.
"""

from meter_stream.live.compaction import Compactor
from meter_stream.live.cycle import CycleResult, run_cycle
from meter_stream.live.runner import DEFAULT_MAX_ROWS_PER_CYCLE, LIVE_CYCLES, RunnerLimits, percentile, start, watch
from meter_stream.live.store import (
    CYCLE_TAG,
    UNDO_SUFFIX,
    Cursor,
    Settings,
    SinkPosition,
    append_files,
    cursor_files,
    new_raw_files,
    new_sink_files,
    read_cursor,
    read_figures,
)

__all__ = [
    "CYCLE_TAG",
    "DEFAULT_MAX_ROWS_PER_CYCLE",
    "LIVE_CYCLES",
    "UNDO_SUFFIX",
    "Compactor",
    "Cursor",
    "CycleResult",
    "RunnerLimits",
    "Settings",
    "SinkPosition",
    "append_files",
    "cursor_files",
    "new_raw_files",
    "new_sink_files",
    "percentile",
    "read_cursor",
    "read_figures",
    "run_cycle",
    "start",
    "watch",
]
