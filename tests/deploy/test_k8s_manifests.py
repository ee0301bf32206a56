"""deploy/k8s: the Kustomize base and GPU overlay parse, and keep the invariants that make
scaling and shutdown safe (grace > drain, replicas <= partitions, probes on the real paths,
only environment variables the service reads)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.config import environment_variables
from service.http import HealthServer

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KEDA_SASL_MODES = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
SERVICE_ENV = environment_variables()


def render(folder: Path) -> list[dict]:
    """The subset of `kustomize build` these manifests use: resources (files or a base folder),
    strategic-merge patches by kind and name (containers merged by name), image overrides."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((folder / patch["path"]).read_text())
        target = next(
            d
            for d in docs
            if d["kind"] == change["kind"] and d["metadata"]["name"] == change["metadata"]["name"]
        )
        _merge(target, change)
    for image in kustomization.get("images", []):
        for container in _containers(docs):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return docs


def _merge(target: dict, change: dict) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif key == "containers":
            for container in value:
                own = next(c for c in target[key] if c["name"] == container["name"])
                _merge(own, container)
        else:
            target[key] = copy.deepcopy(value)


def _containers(docs: list[dict]) -> list[dict]:
    return [c for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]


def _one(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def check_invariants(docs: list[dict]) -> None:
    config = _one(docs, "ConfigMap")["data"]
    secret = _one(docs, "Secret")
    deployment = _one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    scaled = _one(docs, "ScaledObject")

    # Shutdown: the pod outlives the drain, so in-flight jobs finish and are committed.
    assert pod["terminationGracePeriodSeconds"] > float(config["SLUICE_DRAIN_TIMEOUT_S"]) + 10

    # Scaling: never more replicas than partitions, and KEDA watches Sluice's own group and topic.
    partitions = int(config["SLUICE_TOPIC_PARTITIONS"])
    assert deployment["spec"]["replicas"] <= partitions
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] == partitions
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == config["SLUICE_GROUP_ID"]
    assert trigger["metadata"]["topic"] == config["SLUICE_JOBS_TOPICS"].split(",")[0]
    assert trigger["metadata"]["bootstrapServers"] == config["SLUICE_KAFKA_BOOTSTRAP"]
    assert trigger["metadata"]["sasl"] == KEDA_SASL_MODES[config["SLUICE_KAFKA_SASL_MECHANISM"]]
    assert trigger["metadata"]["tls"] == (
        "enable" if config["SLUICE_KAFKA_SECURITY_PROTOCOL"].endswith("SSL") else "disable"
    )
    auth = _one(docs, "TriggerAuthentication")
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {secret["metadata"]["name"]}
    assert {r["key"] for r in auth["spec"]["secretTargetRef"]} <= set(secret["stringData"])

    # Probes: the paths the service's HTTP endpoint really serves, on the port it listens on.
    served = set(HealthServer("127.0.0.1", 0, bytes, bool, bool)._routes)
    port = int(config["SLUICE_HTTP_PORT"])
    (named_port,) = container["ports"]
    assert named_port["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in served and get["port"] == named_port["name"], probe
    scrape = deployment["spec"]["template"]["metadata"]["annotations"]
    assert scrape["prometheus.io/path"] in served and int(scrape["prometheus.io/port"]) == port

    # Configuration: only variables the service reads; the SASL credentials come from the Secret.
    assert set(config) <= SERVICE_ENV, set(config) - SERVICE_ENV
    assert set(secret["stringData"]) <= SERVICE_ENV
    assert "SLUICE_KAFKA_SASL_PASSWORD" in secret["stringData"]
    assert "SLUICE_KAFKA_SASL_PASSWORD" not in config
    sources = {s.get("configMapRef", s.get("secretRef"))["name"] for s in container["envFrom"]}
    assert sources == {_one(docs, "ConfigMap")["metadata"]["name"], secret["metadata"]["name"]}

    # The model is mounted read-only where SLUICE_ENGINE_MODEL points; the process is not root.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config["SLUICE_ENGINE_MODEL"]]
    assert mount["readOnly"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0

    # Disruptions: a budget over the same pods.
    budget = _one(docs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()
    assert budget["spec"]["maxUnavailable"] == 1


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_base_keeps_the_invariants_and_runs_on_the_cpu():
    docs = render(K8S / "base")
    check_invariants(docs)
    config = _one(docs, "ConfigMap")["data"]
    assert config["SLUICE_ENGINE_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in str(_containers(docs)[0]["resources"])


def test_gpu_overlay_requests_a_gpu_runs_on_cuda_and_keeps_the_invariants():
    docs = render(K8S / "overlays" / "gpu")
    check_invariants(docs)
    (container,) = _containers(docs)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    config = _one(docs, "ConfigMap")["data"]
    assert config["SLUICE_ENGINE_DEVICE"] == "cuda" and config["SLUICE_ENGINE_DTYPE"] == "bfloat16"
    # The overlay changes the device, not the scaling or shutdown settings of the base.
    assert (
        config["SLUICE_TOPIC_PARTITIONS"]
        == _one(render(K8S / "base"), "ConfigMap")["data"]["SLUICE_TOPIC_PARTITIONS"]
    )


def test_configuration_in_the_manifests_is_a_valid_service_configuration():
    from service.config import load_config

    for folder in (K8S / "base", K8S / "overlays" / "gpu"):
        docs = render(folder)
        env = {**_one(docs, "ConfigMap")["data"], **_one(docs, "Secret")["stringData"]}
        config = load_config(env)  # raises ConfigError naming the option on a bad value
        assert config.kafka_security_protocol == "SASL_PLAINTEXT" and config.kafka_sasl_password


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed on this machine")
@pytest.mark.parametrize("folder", ["base", "overlays/gpu"])
def test_kubectl_kustomize_builds_the_same_manifests(folder):
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    check_invariants(docs)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in render(K8S / folder)
    )
