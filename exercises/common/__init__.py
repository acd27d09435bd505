"""Shared code of the pipeline stages.

- ``message``: the measurement message format and the expected series (pure Python, also used by
  ``producer.py`` and ``test_your_docker_setup/reader.py``).
- ``config``: datastore layout and command-line/environment options (pure Python).
- ``spark``: schemas, the SparkSession builder and safe stage I/O (needs pyspark).
"""
