#!/usr/bin/env bash
# The README's main-job command: install, then `ugt demo` (stack up -> ML-1M -> replay -> Flink jobs -> /recommend).
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh
exec .venv/bin/ugt demo "$@"
