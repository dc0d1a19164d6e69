#!/usr/bin/env bash
# Runs bench/ml1m_quality.py on a GPU machine with no network: the ML-1M atomic files travel gzipped in
# .ugtdata/ (ignored by git) and are unpacked into $UGT_CACHE; results land in $OUT (or /tmp).
# Usage: bash bench/gpu_ml1m.sh [bench/ml1m_quality.py arguments]
#        BENCH_SCRIPT=bench/cold_start.py bash bench/gpu_ml1m.sh [bench/cold_start.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
export UGT_CACHE=${UGT_CACHE:-/tmp/ugt-cache} PYTHONUNBUFFERED=1
# the tree arrives as a copy inside another repository: pass the project's commit in (UGT_COMMIT=<sha> bash ...),
# or the result records none (bench/common.py git_commit)
export UGT_COMMIT=${UGT_COMMIT:-}
out=${OUT:-/tmp/ugt-bench-out}
mkdir -p "$out"
d=$UGT_CACHE/datasets/ml-1m
mkdir -p "$d" && zcat .ugtdata/ml-1m.inter.gz > "$d/ml-1m.inter" && cp .ugtdata/ml-1m.item .ugtdata/ml-1m.user .ugtdata/SOURCE "$d/" && touch "$d/.complete"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, numpy, pandas; print('torch', torch.__version__, 'numpy', numpy.__version__, 'pandas', pandas.__version__)"
# BENCH_SCRIPT=bench/cold_start.py runs the cold-start harness instead (same arguments --runs-dir / --out)
script=${BENCH_SCRIPT:-bench/ml1m_quality.py}
name=$(basename "$script" .py); [ "$name" = cold_start ] && name=ml1m_cold_start
timeout "${BENCH_TIMEOUT:-560}" python3 "$script" "$@" --runs-dir /tmp/runs --out "$out/$name.json"
rc=$?
tar czf "$out/runs.tgz" --exclude='*.pt' -C /tmp runs
for f in /tmp/runs/*/stdout.log; do echo "== $f"; tail -n 3 "$f"; done
exit $rc
