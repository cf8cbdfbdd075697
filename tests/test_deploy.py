"""deploy/: every manifest parses and says what matters; Kubernetes kinds validate against their schemas."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
IMAGE = "ghcr.io/raymask/raymask:0.1.0"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))
DOCS = [(path, doc) for path in YAML_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]
CONFIG_REF = re.compile(r"configs/[\w.-]+\.yaml")
SECRET_KEYS = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key)", re.IGNORECASE)


def walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    found = [(path, node)]
    if isinstance(node, dict):
        for key, value in node.items():
            found += walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += walk(value, f"{path}[{i}]")
    return found


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("containers", []))


def test_there_are_manifests_of_every_kind() -> None:
    kinds = {doc.get("kind") for _, doc in DOCS}
    assert {"RayCluster", "RayJob", "CronJob"} <= kinds
    assert (DEPLOY / "docker" / "Dockerfile").is_file()
    assert (DEPLOY / "cluster-launcher" / "raymask-aws.yaml").is_file()
    assert {p.name for p in (DEPLOY / "vm").iterdir()} >= {
        "raymask-nightly.service",
        "raymask-nightly.timer",
        "crontab",
    }


@pytest.mark.parametrize(("path", "doc"), [(p, d) for p, d in DOCS if d.get("kind") in {"CronJob", "Job", "ConfigMap"}])
def test_core_kubernetes_kinds_validate(path: Path, doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_ray_clusters_put_gpus_on_workers_and_none_on_the_head() -> None:
    specs = []
    for _, doc in DOCS:
        if doc.get("kind") == "RayCluster":
            specs.append(doc["spec"])
        elif doc.get("kind") == "RayJob":
            specs.append(doc["spec"]["rayClusterSpec"])
    assert specs
    for spec in specs:
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0"
        for container in containers(head["template"]["spec"]):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
        for group in spec["workerGroupSpecs"]:
            for container in containers(group["template"]["spec"]):
                limits = container["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
                assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]


def test_entrypoints_name_configs_that_exist() -> None:
    texts = [p.read_text() for p in [*YAML_FILES, *(DEPLOY / "vm").iterdir()]]
    referenced = {ref for text in texts for ref in CONFIG_REF.findall(text)}
    assert referenced, "no entrypoint names a config"
    for ref in referenced:
        assert (ROOT / ref).is_file(), ref
    rayjob = next(doc for _, doc in DOCS if doc.get("kind") == "RayJob")
    assert rayjob["spec"]["entrypoint"].startswith("raymask run /app/configs/")
    cron = next(doc for _, doc in DOCS if doc.get("kind") == "CronJob")
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--") + 1 : command.index("--") + 3] == ["raymask", "batch"]


def test_one_image_name_throughout() -> None:
    images = {
        value for _, doc in DOCS for path, value in walk(doc) if path.endswith(".image") and isinstance(value, str)
    }
    assert images == {IMAGE}
    assert "rayproject/ray:2.60.0" in (DEPLOY / "docker" / "Dockerfile").read_text()
    ray_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("ray=="))
    assert ray_pin == "ray==2.60.0"  # the base image's Ray must match the pinned one


def test_no_secrets_inline() -> None:
    for path, doc in DOCS:
        for where, value in walk(doc):
            key = where.rsplit(".", 1)[-1]
            if SECRET_KEYS.search(key) and isinstance(value, (str, int)):
                pytest.fail(f"{path.relative_to(ROOT)}: {where} holds a literal value")
            is_env_entry = isinstance(value, dict) and "name" in value and ({"value", "valueFrom"} & set(value))
            if is_env_entry and SECRET_KEYS.search(str(value["name"])):
                assert "value" not in value, f"{path.relative_to(ROOT)}: {where} sets a secret inline; use valueFrom"


def test_jobs_read_and_write_object_storage_with_credentials_from_a_secret_or_a_role() -> None:
    """The RayJob's input and store are s3:// URLs (no shared volume assumed), every container of it
    takes the AWS_* settings from a Secret (or its service account's role), and the cluster launcher's
    nodes get an instance profile; no credential is written in any file (test_no_secrets_inline)."""
    rayjob = next(doc for _, doc in DOCS if doc.get("kind") == "RayJob")
    entry = rayjob["spec"]["entrypoint"]
    assert "source.path=s3://" in entry and "output.path=s3://" in entry
    cron = next(doc for _, doc in DOCS if doc.get("kind") == "CronJob")
    command = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "output.root=s3://raymask-masks/nightly" in command  # run as written by test_object_storage
    assert any(arg.startswith("inputs=") and "s3://" in arg for arg in command)
    raycluster = next(doc for _, doc in DOCS if doc.get("kind") == "RayCluster")
    pods = []
    for spec in (rayjob["spec"]["rayClusterSpec"], raycluster["spec"]):
        pods += [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        assert "volumes" not in pod and pod.get("serviceAccountName") == "raymask"
        for container in containers(pod):
            assert {"secretRef": {"name": "raymask-s3", "optional": True}} in container.get("envFrom", [])
    launcher = yaml.safe_load((DEPLOY / "cluster-launcher" / "raymask-aws.yaml").read_text())
    for node in launcher["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"] == {"Name": "raymask-s3"}
