"""Stage 3, cleaner: processed_data onto a regular grid per series, holes filled and flagged (cleaned_data).

The stage's code is ``meter_stream/cleaner.py``; this script runs it, as ``python exercises/cleaner.py`` (the
script's folder holds the package) or under spark-submit (ship the package with ``--py-files``,
``make package``). Options: ``python exercises/cleaner.py --help``.
"""

import sys

from meter_stream.cleaner import main

if __name__ == "__main__":
    sys.exit(main())
