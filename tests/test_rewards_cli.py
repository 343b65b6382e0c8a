"""`rlk2 score` and `rlk2 rewards`, run as a user runs them (a subprocess of the real CLI)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rlk2(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlk2.cli", *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def write(tmp_path: pathlib.Path, rows: list) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_score_one_line_per_row_in_order(tmp_path):
    rows = [
        {"completion": r"so \boxed{4}", "answer": "4"},
        {"completion": "no idea", "answer": "4"},
        {"completion": r"\boxed{4}", "answer": r"\frac{"},  # broken gold -> unscorable, with the reason
        {"completion": r"\boxed{0.5}", "answer": r"\frac12", "prompt": "half?"},
    ]
    proc = rlk2("score", "--reward", "math", "--input", write(tmp_path, rows))
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert out == [
        {"reward": 1.0, "error": None},
        {"reward": 0.0, "error": None},
        {"reward": None, "error": "unparsable gold"},
        {"reward": 1.0, "error": None},
    ]


def test_score_reads_stdin_and_passes_options():
    rows = "\n".join(json.dumps(r) for r in [{"completion": "abc"}, {"completion": "<a>x</a>"}]) + "\n"
    proc = rlk2("score", "--reward", "format", "--option", 'pattern="<a>.*</a>"', stdin=rows)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["reward"] for line in proc.stdout.splitlines()] == [0.0, 1.0]


def test_malformed_line_is_one_error_with_line_number(tmp_path):
    path = write(tmp_path, [{"completion": "a", "answer": "1"}, '{"completion": "b", "answer": ', {"completion": "c"}])
    proc = rlk2("score", "--reward", "math", "--input", path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:2: malformed JSON" in lines[0]


def test_missing_column_and_unknown_reward_fail_before_scoring(tmp_path):
    proc = rlk2(
        "score",
        "--reward",
        "math",
        "--input",
        write(tmp_path, [{"completion": "a", "answer": "1"}, {"completion": "b"}]),
    )
    assert proc.returncode == 2 and ":2: reward 'math' needs column 'answer'" in proc.stderr
    proc = rlk2("score", "--reward", "maths", stdin='{"completion": "a"}\n')
    assert proc.returncode == 2 and "unknown reward 'maths'" in proc.stderr and "did you mean 'math'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = rlk2("score", "--reward", "math", "--input", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_rewards_lists_every_reward_with_columns():
    proc = rlk2("rewards", "--json", "examples/my_reward.py:short_and_right")
    assert proc.returncode == 0, proc.stderr
    listed = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert {"math", "format", "length", "budget", "code"} <= set(listed)
    assert listed["math"]["columns"] == ["answer"]
    assert listed["budget"]["columns"] == ["num_tokens", "truncated"]
    assert listed["examples/my_reward.py:short_and_right"]["columns"] == ["answer"]
    table = rlk2("rewards")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:2] == ["NAME", "COLUMNS"]


def test_rewards_describes_the_rewards_a_config_names(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "tasks:\n  - name: arith\n    source: builtin:arith\n    rewards:\n      - name: math\n"
        "      - name: examples/my_reward.py:short_and_right\n        weight: 0.5\n"
    )
    proc = rlk2("rewards", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    listed = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert listed["examples/my_reward.py:short_and_right"]["source"] == "config task 'arith'"
    assert listed["examples/my_reward.py:short_and_right"]["columns"] == ["answer"]
