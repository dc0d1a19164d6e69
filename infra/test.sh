#!/usr/bin/env bash
# The README's test command: install what a fresh machine lacks, then run the whole suite.
# The integration tests' harness (tests/integration/conftest.py) starts Kafka, the Schema Registry,
# Redis and the Flink cluster, and stops whatever it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/install.sh
exec .venv/bin/python -m pytest -ra "$@"
