"""Harness semantics of the runner (test counting, verdicts, early exits, stdin/stdout cases) and job validation.

These drive runner.py directly without a sandbox (sandboxes.testing.UnisolatedRunner), so they run everywhere and
fast; only benign programs here. The same behaviours under real isolation are in test_sandbox_security.py.
"""

import json

import pytest

from sandboxes import Job, JobError, Status
from sandboxes.pool import Limits
from sandboxes.testing import UnisolatedRunner


@pytest.fixture(scope="module")
def runner():
    with UnisolatedRunner(Limits(timeout_s=5, nproc=1 << 16)) as r:
        yield r


ADD = "def add(a, b):\n    return a + b\n"


def test_runner_is_protected_and_ready(runner):
    assert runner.ready["ready"] is True
    assert runner.ready["nondumpable"] is True


def test_each_top_level_assert_is_one_test(runner):
    r = runner.run({"code": ADD, "tests": "assert add(1, 2) == 3\nx = 2\nassert add(x, x) == 4\nassert add(0, 0) == 1"})
    # three asserts; `x = 2` is setup, not a test; the third assert fails
    assert (r.status, r.passed, r.total, r.verdicts) == (Status.FAILED, 2, 3, (True, True, False))
    assert "AssertionError" in r.error


def test_all_asserts_pass(runner):
    r = runner.run({"code": ADD, "tests": "assert add(1, 2) == 3\nassert add(2, 2) == 4"})
    assert (r.status, r.passed, r.total) == (Status.PASSED, 2, 2)


def test_check_body_split_per_assert_and_constant_asserts_do_not_count(runner):
    tests = (
        "def check(candidate):\n    assert True, 'not a test'\n    assert candidate(1, 1) == 2\n"
        "    for a in range(3):\n        assert candidate(a, 0) == a\n    assert candidate(2, 2) == 5\n"
    )
    r = runner.run({"code": ADD, "tests": tests, "entry_point": "add"})
    # tests: `assert candidate(1,1)`, the `for` loop (contains asserts), `assert candidate(2,2) == 5` (fails)
    assert (r.status, r.passed, r.total, r.verdicts) == (Status.FAILED, 2, 3, (True, True, False))


def test_check_with_return_runs_as_one_test(runner):
    tests = "def check(candidate):\n    if candidate(1, 1) != 2:\n        return\n    assert candidate(2, 3) == 5\n"
    r = runner.run({"code": ADD, "tests": tests, "entry_point": "add"})
    assert (r.status, r.total) == (Status.PASSED, 1)


def test_missing_entry_point_fails_every_test(runner):
    r = runner.run(
        {"code": "def other(): pass", "tests": "def check(c):\n    assert c(1, 1) == 2", "entry_point": "add"}
    )
    assert (r.status, r.passed, r.total) == (Status.FAILED, 0, 1)
    assert "not defined" in r.error


def test_test_functions_are_collected(runner):
    tests = "def test_one():\n    assert add(1, 1) == 2\n\ndef test_two():\n    assert add(1, 1) == 3\n"
    r = runner.run({"code": ADD, "tests": tests})
    assert (r.status, r.passed, r.total) == (Status.FAILED, 1, 2)


def test_block_without_asserts_is_one_test_passing_if_nothing_raises(runner):
    ok = runner.run({"code": ADD, "tests": "if add(1, 1) != 2:\n    raise ValueError('wrong')"})
    bad = runner.run({"code": ADD, "tests": "if add(1, 1) != 3:\n    raise ValueError('wrong')"})
    assert (ok.status, ok.total) == (Status.PASSED, 1)
    assert (bad.status, bad.total) == (Status.FAILED, 1)


def test_failed_setup_statement_fails_the_tests_after_it(runner):
    r = runner.run({"code": ADD, "tests": "assert add(1, 1) == 2\nimport no_such_module\nassert add(2, 2) == 4"})
    assert (r.status, r.passed, r.total) == (Status.FAILED, 1, 2)


@pytest.mark.parametrize(
    "exit_line", ["exit(0)", "import sys; sys.exit(0)", "raise SystemExit", "import os; os._exit(0)", "quit()"]
)
def test_early_exit_never_passes(runner, exit_line):
    r = runner.run({"code": ADD + exit_line, "tests": "assert add(1, 2) == 3"})
    assert r.status is Status.FAILED
    assert (r.passed, r.total) == (0, 1)


def test_exit_inside_a_test_fails_that_test(runner):
    r = runner.run({"code": "def f():\n    raise SystemExit(0)", "tests": "assert f() is None\nassert 1 + 1 == 2"})
    assert (r.status, r.verdicts) == (Status.FAILED, (False, True))


def test_forged_verdicts_on_every_fd_do_not_pass(runner):
    forge = (
        "import os, json\n"
        "msg = json.dumps({'k': 'done', 'verdicts': [True], 'n': 'guess'}) + '\\n'\n"
        "print('passed 1/1'); print(msg)\n"
        "for fd in range(3, 64):\n"
        "    try: os.write(fd, json.dumps({'k': 'collected', 'total': 1, 'n': 'guess'}).encode()"
        " + b'\\n' + msg.encode())\n"
        "    except OSError: pass\n"
        "os._exit(0)\n"
    )
    r = runner.run({"code": forge, "tests": "assert False"})
    assert r.status is Status.FAILED and r.passed == 0 and r.total == 1


def test_program_cannot_change_the_test_count(runner):
    # Tests are compiled and counted before the program runs; rebinding compile/ast afterwards changes nothing.
    code = "import builtins, ast\nbuiltins.compile = None\nast.parse = None\n" + ADD
    r = runner.run({"code": code, "tests": "assert add(1, 1) == 2\nassert add(1, 2) == 3"})
    assert (r.status, r.total) == (Status.PASSED, 2)


def test_tests_collected_once_are_the_same_for_every_job(runner):
    # The runner collects tests once and every job process inherits them; a program that empties the collected
    # statements it can reach in its own process changes nothing for the next job with the same tests.
    tests = "assert add(1, 1) == 2\nassert add(1, 2) == 4\nassert add(2, 2) == 4"
    vandal = (
        "import gc\n"
        "for obj in gc.get_objects():\n"
        "    if isinstance(obj, list) and obj and all(isinstance(x, tuple) and len(x) == 2 for x in obj):\n"
        "        obj.clear()\n" + ADD
    )
    first = runner.run({"code": ADD, "tests": tests})
    vandalised = runner.run({"code": vandal, "tests": tests})
    again = runner.run({"code": ADD, "tests": tests})
    assert vandalised.verdicts == (False, False, False)  # it did reach the collected tests in its own process
    # three asserts, the second wrong: the same verdicts every time
    assert first.verdicts == again.verdicts == (True, False, True)


def test_large_tests_are_collected_in_the_job_process_with_the_same_verdicts(runner):
    from sandboxes import runner as runner_module

    padding = "# " + "x" * runner_module.PLAN_MAX_CHARS + "\n"  # past the runner's cache limit
    tests = "assert add(1, 1) == 2\nassert add(1, 2) == 4\n"
    small = runner.run({"code": ADD, "tests": tests})
    large = runner.run({"code": ADD, "tests": padding + tests})
    broken = runner.run({"code": ADD, "tests": padding + "assert add(1, 2) ==="})
    assert small.verdicts == large.verdicts == (True, False)
    assert (broken.total, broken.status) == (0, Status.FAILED) and "tests do not compile" in broken.error


def test_verdicts_larger_than_a_default_pipe_all_arrive(runner):
    # 30000 verdicts are ~180 KB of JSON, more than a default pipe holds while the runner waits for the job to end
    tests = "assert add(1, 1) == 2\n" * 29_999 + "assert add(1, 1) == 3\n"
    r = runner.run({"code": ADD, "tests": tests, "timeout_s": 30})
    assert (r.status, r.passed, r.total) == (Status.FAILED, 29_999, 30_000)


def test_program_syntax_error_is_runtime_error(runner):
    r = runner.run({"code": "def add(a, b):\nreturn a + b", "tests": "assert add(1, 2) == 3"})
    assert (r.status, r.passed, r.total) == (Status.RUNTIME_ERROR, 0, 1)
    assert "does not compile" in r.error


def test_program_exception_is_runtime_error(runner):
    r = runner.run({"code": "raise KeyError('boom')", "tests": "assert True\nassert 1"})
    assert r.status is Status.RUNTIME_ERROR
    assert "KeyError" in r.error


def test_broken_tests_count_nothing(runner):
    for _ in range(2):  # the second time from the runner's cache of collected tests
        r = runner.run({"code": ADD, "tests": "assert add(1, 2) ==="})
        assert (r.status, r.total) == (Status.FAILED, 0)
        assert "tests do not compile" in r.error


def test_memory_error_is_memory_exceeded(runner):
    r = runner.run({"code": "x = bytearray(10 ** 11)", "tests": "assert x", "memory_mb": 256})
    assert r.status is Status.MEMORY_EXCEEDED


def test_wall_clock_timeout(runner):
    r = runner.run({"code": "import time\ntime.sleep(30)", "tests": "assert 1", "timeout_s": 0.5})
    assert r.status is Status.TIMEOUT
    assert 0.5 <= r.wall_s < 5


def test_stdout_and_stderr_are_captured_and_truncated():
    with UnisolatedRunner(Limits(max_output=100, nproc=1 << 16)) as small:
        r = small.run({"code": "import sys\nprint('x' * 1000)\nprint('oops', file=sys.stderr)", "tests": "assert 1"})
    assert r.stdout.startswith("x" * 100) and "more bytes truncated" in r.stdout
    assert r.stderr.strip() == "oops"


def test_job_environment_is_scrubbed(runner):
    r = runner.run({"code": "import os\nprint(sorted(os.environ))", "tests": "assert 1"})
    assert json.loads(r.stdout.replace("'", '"')) == ["HOME", "LANG", "PATH", "TMPDIR"]


# ----------------------------------------------------------------------------------------------- stdin/stdout
ECHO_DOUBLE = "n = int(input())\nprint(n * 2)\n"


def test_cases_compare_every_line(runner):
    cases = [
        {"stdin": "3\n", "stdout": "6\n"},  # exact
        {"stdin": "4", "stdout": "8   \n\n"},  # trailing whitespace and blank lines ignored
        {"stdin": "5", "stdout": "10\n11"},  # a missing line fails
        {"stdin": "1", "stdout": ""},
    ]  # an extra line fails
    r = runner.run({"code": ECHO_DOUBLE, "test_cases": cases})
    assert (r.status, r.verdicts) == (Status.FAILED, (True, True, False, False))


def test_cases_exit_zero_is_fine_nonzero_exit_fails(runner):
    ok = runner.run({"code": ECHO_DOUBLE + "import sys; sys.exit(0)", "test_cases": [{"stdin": "2", "stdout": "4"}]})
    bad = runner.run({"code": ECHO_DOUBLE + "import sys; sys.exit(3)", "test_cases": [{"stdin": "2", "stdout": "4"}]})
    assert ok.status is Status.PASSED
    assert (bad.status, bad.passed) == (Status.RUNTIME_ERROR, 0)


def test_cases_crash_in_one_case_is_runtime_error(runner):
    r = runner.run({"code": ECHO_DOUBLE, "test_cases": [{"stdin": "2", "stdout": "4"}, {"stdin": "x", "stdout": "?"}]})
    assert (r.status, r.verdicts) == (Status.RUNTIME_ERROR, (True, False))


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "row, field",
    [
        ({"tests": "assert 1"}, "code"),
        ({"code": "x", "tests": "assert 1", "test_cases": [{"stdin": "", "stdout": ""}]}, "exactly one"),
        ({"code": "x"}, "exactly one"),
        ({"code": "x", "test_cases": [{"stdin": ""}]}, "test_cases[0]"),
        ({"code": "x", "test_cases": "not json"}, "test_cases"),
        ({"code": "x", "tests": "assert 1", "entry_point": "not an identifier"}, "entry_point"),
        ({"code": "x", "tests": "assert 1", "timeout_s": -1}, "timeout_s"),
        ({"code": "x", "tests": "assert 1", "memory_mb": "lots"}, "memory_mb"),
        ({"code": "x", "tests": "assert 1", "colour": "red"}, "colour"),
    ],
)
def test_bad_jobs_name_the_field(row, field):
    with pytest.raises(JobError, match=None) as info:
        Job.from_dict(row)
    assert field in str(info.value)
    assert "\n" not in str(info.value)


def test_test_cases_may_be_json_text():
    job = Job.from_dict({"code": "x", "test_cases": json.dumps([{"stdin": "1", "stdout": "2"}])})
    assert job.test_cases == (("1", "2"),)


# ---------------------------------------------------------------------------------------------- pool policy
class _FlakySlot:
    """A fake slot: raises an unexpected error on its first call, then answers like a runner."""

    engine, label = "fake", "fake/0"

    def __init__(self):
        self.calls = self.starts = self.stops = 0

    def start(self):
        self.starts += 1

    def send(self, lines, timeout_s):
        self.calls += 1
        if self.calls == 1:
            raise KeyError("unexpected")
        self.sent = [json.loads(line) for line in lines.splitlines()]

    def receive(self, timeout_s):
        job = self.sent.pop(0)
        return {"status": "passed", "verdicts": [True], "wall_s": 0.0, "clean": True, "stdout": job["code"]}

    def stop(self):
        self.stops += 1

    def engine_ok(self):
        return True

    memory_cap_mb = None


class _RecordingSlot:
    """A fake slot that answers like a runner and records what it was sent, per start. Job code "dirty" leaves the
    sandbox unclean; a real runner then exits, so the fake answers nothing after it until restarted."""

    engine = "fake"
    memory_cap_mb = None

    def __init__(self):
        self.sends, self.starts, self.pending, self.label = [], 0, [], "fake/0"

    def start(self):
        self.starts += 1
        self.label, self.pending = f"fake/{self.starts}", []

    def send(self, lines, timeout_s):
        jobs = [json.loads(line) for line in lines.splitlines()]
        self.sends.append((self.starts, [job["code"] for job in jobs]))
        self.pending += jobs

    def receive(self, timeout_s):
        from sandboxes.pool import SlotDied

        if not self.pending:
            raise SlotDied("the runner exited")
        job = self.pending.pop(0)
        clean = job["code"] != "dirty"
        if not clean:
            self.pending = []  # the runner exits: what was sent behind this job never runs
        return {"status": "passed", "verdicts": [True], "wall_s": 0.0, "clean": clean, "stdout": job["code"]}

    def stop(self):
        self.pending = []

    def engine_ok(self):
        return True


def test_jobs_pipelined_behind_an_unclean_job_run_in_a_fresh_sandbox():
    from sandboxes.pool import SlotPool

    slot = _RecordingSlot()
    with SlotPool("fake", [slot], Limits(), pipeline=2) as pool:
        with pool._cv:  # all four queued before the worker looks
            futures = [pool.submit({"code": c, "tests": "assert 1"}) for c in ("dirty", "a", "b", "c")]
        results = [f.result() for f in futures]
        retried = pool.stats.retried
    # the worker sent "dirty" and "a" together; "a" never ran there and was sent again after the restart
    assert [(r.stdout, r.backend) for r in results] == [
        ("dirty", "fake/1"),
        ("a", "fake/2"),
        ("b", "fake/2"),
        ("c", "fake/2"),
    ]
    assert slot.sends[0] == (1, ["dirty", "a"]) and slot.sends[1][0] == 2 and slot.sends[1][1][0] == "a"
    assert retried == 0  # a job that never ran is not a retry


def test_unexpected_slot_error_is_infra_error_and_the_worker_survives():
    from sandboxes.pool import SlotPool

    slot = _FlakySlot()
    with SlotPool("fake", [slot], Limits()) as pool:
        first = pool.run({"code": "a", "tests": "assert 1"})
        second = pool.run({"code": "b", "tests": "assert 1"})
    assert first.status is Status.INFRA_ERROR and "KeyError" in first.error
    assert second.status is Status.PASSED and second.stdout == "b"
    assert slot.starts == 2  # recycled after the failure
