"""`rlk2 train` and `rlk2 eval` on environment tasks (DESIGN.md 2.6): episodes in the loop, their metrics and rollout
records, the environment's own reward, an environment that fails, exact resume, and the start-up refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / "tests" / "test_train_envs.py"


class Lookup:
    """The row names a key; the value is only reachable through the `lookup` tool."""

    def reset(self, prompt: str, **row):
        self.store = {row["key"]: row["value"]}
        return prompt

    def lookup(self, key: str) -> str:
        """The value stored under a key.

        Args:
            key: the key
        """
        return self.store.get(key, "no such key")

    def reward(self, messages, **row):
        return 1.0 if row["value"] in messages[-1]["content"] else 0.0


class FailingReset(Lookup):
    """Its reset always raises."""

    def reset(self, prompt: str, **row):
        raise RuntimeError("no store today")


def rlk2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmstart")


def config(tmp_path: Path, cache: Path, **task) -> Path:
    cfg = {
        "run": {"name": "envs", "seed": 0, "dir": str(tmp_path / "run")},
        "warm_start": {"steps": 5, "cache_dir": str(cache)},
        "policy": {"demo": {"hidden_size": 32, "num_hidden_layers": 2}},
        "tasks": [
            {
                "name": "mul",
                "source": "builtin:mul",
                "env": "rlk2.envs.builtin:Question",
                "tools": ["calculator"],
                "describe_tools": "none",
                "max_turns": 2,
                "max_new_tokens": 12,
                "eval_size": 8,
                **task,
            }
        ],
        "rollout": {"group_size": 4, "prompts_per_step": 4},
        "trainer": {"steps": 2, "save_every": 1},
        "eval": {"samples": 2, "greedy": False},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_environment_task_trains_logs_episodes_and_resumes_exactly(tmp_path, cache):
    cfg = config(tmp_path, cache)
    run = tmp_path / "run"
    proc = rlk2("train", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in metric_rows(run) if "loss" in r]
    assert len(steps) == 2
    for row in steps:
        assert {"episodes/turns", "episodes/tool_calls", "episodes/tool_errors", "episodes/truncated"} <= set(row)
        assert 1.0 <= row["episodes/turns"] <= 2.0
    evals = [r for r in metric_rows(run) if "eval/mul/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval/mul/tool_calls" in evals[0]
    records = [json.loads(x) for x in (run / "rollouts" / "step-1.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(r["messages"][0]["role"] == "user" for r in records)
    assert all(
        r["completion"] == [m for m in r["messages"] if m["role"] == "assistant"][-1]["content"] for r in records
    )
    # Exact resume: step 2 again from the step-1 checkpoint gives the same row.
    (run / "checkpoints" / "step-2").rename(tmp_path / "step-2-away")
    again = rlk2("train", "--resume", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    redo = [r for r in metric_rows(run) if "loss" in r][-1]
    first = steps[-1]
    for key in ("loss", "reward/mean", "episodes/turns", "episodes/tool_calls", "completion/mean_length"):
        assert redo[key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key


def test_the_environment_reward_and_a_failing_environment(tmp_path, cache):
    data = tmp_path / "lookup.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is stored under k{i}?", "key": f"k{i}", "value": str(1000 + i)}) + "\n"
            for i in range(40)
        )
    )
    common = dict(source=str(data), tools=[], rewards=[{"name": "env"}], max_turns=2)
    good = config(tmp_path, cache, env=f"{ENVS}:Lookup", **common)
    proc = rlk2("train", str(good), "trainer.steps=1", "warm_start.enabled=false", "trainer.save_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(r for r in metric_rows(tmp_path / "run") if "loss" in r)
    assert row["frac_unscorable"] == 0.0 and "rewards/env/mean" in row

    bad = config(tmp_path, cache, env=f"{ENVS}:FailingReset", **common)
    proc = rlk2(
        "train", str(bad), "trainer.steps=1", "warm_start.enabled=false", "run.overwrite=true", "trainer.save_every=0"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(r for r in metric_rows(tmp_path / "run") if "loss" in r)
    assert row["frac_unscorable"] == 1.0 and row["episodes/env_errors"] == 16  # never scored 0.0
    assert "episode unscorable: reset raised RuntimeError: no store today" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "task, needle",
    [
        ({"env": f"{ENVS}:NoSuchClass"}, "tasks[0].env"),
        ({"env": "rlk2.envs.builtin:Question", "tools": ["shell"]}, "not a built-in tool"),
        ({"env": "rlk2.envs.builtin:Question", "rewards": [{"name": "env"}]}, "has no reward(messages, **row)"),
        ({"env": None, "tools": [], "rewards": [{"name": "env"}]}, "this task has no env"),
        ({"env": None, "tools": ["calculator"]}, "tools need an environment"),
        ({"max_turns": 0}, "tasks[0].max_turns"),
        ({"describe_tools": "loud"}, "'loud' is not one of"),
    ],
)
def test_bad_environment_settings_are_one_line_at_start_up(tmp_path, cache, task, needle):
    proc = rlk2("train", str(config(tmp_path, cache, **task)), "warm_start.enabled=false")
    lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith(("rl:", "warm start"))]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert needle in lines[0]
    assert not (tmp_path / "run").exists()


class Echo:
    """Every complete turn is answered by `echo` (the `every_turn` parser below calls it, whatever was written)."""

    def reset(self, prompt: str, **row):
        return prompt

    def echo(self, text: str) -> str:
        """Say it back.

        Args:
            text: what to say
        """
        return text


def test_partial_rollouts_pause_resume_reweigh_and_resume_exactly(tmp_path, cache, monkeypatch):
    """With a budget of one token per step every episode that calls a tool is paused after its first turn and its
    group trains in the next step: resumed episodes are counted, their stale tokens reweighed (`rollout/is_weight`),
    and a run resumed from a checkpoint holding paused groups continues exactly."""
    from rlk2.config import load_config
    from rlk2.envs import ToolCall, tools
    from rlk2.train import train

    monkeypatch.setitem(tools.PARSERS, "every_turn", lambda text: [ToolCall("echo", {"text": "hi"})])
    over = [
        f"tasks.0.env={ENVS}:Echo",
        "tasks.0.tools=[]",
        "tasks.0.tool_parser=every_turn",
        "tasks.0.max_turns=3",
        "tasks.0.max_new_tokens=10",
        "rollout.partial_tokens=1",
        "warm_start.steps=60",  # replies end with EOS within the turn budget, so turns complete
        "trainer.steps=4",
        "trainer.keep_last=0",
        "eval.samples=1",
    ]
    cfg = config(tmp_path, cache)
    train(load_config(cfg, over))
    run = tmp_path / "run"
    rows = [r for r in metric_rows(run) if "loss" in r]
    assert len(rows) == 4
    assert rows[0]["episodes/resumed"] == 0.0 and rows[0]["episodes/paused"] > 0
    assert any(r["episodes/resumed"] > 0 and "rollout/is_weight" in r for r in rows[1:])
    assert all(0.0 < r.get("rollout/is_weight", 1.0) <= 2.0 for r in rows)
    # Resume from step 2's checkpoint (it holds the groups paused in step 2): steps 3 and 4 come out the same.
    for step in (3, 4):
        (run / "checkpoints" / f"step-{step}").rename(tmp_path / f"away-{step}")
    train(load_config(run / "config.yaml", [f"run.dir={run}"]), resume=True)
    again = [r for r in metric_rows(run) if "loss" in r]
    stable = ("loss", "reward/mean", "episodes/turns", "episodes/resumed", "episodes/paused", "completion/mean_length")
    for a, b in zip(rows[2:], again[2:]):
        for key in stable:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_partial_rollouts_are_refused_on_several_processes(tmp_path, cache):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")),
        *("--num_processes", "2", "--main_process_port", str(port)),
    ]
    args = ["-m", "rlk2.cli", "train", str(config(tmp_path, cache)), "rollout.partial_tokens=4"]
    proc = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0 and "partial rollouts run on one process only" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_agent_demo_learns_to_call_the_calculator(tmp_path):
    """configs/demo_agent.yaml as shipped: RL raises held-out pass@1 by 30 points or more, by calling the tool."""
    run = tmp_path / "run"
    proc = rlk2("train", "configs/demo_agent.yaml", f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [r for r in metric_rows(run) if "eval/mul/pass@1" in r]
    before, after = evals[0], evals[-1]
    assert after["eval/mul/pass@1"] - before["eval/mul/pass@1"] >= 0.30, (before, after)
    assert after["eval/mul/tool_calls"] > before["eval/mul/tool_calls"] + 0.3


def test_rlk2_eval_reports_episodes_of_an_environment_task(tmp_path, cache):
    """`rlk2 eval` on a run whose task is an environment (and on the shipped mul_agent task file): pass@k over
    episodes, with the mean turns and tool calls in report.json."""
    cfg = config(tmp_path, cache)
    assert rlk2("train", str(cfg), "trainer.steps=1", "trainer.save_every=0").returncode == 0
    out = tmp_path / "eval"
    tasks = f"{ROOT / 'configs' / 'eval' / 'mul_agent.yaml'}"
    proc = rlk2("eval", str(tmp_path / "run"), "--tasks", tasks, "--limit", "4", "--k", "1,2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    (metrics,) = report["tasks"]["mul_agent"]["metrics"].values()
    assert 1.0 <= metrics["turns"]["value"] <= 3.0 and metrics["tool_calls"]["value"] >= 0.0
    assert "pass@2" in metrics
