"""Podman on this kind of machine, for the container tests: everything machine-specific lives here,
never in the shipped Dockerfiles or compose file.

No registry is reachable and no Docker daemon runs, so: Debian's podman (installed on first use),
the runc runtime and cgroupfs (crun fails on this kernel's hybrid cgroups), explicit ulimits, a
base image made by debootstrap from the machine's Debian mirror, and the machine's CA bundle
mounted into builds so pip reaches its index.

Each image is built once and shared by every test that needs it: its tag is a hash of what it is
built from (the Dockerfile, the build arguments and the files of its context that git sees: no
caches, no build output), computed by `build()` for every caller, so a second test or a second
run finds it. The Sluice images install the wheels `make` downloaded into build/wheels (mounted
as PIP_FIND_LINKS with PIP_NO_INDEX), so a fresh machine downloads PyTorch once. Every build is timed
(`BUILD_TIMES`); the suite's summary prints them. What cannot be built here (no package index,
no Debian mirror, no podman) is skipped with the reason, never left to run into a timeout.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD = REPO_ROOT / "build" / "containers"
WHEELS = REPO_ROOT / "build" / "wheels"  # the Makefile downloads every wheel of the venv here
BASE_IMAGE = "localhost/sluice-base:bookworm"
# A fresh machine builds each image from nothing: the Sluice images install PyTorch and its CUDA
# libraries (~6 GB) in their deps stage, 2-3 minutes on the 2-core Zen 5 machine and past 10 on a
# slower AVX2 one (issue 25). The tests that build them carry BUILD_TIMEOUT_S plus their run time.
BUILD_TIMEOUT_S = 1800
BUILD_TIMES: list[tuple[str, str, float]] = []  # (image, built/reused/failed, seconds), for the summary
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
    """Debian's podman, runc, debootstrap and podman-compose, installed once; the test is skipped,
    with the reason, where they cannot be installed or a build could not reach the package index."""
    _skip_unless_index_reachable()
    tools = ("podman", "runc", "debootstrap", "podman-compose")
    if all(shutil.which(tool) for tool in tools) and Path("/usr/lib/cni/dnsname").exists():
        return
    if not shutil.which("apt-get"):
        pytest.skip("podman is not installed and there is no apt-get to install it")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            check=True,
            capture_output=True,
            env=env,
            timeout=900,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        stderr = getattr(e, "stderr", b"") or b""
        pytest.skip(f"podman and its tools could not be installed from Debian's packages: {stderr[-500:]!r}")


@functools.cache
def _index_reachable() -> str | None:
    """None where pip's package index answers; else why not (the images install from it)."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        urllib.request.urlopen(f"{index}/pip/", timeout=20).close()
    except OSError as e:
        return f"the package index {index} is not reachable ({e}): the images install from it"
    return None


def _skip_unless_index_reachable() -> None:
    reason = _index_reachable()
    if reason:
        pytest.skip(reason)


def ensure_base_image() -> str:
    """A minimal Debian bookworm image from debootstrap, imported once."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return BASE_IMAGE
    rootfs = BUILD / "rootfs-bookworm"
    if not (rootfs / "etc" / "debian_version").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(rootfs)],
                check=True,
                capture_output=True,
                timeout=900,
            )
        except subprocess.CalledProcessError as e:
            shutil.rmtree(rootfs, ignore_errors=True)
            pytest.skip(
                f"debootstrap could not fetch Debian bookworm (no mirror reachable?): {e.stderr[-500:]!r}"
            )
        BUILD_TIMES.append(("debootstrap bookworm", "built", time.monotonic() - started))
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
    timeout: float = BUILD_TIMEOUT_S,
    target: str | None = None,
) -> str:
    """`podman build` on the debootstrap base, tagged by a hash of the Dockerfile, the build arguments
    and the files in `sources`: with that tag present nothing is built. `base_arg` is the
    Dockerfile's build argument that names its base image; `target` a stage to stop at."""
    args = {base_arg: ensure_base_image(), **(build_args or {})}
    stage = {"--target": target} if target else {}
    tag = f"localhost/{name}:{_content_hash(dockerfile, sources, {**args, **stage})}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        if not any(image == name for image, _, _ in BUILD_TIMES):
            BUILD_TIMES.append((name, "reused", 0.0))
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
    command += ["--build-arg", "PIP_CERT=/run/host-ca.pem", *(["--target", target] if target else [])]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    for key, path in (build_contexts or {}).items():
        command += ["--build-context", f"{key}={path.resolve()}"]
    if target:  # a stage of its own (PyTorch and the dependencies, ~6.6 GB): the old one goes first,
        _remove_other_tags(name, keep=tag)  # as one beside it ran out of disk
    started, clock = int(time.time()), time.monotonic()
    result = podman(*command, "-t", tag, str(context), timeout=timeout, check=False)
    BUILD.mkdir(parents=True, exist_ok=True)
    (BUILD / f"{name}.log").write_text(result.stdout + result.stderr)  # the last build's log, for a look
    BUILD_TIMES.append((name, "built" if result.returncode == 0 else "failed", time.monotonic() - clock))
    if result.returncode != 0:
        raise RuntimeError(
            f"podman build of {name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    # Any other image goes after the new one is built: until then its layers are the new build's cache.
    _remove_other_tags(name, keep=tag)
    _remove_stale_stages(before=started)
    return tag


def _remove_other_tags(name: str, keep: str) -> None:
    """Older builds of the image (several GB each with PyTorch): only the newest is kept."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/{name}", check=False)
    same_name = {ref for ref in listed.stdout.split() if ref.rpartition(":")[0] == f"localhost/{name}"}
    for old in same_name - {keep}:  # podman lists sluice-cpu-deps under sluice-cpu too
        podman("rmi", old, check=False)


def _remove_stale_stages(before: int) -> None:
    """Untagged images (build stages, former builds) older than this build; those of the build just
    made stay, as the layer cache of the next one. The heavy stage (deps) is tagged, so kept."""
    podman("image", "prune", "-f", "--filter", f"until={before}", check=False)


def _content_hash(dockerfile: Path, sources: list[Path], args: dict[str, str]) -> str:
    digest = hashlib.sha256(dockerfile.read_bytes())
    digest.update(repr(sorted(args.items())).encode())
    for path in _context_files(sources):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _context_files(sources: list[Path]) -> list[Path]:
    """The files of `sources` that git sees (tracked, or new and not ignored): what a build sends,
    never caches or build output that a test run left beside them."""
    listed = subprocess.run(
        [
            "git",
            "-C",
            str(REPO_ROOT),
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
            "--",
            *(str(source.relative_to(REPO_ROOT)) for source in sources),
        ],
        capture_output=True,
        check=False,
    )
    if listed.returncode == 0:  # a git checkout
        files = {REPO_ROOT / name for name in listed.stdout.decode().split("\0") if name}
        return sorted(path for path in files if path.is_file())
    return sorted(  # a copy without git: every file but bytecode
        path
        for source in sources
        for path in (source.rglob("*") if source.is_dir() else [source])
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


# The project's images, as deploy/compose.yaml builds them, on the debootstrap base. The same list
# as .dockerignore lets into the build context (tests/deploy/test_containers.py checks).
SLUICE_SOURCES = [
    REPO_ROOT / name for name in ("pyproject.toml", "README.md", "engine", "schemas", "service")
]


def _sluice_image(name: str, dockerfile: Path, base_arg: str, build_args: dict[str, str]) -> str:
    """A Sluice image, installing from build/wheels where `make` downloaded the venv's wheels.

    Its `deps` stage (PyTorch and the other dependencies) is built and tagged first, from the
    Dockerfile and pyproject.toml alone: a tagged stage survives the pruning of stale stages, so a
    change of our code rebuilds only the wheel and the last layers."""
    volumes, args = [], dict(build_args)
    if any(WHEELS.glob("torch-*.whl")) and any(WHEELS.glob("setuptools-*.whl")):
        # from the venv's wheels alone (pip prefers the index's copy of a wheel it finds in both)
        volumes.append(f"{WHEELS}:/wheels:ro")
        args.update(PIP_FIND_LINKS="/wheels", PIP_NO_INDEX="1")
    deps = [dockerfile, REPO_ROOT / "pyproject.toml"]
    build(
        f"{name}-deps", dockerfile, REPO_ROOT, deps, args, base_arg=base_arg, volumes=volumes, target="deps"
    )
    sources = [dockerfile, *SLUICE_SOURCES]
    return build(name, dockerfile, REPO_ROOT, sources, args, base_arg=base_arg, volumes=volumes)


DEPLOY = REPO_ROOT / "deploy"


def kafka_image() -> str:
    sources = [DEPLOY / "kafka" / name for name in ("Dockerfile", "entrypoint.sh", "log4j2.properties")]
    libs = {"kafka-libs": kafka_libs()}
    return build(
        "sluice-kafka", DEPLOY / "kafka" / "Dockerfile", DEPLOY / "kafka", sources, build_contexts=libs
    )


def sluice_cpu_image() -> str:
    # download.pytorch.org is not reachable here: PyPI's torch wheel (CUDA build, runs on CPU), the
    # one the venv installed, from build/wheels.
    return _sluice_image(
        "sluice-cpu", DEPLOY / "Dockerfile.cpu", "PYTHON_IMAGE", {"TORCH_INDEX": "https://pypi.org/simple"}
    )


def sluice_cuda_image() -> str:
    """deploy/Dockerfile on the debootstrap base (no NVIDIA base image is reachable)."""
    return _sluice_image("sluice-cuda", DEPLOY / "Dockerfile", "CUDA_IMAGE", {})


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
