"""Helpers for test suites that use sandboxes (imports pytest lazily).

- `require(backend)`: skip when the backend is unusable here, except that RLK2_REQUIRE_DOCKER=1 /
  RLK2_REQUIRE_BWRAP=1 turn the skip into a failure, so CI can never silently skip the sandbox tests.
- `UnisolatedRunner`: the runner as a plain child process, NO isolation, for fast tests of the harness semantics
  (test counting, verdicts, early exits) with benign programs only. Not PID 1, so it works in a private temporary
  directory and never sweeps processes or wipes anything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from sandboxes.image import RUNNER_PATH
from sandboxes.pool import Limits
from sandboxes.result import ExecutionResult, Job


def backend_problem(backend: str) -> str | None:
    if backend == "docker":
        from sandboxes import docker_problem

        return docker_problem()
    if backend == "bwrap":
        from sandboxes.bwrap_backend import bwrap_problem

        return bwrap_problem()
    raise ValueError(f"unknown backend {backend!r}")


def required(backend: str) -> bool:
    return os.environ.get(f"RLK2_REQUIRE_{backend.upper()}", "") not in ("", "0")


def require(backend: str) -> None:
    """pytest.skip (or pytest.fail when RLK2_REQUIRE_<BACKEND> is set) unless `backend` works here."""
    import pytest

    problem = backend_problem(backend)
    if problem is None:
        return
    if required(backend):
        pytest.fail(f"RLK2_REQUIRE_{backend.upper()} is set but the {backend} sandbox is unusable: {problem}")
    pytest.skip(f"{backend} sandbox unusable here: {problem}")


class UnisolatedRunner:
    """Drive runner.py directly over pipes (no sandbox). Use with benign programs only."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits(nproc=1 << 16)  # not a per-sandbox uid here: do not cap the user's tasks
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER_PATH)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"PATH": os.environ.get("PATH", "/usr/bin")},
        )
        self.ready = json.loads(self.proc.stdout.readline())

    def raw(self, job: Job | dict[str, Any]) -> dict[str, Any]:
        job = job if isinstance(job, Job) else Job.from_dict(job)
        self.proc.stdin.write((json.dumps(self.limits.payload(job)) + "\n").encode())
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def run(self, job: Job | dict[str, Any]) -> ExecutionResult:
        job = job if isinstance(job, Job) else Job.from_dict(job)
        return ExecutionResult.from_runner(self.raw(job), job.id, "unisolated")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()

    def __enter__(self) -> UnisolatedRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SecondEngine:
    """A second dockerd on its own socket, data root and exec root (root only), for multi-engine and fault tests.

    `start()` after an abrupt `stop(SIGKILL)` first ends the killed engine's orphaned containerd, as a service
    manager would when it restarts the unit; otherwise the new dockerd waits on the old one's lock and gives up.
    """

    DATA_ROOT = "/var/lib/rlk2-test-docker2"  # kept between runs so the image copy is reused

    def __init__(self, base, *, tls: bool = False) -> None:
        """`tls=True`: the engine also listens on loopback TCP with TLS (`tls_url`, certificates made here for the
        test with `make_tls_files`; the client must present its own)."""
        import socket
        from pathlib import Path

        self.run_dir = Path(base)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.url = f"unix://{self.run_dir}/docker.sock"
        self.proc: subprocess.Popen | None = None
        self.tls_dir = self.tls_url = None
        if tls:
            self.tls_dir = make_tls_files(self.run_dir / "tls")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.tcp = f"tcp://127.0.0.1:{s.getsockname()[1]}"
            self.tls_url = f"{self.tcp}?tls={self.tls_dir}"

    def start(self) -> None:
        import time

        from sandboxes.docker_backend import engine_client

        self._end_orphaned_containerd()
        # A killed containerd can stay a zombie when nothing reaps orphans; its pid file would make the new dockerd
        # wait for it forever ("containerd is still running"), so a stopped engine's pid file goes.
        (self.run_dir / "exec" / "containerd" / "containerd.pid").unlink(missing_ok=True)
        log = open(self.run_dir / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--iptables=false",
                "--bridge=none",
                "-H",
                self.url,
                "--data-root",
                self.DATA_ROOT,
                "--exec-root",
                str(self.run_dir / "exec"),
                "--pidfile",
                str(self.run_dir / "docker.pid"),
                *self._tls_flags(),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 90
        while True:
            try:
                engine_client(self.url, timeout=5).ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop(signal_number=9)
                    raise RuntimeError(f"second dockerd did not come up; see {self.run_dir / 'dockerd.log'}") from None
                time.sleep(0.3)

    def _tls_flags(self) -> list[str]:
        if self.tls_dir is None:
            return []
        d = self.tls_dir
        return [
            "-H",
            self.tcp,
            "--tlsverify",
            f"--tlscacert={d / 'ca.pem'}",
            f"--tlscert={d / 'server-cert.pem'}",
            f"--tlskey={d / 'server-key.pem'}",
        ]

    def ensure_image(self, tag: str, source_url: str) -> None:
        """Copy `tag` from the engine at `source_url` unless present; keep only that tag of the repository."""
        from sandboxes.docker_backend import engine_client

        target = engine_client(self.url, timeout=300)
        try:
            target.images.get(tag)
        except Exception:
            source = engine_client(source_url, timeout=300)
            target.images.load(b"".join(source.images.get(tag).save(named=True)))
        for image in target.images.list(name=tag.rpartition(":")[0]):
            if tag not in image.tags:
                target.images.remove(image.id, force=True)

    def stop(self, signal_number: int = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal_number)
            self.proc.wait(timeout=60)

    def close(self) -> None:
        """Stop the engine and remove its runtime directory (the data root stays, unmounted)."""
        import shutil

        self.stop()
        self._end_orphaned_containerd()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if os.path.ismount(self.DATA_ROOT):  # dockerd bind-mounts its data root onto itself and leaves it mounted
            subprocess.run(["umount", self.DATA_ROOT], check=False)

    def _end_orphaned_containerd(self) -> None:
        import signal
        import time
        from pathlib import Path

        marker = str(self.run_dir / "exec")
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                argv
                and Path(argv[0].decode(errors="replace")).name == "containerd"
                and marker.encode() in b" ".join(argv)
            ):
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                for _ in range(100):
                    if not (proc / "cmdline").exists():
                        break
                    time.sleep(0.05)


def make_tls_files(directory):
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI (no
    Python crypto package is a dependency): ca.pem, cert.pem and key.pem (the client's, Docker's DOCKER_CERT_PATH
    layout) and server-cert.pem / server-key.pem for dockerd. Returns the directory."""
    from pathlib import Path

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=rlk2 test CA", "-keyout",
            "ca-key.pem", "-out", "ca.pem")  # fmt: skip
    for name, subject, ext in (
        ("server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "/CN=rlk2 test client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}-key.pem",
                "-out", f"{name}.csr")  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}-cert.pem")  # fmt: skip
    (d / "cert.pem").write_bytes((d / "client-cert.pem").read_bytes())
    (d / "key.pem").write_bytes((d / "client-key.pem").read_bytes())
    for key in d.glob("*key.pem"):
        key.chmod(0o600)
    return d


class SshEngine:
    """This machine's Docker engine reached the way Docker reaches a remote one over ssh (`ssh://USER@HOST:PORT`):
    an sshd of its own on a loopback port, key-only, and a home directory holding the client's key and the
    server's host key (`home`: point $HOME at it, as the docker SDK's ssh transport, paramiko, reads ~/.ssh there).
    Root only (sshd). Through it the SDK runs `docker system dial-stdio` on the "remote" host."""

    def __init__(self, base) -> None:
        import getpass
        import socket
        from pathlib import Path

        self.dir = Path(base)
        self.home = self.dir / "home"
        (self.home / ".ssh").mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"ssh://{getpass.getuser()}@127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import socket
        import time

        d, ssh = self.dir, self.home / ".ssh"
        for key in (d / "host_ed25519", ssh / "id_ed25519"):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (d / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
        host_key = (d / "host_ed25519.pub").read_text().split()
        (ssh / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n")
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {d / 'host_ed25519'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    f"PidFile {d / 'sshd.pid'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    # each pool slot holds a session for its attach stream and the SDK's connection pool up to 10
                    # more: sshd's default of 10 per connection made channels fail under a burst
                    "MaxSessions 64",
                ]
            )
            + "\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        log = open(d / "sshd.log", "ab")  # noqa: SIM115 - the daemon's log, open for its lifetime
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError(f"sshd did not come up; see {d / 'sshd.log'}") from None
                time.sleep(0.1)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
