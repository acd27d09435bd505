# The measurement producer (live mode), as the `producer` service of docker-compose.yml.
# It needs no Spark: only confluent-kafka, tqdm and the shared message format.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir confluent-kafka==2.16.1 tqdm==4.70.1
COPY exercises/common/__init__.py exercises/common/message.py exercises/common/config.py exercises/common/kafka_client.py exercises/common/
COPY producer.py .
ENTRYPOINT ["python", "producer.py"]
