#!/usr/bin/env bash
# The GPU generator's steps on a GPU machine with no network (the device tool's machine): unpacks ML-1M from
# .ugtdata (ignored by git; carry it), installs carried wheels (.whl) only if pytest is missing (bench/gpu_stage.sh
# makes both on a machine with the network), then
#   bash bench/gpu_serving.sh test                 # kernel + inference parity tests on the GPU
#   bash bench/gpu_serving.sh train MINUTES [ARGS] # a short ML-1M UGT run -> $OUT/checkpoint.pt, summary.json
#        (ARGS go to `ugt train`, e.g. --set tie_order=stable)
#   bash bench/gpu_serving.sh bench [ARGS...]      # bench/serving_gpu.py ARGS --out $OUT/serving_gpu.json
#   bash bench/gpu_serving.sh compress [ARGS...]   # bench/compression_gpu.py ARGS --out $OUT/compression_gpu.json:
#        bf16 vs fp8 vs int8_weight engines on a trained checkpoint (--checkpoint, carried under .ugtdata)
#   bash bench/gpu_serving.sh throughput [ARGS...] # bench/sharded_items.py throughput --device cuda ARGS
#        --out $OUT/train_throughput.json: single-GPU training samples/s, ML-1M and industrial (about 2 minutes)
#   bash bench/gpu_serving.sh topk [ARGS...]       # bench/topk_retrieval.py --device cuda ARGS --out
#        $OUT/topk_retrieval_gpu.json: exact top-k at 100k/1M items, plain vs blocked, eager and graph replay
#   bash bench/gpu_serving.sh distill [ARGS...]    # bench/distill_student.py ARGS --out $OUT/distill_student.json:
#        a smaller student trained from a teacher checkpoint's scores (--teacher), then both: HR@10, CPU req/s
#   bash bench/gpu_serving.sh profile [ARGS...]    # python -m bench.engine_profile ARGS: where an engine step's time
#        goes (a diagnosis, no result file), e.g. --size industrial --kernels, or --paged-attention
#   bash bench/gpu_serving.sh e2e [ARGS...]        # bench/serving_gpu_e2e.py ARGS --out $OUT/serving_gpu_e2e.json:
#        `ugt serve --workers N` over HTTP with Redis; carry .ugtdata/debs (Debian's redis-tools, liblzf1,
#        libjemalloc2, libatomic1: `apt-get download` them), .ugtdata/datasets/ml-1m.tgz and the wheels in .whl
# Several steps in one call: bash bench/gpu_serving.sh test && bash bench/gpu_serving.sh bench --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
export UGT_CACHE=${UGT_CACHE:-/tmp/ugt-cache} PYTHONUNBUFFERED=1
# the tree arrives as a copy inside another repository: pass the project's commit in (UGT_COMMIT=<sha> bash ...),
# or the result records none (bench/common.py git_commit)
export UGT_COMMIT=${UGT_COMMIT:-}
out=${OUT:-/tmp/ugt-bench-out}
mkdir -p "$out"
d=$UGT_CACHE/datasets/ml-1m
if [ ! -f "$d/.complete" ] && [ -f .ugtdata/datasets/ml-1m.tgz ]; then
  mkdir -p "$UGT_CACHE/datasets" && tar xzf .ugtdata/datasets/ml-1m.tgz -C "$UGT_CACHE/datasets" && touch "$d/.complete"
fi
if [ ! -f "$d/.complete" ] && [ -f .ugtdata/ml-1m.inter.gz ]; then
  mkdir -p "$d" && zcat .ugtdata/ml-1m.inter.gz > "$d/ml-1m.inter" && cp .ugtdata/ml-1m.item .ugtdata/ml-1m.user .ugtdata/SOURCE "$d/" && touch "$d/.complete"
fi
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pytest, fastapi, uvicorn, redis, confluent_kafka" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step=${1:-}
shift || true
case "$step" in
  test)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -m pytest -q -p no:cacheprovider tests/models/test_hstu_kernel.py tests/models/test_inference.py \
      tests/models/test_ranking.py tests/models/test_generation.py tests/models/test_kv_append.py \
      tests/models/test_graph_warmup.py tests/models/test_weight_quant.py tests/models/test_blocked_topk.py \
      tests/models/test_slot_attention.py ;;
  train)
    minutes=${1:-4}
    shift || true
    python3 -m ugt.cli train --config models/configs/ugt_ml1m.yaml --out-dir /tmp/ugt-ml1m --quiet \
      --set "max_minutes=$minutes" --set dpo.enabled=false --set "semantic_ids={artifact: .ugtdata/sid/ml1m}" "$@" \
      && cp /tmp/ugt-ml1m/checkpoint.pt /tmp/ugt-ml1m/summary.json "$out/" ;;
  bench)
    python3 bench/serving_gpu.py --out "$out/serving_gpu.json" "$@" ;;
  compress)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -m bench.compression_gpu --out "$out/compression_gpu.json" "$@" ;;
  throughput)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -m bench.sharded_items throughput --device cuda --out "$out/train_throughput.json" "$@" ;;
  topk)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -m bench.topk_retrieval --device cuda --out "$out/topk_retrieval_gpu.json" "$@" ;;
  distill)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -m bench.distill_student --work-dir /tmp/ugt-distill-student --out "$out/distill_student.json" "$@" \
      && cp /tmp/ugt-distill-student/summary.json "$out/distill_student_summary.json" ;;
  profile)
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 -m bench.engine_profile "$@" ;;
  e2e)
    # redis-server from the carried Debian packages, unpacked beside the system (never into /)
    r=/tmp/redis-root
    mkdir -p $r && for f in .ugtdata/debs/*.deb; do dpkg -x "$f" $r; done
    ln -sf redis-check-rdb $r/usr/bin/redis-server  # Debian's redis-server is this binary under another name
    export PATH=$r/usr/bin:$PATH LD_LIBRARY_PATH=$r/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    redis-server --version || exit 1
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 bench/serving_gpu_e2e.py --out "$out/serving_gpu_e2e.json" "$@" ;;
  *)
    echo "usage: bash bench/gpu_serving.sh test | train MINUTES [ugt train args] | bench [bench/serving_gpu.py args] | compress [args] | throughput [args] | topk [args] | distill [args] | profile [args] | e2e [args]" >&2
    exit 2 ;;
esac
