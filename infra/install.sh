#!/usr/bin/env bash
# Installs what a FRESH machine needs for the local stack (`ugt stack up`), idempotently:
#   - Debian's redis-server (if missing),
#   - Java 17 and Maven (if missing), and g++ when no C++ compiler is found (torch.compile on CPU),
#   - the Maven artifacts (Kafka 4.x broker jars, the Flink Kafka SQL connector) copied into
#     ${UGT_CACHE:-~/.cache/ugt}/lib/{kafka,flink-connectors} by infra/maven/pom.xml.
#   - the Python environment .venv: every package pinned in infra/requirements.lock (made from
#     pyproject.toml by `uv pip compile pyproject.toml --extra all -o infra/requirements.lock`), plus UGT itself,
#   - helm (tests/deploy renders and lints the chart infra/k8s/ugt), built with Go from the Go module proxy into
#     ${UGT_CACHE:-~/.cache/ugt}/bin when Go is there (~1.5 min the first time on 2 cores, cached afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# a JDK, not only a JRE: tokenize --engine sql compiles jobs/jvm/ with javac (infra.jars.tokenize_jvm_jars)
command -v javac >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
# torch.compile of the CPU serving steps (serving key torch_compile, on in the shipped configs) builds C++
command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || need_apt+=(g++)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install.sh: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi
# Debian's package starts its own redis on 6379 as a system service; the stack runs its own
# redis-server (data and log under var/), so stop the system one where systemd/service runs it.
if [[ " ${need_apt[*]:-} " == *" redis-server "* ]]; then
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server || true
    systemctl disable redis-server >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/redis-server ]; then
    /etc/init.d/redis-server stop >/dev/null 2>&1 || true
  fi
fi

lib="${UGT_CACHE:-$HOME/.cache/ugt}/lib"
if ls "$lib"/kafka/kafka_2.13-*.jar >/dev/null 2>&1 && ls "$lib"/flink-connectors/flink-sql-connector-kafka-*.jar >/dev/null 2>&1; then
  echo "install.sh: jars already in $lib"
else
  echo "install.sh: resolving Maven artifacts into $lib (first time: ~1 min)"
  mvn -q -B -f infra/maven/pom.xml package -Dugt.lib="$lib"
fi
# Python: one venv for the CLI, the Flink Python workers, Feast and serving (docs/DEPENDENCIES.md).
if [ ! -x .venv/bin/python ]; then
  echo "install.sh: creating .venv"
  python3 -m venv .venv
fi
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q uv
.venv/bin/uv pip install -q --python .venv/bin/python -r infra/requirements.lock
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .

HELM_VERSION=v3.22.0
helm_bin="${UGT_CACHE:-$HOME/.cache/ugt}/bin"
go_bin="$(command -v go || echo /usr/local/go/bin/go)"
if [ -x "$helm_bin/helm" ] && [ "$(cat "$helm_bin/helm.version" 2>/dev/null)" = "$HELM_VERSION" ]; then
  echo "install.sh: helm $HELM_VERSION already in $helm_bin"
elif [ -x "$go_bin" ]; then
  echo "install.sh: building helm $HELM_VERSION from the Go module proxy into $helm_bin (first time: ~1.5 min)"
  mkdir -p "$helm_bin"
  GOBIN="$helm_bin" "$go_bin" install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > "$helm_bin/helm.version"
else
  echo "install.sh: no Go toolchain: helm not built (tests/deploy skips the chart checks)"
fi

echo "install.sh: done (redis-server $(redis-server --version | awk '{print $3}'), jars in $lib)"
