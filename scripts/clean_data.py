"""Remove a datastore's stage folders (``make clean-data``), refusing anything that does not look like one.

Refused, with exit 2 and nothing removed: an empty path, ``/``, the home folder, a folder that does not
exist, and a folder holding anything besides the stage folders (``meter_stream.config.FOLDERS``), their
locks and what interrupted runs leave beside them (``.staging``, ``.previous``, ``.undo-N``,
``.staging-N``). The folder itself is kept.

Usage:
    python scripts/clean_data.py DATASTORE
"""

from __future__ import annotations

import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "exercises")]

from meter_stream.config import FOLDERS  # noqa: E402 (after the path above)

#: A stage folder, its lock, or what an interrupted run leaves beside it.
DATASTORE_ENTRY = re.compile(
    rf"^({'|'.join(map(re.escape, (name for name, _ in FOLDERS.values())))})"
    r"(\.lock|\.staging|\.previous|\.undo-\d+|\.staging-.+)?$"
)


def refusal(datastore: str) -> str | None:
    """Why ``datastore`` is not removed, or None when it looks like a datastore."""
    if not datastore.strip():
        return "no datastore given (DATASTORE is empty)"
    folder = os.path.realpath(datastore)
    if folder in ("/", os.path.realpath(os.path.expanduser("~"))):
        return f"{datastore} is {folder}, not a datastore"
    if not os.path.isdir(folder):
        return f"{datastore} is not a folder"
    others = sorted(name for name in os.listdir(folder) if not DATASTORE_ENTRY.match(name))
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        return f"{datastore} holds more than a datastore's folders ({shown}); remove those yourself if you mean it"
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    reason = refusal(args[0])
    if reason:
        print(f"clean-data refused: {reason}", file=sys.stderr)
        return 2
    folder = os.path.realpath(args[0])
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    print(f"removed the stage folders under {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
