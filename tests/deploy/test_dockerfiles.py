"""The image Dockerfiles of infra/k8s/docker parse and build what the chart runs (checked without docker).

dockerfile-parse reads each file; the checks: FROM comes first, every base image has a pinned tag (never
`latest`), every COPY from the build context (the repository root) names a path that exists, every
`COPY --from` names an earlier stage or a tagged image, and the versions agree with the project's pins.
"""

from __future__ import annotations

import re

import pytest
from dockerfile_parse import DockerfileParser

from infra.settings import REPO_ROOT
from jobs.common import CONNECTOR_JAR_NAME
from tests.deploy.chart_render import chart_values

DOCKERFILES = sorted((REPO_ROOT / "infra" / "k8s" / "docker").glob("*.Dockerfile"))


def instructions(path) -> list[dict]:
    return [i for i in DockerfileParser(path=str(path)).structure if i["instruction"] != "COMMENT"]


def image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def locked_version(package: str) -> str:
    match = re.search(rf"^{package}==(\S+)$", (REPO_ROOT / "infra" / "requirements.lock").read_text(), re.M)
    assert match, package
    return match.group(1)


def test_both_images_exist() -> None:
    assert {p.name for p in DOCKERFILES} == {"flink-job.Dockerfile", "serving.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lint(path) -> None:
    steps = instructions(path)
    assert steps and steps[0]["instruction"] == "FROM", f"{path.name}: the first instruction must be FROM"
    stages: set[str] = set()
    problems = []
    for step in steps:
        value = step["value"]
        if step["instruction"] == "FROM":
            image, *alias = value.split()
            tag = image_tag(image)
            if tag is None or tag == "latest":
                problems.append(f"line {step['startline'] + 1}: {image} has no pinned tag")
            if alias:
                stages.add(alias[-1])
        elif step["instruction"] == "COPY":
            flags = [w for w in value.split() if w.startswith("--")]
            words = [w for w in value.split() if not w.startswith("--")]
            from_flag = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if from_flag is not None:
                if from_flag not in stages and image_tag(from_flag) in (None, "latest"):
                    problems.append(f"line {step['startline'] + 1}: COPY --from={from_flag} is no earlier stage")
                continue
            problems += [f"line {step['startline'] + 1}: COPY {src}: no such path in the repository"
                         for src in words[:-1] if not (REPO_ROOT / src).exists()]
    assert not problems, "\n".join(problems)


def test_flink_image_matches_the_pins() -> None:
    """The Flink image's version is apache-flink's in the lock, and the chart names the same Flink."""
    flink = locked_version("apache-flink")
    text = (REPO_ROOT / "infra" / "k8s" / "docker" / "flink-job.Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (flink:\S+)", text, re.M)
    assert base.startswith(f"flink:{flink}-"), (base, flink)
    values = chart_values()["flink"]
    major, minor = flink.split(".")[:2]
    assert values["flinkVersion"] == f"v{major}_{minor}"
    assert values["pythonJar"].endswith(f"flink-python-{flink}.jar")
    for pom in re.findall(r"-f (infra/maven/\S+)", text):
        assert (REPO_ROOT / pom).is_file(), pom
    # the connector the jobs look for (jobs/common.py) is the one infra/maven/pom.xml puts in Flink's lib/
    (jar,) = re.findall(r"UGT_KAFKA_CONNECTOR_JAR=(\S+)", text)
    assert jar == f"/opt/flink/lib/{CONNECTOR_JAR_NAME}"
    connector = re.search(r"<flink.kafka.connector.version>(\S+)</", (REPO_ROOT / "infra/maven/pom.xml").read_text())
    assert connector and CONNECTOR_JAR_NAME == f"flink-sql-connector-kafka-{connector.group(1)}.jar"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_hold_the_environment_the_chart_runs(path) -> None:
    """Each image installs infra/requirements.lock into /opt/ugt/.venv, the interpreter the chart calls."""
    text = path.read_text()
    assert "COPY infra/requirements.lock" in text and "-r infra/requirements.lock" in text
    assert re.search(r"^WORKDIR /opt/ugt$", text, re.M) and ".venv" in text
    values = chart_values()
    assert values["flink"]["python"] == "/opt/ugt/.venv/bin/python"
