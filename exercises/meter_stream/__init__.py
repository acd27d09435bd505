"""meter-stream: the pipeline's code, run by the scripts in ``exercises/`` and shipped to a cluster whole.

The stages, each with its ``main`` and its ``run(...)``:

- ``consumer``: the Kafka topic into consumer_data, exactly once.
- ``processor``: consumer_data into typed measurements (processed_data) and quarantine_data.
- ``cleaner``: processed_data onto a 10-second grid per series (cleaned_data).
- ``checker``: the data-quality checks (``check_figures``: the figures; ``check_report``: tables, chart).
- ``pipeline``: the four in one SparkSession; ``live``: the live mode behind ``--watch``.

Shared by them, one module per concern. Pure Python (also used by ``producer.py`` and
``test_your_docker_setup/reader.py``, and copied into the producer's Docker image):

- ``message``: the measurement message format and the expected series.
- ``config``: datastore layout, command-line/environment options, logging.
- ``kafka_client``: Kafka client settings (broker, topic, security), secrets kept out of logs.

Needs pyspark:

- ``contracts``: schemas, quality flags, the hour partition, per-series settings.
- ``session``: the SparkSession builder and driver-side helpers.
- ``jvm``: the one place that reaches the JVM behind PySpark (what has no public form).
- ``storage``: exit codes, locks, atomic replace, partitions, small files on any Hadoop file system.
- ``raw_input``: consumer_data's topic generations and file-sink logs.

Imports go downwards only: shared modules never import a stage, a stage never imports another
(``pipeline`` and ``live`` run them).
"""
