"""Sandbox faults under a real `rlk2 train` run with the `code` reward: containers killed from outside, then the
whole Docker engine stopped and started again. The run never stops; rewards are None (never 0.0) only while no
sandbox can run, a warning says so every step, and the pool recovers when the engine returns."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DATA = Path(__file__).parent / "data" / "code_tasks.jsonl"


def _steps(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _wait(proc, run: Path, done, what: str, timeout: float = 240) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _steps(run)
        if done(rows):
            return rows
        assert proc.poll() is None, f"the run ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_run_survives_killed_containers_and_a_stopped_engine(second_engine, tmp_path):
    from sandboxes.docker_backend import LABEL, engine_client

    run = tmp_path / "run"
    reward = "[{name: code, weight: 1.0, timeout_s: 120}]"
    args = [
        f"run.dir={run}",
        "trainer.steps=500",
        "trainer.save_every=0",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.steps=5",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "eval.samples=1",
        "eval.greedy=false",
        f"tasks.0.source={DATA}",
        "tasks.0.eval_size=4",
        f"tasks.0.rewards={reward}",
        "tasks.0.max_new_tokens=16",
        "policy.demo.hidden_size=32",
        "policy.demo.num_hidden_layers=2",
    ]
    env = {**os.environ, "RLK2_SANDBOX_BACKEND": "docker", "RLK2_SANDBOX_ENGINES": second_engine.url}
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "train", *args], stdout=log, stderr=subprocess.STDOUT, env=env, text=True
    )
    try:
        _wait(proc, run, lambda rows: len(rows) >= 2, "two scored steps")

        # 1. containers killed from outside, one every half second: jobs are retried on fresh containers.
        client = engine_client(second_engine.url)
        killed, n0 = 0, len(_steps(run))
        deadline = time.monotonic() + 240
        # at least two kills and four steps under fire (steps of this tiny run can outpace one kill per half second)
        while (len(_steps(run)) < n0 + 4 or killed < 2) and time.monotonic() < deadline:
            for c in client.containers.list(filters={"label": LABEL})[:1]:
                try:
                    c.kill()
                    killed += 1
                except Exception:  # already gone: the pool got there first
                    pass
            time.sleep(0.5)
        assert killed >= 2
        rows = _wait(proc, run, lambda rows: len(rows) >= n0 + 5, "steps after the kills")
        assert [r["frac_unscorable"] for r in rows] == [0.0] * len(rows)  # every response still scored

        # 2. the engine stops: responses become unscorable (None), the run goes on and warns.
        second_engine.stop()
        n1 = len(_steps(run))
        rows = _wait(
            proc,
            run,
            lambda rows: sum(r["frac_unscorable"] == 1.0 for r in rows[n1:]) >= 3,
            "steps with the engine down",
        )
        down = [r for r in rows[n1:] if r["frac_unscorable"] == 1.0]
        assert all(r["grad_norm"] == 0.0 for r in down)  # nothing was learned from unscorable responses

        # 3. the engine comes back: the pool restarts its containers and scoring resumes.
        second_engine.start()
        n2 = len(_steps(run))
        _wait(proc, run, lambda rows: any(r["frac_unscorable"] == 0.0 for r in rows[n2:]), "recovery")

        proc.send_signal(signal.SIGTERM)  # graceful stop: finish the step, checkpoint, exit 0
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert "Traceback" not in out
    assert "16/16 responses unscorable (returned None by their reward)" in out and "infra_error" in out
    assert "resume with: rlk2 train --resume" in out
