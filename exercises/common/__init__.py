"""Shared code of the pipeline stages, one module per concern.

Pure Python (also used by ``producer.py`` and ``test_your_docker_setup/reader.py``, and copied into
the producer's Docker image):

- ``message``: the measurement message format and the expected series.
- ``config``: datastore layout, command-line/environment options, logging.
- ``kafka_client``: Kafka client settings (broker, topic, security), secrets kept out of logs.

Needs pyspark:

- ``contracts``: schemas, quality flags, the hour partition, per-series settings.
- ``session``: the SparkSession builder and driver-side helpers.
- ``storage``: exit codes, locks, atomic replace, partitions, small files on any Hadoop file system.
- ``raw_input``: consumer_data's topic generations and file-sink logs.
"""
