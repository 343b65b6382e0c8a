"""Jobs in, typed results out: the data side of the sandbox contract (DESIGN.md 2.4)."""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandboxes.jsonl import JsonlError, iter_jsonl


class Status(str, enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    MEMORY_EXCEEDED = "memory_exceeded"
    RUNTIME_ERROR = "runtime_error"
    INFRA_ERROR = "infra_error"  # the sandbox, not the job, failed: callers must not score it


class SandboxError(Exception):
    """Base class of this package's errors (message is one line)."""


class JobError(SandboxError, ValueError):
    """A job is malformed; the message names the field."""


class SandboxUnavailable(SandboxError):
    """No backend could be opened (engine down, image missing, bubblewrap not usable)."""


MAX_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Job:
    """One program and its tests. Exactly one of `tests` / `test_cases`.

    tests:       Python test code run after the program in the same interpreter and namespace. A test is each
                 top-level `assert` statement and each `def test_*` function; with `entry_point`, `tests` defines
                 `check(candidate)` and each assert statement of its body is a test (HumanEval convention).
    test_cases:  [{"stdin": str, "stdout": str}, ...]; output compared line by line after stripping trailing
                 whitespace (trailing blank lines ignored); missing or extra lines fail; a non-zero exit fails.
    timeout_s / memory_mb: None means the backend's default; both are capped by the backend's maxima.
    """

    code: str
    tests: str | None = None
    test_cases: tuple[tuple[str, str], ...] | None = None
    entry_point: str | None = None
    timeout_s: float | None = None
    memory_mb: int | None = None
    id: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, str):
            raise JobError(f"job {self.id!r}: 'code' must be a string")
        if (self.tests is None) == (self.test_cases is None):
            raise JobError(f"job {self.id!r}: give exactly one of 'tests' or 'test_cases'")
        if self.tests is not None and not isinstance(self.tests, str):
            raise JobError(f"job {self.id!r}: 'tests' must be a string")
        if self.entry_point is not None:
            if not isinstance(self.entry_point, str) or not self.entry_point.isidentifier():
                raise JobError(f"job {self.id!r}: 'entry_point' must be a Python identifier")
            if self.tests is None:
                raise JobError(f"job {self.id!r}: 'entry_point' needs 'tests' defining check(candidate)")
        if self.timeout_s is not None and (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, (int, float))
            or not (0 < self.timeout_s <= MAX_TIMEOUT_S)
        ):
            raise JobError(f"job {self.id!r}: 'timeout_s' must be a number in (0, {MAX_TIMEOUT_S:g}]")
        if self.memory_mb is not None and (
            isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, int) or self.memory_mb < 32
        ):
            raise JobError(f"job {self.id!r}: 'memory_mb' must be an integer >= 32")

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Job:
        """A job from its JSONL shape `{"id","code","tests"|"test_cases","entry_point"?,"timeout_s"?,"memory_mb"?}`."""
        if not isinstance(row, Mapping):
            raise JobError("a job must be a JSON object")
        known = {"id", "code", "tests", "test_cases", "entry_point", "timeout_s", "memory_mb"}
        unknown = sorted(set(row) - known)
        if unknown:
            raise JobError(f"job {row.get('id')!r}: unknown field {unknown[0]!r}")
        if "code" not in row:
            raise JobError(f"job {row.get('id')!r}: missing field 'code'")
        return cls(
            code=row["code"],
            tests=row.get("tests"),
            test_cases=parse_test_cases(row.get("test_cases"), row.get("id")),
            entry_point=row.get("entry_point"),
            timeout_s=row.get("timeout_s"),
            memory_mb=row.get("memory_mb"),
            id=row.get("id"),
        )


def parse_test_cases(value: Any, job_id: Any = None) -> tuple[tuple[str, str], ...] | None:
    """Accept a list of {"stdin","stdout"} objects (or its JSON text, as datasets often store it)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise JobError(f"job {job_id!r}: 'test_cases' is a string but not JSON ({exc})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise JobError(f"job {job_id!r}: 'test_cases' must be a non-empty list of {{'stdin', 'stdout'}} objects")
    cases = []
    for i, case in enumerate(value):
        if isinstance(case, (list, tuple)) and len(case) == 2:
            stdin, stdout = case
        elif isinstance(case, Mapping) and {"stdin", "stdout"} <= set(case):
            stdin, stdout = case["stdin"], case["stdout"]
        else:
            raise JobError(f"job {job_id!r}: test_cases[{i}] must have 'stdin' and 'stdout'")
        if not isinstance(stdin, str) or not isinstance(stdout, str):
            raise JobError(f"job {job_id!r}: test_cases[{i}] 'stdin' and 'stdout' must be strings")
        cases.append((stdin, stdout))
    return tuple(cases)


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one job. `verdicts[i]` is test i's outcome; `passed == sum(verdicts)`."""

    status: Status
    passed: int = 0
    total: int = 0
    verdicts: tuple[bool, ...] = ()
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    error: str | None = None  # why it did not pass (first failure, limit hit, infrastructure reason)
    id: Any = None
    backend: str = field(default="", compare=False)  # which slot ran it, e.g. "docker:unix:///var/run/docker.sock"

    @property
    def fraction(self) -> float | None:
        """Passed fraction, or None when no test could be counted (or the sandbox failed)."""
        if self.status is Status.INFRA_ERROR or self.total == 0:
            return None
        return self.passed / self.total

    def to_json(self) -> dict[str, Any]:
        """The `rlk2 sandbox exec` output row (DESIGN.md 2.4)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "passed": self.passed,
            "total": self.total,
            "wall_s": round(self.wall_s, 4),
            "stdout": self.stdout,
            "stderr": self.stderr,
        }

    @classmethod
    def infra(cls, reason: str, job_id: Any = None, backend: str = "") -> ExecutionResult:
        return cls(status=Status.INFRA_ERROR, error=reason, id=job_id, backend=backend)

    @classmethod
    def from_runner(cls, raw: Mapping[str, Any], job_id: Any, backend: str) -> ExecutionResult:
        verdicts = tuple(bool(v) for v in raw.get("verdicts", ()))
        return cls(
            status=Status(raw["status"]),
            passed=sum(verdicts),
            total=len(verdicts),
            verdicts=verdicts,
            stdout=raw.get("stdout", ""),
            stderr=raw.get("stderr", ""),
            wall_s=float(raw.get("wall_s", 0.0)),
            error=raw.get("error"),
            id=job_id,
            backend=backend,
        )


def read_jobs(lines: Iterable[str | bytes], source: str = "<input>") -> list[Job]:
    """JSONL jobs (the `sandboxes.jsonl` rules: blank lines skipped); a bad line is a JobError naming source:line."""
    jobs = []
    try:
        for lineno, row in iter_jsonl(lines, source):
            try:
                jobs.append(Job.from_dict(row))
            except JobError as exc:
                raise JobError(f"{source}:{lineno}: {exc}") from None
    except JsonlError as exc:
        raise JobError(str(exc)) from None
    return jobs
