"""Stage 2, processor: consumer_data into typed measurements (processed_data) and quarantine_data.

The stage's code is ``meter_stream/processor.py``; this script runs it, as ``python exercises/processor.py`` (the
script's folder holds the package) or under spark-submit (ship the package with ``--py-files``,
``make package``). Options: ``python exercises/processor.py --help``.
"""

import sys

from meter_stream.processor import main

if __name__ == "__main__":
    sys.exit(main())
