"""Find helm and render the Kubernetes chart (infra/k8s/ugt) with it: the helpers of the deploy tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from infra.settings import REPO_ROOT, get_settings

CHART = REPO_ROOT / "infra" / "k8s" / "ugt"
KUBE_VERSION = "1.31.0"
# Values sets every check runs on: the defaults, and the other branches of the templates
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "cluster-hpa-gpu": ["redis.mode=cluster", "autoscaling.serving.mode=hpa", "serving.gpu.enabled=true"],
    "external-kafka-fixed": ["kafka.enabled=false", "kafka.externalBootstrap=kafka.example:9092",
                             "autoscaling.serving.mode=none", "monitoring.enabled=false",
                             "flink.autoscaler.enabled=false", "feast.sharedClaim.create=false"],
}


def helm_binary() -> str | None:
    """helm from UGT_HELM, install.sh's cache ($UGT_CACHE/bin) or PATH."""
    candidates = [os.environ.get("UGT_HELM", ""), str(get_settings().cache_dir / "bin" / "helm"),
                  shutil.which("helm") or ""]
    return next((c for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def go_available() -> bool:
    return shutil.which("go") is not None or Path("/usr/local/go/bin/go").exists()


def set_args(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key twice in one mapping (the API server rejects or warns on it; PyYAML keeps
    the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def render(helm: str, values: list[str]) -> list[dict]:
    """`helm template` of the chart: every rendered object (hooks included), as dicts; a duplicate key fails."""
    proc = subprocess.run([helm, "template", "ugt", str(CHART), "--namespace", "ugt", "--kube-version", KUBE_VERSION,
                           *set_args(values)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.load_all(proc.stdout, Loader=UniqueKeyLoader) if doc]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())
