# The measurement producer (live mode), as the `producer` service of docker-compose.yml.
# It needs no Spark: only confluent-kafka, tqdm and the shared message format.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir confluent-kafka==2.16.1 tqdm==4.70.1
COPY exercises/meter_stream/__init__.py exercises/meter_stream/message.py exercises/meter_stream/config.py exercises/meter_stream/kafka_client.py exercises/meter_stream/
COPY producer.py .
ENTRYPOINT ["python", "producer.py"]
