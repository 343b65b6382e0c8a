"""The run directory (DESIGN.md 2.2): everything `rlk2 train` writes under it, saved *and* restored here.

    runs/<name>/
      config.yaml            the fully resolved config (a resume reads it back, plus the overrides it was given)
      env.json               git SHA, library versions, host, where the starting policy came from
      metrics.jsonl          one JSON row per optimizer step, evaluation rows, critic agreement rows
      rollouts/step-<N>.jsonl  the step's prompts, completions, rewards, advantages (and critic reasons)
      checkpoints/step-<N>/  a Hugging Face checkpoint (or PEFT adapter) + trainer_state.pt, written atomically
      critic_heldout.jsonl   the held-out verified pairs of a closed-loop critic run
      report.md, *.png       the end-of-run report

Only the main process writes (`RunDir.main`); the others read. A checkpoint is first written to a hidden temporary
directory beside it, flushed to disk, then renamed into place, so a crash (or a full disk) never leaves a
half-written `step-<N>`; older checkpoints are pruned only after the new one is in place. `trainer_state.pt` holds
the optimizer, scheduler, prompt samplers and RNG state, so a resume continues the same run.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import accelerate
import numpy as np
import torch
import transformers
import trl

from rlk2.errors import UserError
from rlk2.eval.report import write_run_report

_STEP_DIR = re.compile(r"^step-(\d+)$")
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


# ================================================================================================ the directory
class RunDir:
    """One run's directory. `main`: this process writes (the others of a multi-process run only read)."""

    def __init__(self, path: str | Path, *, main: bool = True) -> None:
        self.path, self.main = Path(path), main

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def heldout_path(self) -> Path:
        return self.path / "critic_heldout.jsonl"

    def is_run(self) -> bool:
        return (self.path / "config.yaml").is_file() and self.metrics_path.exists()

    # -------------------------------------------------------------------------------------------- start
    def start(self, *, config_yaml: str | None, env: dict | None) -> None:
        """Create the directory (and rollouts/); a new run also writes config.yaml and env.json."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "rollouts").mkdir(exist_ok=True)
        if config_yaml is not None:
            (self.path / "config.yaml").write_text(config_yaml)
        if env is not None:
            (self.path / "env.json").write_text(json.dumps(env, indent=2))

    # -------------------------------------------------------------------------------------------- metrics
    def append_metrics(self, row: dict) -> None:
        """Append one row to metrics.jsonl, flushed at once: a crash loses nothing already logged."""
        if not self.main:
            return
        try:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps(row, allow_nan=True) + "\n")
                fh.flush()
        except OSError as exc:
            raise UserError(
                f"{self.metrics_path}: cannot append step {row.get('step')} ({exc.strerror or exc}); "
                f"resume from the last checkpoint with: rlk2 train --resume {self.path}"
            ) from None

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint we restart from (they will be re-done)."""
        if self.main and self.metrics_path.exists():
            rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # -------------------------------------------------------------------------------------------- rollouts
    def write_rollouts(self, step: int, records: list[dict]) -> None:
        if self.main:
            with (self.path / "rollouts" / f"step-{step}.jsonl").open("w") as fh:
                for rec in records:
                    fh.write(json.dumps(rec) + "\n")

    # -------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, step: int, model, tokenizer, *, optimizer, scheduler, samplers: dict, config_yaml: str, keep_last: int
    ) -> None:
        """Write checkpoints/step-<step> (weights, tokenizer, trainer state); one line on a full disk."""
        if not self.main:
            return
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **{name: s.state_dict() for name, s in samplers.items()},
            "rng": rng_state(),
            "config": config_yaml,
        }
        try:
            save_checkpoint(self.path, step, model, tokenizer, state, keep_last=keep_last)
        except OSError as exc:  # disk full, quota, permissions: the partial copy is gone, older ones intact
            prev = latest_checkpoint(self.path)
            kept = f"the last complete checkpoint is {prev}" if prev else "no earlier checkpoint exists"
            raise UserError(
                f"checkpoint at step {step} could not be written ({exc.strerror or exc}); {kept}; "
                f"free space and resume with: rlk2 train --resume {self.path}"
            ) from None

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    @staticmethod
    def restore(checkpoint: Path, *, optimizer, scheduler, samplers: dict) -> int:
        """Load trainer_state.pt of `checkpoint` into the optimizer, scheduler, samplers and RNGs; returns its step.
        (The weights were loaded from the checkpoint itself.) A sampler absent from the state keeps its start."""
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name, sampler in samplers.items():
            if name in state:
                sampler.load_state_dict(state[name])
        set_rng_state(state["rng"])
        return int(state["step"])

    # -------------------------------------------------------------------------------------------- report
    def write_report(self, before: dict, after: dict) -> str:
        """report.md and plots at the end of a run; returns the before/after table."""
        return write_run_report(self.path, self.read_metrics(), before, after)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a torn last line (a crash mid-write) is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path}:{i + 1}: not a JSON row (the file was edited or damaged)") from None
    return rows


def env_info() -> dict:
    """What `env.json` records about the machine and the libraries (so a run can be reproduced)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "git_sha": sha or None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "trl": trl.__version__,
        "host": platform.node(),
        "platform": platform.platform(),
        "argv": sys.argv,
    }


# ================================================================================================ checkpoints
def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.pt").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, trainer_state: dict, *, keep_last: int) -> Path:
    """Write `checkpoints/step-<step>` atomically and keep only the newest `keep_last` (0 = keep all)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a failed write (e.g. a full disk) as its own error type; surface it as the OSError it is
        found = _OS_ERROR.search(str(exc)) if not isinstance(exc, OSError) else None
        if found:
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from exc
        raise
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final
