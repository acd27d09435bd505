"""Stage 4, checker: data-quality checks on cleaned_data, with a report and an exit code.

The stage's code is ``meter_stream/checker.py``; this script runs it, as ``python exercises/checker.py`` (the
script's folder holds the package) or under spark-submit (ship the package with ``--py-files``,
``make package``). Options: ``python exercises/checker.py --help``.
"""

import sys

from meter_stream.checker import main

if __name__ == "__main__":
    sys.exit(main())
