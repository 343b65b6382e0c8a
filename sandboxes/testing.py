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
        self.proc = subprocess.Popen([sys.executable, "-I", str(RUNNER_PATH)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={"PATH": os.environ.get("PATH", "/usr/bin")})
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
