"""The four stages in one SparkSession, and the live mode (--watch).

The stage's code is ``meter_stream/pipeline.py``; this script runs it, as ``python exercises/pipeline.py`` (the
script's folder holds the package) or under spark-submit (ship the package with ``--py-files``,
``make package``). Options: ``python exercises/pipeline.py --help``.
"""

import sys

from meter_stream.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
