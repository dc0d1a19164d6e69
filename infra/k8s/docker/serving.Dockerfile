# The UGT application image: `ugt serve`, the schema registry (`python -m infra.schema_registry`) and the Feast
# apply/materialize jobs of infra/k8s/ugt. Build from the repository root:
#   docker build -f infra/k8s/docker/serving.Dockerfile -t ghcr.io/ugt/ugt-serving:0.1.0 .
# torch from infra/requirements.lock is PyPI's Linux wheel, which carries its CUDA libraries: the same image
# runs on CPU nodes and on GPU nodes (NVIDIA device plugin; values serving.gpu.enabled).
FROM python:3.11.11-slim-bookworm

# g++: torch.compile of the CPU serving steps (serving key torch_compile) builds C++ at start-up
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ugt
# The pinned environment first (its layer is reused while only the code changes)
COPY infra/requirements.lock infra/requirements.lock
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir uv==0.13.9 \
    && .venv/bin/uv pip install --no-cache --python .venv/bin/python -r infra/requirements.lock

COPY pyproject.toml README.md ./
COPY contracts contracts
COPY streams streams
COPY feature_repo feature_repo
COPY models models
COPY jobs jobs
COPY serving serving
COPY infra infra
COPY schemas schemas
COPY bench bench
COPY ugt ugt
RUN .venv/bin/uv pip install --no-cache --python .venv/bin/python --no-deps -e . \
    && mkdir -p /var/ugt feature_repo/data \
    && chown -R 10001:10001 /var/ugt feature_repo/data

ENV PATH=/opt/ugt/.venv/bin:$PATH \
    HOME=/var/ugt \
    UGT_VAR=/var/ugt \
    UGT_CACHE=/var/ugt/cache \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8000
CMD ["ugt", "serve", "--host", "0.0.0.0", "--port", "8000"]
