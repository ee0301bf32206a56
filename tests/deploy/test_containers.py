"""deploy/Dockerfile (CUDA), deploy/Dockerfile.cpu and deploy/compose.yaml, checked statically.

No Docker daemon runs where the tests run, so the images are not built here: these tests check
what can be checked without one. Each Dockerfile copies only files that exist, installs the
package and starts the service's real entry point as a non-root user; the compose file is valid
against the Compose Specification's JSON schema (tests/deploy/compose-spec.json) and every file
it mounts or builds from exists.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from service.config import ServiceConfig, environment_variables
from tests.deploy import podman

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
SERVICE_ENV = environment_variables()


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_file_the_image_copies_from_the_repository_exists(dockerfile):
    copied = [
        shlex.split(args)[:-1]
        for k, args in instructions(dockerfile)
        if k == "COPY" and "--from=" not in args
    ]
    assert copied, "the image copies nothing from the repository"
    for sources in copied:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
    names = {s for sources in copied for s in sources}
    # What `pip install .` needs: the project file, the readme it names, and every package it installs.
    assert {"pyproject.toml", "README.md", "engine", "schemas", "service"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_the_service_entry_point_as_a_non_root_user(dockerfile):
    stage = final_stage(dockerfile)
    (user,) = [args for k, args in stage if k == "USER"]
    uid = user.split(":")[0]
    assert uid not in ("0", "root") and uid.isdigit()  # numeric: Kubernetes' runAsNonRoot can verify it
    (entrypoint,) = [json.loads(args) for k, args in stage if k == "ENTRYPOINT"]
    assert entrypoint[-2:] == ["-m", "service"]
    assert (REPO_ROOT / "service" / "__main__.py").is_file()
    # The user comes after everything that needs root, and runs what was installed in the build stage.
    assert [k for k, _ in stage].index("USER") > max(i for i, (k, _) in enumerate(stage) if k == "RUN")
    assert any(k == "COPY" and "--from=build" in args for k, args in stage)
    assert any(
        k == "RUN" and "pip wheel" in args and args.rstrip().endswith(" .")
        for k, args in instructions(dockerfile)
    )
    assert any(k == "RUN" and "pip install --no-cache-dir --no-deps /tmp/dist/" in args for k, args in stage)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_heavy_layers_come_before_the_projects_sources(dockerfile):
    """PyTorch, then the other dependencies (from pyproject.toml alone), then our code: a change of
    our code rebuilds the wheel and the last layer, never the gigabytes of PyTorch."""
    steps = instructions(dockerfile)
    torch_install = next(
        i for i, (k, args) in enumerate(steps) if k == "RUN" and args.rstrip().endswith(" torch")
    )
    first_source = next(
        i
        for i, (k, args) in enumerate(steps)
        if k == "COPY" and "--from=" not in args and {"engine", "schemas", "service"} & set(args.split())
    )
    stages = [i for i, (k, _) in enumerate(steps) if k == "FROM"]
    deps_stage = steps[stages[0] : stages[1]]
    assert torch_install < stages[1] < first_source
    assert [args for k, args in deps_stage if k == "COPY"] == ["pyproject.toml /src/pyproject.toml"]
    stage = final_stage(dockerfile)
    assert stage[0] == ("FROM", "deps")  # the service is the deps stage itself: its gigabytes not copied
    assert [args for k, args in stage if k == "COPY"] == ["--from=build /dist /tmp/dist"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_is_configured_by_service_variables_and_probes_the_real_health_path(dockerfile):
    stage = final_stage(dockerfile)
    env = " ".join(args for k, args in stage if k == "ENV")
    variables = set(re.findall(r"\b(SLUICE_[A-Z0-9_]+)=", env))
    assert variables and variables <= SERVICE_ENV, variables - SERVICE_ENV
    assert "SLUICE_HTTP_HOST=0.0.0.0" in env  # reachable from outside the container
    (expose,) = [args for k, args in stage if k == "EXPOSE"]
    assert f"SLUICE_HTTP_PORT={expose}" in env
    (health,) = [args for k, args in stage if k == "HEALTHCHECK"]
    assert f":{expose}/healthz" in health
    assert any(k == "VOLUME" and "/models" in args for k, args in stage)


def test_the_cuda_image_runs_on_cuda_with_the_model_from_the_mounted_folder():
    stage = " ".join(args for k, args in final_stage(DEPLOY / "Dockerfile") if k == "ENV")
    assert "SLUICE_ENGINE_DEVICE=cuda" in stage and "SLUICE_ENGINE_MODEL=/models/model" in stage
    (base,) = [args for k, args in instructions(DEPLOY / "Dockerfile") if k == "ARG" and "CUDA_IMAGE" in args]
    assert "nvidia/cuda:" in base and "runtime" in base


def test_the_cpu_image_builds_the_cpu_kernels_into_a_folder_it_keeps_and_runs_them_from_there():
    """Built at image build time (as root, after the wheel is installed) into TORCH_EXTENSIONS_DIR,
    which the service reads at run time: a container on the build host's kind of CPU compiles
    nothing. Not under /tmp (an emptyDir in deploy/k8s, new in every pod) nor HOME (/tmp)."""
    stage = final_stage(DEPLOY / "Dockerfile.cpu")
    (folder,) = [
        args.partition("=")[2] for k, args in stage if k == "ENV" and args.startswith("TORCH_EXTENSIONS_DIR=")
    ]
    assert folder.startswith("/opt/sluice/") and not folder.startswith("/tmp")
    keys = [k for k, _ in stage]
    build = next(
        i for i, (k, args) in enumerate(stage) if k == "RUN" and "cpu_kernels" in args and ".load()" in args
    )
    wheel = next(i for i, (k, args) in enumerate(stage) if k == "RUN" and "/tmp/dist/" in args)
    setting = keys.index("ENV", wheel)
    assert wheel < setting < build < keys.index("USER")  # the installed sources, TORCH_EXTENSIONS_DIR set
    # a failed build fails the image on x86; elsewhere (no immintrin.h) the engine runs PyTorch's ops
    assert "is_x86()" in stage[build][1] and "exit(k.failure())" in stage[build][1]
    # g++ stays: inductor compiles the sdpa backend's decode kernel, and another ISA its own kernels
    assert any(k == "RUN" and "g++" in args for k, args in instructions(DEPLOY / "Dockerfile.cpu"))


def test_docker_context_holds_only_what_the_images_install_and_the_harness_hashes():
    rules = [
        line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"
    ]
    assert rules[0] == "*"  # nothing unless let through: no venv, build output, tests or git history
    let_through = {rule[1:] for rule in rules if rule.startswith("!")}
    assert let_through == {path.name for path in podman.SLUICE_SOURCES}
    assert {"**/__pycache__", "**/*.pyc"} <= set(rules)


def _compose_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)  # the draft the schema names in $schema


def _compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_compose_file_is_valid_against_the_compose_specification_schema():
    _compose_validator().validate(_compose())  # raises with the offending path and value
    _compose_validator().validate(_compose("compose.grafana.yaml"))


def test_compose_schema_check_rejects_a_broken_file():
    broken = _compose()
    broken["services"]["sluice-1"]["depends_on"] = {"kafka": {"condition": "when_ready"}}
    with pytest.raises(jsonschema.ValidationError):
        _compose_validator().validate(broken)


def test_compose_stack_builds_every_image_from_the_repository():
    services = _compose()["services"]
    assert set(services) == {"kafka", "sluice-1", "sluice-2", "jaeger", "prometheus"}
    for name, service in services.items():
        build = service["build"]  # no image from a registry: each is built here
        assert (DEPLOY / build["context"] / build.get("dockerfile", "Dockerfile")).is_file(), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    pinned = re.search(r"<kafka.version>(.+)</kafka.version>", (DEPLOY / "kafka" / "pom.xml").read_text())[1]
    kafka = services["kafka"]
    assert kafka["build"]["additional_contexts"]["kafka-libs"] == f"../build/kafka/libs-{pinned}"
    assert kafka["image"].endswith(f":{pinned}")


def test_compose_services_agree_on_topics_ports_and_brokers():
    services = _compose()["services"]
    sluices = [services["sluice-1"], services["sluice-2"]]
    sluice_env = sluices[0]["environment"]
    assert set(sluice_env) <= SERVICE_ENV and sluices[1]["environment"] == sluice_env
    assert float(sluices[0]["stop_grace_period"].rstrip("s")) > float(sluice_env["SLUICE_DRAIN_TIMEOUT_S"])
    defaults = ServiceConfig()
    jaeger = yaml.safe_load((DEPLOY / "jaeger" / "config.yaml").read_text())
    receiver = jaeger["receivers"]["kafka"]
    assert receiver["traces"]["topic"].endswith(f":-{defaults.traces_topic}}}")  # ${env:...:-default}
    assert receiver["traces"]["encoding"] == "otlp_proto"  # what tracing.py writes
    assert services["jaeger"]["environment"]["JAEGER_KAFKA_BROKERS"] == sluice_env["SLUICE_KAFKA_BOOTSTRAP"]
    assert jaeger["service"]["pipelines"]["traces"]["receivers"] == ["kafka"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"sluice-{i}:{defaults.http_port}" for i in (1, 2)]


def test_grafana_is_provisioned_with_the_prometheus_source_and_the_sluice_dashboard():
    grafana = _compose("compose.grafana.yaml")["services"]["grafana"]
    assert grafana["depends_on"] == ["prometheus"]  # the service of compose.yaml it is added to
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./grafana/sluice.json"].startswith("/var/lib/grafana/dashboards/")
    provisioning = DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sluice.yaml").read_text())["providers"]
    assert provider["options"]["path"] == str(Path(mounts["./grafana/sluice.json"]).parent)
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert (
        source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    )
