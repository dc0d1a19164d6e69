"""The Kubernetes chart renders, lints, and every object it renders is valid, without a cluster.

Built-in kinds are validated against the Kubernetes JSON schemas that `kubernetes-validate` ships (strict: an
unknown field fails). The operators' kinds (Strimzi, Flink operator, Prometheus operator, KEDA) are validated
against their CRDs' openAPIV3Schema where infra/k8s/crd-schemas/ has it, and always for apiVersion, kind, name and
the spec fields their operators require. Then what the chart says is checked against the project: topic names,
job files, metric names, probes.
"""

from __future__ import annotations

import json
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from infra.settings import REPO_ROOT, Topics
from tests.deploy.chart_render import CHART, KUBE_VERSION, VARIANTS, chart_values, of_kind, set_args

CRD_SCHEMAS = REPO_ROOT / "infra" / "k8s" / "crd-schemas"
# (apiVersion, kind) of the operators' resources -> spec paths their operators require
CUSTOM_KINDS: dict[tuple[str, str], list[str]] = {
    ("kafka.strimzi.io/v1", "Kafka"): ["kafka.listeners", "kafka.version"],
    ("kafka.strimzi.io/v1", "KafkaNodePool"): ["replicas", "roles", "storage"],
    ("kafka.strimzi.io/v1", "KafkaTopic"): ["partitions", "replicas", "topicName"],
    ("flink.apache.org/v1beta1", "FlinkDeployment"): [
        "image", "flinkVersion", "jobManager.resource", "taskManager.resource", "job.jarURI", "job.upgradeMode"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["selector", "endpoints"],
    ("monitoring.coreos.com/v1", "PodMonitor"): ["selector", "podMetricsEndpoints"],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["groups"],
    ("keda.sh/v1alpha1", "ScaledObject"): ["scaleTargetRef.name", "triggers"],
}


def lookup(obj: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def is_custom(obj: dict) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(helm: str, variant: str) -> None:
    proc = subprocess.run([helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION,
                           *set_args(VARIANTS[variant])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_values_fail_to_render(helm: str) -> None:
    for bad in ("redis.mode=sentinel", "autoscaling.serving.mode=vpa", "kafka.enabled=false"):
        proc = subprocess.run([helm, "template", "ugt", str(CHART), "--kube-version", KUBE_VERSION, "--set", bad],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0, f"{bad} rendered"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_validates(rendered: dict[str, list[dict]], variant: str) -> None:
    """Built-in kinds against Kubernetes' schemas (strict), the operators' kinds against theirs."""
    kube = KUBE_VERSION.rsplit(".", 1)[0]
    errors = []
    for obj in rendered[variant]:
        where = f"{obj.get('kind')}/{lookup(obj, 'metadata.name')}"
        if is_custom(obj):
            errors += [f"{where}: {e}" for e in custom_resource_errors(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, kube, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {kube} "
                          "and not one of the operators' kinds")
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def custom_resource_errors(obj: dict) -> list[str]:
    errors = ["missing metadata.name"] if not lookup(obj, "metadata.name") else []
    errors += [f"missing spec.{path}" for path in CUSTOM_KINDS[(obj["apiVersion"], obj["kind"])]
               if lookup(obj.get("spec", {}), path) in (None, "", [], {})]
    schema_file = CRD_SCHEMAS / f"{obj['apiVersion'].split('/')[0]}_{obj['kind']}.json"
    if schema_file.exists():
        schema = json.loads(schema_file.read_text())
        validator = jsonschema.Draft7Validator(schema)
        errors += [f"{e.message} at {'.'.join(map(str, e.path))}" for e in validator.iter_errors(obj)]
    return errors


def test_every_custom_kind_is_rendered(rendered: dict[str, list[dict]]) -> None:
    """The table of operator kinds is not stale: each of them appears in some variant."""
    seen = {(o["apiVersion"], o["kind"]) for objects in rendered.values() for o in objects}
    assert set(CUSTOM_KINDS) <= seen, set(CUSTOM_KINDS) - seen


def test_kafka_is_replicated_kraft(default_objects: list[dict]) -> None:
    (kafka,) = of_kind(default_objects, "Kafka")
    (pool,) = of_kind(default_objects, "KafkaNodePool")
    assert sorted(pool["spec"]["roles"]) == ["broker", "controller"] and pool["spec"]["replicas"] == 3
    assert kafka["spec"]["kafka"]["config"]["min.insync.replicas"] == 2
    topics = {t["spec"]["topicName"]: t["spec"] for t in of_kind(default_objects, "KafkaTopic")}
    expected = Topics()
    assert set(topics) == {expected.raw, expected.tokens, expected.dlq, expected.items}
    assert all(t["replicas"] == 3 and t["config"]["min.insync.replicas"] == 2 for t in topics.values())


def test_flink_jobs_run_the_project_files(default_objects: list[dict]) -> None:
    deployments = of_kind(default_objects, "FlinkDeployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        "ugt-tokenize", "ugt-user-state", "ugt-item-semantic-ids"}
    for dep in deployments:
        args = dep["spec"]["job"]["args"]
        script = args[args.index("-py") + 1]
        assert script.startswith("/opt/ugt/") and (REPO_ROOT / script.removeprefix("/opt/ugt/")).is_file(), script
        assert args[args.index("--parallelism") + 1] == str(dep["spec"]["job"]["parallelism"])
        conf = dep["spec"]["flinkConfiguration"]
        assert conf["job.autoscaler.enabled"] == "true"
        assert conf["execution.checkpointing.dir"].startswith("file:///flink-data/checkpoints/")


def test_serving_probes_and_drain(rendered: dict[str, list[dict]]) -> None:
    values = chart_values()["serving"]
    for variant, objects in rendered.items():
        (dep,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-serving")]
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health", (variant, probe)
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(values["drainSeconds"])]
        assert pod["terminationGracePeriodSeconds"] > values["drainSeconds"]
        args = container["args"]
        workers = int(args[args.index("--workers") + 1])
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu, workers) == ((1, 1) if variant == "cluster-hpa-gpu" else (None, values["workers"]))


def serving_metric_names() -> set[str]:
    """The series serving exposes: every `ugt_serving_*` name in serving/metrics.py, as Prometheus writes them."""
    source = (REPO_ROOT / "serving" / "metrics.py").read_text()
    names = set(re.findall(r'"(ugt_serving_[a-z_]+)"', source))
    counters = set(re.findall(r'Counter(?:MetricFamily)?\(\s*"(ugt_serving_[a-z_]+)"', source))
    histograms = set(re.findall(r'Histogram(?:MetricFamily)?\(\s*"(ugt_serving_[a-z_]+)"', source))
    return (names | {n.removesuffix("_total") + "_total" for n in counters}
            | {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")})


def test_rules_and_autoscaling_use_real_metric_names(rendered: dict[str, list[dict]]) -> None:
    known = serving_metric_names()
    queries = []
    for objects in rendered.values():
        for rule_set in of_kind(objects, "PrometheusRule"):
            queries += [r["expr"] for g in rule_set["spec"]["groups"] for r in g["rules"]]
        for scaled in of_kind(objects, "ScaledObject"):
            queries += [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    used = {name for q in queries for name in re.findall(r"\bugt_serving_[a-z_]+", q)}
    assert used and used <= known, used - known
    flink = {name for q in queries for name in re.findall(r"\bflink_[A-Za-z_]+", q)}
    assert flink == {"flink_jobmanager_job_numberOfFailedCheckpoints", "flink_jobmanager_job_numRestarts"}


def test_every_process_gets_the_stack_addresses(default_objects: list[dict]) -> None:
    """UGT_* variables of infra/settings.py point at the release's services in every UGT container."""
    containers = [c for d in of_kind(default_objects, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
                  if c["name"] == "serving"]
    containers += [d["spec"]["podTemplate"]["spec"]["containers"][0] for d in of_kind(default_objects, "FlinkDeployment")]
    for container in containers:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["UGT_KAFKA_BOOTSTRAP"] == "ugt-kafka-kafka-bootstrap:9092"
        assert env["UGT_REGISTRY_URL"] == "http://ugt-schema-registry:8085/apis/ccompat/v7"
        assert env["UGT_REDIS_URL"] == "redis://ugt-redis:6379/0"
    services = {s["metadata"]["name"] for s in of_kind(default_objects, "Service")}
    assert {"ugt-schema-registry", "ugt-redis", "ugt-serving"} <= services


def test_crd_schema_files_are_named_for_rendered_kinds() -> None:
    """A schema file in infra/k8s/crd-schemas is used only when its name matches a kind: catch a misnamed one."""
    expected = {f"{api.split('/')[0]}_{kind}.json" for api, kind in CUSTOM_KINDS}
    present = {p.name for p in CRD_SCHEMAS.glob("*.json")} if CRD_SCHEMAS.is_dir() else set()
    assert present <= expected, present - expected


def test_redis_modes(rendered: dict[str, list[dict]]) -> None:
    """standalone: one AOF master; cluster: 3 masters + 3 replicas, formed by a hook Job, Feast told so."""
    for variant, nodes, redis_type in (("default", 1, "redis"), ("cluster-hpa-gpu", 6, "redis_cluster")):
        objects = rendered[variant]
        (sts,) = [s for s in of_kind(objects, "StatefulSet") if s["metadata"]["name"] == "ugt-redis"]
        assert sts["spec"]["replicas"] == nodes
        conf = {c["metadata"]["name"]: c["data"] for c in of_kind(objects, "ConfigMap")}
        assert "appendonly yes" in conf["ugt-redis"]["redis.conf"]
        assert ("cluster-enabled yes" in conf["ugt-redis"]["redis.conf"]) == (nodes > 1)
        feast = yaml.safe_load(conf["ugt-feast"]["feature_store.yaml"])["online_store"]
        assert feast["redis_type"] == redis_type
        assert len(feast["connection_string"].split(",")) == nodes
        jobs = {j["metadata"]["name"] for j in of_kind(objects, "Job")}
        assert ("ugt-redis-cluster-create" in jobs) == (nodes > 1) and "ugt-feast-apply" in jobs
        serving = [c for d in of_kind(objects, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
                   if c["name"] == "serving"]
        url = {e["name"]: e.get("value") for e in serving[0]["env"]}["UGT_REDIS_URL"]
        # the jobs and serving open a cluster client for every node (infra/redis_client.py), as Feast does
        assert url == ("redis+cluster://" + feast["connection_string"] if nodes > 1 else "redis://ugt-redis:6379/0")


def test_feast_config_is_the_repos_with_the_release_redis(default_objects: list[dict]) -> None:
    """The chart's feature_store.yaml is feature_repo/feature_store.yaml but for where Redis is."""
    (config,) = [c for c in of_kind(default_objects, "ConfigMap") if c["metadata"]["name"] == "ugt-feast"]
    rendered = yaml.safe_load(config["data"]["feature_store.yaml"])
    repo = yaml.safe_load((REPO_ROOT / "feature_repo" / "feature_store.yaml").read_text())
    for online in (rendered["online_store"], repo["online_store"]):
        online.pop("connection_string", None)
        online.pop("redis_type", None)
    assert rendered == repo
