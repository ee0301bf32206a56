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
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD = REPO_ROOT / "build" / "containers"
BASE_IMAGE = "localhost/sluice-base:bookworm"
GLOBAL = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096"]  # under the host's hard limits
PACKAGES = ["podman", "runc", "debootstrap", "podman-compose", "uidmap", "slirp4netns", "fuse-overlayfs"]


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *GLOBAL, *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def ensure_tools() -> None:
    """Debian's podman, runc, debootstrap and podman-compose, installed once."""
    if all(shutil.which(tool) for tool in ("podman", "runc", "debootstrap", "podman-compose")):
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


def build(
    name: str,
    dockerfile: Path,
    context: Path,
    sources: list[Path],
    build_args: dict[str, str] | None = None,
    build_contexts: dict[str, Path] | None = None,
    base_arg: str = "BASE_IMAGE",
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
    command += ["--build-arg", "PIP_CERT=/run/host-ca.pem"]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    for key, path in (build_contexts or {}).items():
        command += ["--build-context", f"{key}={path.resolve()}"]
    result = podman(*command, "-t", tag, str(context), timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"podman build of {name} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    _remove_other_tags(name, keep=tag)
    return tag


def _remove_other_tags(name: str, keep: str) -> None:
    """Older builds of the image (several GB each with PyTorch): only the newest is kept."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", f"localhost/{name}", check=False)
    for old in set(listed.stdout.split()) - {keep}:
        podman("rmi", old, check=False)


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
