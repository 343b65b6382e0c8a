"""The cost of tools: an RL step of the agent demo with its environment vs the same policy and prompts single-turn.

Both runs start from the agent demo's warm start (`configs/demo_agent.yaml`, built once and cached), run the same
steps on the same prompts and seeds; one plays episodes (the policy's tool calls are parsed, the calculator runs,
its answer is tokenised and appended, the next turn is generated), the other takes each first reply as it is
(`tasks.0.env=null`). A step's cost per policy token is (time/rollout + time/reward + time/update) over the policy
tokens it generated (completion/mean_length x samples, tool tokens excluded); `ratio` is the environment run's
cost per policy token over the single-turn run's, medians over the steps after the first. The issue's target is
a ratio <= 1.5.

    python bench/bench_agent_step.py [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(run_dir: Path, steps: int, seed: int, extra: list[str]) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "rlk2.cli",
        "train",
        "configs/demo_agent.yaml",
        f"run.dir={run_dir}",
        f"run.seed={seed}",
        f"trainer.steps={steps}",
        "eval.samples=1",
        "eval.greedy=false",
        "tasks.0.eval_size=8",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _per_token(rows: list[dict], samples: int) -> tuple[float, float, float]:
    """(median seconds per policy token, median policy tokens per step, median step seconds), first step left out."""
    costs, tokens, times = [], [], []
    for r in rows[1:]:
        t = r["time/rollout"] + r["time/reward"] + r["time/update"]
        n = r["completion/mean_length"] * samples
        costs.append(t / n)
        tokens.append(n)
        times.append(t)
    return statistics.median(costs), statistics.median(tokens), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    samples = 32 * 8  # configs/demo_agent.yaml: prompts_per_step x group_size
    with tempfile.TemporaryDirectory() as tmp:
        env_rows = _run(Path(tmp) / "env", args.steps, args.seed, [])
        plain_rows = _run(Path(tmp) / "plain", args.steps, args.seed, ["tasks.0.env=null", "tasks.0.tools=[]"])
    env_cost, env_tokens, env_time = _per_token(env_rows, samples)
    plain_cost, plain_tokens, plain_time = _per_token(plain_rows, samples)
    row = {
        "bench": "agent_step",
        "steps": args.steps,
        "env_step_s": round(env_time, 3),
        "env_policy_tokens": round(env_tokens),
        "env_turns": statistics.median(r["episodes/turns"] for r in env_rows[1:]),
        "single_turn_step_s": round(plain_time, 3),
        "single_turn_policy_tokens": round(plain_tokens),
        "env_ms_per_policy_token": round(env_cost * 1e3, 4),
        "single_turn_ms_per_policy_token": round(plain_cost * 1e3, 4),
        "ratio": round(env_cost / plain_cost, 3),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
