"""Exact resume: a run continued from a checkpoint logs the same training metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

# Wall-clock measurements differ between runs; everything else must match exactly.
VOLATILE = ("time/", "throughput/")


def rlk2(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, timeout=900, **kw)


def base(tmp: Path, run: str, steps: int) -> list[str]:
    return [
        f"run.dir={tmp / run}",
        f"trainer.steps={steps}",
        "trainer.save_every=1",
        "trainer.keep_last=0",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.steps=5",
        f"warm_start.cache_dir={tmp / 'cache'}",
        "eval.samples=1",
        "eval.greedy=false",
        "tasks.0.eval_size=4",
        "policy.demo.hidden_size=32",
        "policy.demo.num_hidden_layers=2",
    ]


def train_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows if "loss" in r}


def test_resume_matches_uninterrupted_run(tmp_path):
    full = rlk2("train", *base(tmp_path, "full", 4))
    assert full.returncode == 0, full.stderr[-2000:]
    part = rlk2("train", *base(tmp_path, "part", 2))
    assert part.returncode == 0, part.stderr[-2000:]
    resumed = rlk2("train", "--resume", str(tmp_path / "part"), "trainer.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "part")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert a[step] == b[step], f"step {step} differs"


def test_resume_restores_muonclip_state(tmp_path):
    """MuonClip's momentum buffers, its AdamW moments and its QK-Clip counters come back exactly on resume."""
    extra = ["optim.name=muonclip", "optim.lr=0.02"]
    full = rlk2("train", *base(tmp_path, "full", 3), *extra)
    assert full.returncode == 0, full.stderr[-2000:]
    part = rlk2("train", *base(tmp_path, "part", 1), *extra)
    assert part.returncode == 0, part.stderr[-2000:]
    resumed = rlk2("train", "--resume", str(tmp_path / "part"), "trainer.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "part")
    assert sorted(b) == [1, 2, 3] and "qk_clip/max_logit" in a[3]
    for step in (1, 2, 3):
        assert a[step] == b[step], f"step {step} differs"


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    proc = rlk2("train", "--resume", str(tmp_path))
    assert proc.returncode == 2
    assert "not an rlk2 run directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "train", *base(tmp_path, "run", 200)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "resume with: rlk2 train --resume" in out
    steps = sorted(train_rows(tmp_path / "run"))
    ckpts = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert steps and ckpts[-1] == steps[-1] < 200


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_matches(tmp_path):
    full = rlk2("train", *base(tmp_path, "full", 6))
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "train", *base(tmp_path, "killed", 6)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    target = 2 + int.from_bytes(os.urandom(1), "little") % 3  # kill somewhere after step 2..4 was logged
    while proc.poll() is None:
        if metrics.exists() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= target:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    resumed = rlk2("train", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = train_rows(tmp_path / "full"), train_rows(tmp_path / "killed")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert a[step] == b[step], f"step {step} differs"
