"""Docker backend: a warm pool of hardened containers, possibly spread over several engines.

Each slot is one long-lived container running the runner as PID 1; jobs travel over the container's attached
stdin/stdout (Docker's multiplexed attach stream). Engines are given as DOCKER_HOST-style URLs
(`unix:///var/run/docker.sock`, `ssh://user@host`, `tcp://host:2376?tls=CERT_DIR` with that engine's own TLS files,
or `tcp://host:2376` with DOCKER_TLS_VERIFY/DOCKER_CERT_PATH; plain TCP only on loopback); each gets
`slots_per_engine` containers and all of them pull from one queue, with the same verdicts, deadlines and retries
whatever the transport.

Every container: no network, read-only root, size-capped tmpfs /tmp (noexec) and /dev/shm, memory limit with no
swap, pids and CPU limits, all capabilities dropped, no-new-privileges, a non-root uid of its own (so RLIMIT_NPROC,
which the kernel counts per uid, is per container), no log driver (job output never lands on the host disk),
stdin closed - and the container removed - when the host side goes away.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import select
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sandboxes.image import DEFAULT_IMAGE, RUNNER_CMD
from sandboxes.pool import Limits, Slot, SlotDied, SlotError, SlotHung, SlotPool, default_pool_size
from sandboxes.result import SandboxUnavailable

log = logging.getLogger("sandboxes")

LABEL = "org.rlk2.sandbox.pool"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"


@dataclass(frozen=True)
class DockerOptions:
    """Container limits (per slot)."""

    image: str = DEFAULT_IMAGE
    """Image tag; see `rlk2 sandbox build`."""
    cpus: float = 1.0
    """CPU quota per container (CFS), in cores."""
    memory_mb: int = 1024
    """Container memory limit (cgroup, no swap); caps every job's memory_mb too."""
    pids: int = 128
    """Container pids limit (cgroup)."""
    scratch_mb: int = 64
    """Size of the tmpfs mounted at /tmp (the job's cwd), wiped after every job."""
    shm_mb: int = 16
    """Size of /dev/shm, wiped after every job."""
    ready_timeout_s: float = 60.0
    """How long a new container may take to print its ready line."""


def default_engines() -> list[str]:
    """RLK2_SANDBOX_ENGINES (comma-separated URLs), else DOCKER_HOST, else the local socket."""
    env = os.environ.get("RLK2_SANDBOX_ENGINES", "").strip()
    if env:
        return [u.strip() for u in env.split(",") if u.strip()]
    return [os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE]


class EngineRefused(ValueError):
    """An engine spec rlk2 will not use as given (one line: the spec and what to change)."""


_LOOPBACK = ("127.", "localhost", "[::1]", "::1")


def engine_client(url: str, timeout: float = 60.0):
    """A Docker SDK client for one engine spec: a DOCKER_HOST-style URL, where a `tcp://` engine may name its own
    TLS files as `tcp://host:2376?tls=CERT_DIR` (Docker's DOCKER_CERT_PATH layout: ca.pem, cert.pem, key.pem; the
    engine's certificate is verified against ca.pem and this client presents cert.pem). Without `?tls=`, TLS comes
    from DOCKER_TLS_VERIFY / DOCKER_CERT_PATH. Plain TCP (no TLS at all) is refused unless the host is loopback:
    anyone who reaches a plain Docker port can run containers as root on that host."""
    import docker
    from docker.utils import kwargs_from_env

    base, tls_dir = _split_spec(url)
    kwargs = kwargs_from_env()
    kwargs["base_url"] = base
    if not base.startswith("tcp://"):
        kwargs.pop("tls", None)
    elif isinstance(kwargs.get("tls"), docker.tls.TLSConfig) and tls_dir is None:
        env = kwargs["tls"]
        kwargs["tls"] = _OwnCATLS(client_cert=env.cert, ca_cert=env.ca_cert, verify=env.verify)
    elif tls_dir is not None:
        files = {name: os.path.join(tls_dir, name) for name in ("ca.pem", "cert.pem", "key.pem")}
        missing = [f for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise EngineRefused(
                f"engine {url}: {missing[0]} does not exist (?tls= names a directory with ca.pem, cert.pem and key.pem)"
            )
        kwargs["tls"] = _OwnCATLS(
            client_cert=(files["cert.pem"], files["key.pem"]), ca_cert=files["ca.pem"], verify=True
        )
    elif not kwargs.get("tls") and not base[len("tcp://") :].startswith(_LOOPBACK):
        raise EngineRefused(
            f"engine {url}: plain TCP without TLS is refused off loopback (anyone who reaches the port is root on "
            "that host); use tcp://HOST:2376?tls=CERT_DIR, DOCKER_TLS_VERIFY=1 with DOCKER_CERT_PATH, or ssh://"
        )
    return docker.DockerClient(timeout=timeout, **kwargs)


@functools.cache
def _own_ca_tls():
    import docker.tls

    class OwnCATLS(docker.tls.TLSConfig):
        """Verifies the engine against its own CA file whatever the environment says: requests lets
        REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's CA file (psf/requests#3829), so with either set the
        engine's CA would be ignored and every connection fail verification."""

        def configure_client(self, client) -> None:
            super().configure_client(client)
            client.trust_env = False  # also ignores proxy variables: an engine is reached directly

    return OwnCATLS


def _OwnCATLS(**kwargs):  # noqa: N802 - a class made on first use, so importing this module needs no docker SDK
    return _own_ca_tls()(**kwargs)


def _split_spec(url: str) -> tuple[str, str | None]:
    """(the URL the SDK gets, the `?tls=` directory or None); any other query key is an error."""
    from urllib.parse import parse_qs

    base, _, query = url.partition("?")
    if not query:
        return base, None
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"tls"})
    if unknown:
        raise EngineRefused(f"engine {url}: unknown option {unknown[0]!r} (the only one is ?tls=CERT_DIR)")
    if not base.startswith("tcp://"):
        raise EngineRefused(f"engine {url}: ?tls= applies to tcp:// engines only")
    tls_dir = params["tls"][-1]
    if not tls_dir:
        raise EngineRefused(f"engine {url}: ?tls= needs a directory")
    return base, os.path.expanduser(tls_dir)


class _AttachStream:
    """Line-oriented reader/writer over a raw attach socket.

    Hand-written because the SDK's frame iterator has no read deadline, and every read here needs one."""

    def __init__(self, sock: Any) -> None:
        self.sock = getattr(sock, "_sock", sock)  # the SDK wraps unix/tcp sockets in a SocketIO
        self.raw = b""
        self.out = b""
        self.err_tail = b""

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._wait(deadline, write=True)
            try:
                n = self.sock.send(view)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError as exc:
                raise SlotDied(f"attach stream closed ({exc})") from None
            view = view[n:]

    def _wait(self, deadline: float, write: bool = False) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SlotHung("no answer before the deadline")
        if write and hasattr(self.sock, "send_ready"):
            # An ssh:// engine's stream is a paramiko channel, whose fileno() is a pipe that signals reads only
            # (select never reports it writable): ask the channel itself, whose window is rarely full.
            while not self.sock.send_ready():
                if time.monotonic() > deadline:
                    raise SlotHung("no answer before the deadline")
                time.sleep(0.001)
            return
        r, w, _ = select.select([] if write else [self.sock], [self.sock] if write else [], [], left)
        if not r and not w:
            raise SlotHung("no answer before the deadline")

    def read_line(self, deadline: float) -> bytes:
        while b"\n" not in self.out:
            self._wait(deadline)
            try:
                chunk = self.sock.recv(1 << 16)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError as exc:
                raise SlotDied(f"attach stream closed ({exc})") from None
            if not chunk:
                raise SlotDied("the container's output stream ended" + self._stderr_note())
            self.raw += chunk
            while len(self.raw) >= 8:  # frame: [stream:1][0:3][size:4 big-endian] payload
                kind, size = self.raw[0], struct.unpack(">I", self.raw[4:8])[0]
                if len(self.raw) < 8 + size:
                    break
                payload, self.raw = self.raw[8 : 8 + size], self.raw[8 + size :]
                if kind == 1:
                    self.out += payload
                else:
                    self.err_tail = (self.err_tail + payload)[-2000:]
        line, self.out = self.out.split(b"\n", 1)
        return line

    def _stderr_note(self) -> str:
        tail = self.err_tail.decode("utf-8", "replace").strip().splitlines()[-1:]
        return f" (stderr: {tail[0]})" if tail else ""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Engine:
    """One Docker engine: a client for work and a short-timeout client for liveness pings."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = engine_client(url)
        self._ping = engine_client(url, timeout=3.0)

    def ok(self) -> bool:
        try:
            return bool(self._ping.ping())
        except Exception:
            return False


class DockerSlot(Slot):
    def __init__(self, engine: Engine, name: str, uid: int, pool_id: str, options: DockerOptions) -> None:
        self.eng, self.engine, self.name, self.uid = engine, engine.url, name, uid
        self.pool_id, self.options = pool_id, options
        self.label = f"docker:{engine.url}/{name}"
        self.container_id: str | None = None
        self.stream: _AttachStream | None = None
        self.generation = 0

    @property
    def memory_cap_mb(self) -> int | None:
        return self.options.memory_mb

    def create_kwargs(self) -> dict[str, Any]:
        import docker

        o = self.options
        return dict(
            image=o.image,
            command=RUNNER_CMD,
            name=f"{self.name}-{self.generation}",
            user=f"{self.uid}:{self.uid}",
            stdin_open=True,
            working_dir="/tmp",
            hostname="sandbox",
            environment={"LANG": "C.UTF-8", "PATH": "/usr/local/bin:/usr/bin:/bin"},
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={o.scratch_mb}m,mode=1777"},
            shm_size=f"{o.shm_mb}m",
            mem_limit=f"{o.memory_mb}m",
            memswap_limit=f"{o.memory_mb}m",
            pids_limit=o.pids,
            nano_cpus=int(o.cpus * 1e9),
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            ulimits=[docker.types.Ulimit(name="core", soft=0, hard=0)],
            ipc_mode="private",
            log_config=docker.types.LogConfig(type="none"),
            auto_remove=True,
            stop_signal="SIGKILL",
            labels={LABEL: self.pool_id},
        )

    def start(self) -> None:
        import docker

        self.generation += 1
        self.label = f"docker:{self.engine}/{self.name}-{self.generation}"  # names the container a job ran in
        api = self.eng.client.api
        try:
            container = self.eng.client.containers.create(**self.create_kwargs())
            self.container_id = container.id
            sock = api.attach_socket(container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            self.stream = _AttachStream(sock)
            container.start()
            ready = json.loads(self.stream.read_line(time.monotonic() + self.options.ready_timeout_s))
        except docker.errors.ImageNotFound:
            raise SlotError(
                f"image {self.options.image} is missing on {self.engine} (run `rlk2 sandbox build --offline`)"
            ) from None
        except (SlotDied, SlotHung, ValueError) as exc:
            raise SlotError(f"the runner did not start: {exc}") from None
        except docker.errors.DockerException as exc:
            raise SlotError(str(exc).splitlines()[0]) from None
        if not ready.get("ready") or ready.get("pid") != 1 or not ready.get("nondumpable"):
            raise SlotError(f"the runner started without its protections: {ready}")

    def send(self, lines: bytes, timeout_s: float) -> None:
        if self.stream is None:
            raise SlotDied("not started")
        self.stream.send(lines, time.monotonic() + timeout_s)

    def receive(self, timeout_s: float) -> dict[str, Any]:
        if self.stream is None:
            raise SlotDied("not started")
        try:
            return json.loads(self.stream.read_line(time.monotonic() + timeout_s))
        except ValueError as exc:
            raise SlotDied(f"unreadable runner output ({exc})") from None

    def stop(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.container_id is not None:
            try:
                self.eng.client.api.remove_container(self.container_id, force=True)
            except Exception:
                pass  # already gone (auto_remove) or the engine is unreachable; stdin_once cleans up there
            self.container_id = None

    def engine_ok(self) -> bool:
        return self.eng.ok()


def open_docker_pool(
    engines: Sequence[str] | None = None,
    slots_per_engine: int | None = None,
    limits: Limits | None = None,
    options: DockerOptions | None = None,
) -> SlotPool:
    """Open a warm pool over one or more engines. Raises SandboxUnavailable when no engine can run the image."""
    import docker

    engines = list(engines or default_engines())
    options = options or DockerOptions()
    limits = limits or Limits()
    pool_id = secrets.token_hex(4)
    uid_base = 100_000 + secrets.randbelow(1 << 20) * 64  # a uid range of its own per pool (RLIMIT_NPROC is per uid)
    slots: list[Slot] = []
    problems = []
    for e_index, url in enumerate(engines):
        try:
            engine = Engine(url)
            engine.client.ping()
            engine.client.images.get(options.image)
            n = slots_per_engine or default_pool_size(int(engine.client.info().get("NCPU", 1)))
        except EngineRefused as exc:  # a configuration to fix, not an outage to route around
            raise SandboxUnavailable(f"docker: {exc}") from None
        except docker.errors.ImageNotFound:
            problems.append(f"image {options.image} is missing on {url} (run `rlk2 sandbox build --offline`)")
            continue
        except Exception as exc:  # unreachable engine, bad URL, permission denied on the socket
            problems.append(
                f"engine {url} does not answer ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            )
            continue
        for i in range(n):
            slot_no = len(slots)
            slots.append(DockerSlot(engine, f"rlk2-sbx-{pool_id}-{e_index}-{i}", uid_base + slot_no, pool_id, options))
    if not slots:
        raise SandboxUnavailable("docker: " + "; ".join(problems))
    for p in problems:  # some engines work: carry on without the others, but say so
        log.warning("docker sandbox: %s; continuing without it", p)
    return SlotPool(f"docker[{pool_id}]", slots, limits)
