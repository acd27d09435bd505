"""Stage 1, consumer: the Kafka topic into consumer_data, exactly once.

The stage's code is ``meter_stream/consumer.py``; this script runs it, as ``python exercises/consumer.py`` (the
script's folder holds the package) or under spark-submit (ship the package with ``--py-files``,
``make package``). Options: ``python exercises/consumer.py --help``.
"""

import sys

from meter_stream.consumer import main

if __name__ == "__main__":
    sys.exit(main())
