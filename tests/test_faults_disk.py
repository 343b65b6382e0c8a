"""A disk that fills up under a real run: the checkpoint fails with a clear error, the previous one is intact,
and the run resumes from it once there is space again."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sandboxes.testing import required

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a real filesystem that really runs out of space (mounting needs root, as CI has)."""
    if os.geteuid() != 0:
        if required("docker"):  # the CI signal: there this must run
            pytest.fail("the disk-full test needs root to mount a tmpfs")
        pytest.skip("the disk-full test needs root to mount a tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Take all free space on `disk` but `leave` bytes (enough for metrics rows, far too little for a checkpoint)."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(small_disk, tmp_path):
    run = small_disk / "run"
    args = [
        f"run.dir={run}",
        "trainer.steps=50",
        "trainer.save_every=2",
        "trainer.keep_last=0",
        "trainer.save_rollouts=false",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.steps=5",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "eval.samples=1",
        "eval.greedy=false",
        "tasks.0.eval_size=4",
        "policy.demo.hidden_size=32",
        "policy.demo.num_hidden_layers=2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlk2.cli", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first = run / "checkpoints" / "step-2"
    deadline = time.monotonic() + 300
    while not (first / "trainer_state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run never wrote its first checkpoint"
        time.sleep(0.02)
    filler = _fill(small_disk, leave=256 * 1024)
    out, err = proc.communicate(timeout=300)

    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "checkpoint at step 4 could not be written (No space left on device)" in last, last
    assert f"the last complete checkpoint is {first}" in last and f"--resume {run}" in last
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # no half-written step-4
    state = torch.load(first / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2

    filler.unlink()  # space again: the run continues from step 2, nothing lost
    resumed = subprocess.run(
        [sys.executable, "-m", "rlk2.cli", "train", "--resume", str(run), "trainer.steps=5"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
