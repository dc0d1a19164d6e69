# The image of the PyFlink jobs (tokenize, user_state, item_semantic_ids) run by the Flink Kubernetes Operator:
# Flink 2.2.1 (the version of apache-flink in infra/requirements.lock), Python 3.11 with the project's pinned
# environment, the project itself, and the Kafka SQL connector + flink-parquet jars from Maven Central
# (infra/maven) in Flink's lib/, where jobs/common.py and jobs/lake.py look for them. Build from the repo root:
#   docker build -f infra/k8s/docker/flink-job.Dockerfile -t ghcr.io/ugt/ugt-flink-job:0.1.0 .
FROM maven:3.9.9-eclipse-temurin-17 AS jars
WORKDIR /build
COPY infra/maven infra/maven
RUN mvn -q -B -f infra/maven/pom.xml package -Dugt.lib=/jars \
    && mvn -q -B -f infra/maven/flink-parquet.xml package -Dugt.lib=/jars

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM flink:2.2.1-scala_2.12-java17
USER root
COPY --from=uv /uv /usr/local/bin/uv
# A standalone CPython 3.11 (uv's managed builds), independent of the base image's distribution
ENV UV_PYTHON_INSTALL_DIR=/opt/python
WORKDIR /opt/ugt
COPY infra/requirements.lock infra/requirements.lock
RUN uv python install 3.11 \
    && uv venv --python 3.11 .venv \
    && uv pip install --no-cache --python .venv/bin/python -r infra/requirements.lock

# The connector and the parquet + Hadoop jars on the cluster's classpath; flink-python too (thread mode)
COPY --from=jars /jars/flink-connectors/ /opt/flink/lib/
COPY --from=jars /jars/flink-parquet/ /opt/flink/lib/
RUN cp /opt/flink/opt/flink-python-*.jar /opt/flink/lib/

COPY pyproject.toml README.md ./
COPY contracts contracts
COPY streams streams
COPY feature_repo feature_repo
COPY models models
COPY jobs jobs
COPY infra infra
COPY schemas schemas
COPY serving serving
COPY ugt ugt
RUN uv pip install --no-cache --python .venv/bin/python --no-deps -e . \
    && mkdir -p /var/ugt feature_repo/data /flink-data \
    && chown -R flink:flink /var/ugt feature_repo/data /flink-data

# jobs/common.py finds the connector here and, as it is the very jar in lib/, does not ship it with each job
ENV UGT_KAFKA_CONNECTOR_JAR=/opt/flink/lib/flink-sql-connector-kafka-5.0.0-2.2.jar \
    UGT_VAR=/var/ugt \
    UGT_CACHE=/var/ugt/cache \
    PYTHONUNBUFFERED=1
# the image's entrypoint (docker-entrypoint.sh) drops to the flink user
