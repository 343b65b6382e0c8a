"""bubblewrap backend: the same warm pool and runner for Linux hosts without Docker.

Each slot is one long-lived `bwrap` process: new user, pid, network, IPC, UTS and cgroup namespaces; the runner is
PID 1 (`--as-pid-1`) under uid 65534; the root is an empty read-only tmpfs with read-only binds of the offline
root filesystem's /usr and /etc when it has been built (`rlk2 sandbox build --offline`), else of the host's /usr
only; /tmp and /dev/shm are size-capped tmpfs; the environment is cleared; nested user namespaces are disabled;
the sandbox dies with its host process. Started as root, the pool first drops to uid/gid 65534 on the host, so
the sandbox is an unprivileged user namespace in every case.

Weaker than the Docker backend, and said so in sandboxes/__init__.py: no cgroup limits (memory is bounded per
process by RLIMIT_AS and process count by RLIMIT_NPROC, so a job's total is at most their product), no CPU quota
and no seccomp filter.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxes.image import RUNNER_IN_IMAGE, RUNNER_PATH, rootfs_path
from sandboxes.pool import Limits, Slot, SlotDied, SlotError, SlotHung, SlotPool
from sandboxes.result import SandboxUnavailable

NOBODY = 65534


@dataclass(frozen=True)
class BwrapOptions:
    root: str | None = None
    """Root filesystem whose /usr (and /etc) are bound read-only; None: the offline rootfs if built, else the host."""
    scratch_mb: int = 64
    """Size of the /tmp tmpfs (the job's cwd), wiped after every job."""
    shm_mb: int = 16
    """Size of the /dev/shm tmpfs."""
    ready_timeout_s: float = 30.0


def resolve_root(options: BwrapOptions) -> Path:
    if options.root:
        return Path(options.root)
    cached = rootfs_path()
    if (cached / "usr" / "bin" / "python3").exists():
        return cached
    return Path("/")


def bwrap_argv(root: Path, runner_fd: int, options: BwrapOptions) -> list[str]:
    """The bubblewrap command line for one slot (runner source arrives on `runner_fd`)."""
    argv = [
        "bwrap",
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--as-pid-1",
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--hostname",
        "sandbox",
        "--ro-bind",
        str(root / "usr"),
        "/usr",
    ]
    for name in ("bin", "lib", "lib64", "sbin"):  # merged-/usr layouts: symlinks; otherwise bind the directory
        path = root / name
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), f"/{name}"]
        elif path.is_dir():
            argv += ["--ro-bind", str(path), f"/{name}"]
    if root != Path("/"):
        argv += ["--ro-bind", str(root / "etc"), "/etc"]  # the sandbox's own /etc; the host's is never exposed
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(options.scratch_mb << 20),
        "--perms",
        "1777",
        "--tmpfs",
        "/tmp",
        "--size",
        str(options.shm_mb << 20),
        "--perms",
        "1777",
        "--tmpfs",
        "/dev/shm",
        "--ro-bind-data",
        str(runner_fd),
        RUNNER_IN_IMAGE,
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        "/tmp",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/local/bin:/usr/bin:/bin",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--",
        "/usr/bin/python3",
        "-I",
        RUNNER_IN_IMAGE,
    ]
    return argv


def _unprivileged() -> dict[str, Any]:
    """Popen arguments that start bwrap as nobody when we are root (no supplementary groups)."""
    return dict(user=NOBODY, group=NOBODY, extra_groups=[]) if os.geteuid() == 0 else {}


class BwrapSlot(Slot):
    engine = "bwrap"

    def __init__(self, index: int, options: BwrapOptions) -> None:
        self.options, self.index = options, index
        self.label = f"bwrap/{index}"
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.err = None
        self.generation = 0

    def start(self) -> None:
        self.generation += 1
        self.label = f"bwrap/{self.index}-{self.generation}"  # names the sandbox a job ran in
        root = resolve_root(self.options)
        if not (root / "usr" / "bin" / "python3").exists():
            raise SlotError(f"no python3 under {root}/usr/bin")
        with tempfile.TemporaryFile() as runner:
            runner.write(RUNNER_PATH.read_bytes())
            runner.seek(0)
            self.err = tempfile.TemporaryFile()
            try:
                self.proc = subprocess.Popen(
                    bwrap_argv(root, runner.fileno(), self.options),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=self.err,
                    pass_fds=(runner.fileno(),),
                    env={},
                    start_new_session=True,
                    **_unprivileged(),
                )
            except OSError as exc:
                raise SlotError(f"cannot run bwrap: {exc}") from None
            self.buf = b""
            try:
                ready = json.loads(self._read_line(time.monotonic() + self.options.ready_timeout_s))
            except (SlotDied, SlotHung, ValueError) as exc:
                raise SlotError(f"the runner did not start: {exc}{self._stderr_note()}") from None
        if not ready.get("ready") or ready.get("pid") != 1 or not ready.get("nondumpable"):
            raise SlotError(f"the runner started without its protections: {ready}")

    def _stderr_note(self) -> str:
        if self.err is None:
            return ""
        self.err.seek(0)
        tail = self.err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()[-1:]
        return f" (bwrap: {tail[0]})" if tail else ""

    def _read_line(self, deadline: float) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SlotHung("no answer before the deadline")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise SlotHung("no answer before the deadline")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise SlotDied("the sandbox exited" + self._stderr_note())
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def send(self, lines: bytes, timeout_s: float) -> None:
        if self.proc is None or self.proc.stdin is None:
            raise SlotDied("not started")
        fd, view, deadline = self.proc.stdin.fileno(), memoryview(lines), time.monotonic() + timeout_s
        while view:  # the pipe fills while the runner is busy with earlier jobs: wait, but not past the deadline
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise SlotHung("the runner did not take its jobs before the deadline")
            try:
                view = view[os.write(fd, view[: select.PIPE_BUF]) :]
            except OSError as exc:
                raise SlotDied(f"the sandbox's stdin closed ({exc})") from None

    def receive(self, timeout_s: float) -> dict[str, Any]:
        if self.proc is None:
            raise SlotDied("not started")
        try:
            return json.loads(self._read_line(time.monotonic() + timeout_s))
        except ValueError as exc:
            raise SlotDied(f"unreadable runner output ({exc})") from None

    def stop(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # bwrap and, through the pid namespace, everything inside
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.proc = None
        if self.err is not None:
            self.err.close()
            self.err = None


def bwrap_problem(options: BwrapOptions | None = None) -> str | None:
    """Why the bubblewrap backend cannot run here, or None when it can (starts and stops one sandbox)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed (apt-get install bubblewrap)"
    slot = BwrapSlot(0, options or BwrapOptions())
    try:
        slot.start()
    except SlotError as exc:
        return str(exc)
    finally:
        slot.stop()
    return None


def open_bwrap_pool(
    pool_size: int | None = None, limits: Limits | None = None, options: BwrapOptions | None = None
) -> SlotPool:
    if shutil.which("bwrap") is None:
        raise SandboxUnavailable("bwrap: bubblewrap is not installed (apt-get install bubblewrap)")
    options = options or BwrapOptions()
    # 2 per CPU: on 2 busy cores 4 sandboxes ran faster than 2, at the same CPU per program (unlike Docker's)
    n = pool_size or max(2, min(32, 2 * (os.cpu_count() or 1)))
    return SlotPool("bwrap", [BwrapSlot(i, options) for i in range(n)], limits or Limits())
