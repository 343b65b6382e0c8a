"""Isolated execution of model-written Python against unit tests: a warm pool of hardened sandboxes.

    >>> import sandboxes
    >>> with sandboxes.open_backend() as pool:                      # doctest: +SKIP (needs Docker or bubblewrap)
    ...     r = pool.run({"code": "def add(a, b): return a + b", "tests": "assert add(1, 2) == 3"})
    >>> r.status, r.passed, r.total                                 # doctest: +SKIP
    (<Status.PASSED: 'passed'>, 1, 1)

API: `open_backend(name)` opens a pool once (`"docker"`, `"bwrap"`, or None for $RLK2_SANDBOX_BACKEND, else Docker
when an engine answers and has the image, else bubblewrap); the pool has `run(job)`, `run_batch(jobs)`,
`submit(job) -> Future` and `close()`, and is safe to share between threads. A job is a `Job` or a dict
`{"code", "tests" | "test_cases", "entry_point"?, "timeout_s"?, "memory_mb"?, "id"?}`; the result is an
`ExecutionResult` whose `status` is a `Status`: passed | failed | timeout | memory_exceeded | runtime_error |
infra_error. `probe()` says which backends work here and why not the others. This package imports nothing from
`rlk2` or `rewards`.

Threat model
============
Assumed attacker: the program under test, written by a policy being trained, which may loop, allocate, fork,
flood output, fill the disk, probe the network and the host, kill what it can see, leave processes behind, or
try to make failing tests look passed (exit early with status 0, raise SystemExit, print "passed").

Isolated (both backends unless noted):
- Network: none (Docker `--network none`; bwrap a new, empty network namespace).
- Host files: not visible. Docker: the image's read-only root. bwrap: read-only binds of the offline root
  filesystem's /usr and /etc when built (else the host's /usr only: system binaries and libraries, readable);
  nothing else of the host. Writable: only /tmp and /dev/shm, size-capped tmpfs, wiped after every job.
- Host environment: never passed in; jobs see PATH, LANG, HOME=/tmp, TMPDIR=/tmp only.
- Privilege: a non-root uid; Docker drops all capabilities, sets no-new-privileges and keeps its default seccomp
  profile; bwrap runs in an unprivileged user namespace (started as nobody when the host process is root) with
  nested user namespaces disabled; the images carry no setuid binaries.
- Resources per job: wall clock (enforced outside the job: the whole process group is SIGKILLed, the sandbox
  recycled if anything survives or the runner stops answering), CPU time, address space, file size (which also
  caps output), open files, processes, no core dumps; returned stdout/stderr truncated. Docker adds cgroup limits
  per container: memory (no swap), pids, CPU quota.
- Between jobs: every process but the runner is killed, scratch wiped; SysV IPC objects left behind, a failed wipe
  or a surviving process get the whole sandbox replaced, and the runner runs nothing more (jobs the host sent
  ahead to it are resent to another sandbox).
- Between jobs in the runner's memory: each job process is a fresh fork of the runner, so what a job changes in
  its interpreter (modules, builtins, the collected tests it inherits) dies with it.
- The runner: PID 1 of its pid namespace with no signal handlers (a job cannot signal it) and non-dumpable (a job
  under the same uid cannot ptrace it or open /proc/1/fd/*, the host channel).
- Verdicts: tests are compiled and counted before the program runs (by the runner, once per distinct tests); the
  harness reports over a pipe with a random per-job nonce, so exit(0), os._exit(0), SystemExit or printing fake
  results cannot pass; stdin/stdout cases are compared outside the program's process.

Not isolated (out of scope; use VMs such as gVisor or Firecracker under the engine if these matter):
- Kernel exploits: all sandboxes share the host kernel; so do container-escape bugs in runc/Docker.
- CPU side channels (Spectre-class, cache timing) and timing of co-located jobs.
- A program that deliberately reads the harness's memory in its own interpreter to find the nonce, or that
  returns objects whose __eq__ always answers True: both run in the tests' interpreter by contract (DESIGN.md 2.3).
  The channel defeats early exits and forged output, not an in-process adversary; review hacks like these in
  rollouts.
- Denial of service on the host beyond the limits above: jobs share the engine's CPU and disk bandwidth.
- bwrap backend only: no cgroup memory/pids/CPU limits (per-job memory is at most RLIMIT_AS x RLIMIT_NPROC), no
  seccomp filter; the host's /usr is readable when no offline root filesystem was built.
- A remote engine's own security (ssh / TLS to it) is the operator's; jobs and results travel over that channel.
"""

from __future__ import annotations

import os
from typing import Any

from sandboxes.image import DEFAULT_IMAGE
from sandboxes.pool import Limits, SlotPool
from sandboxes.result import ExecutionResult, Job, JobError, SandboxError, SandboxUnavailable, Status

__all__ = [
    "DEFAULT_IMAGE",
    "BACKENDS",
    "ExecutionResult",
    "Job",
    "JobError",
    "Limits",
    "SandboxError",
    "SandboxUnavailable",
    "SlotPool",
    "Status",
    "open_backend",
    "probe",
]

BACKENDS = ("docker", "bwrap")


def docker_problem(engines: list[str] | None = None, image: str = DEFAULT_IMAGE) -> str | None:
    """Why the Docker backend cannot run here, or None (engine answers and has the image)."""
    try:
        import docker
    except ImportError:
        return "the docker Python SDK is not installed (pip install docker)"
    from sandboxes.docker_backend import EngineRefused, default_engines, engine_client

    problems = []
    for url in engines or default_engines():
        try:
            client = engine_client(url, timeout=5)
            client.ping()
        except EngineRefused as exc:
            problems.append(str(exc))
            continue
        except Exception as exc:
            problems.append(f"engine {url} does not answer ({(str(exc) or type(exc).__name__).splitlines()[0]})")
            continue
        try:
            client.images.get(image)
            return None
        except docker.errors.ImageNotFound:
            problems.append(f"image {image} is missing on {url} (run `rlk2 sandbox build --offline`)")
        except Exception as exc:
            problems.append(f"engine {url}: {str(exc).splitlines()[0]}")
    return "; ".join(problems)


def probe() -> dict[str, str | None]:
    """{backend: None if usable here, else the reason} for every backend."""
    from sandboxes.bwrap_backend import bwrap_problem

    return {"docker": docker_problem(), "bwrap": bwrap_problem()}


def choose_backend(name: str | None = None) -> str:
    """The backend `open_backend(name)` would use: name, else $RLK2_SANDBOX_BACKEND, else docker > bwrap."""
    name = name or os.environ.get("RLK2_SANDBOX_BACKEND") or None
    if name is not None:
        if name not in BACKENDS:
            raise SandboxError(f"unknown sandbox backend {name!r} (choose from {', '.join(BACKENDS)})")
        return name
    if docker_problem() is None:
        return "docker"
    from sandboxes.bwrap_backend import bwrap_problem

    if bwrap_problem() is None:
        return "bwrap"
    found = probe()
    raise SandboxUnavailable("no sandbox backend works here: " + "; ".join(f"{k}: {v}" for k, v in found.items()))


def open_backend(
    name: str | None = None,
    *,
    pool_size: int | None = None,
    limits: Limits | None = None,
    engines: list[str] | None = None,
    **backend_options: Any,
) -> SlotPool:
    """Open a warm pool. `pool_size` is per engine for Docker; `backend_options` go to DockerOptions/BwrapOptions."""
    backend = choose_backend(name)
    if backend == "docker":
        from sandboxes.docker_backend import DockerOptions, open_docker_pool

        return open_docker_pool(engines, pool_size, limits, DockerOptions(**backend_options))
    from sandboxes.bwrap_backend import BwrapOptions, open_bwrap_pool

    return open_bwrap_pool(pool_size, limits, BwrapOptions(**backend_options))
