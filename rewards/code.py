"""The `code` reward: run the completion's program against the row's unit tests in a sandbox (DESIGN.md 2.3).

Columns (lists aligned with completions):
- `tests`: Python test code run after the program in the same interpreter; with `entry_point` set it defines
  `check(candidate)` and is called on the program's `entry_point` function (HumanEval convention);
- or `test_cases`: `[{"stdin": ..., "stdout": ...}, ...]` (or its JSON text), compared line by line.

The program is the last fenced python block of the completion (```python, ```py, ```python3 or an untagged ```),
else the whole completion. The reward is the passed fraction of the tests, or 1.0/0.0 when `binary` (keyword or
module-level `BINARY`). Unscorable rows are None, never 0.0, and are logged: a sandbox infrastructure error, a row
without tests, tests that do not compile.

All calls share one process-wide warm pool, opened lazily on first use (backend: $RLK2_SANDBOX_BACKEND, else Docker
when an engine answers with the image, else bubblewrap) and closed at interpreter exit. The reward therefore runs in
the caller's process (`run_in="caller"`): it only waits on sandboxes, which enforce every limit from outside the job,
and a worker process per engine slot would mean one pool each. Give its RewardSpec a `timeout_s` that covers a
batch (per-program limits are `timeout_s` / `memory_mb` here, enforced by the sandbox).

>>> completion = "Here you go:\\n```python\\ndef add(a, b):\\n    return a + b\\n```"
>>> extract_code(completion)
'def add(a, b):\\n    return a + b'
>>> code([completion], prompts=["add"], tests=["assert add(1, 2) == 3"])  # doctest: +SKIP (needs a sandbox)
[1.0]
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
from typing import Any

from rewards.traits import reward_traits
from sandboxes import ExecutionResult, Job, JobError, SandboxError, Status, open_backend

log = logging.getLogger("rewards.code")

BINARY = False
"""Default scoring: False = passed fraction, True = 1.0 only when every test passes."""
TIMEOUT_S = 10.0
"""Default per-program wall-clock limit (program plus its tests), seconds."""
MEMORY_MB = 512
"""Default per-program memory limit, MiB."""
RETRY_OPEN_S = 30.0
"""After a failed attempt to open the sandbox pool, wait this long before trying again (rows are None meanwhile)."""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The last fenced python (or untagged) block; the whole completion when there is none."""
    blocks = [body for tag, body in _FENCE.findall(completion) if tag.lower() in _PYTHON_TAGS]
    if not blocks:
        return completion
    return blocks[-1].rstrip("\n").rstrip()


class _SharedPool:
    """One pool per process, created on first use, shared by every reward call and thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = None
        self._failed_at = 0.0
        self._error = ""

    def get(self):
        with self._lock:
            if self._pool is None:
                if time.monotonic() - self._failed_at < RETRY_OPEN_S and self._failed_at:
                    raise SandboxError(self._error)
                try:
                    self._pool = open_backend()
                except SandboxError as exc:
                    self._failed_at, self._error = time.monotonic(), str(exc)
                    raise
                log.info("code reward: sandbox pool %s with %d slots", self._pool.name, len(self._pool.slots))
            return self._pool

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            self._failed_at = 0.0


_SHARED = _SharedPool()
atexit.register(_SHARED.close)


def get_pool():
    """The process-wide sandbox pool (opened on first call)."""
    return _SHARED.get()


def close_pool() -> None:
    """Close the process-wide pool (the next reward call opens a new one)."""
    _SHARED.close()


def _column(values: list | None, n: int, name: str) -> list:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"code reward: column {name!r} has {len(values)} rows for {n} completions")
    return list(values)


def score(result: ExecutionResult, binary: bool) -> float | None:
    """Reward of one sandbox result: None when unscorable, else the passed fraction or 1/0."""
    if result.status is Status.INFRA_ERROR:
        return None
    if result.total == 0 and result.status in (Status.PASSED, Status.FAILED):
        return None  # no test could be counted: the gold tests are broken or empty
    if binary:
        return 1.0 if result.status is Status.PASSED else 0.0
    return result.passed / result.total if result.total else 0.0


@reward_traits(run_in="caller")
def code(
    completions: list[str],
    *,
    prompts: list[str],
    tests: list[str | None] | None = None,
    test_cases: list | None = None,
    entry_point: list[str | None] | None = None,
    binary: bool | None = None,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    **_: Any,
) -> list[float | None]:
    """Unit-test reward; see the module docstring. `binary`, `timeout_s`, `memory_mb` are scalar options."""
    n = len(completions)
    binary = BINARY if binary is None else bool(binary)
    tests_col = _column(tests, n, "tests")
    cases_col = _column(test_cases, n, "test_cases")
    entry_col = _column(entry_point, n, "entry_point")
    rewards: list[float | None] = [None] * n
    jobs: dict[int, Job] = {}
    for i, completion in enumerate(completions):
        has_tests = isinstance(tests_col[i], str) and tests_col[i].strip() != ""
        has_cases = cases_col[i] is not None and cases_col[i] != ""
        if not has_tests and not has_cases:
            log.warning("code reward: row %d has neither tests nor test_cases; unscorable", i)
            continue
        try:
            jobs[i] = Job(
                code=extract_code(completion or ""),
                tests=tests_col[i] if has_tests else None,
                test_cases=None if has_tests else _cases(cases_col[i], i),
                entry_point=(entry_col[i] or None) if has_tests else None,
                timeout_s=timeout_s or TIMEOUT_S,
                memory_mb=memory_mb or MEMORY_MB,
                id=i,
            )
        except JobError as exc:
            log.warning("code reward: row %d unscorable: %s", i, exc)
    if not jobs:
        return rewards
    try:
        pool = get_pool()
    except SandboxError as exc:
        log.error("code reward: no sandbox (%s); %d rows unscorable", exc, len(jobs))
        return rewards
    # Identical programs with identical tests run once per call: the K samples of a group often coincide once the
    # policy has converged, and a verdict does not depend on which row asked for it.
    first_of: dict[tuple, int] = {}
    futures = {}
    for i, job in jobs.items():
        key = (job.code, job.tests, repr(job.test_cases), job.entry_point)
        if key not in first_of:
            first_of[key] = i
            futures[i] = pool.submit(job)
        else:
            futures[i] = futures[first_of[key]]
    unscorable = 0
    for i, fut in futures.items():
        result = fut.result()
        rewards[i] = score(result, binary)
        if rewards[i] is None:
            unscorable += 1
            log.warning("code reward: row %d unscorable (%s: %s)", i, result.status.value, result.error)
    if unscorable:
        log.warning("code reward: %d of %d rows unscorable", unscorable, n)
    return rewards


def _cases(value: Any, row: int):
    from sandboxes.result import parse_test_cases

    return parse_test_cases(value, row)
