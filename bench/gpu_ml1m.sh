#!/usr/bin/env bash
# The ML-1M quality table on a GPU machine with no network (bench/ml1m_quality.py). What it needs travels in
# .ugtdata/ (ignored by git, carried by the device call; `python -m bench.ml1m_quality stage` makes it): the
# datasets as .ugtdata/datasets/<name>.tgz are unpacked into $UGT_CACHE, the semantic IDs are read in place, and
# the runs folder (.ugtdata/quality-ml1m) is resumed, then packed into $OUT as quality-ml1m.tgz.NN parts for the
# next call (`python -m bench.ml1m_quality unpack <returned files>` puts it back).
# Usage: UGT_COMMIT=<sha> bash bench/gpu_ml1m.sh [run arguments: --parallel N --only ROWS ...]
#        BENCH_TIMEOUT (default 570): seconds this script may take; the rows stop ~30 s before it.
#        BENCH_SCRIPT=bench/cold_start.py bash bench/gpu_ml1m.sh [bench/cold_start.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
export UGT_CACHE=${UGT_CACHE:-/tmp/ugt-cache} PYTHONUNBUFFERED=1
# the tree arrives as a copy inside another repository: pass the project's commit in (UGT_COMMIT=<sha> bash ...),
# or the result records none (bench/common.py git_commit)
export UGT_COMMIT=${UGT_COMMIT:-} UGT_DIRTY=${UGT_DIRTY:-}
[ -z "$UGT_DIRTY" ] && unset UGT_DIRTY
out=${OUT:-/tmp/ugt-bench-out}
budget=${BENCH_TIMEOUT:-570}
mkdir -p "$out" "$UGT_CACHE/datasets"
for f in .ugtdata/datasets/*.tgz; do
  [ -e "$f" ] || { echo "no .ugtdata/datasets/*.tgz: run 'python -m bench.ml1m_quality stage' first" >&2; exit 2; }
  tar xzf "$f" -C "$UGT_CACHE/datasets"
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, numpy, pandas; print('torch', torch.__version__, 'numpy', numpy.__version__, 'pandas', pandas.__version__)"
if [ -n "${BENCH_SCRIPT:-}" ]; then  # the cold-start harness (same GPU, its own runs and result)
  timeout "$budget" python3 "$BENCH_SCRIPT" "$@" --runs-dir /tmp/runs --out "$out/cold_start.json"
  rc=$?
  tar czf "$out/runs.tgz" --exclude='*.pt' -C /tmp runs
  exit $rc
fi
timeout "$budget" python3 -m bench.ml1m_quality run --deadline-s $((budget - 30)) --pack-to "$out" "$@"
