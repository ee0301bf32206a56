"""Podman on this kind of machine, for the container tests: everything machine-specific lives here,
never in the shipped Dockerfiles or compose file.

No registry is reachable and no Docker daemon runs, so: Debian's podman (installed on first use),
the runc runtime and cgroupfs (crun fails on this kernel's hybrid cgroups), explicit ulimits, a
base image made by debootstrap from the machine's Debian mirror, and the machine's CA bundle
mounted into builds so pip reaches its index. Images are tagged by a hash of what they are built
from, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD = REPO_ROOT / "build" / "containers"
BASE_IMAGE = "localhost/sluice-base:bookworm"
GLOBAL = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096"]  # under the host's hard limits
GO_IMAGE = "localhost/sluice-go:host"
# golang-github-containernetworking-plugin-dnsname: compose services find each other by name.
PACKAGES = [
    "podman",
    "runc",
    "debootstrap",
    "podman-compose",
    "uidmap",
    "slirp4netns",
    "fuse-overlayfs",
    "golang-github-containernetworking-plugin-dnsname",
]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *GLOBAL, *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def ensure_tools() -> None:
    """Debian's podman, runc, debootstrap and podman-compose, installed once."""
    tools = ("podman", "runc", "debootstrap", "podman-compose")
    if all(shutil.which(tool) for tool in tools) and Path("/usr/lib/cni/dnsname").exists():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        capture_output=True,
        env=env,
        timeout=900,
    )


def ensure_base_image() -> str:
    """A minimal Debian bookworm image from debootstrap, imported once."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    rootfs = BUILD / "rootfs-bookworm"
    if not (rootfs / "etc" / "debian_version").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs)],
            check=True,
            capture_output=True,
            timeout=900,
        )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["podman", *GLOBAL, "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True
    )
    tar.wait()
    return BASE_IMAGE


def ensure_go_image() -> str:
    """The host's Go toolchain (/usr/local/go) on the debootstrap base: the golang image of a
    Dockerfile's build stage, as no registry is reachable."""
    if podman("image", "exists", GO_IMAGE, check=False).returncode == 0:
        return GO_IMAGE
    goroot = Path(shutil.which("go") or "/usr/local/go/bin/go").resolve().parents[1]
    containerfile = BUILD / "go" / "Containerfile"
    containerfile.parent.mkdir(parents=True, exist_ok=True)
    containerfile.write_text(
        f"FROM {ensure_base_image()}\nCOPY --from=goroot . /usr/local/go\n"
        "ENV PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    podman(
        "build",
        "--build-context",
        f"goroot={goroot}",
        "-f",
        str(containerfile),
        "-t",
        GO_IMAGE,
        str(containerfile.parent),
        timeout=600,
    )
    return GO_IMAGE


def build(
    name: str,
    dockerfile: Path,
    context: Path,
    sources: list[Path],
    build_args: dict[str, str] | None = None,
    build_contexts: dict[str, Path] | None = None,
    base_arg: str = "BASE_IMAGE",
    volumes: list[str] | None = None,
    timeout: float = 1800,
) -> str:
    """`podman build` on the debootstrap base, tagged by a hash of the Dockerfile, the build arguments
    and the files in `sources`: with that tag present nothing is built. `base_arg` is the
    Dockerfile's build argument that names its base image."""
    args = {base_arg: ensure_base_image(), **(build_args or {})}
    tag = f"localhost/{name}:{_content_hash(dockerfile, sources, args)}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        return tag
    cert = os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt")
    command = [
        "build",
        "--network",
        "host",
        *ULIMITS,
        "-v",
        f"{cert}:/run/host-ca.pem:ro",
        "-f",
        str(dockerfile),
    ]
    for volume in volumes or []:
        command += ["-v", volume]
    command += ["--build-arg", "PIP_CERT=/run/host-ca.pem"]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    for key, path in (build_contexts or {}).items():
        command += ["--build-context", f"{key}={path.resolve()}"]
    # Older builds go first: each final image with PyTorch is ~6.6 GB, and a build beside the old
    # ones ran out of disk (the layer cache of the build stage is untagged and stays).
    _remove_other_tags(name, keep=tag)
    started = int(time.time())
    result = podman(*command, "-t", tag, str(context), timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"podman build of {name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    _remove_stale_stages(before=started)
    return tag


def _remove_other_tags(name: str, keep: str) -> None:
    """Older builds of the image (several GB each with PyTorch): only the newest is kept."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/{name}", check=False)
    for old in set(listed.stdout.split()) - {keep}:
        podman("rmi", old, check=False)


def _remove_stale_stages(before: int) -> None:
    """Untagged images (build stages, former builds) older than this build: a build stage of an
    image with PyTorch is several GB, and each change of Sluice's code leaves one behind; those of
    the build just made stay, as the layer cache of the next one."""
    podman("image", "prune", "-f", "--filter", f"until={before}", check=False)


def _content_hash(dockerfile: Path, sources: list[Path], args: dict[str, str]) -> str:
    digest = hashlib.sha256(dockerfile.read_bytes())
    digest.update(repr(sorted(args.items())).encode())
    for source in sources:
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(source.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# The project's images, as deploy/compose.yaml builds them, on the debootstrap base.
SLUICE_SOURCES = [
    REPO_ROOT / name for name in ("pyproject.toml", "README.md", "engine", "schemas", "service")
]
DEPLOY = REPO_ROOT / "deploy"


def kafka_image() -> str:
    sources = [DEPLOY / "kafka" / name for name in ("Dockerfile", "entrypoint.sh", "log4j2.properties")]
    libs = {"kafka-libs": kafka_libs()}
    return build(
        "sluice-kafka", DEPLOY / "kafka" / "Dockerfile", DEPLOY / "kafka", sources, build_contexts=libs
    )


def sluice_cpu_image() -> str:
    # download.pytorch.org is not reachable here: PyPI's torch wheel (CUDA build, runs on CPU).
    return build(
        "sluice-cpu",
        DEPLOY / "Dockerfile.cpu",
        REPO_ROOT,
        [DEPLOY / "Dockerfile.cpu", *SLUICE_SOURCES],
        build_args={"TORCH_INDEX": "https://pypi.org/simple"},
        base_arg="PYTHON_IMAGE",
    )


def jaeger_image() -> str:
    """Jaeger's Go stage on the host's Go toolchain, with the host's module and build caches
    mounted: the modules deploy/observe/build-jaeger.sh already fetched are not fetched again."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    caches = subprocess.run([go, "env", "GOMODCACHE", "GOCACHE"], capture_output=True, text=True, check=True)
    modcache, gocache = caches.stdout.split()
    return build(
        "sluice-jaeger",
        DEPLOY / "jaeger" / "Dockerfile",
        DEPLOY / "jaeger",
        [DEPLOY / "jaeger"],
        build_args={"GO_IMAGE": ensure_go_image(), "CA_CERT": "/run/host-ca.pem"},
        volumes=[f"{modcache}:/root/go/pkg/mod", f"{gocache}:/root/.cache/go-build"],
    )


def prometheus_image() -> str:
    return build(
        "sluice-prometheus",
        DEPLOY / "prometheus" / "Dockerfile",
        DEPLOY / "prometheus",
        [DEPLOY / "prometheus"],
    )


def kafka_libs() -> Path:
    """The jars deploy/kafka/kafka.sh fetches from Maven Central (fetched here if missing)."""
    version = re.search(r"<kafka.version>(.+)</kafka.version>", (DEPLOY / "kafka" / "pom.xml").read_text())[1]
    libs = REPO_ROOT / "build" / "kafka" / f"libs-{version}"
    if not (libs / ".complete").exists():
        subprocess.run([str(DEPLOY / "kafka" / "kafka.sh"), "fetch"], check=True, timeout=900)
    return libs


def compose(
    project: str, env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """podman-compose on deploy/compose.yaml with this machine's podman flags."""
    command = [
        "podman-compose",
        f"--podman-args={' '.join(GLOBAL)}",
        f"--podman-run-args={' '.join(ULIMITS)}",
        "-f",
        str(DEPLOY / "compose.yaml"),
        "-p",
        project,
        *args,
    ]
    return subprocess.run(
        command, env={**os.environ, **env}, cwd=DEPLOY, capture_output=True, text=True, timeout=timeout
    )


def remove_project(project: str) -> None:
    """Whatever of a compose project is left: containers (with their anonymous volumes), then its
    network (podman-compose 1.0.3 leaves it) and named volumes."""
    label = f"label=io.podman.compose.project={project}"
    for kind in ("container", "network", "volume"):
        listed = podman(
            kind, "ls", "-q", "--filter", label, *(["-a"] if kind == "container" else []), check=False
        )
        for item in listed.stdout.split():
            podman(kind, "rm", "-f", *(["-v"] if kind == "container" else []), item, check=False)
