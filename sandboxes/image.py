"""The sandbox image: its tag, the Dockerfile build, and the offline build (debootstrap + `docker import`).

The tag is derived from the runner and the Dockerfile, so a changed runner can never run in a stale image: the
backend asks for the new tag and `rlk2 sandbox doctor` says it is missing. Both builds produce that same tag.
The offline build caches the debootstrapped root filesystem (also used as the bubblewrap root), so rebuilding
after a runner change only re-imports it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sandboxes.result import SandboxError

PACKAGE_DIR = Path(__file__).resolve().parent
RUNNER_PATH = PACKAGE_DIR / "runner.py"
DOCKERFILE = PACKAGE_DIR / "images" / "python" / "Dockerfile"
IMAGE_REPO = "rlk2-sandbox-python"
RUNNER_IN_IMAGE = "/opt/rlk2/runner.py"
RUNNER_CMD = ["python3", "-I", RUNNER_IN_IMAGE]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
ROOTFS_VERSION = "1"  # bump when make_rootfs changes what it produces
# Keep in step with the Dockerfile's ENV / WORKDIR / USER / CMD lines.
IMPORT_CHANGES = [
    "ENV LANG=C.UTF-8",
    "ENV PATH=/usr/local/bin:/usr/bin:/bin",
    "WORKDIR /tmp",
    "USER 65534:65534",
    "LABEL org.rlk2.sandbox=python",
    'CMD ["python3", "-I", "/opt/rlk2/runner.py"]',
]


def recipe_hash() -> str:
    digest = hashlib.sha256(RUNNER_PATH.read_bytes() + b"\0" + DOCKERFILE.read_bytes())
    return digest.hexdigest()[:12]


DEFAULT_IMAGE = f"{IMAGE_REPO}:{recipe_hash()}"


def cache_dir() -> Path:
    """Where the root filesystem is cached. World-readable when root (the bubblewrap backend reads it as nobody)."""
    env = os.environ.get("RLK2_SANDBOX_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/rlk2")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlk2"


def rootfs_path(suite: str = SUITE) -> Path:
    return cache_dir() / f"rootfs-{suite}-v{ROOTFS_VERSION}"


# Dropped from the root filesystem: package caches and documentation (python3 needs none of it).
_TRIM = ["var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"]


def make_rootfs(suite: str = SUITE, mirror: str = MIRROR, dest: Path | None = None) -> Path:
    """debootstrap a minimal Debian with python3 into the cache (needs root and the Debian mirror)."""
    dest = dest or rootfs_path(suite)
    if shutil.which("debootstrap") is None:
        raise SandboxError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise SandboxError("the offline build runs debootstrap and needs root")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(dest.parent, 0o755)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=dest.parent))
    try:
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", suite, str(work), mirror],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SandboxError(f"debootstrap failed: {tail[0]}")
        for rel in _TRIM:
            shutil.rmtree(work / rel, ignore_errors=True)
            (work / rel).mkdir(parents=True, exist_ok=True)
        for root, _, files in os.walk(work):  # no setuid/setgid binaries, even though no-new-privileges blocks them
            for name in files:
                path = os.path.join(root, name)
                st = os.lstat(path)
                if not os.path.islink(path) and st.st_mode & 0o6000:
                    os.chmod(path, st.st_mode & ~0o6000)
        os.chmod(work, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class BuildReport:
    tag: str
    seconds: float
    rootfs_seconds: float | None  # None: the cached root filesystem was reused
    method: str

    def line(self) -> str:
        how = "cached root filesystem" if self.rootfs_seconds is None else f"debootstrap {self.rootfs_seconds:.1f}s"
        return (
            f"built {self.tag} ({self.method}) in {self.seconds:.1f}s ({how})"
            if self.method == "offline"
            else f"built {self.tag} ({self.method}) in {self.seconds:.1f}s"
        )


def _rootfs_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # The engine mounts its own /dev, /proc and /sys; their contents stay out of the image.
    for mount in ("./dev/", "./proc/", "./sys/"):
        if info.name.startswith(mount):
            return None
    return info


def build_offline(
    client, tag: str = DEFAULT_IMAGE, *, suite: str = SUITE, mirror: str = MIRROR, fresh_rootfs: bool = False
) -> BuildReport:
    """debootstrap (or reuse) the root filesystem, add the runner, `docker import` it under `tag`."""
    start = time.monotonic()
    rootfs = rootfs_path(suite)
    rootfs_seconds = None
    if fresh_rootfs or not (rootfs / "usr" / "bin" / "python3").exists():
        t0 = time.monotonic()
        make_rootfs(suite, mirror, rootfs)
        rootfs_seconds = time.monotonic() - t0
    repo, _, version = tag.rpartition(":")
    previous = _image_id(client, tag)
    with tempfile.TemporaryDirectory(prefix="rlk2-image-") as tmp:
        tar_path = Path(tmp) / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(rootfs, arcname=".", filter=_rootfs_filter)
            folder = tarfile.TarInfo("." + os.path.dirname(RUNNER_IN_IMAGE))
            folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(folder)
            info = tar.gettarinfo(str(RUNNER_PATH), arcname="." + RUNNER_IN_IMAGE)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o644
            with open(RUNNER_PATH, "rb") as f:
                tar.addfile(info, f)
        client.api.import_image_from_file(str(tar_path), repository=repo, tag=version, changes=IMPORT_CHANGES)
    current = _image_id(client, tag)
    if current is None:
        raise SandboxError(f"docker import did not produce {tag}")
    _drop_if_untagged(client, previous, current)
    return BuildReport(tag, time.monotonic() - start, rootfs_seconds, "offline")


def _image_id(client, tag: str) -> str | None:
    import docker

    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def _drop_if_untagged(client, image_id: str | None, current: str) -> None:
    """Remove the image a rebuild took the tag from, when nothing else names or runs it (never forced)."""
    if image_id is None or image_id == current:
        return
    try:
        if not client.images.get(image_id).tags:
            client.images.remove(image_id, noprune=False)
    except Exception:
        pass  # still used by a container, or already gone: leave it


def build_dockerfile(client, tag: str = DEFAULT_IMAGE) -> BuildReport:
    """`docker build` of images/python/Dockerfile with the sandboxes package as context (needs the base image)."""
    import docker

    start = time.monotonic()
    previous = _image_id(client, tag)
    try:
        client.images.build(
            path=str(PACKAGE_DIR), dockerfile=str(DOCKERFILE.relative_to(PACKAGE_DIR)), tag=tag, rm=True, forcerm=True
        )
    except docker.errors.BuildError as exc:
        last = next(
            (
                c.get("error") or c.get("stream")
                for c in reversed(list(exc.build_log))
                if c.get("error") or c.get("stream")
            ),
            str(exc),
        )
        raise SandboxError(f"docker build failed: {str(last).strip()}") from None
    _drop_if_untagged(client, previous, _image_id(client, tag) or "")
    return BuildReport(tag, time.monotonic() - start, None, "dockerfile")
