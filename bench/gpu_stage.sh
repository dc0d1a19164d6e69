#!/usr/bin/env bash
# Stages, on this machine (it has the network), what the GPU machine lacks (it has none), into folders git ignores
# that a device call carries (`carry: [".whl", ".ugtdata"]`, 64 MiB a call in all):
#   .whl/                the wheels the GPU image does not hold (the serving path's FastAPI, Redis and Kafka clients,
#                        Avro, ...), at the versions infra/requirements.lock pins; bench/gpu_serving.sh installs them
#   .ugtdata/debs/       Debian's redis-server and its libraries, for `bash bench/gpu_serving.sh e2e`
#   .ugtdata/datasets/   with --data: ML-1M and its semantic IDs (`python -m bench.ml1m_quality stage`, ~14 MiB)
#   bash bench/gpu_stage.sh            # wheels + debs (~14 MiB)
#   bash bench/gpu_stage.sh --data     # and the dataset (needs .venv: `bash infra/install.sh`)
set -euo pipefail
cd "$(dirname "$0")/.."
# not in the GPU image (its package list: the device tool's KINDS.md); each one's own needs that it lacks included
WHEELS=(fastapi starlette pydantic pydantic-core annotated-types typing-inspection annotated-doc opentelemetry-api
        importlib-metadata uvicorn httptools redis pyjwt hiredis confluent-kafka orjson fastavro mmh3)
pins=()
for name in "${WHEELS[@]}"; do
  pin=$(grep -i -E "^${name}==" infra/requirements.lock || true)
  [ -n "$pin" ] || { echo "gpu_stage.sh: $name is not pinned in infra/requirements.lock" >&2; exit 2; }
  pins+=("$pin")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
mkdir -p .ugtdata/debs
(cd .ugtdata/debs && apt-get download redis-tools liblzf1 libjemalloc2 libatomic1 2>/dev/null)
if [ "${1:-}" = "--data" ]; then
  .venv/bin/python -m bench.ml1m_quality stage
fi
du -sh .whl .ugtdata
