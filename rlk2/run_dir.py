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
the optimizer, scheduler, prompt samplers and RNG state, so a resume continues the same run. An FSDP2 run
(rlk2.sharding) writes the gathered weights the same way and its optimizer sharded: rank 0's slice in
`trainer_state.pt`, each other rank's in `optimizer-rank<r>.pt` beside it, moved into the temporary directory before
the rename, so a checkpoint is whole or absent for all ranks at once.
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
import yaml

from rlk2.config import Config, to_dict
from rlk2.errors import UserError
from rlk2.eval.report import write_run_report
from rlk2.sharding import full_state_dict, load_local_optimizer_state, local_optimizer_state, shard_file

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Every entry `rlk2 train` writes in a run directory (what run.overwrite=true may remove).
RUN_ENTRIES = (
    "config.yaml",
    "env.json",
    "metrics.jsonl",
    "rollouts",
    "checkpoints",
    "critic_heldout.jsonl",
    "report.md",
    "reward.png",
    "eval.png",
    "loss.png",
)
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
    def check_new(self, *, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
        """Before anything is written: may a new run start here? An empty or absent directory, or (with
        `run.overwrite=true`) an rlk2 run directory, whose entries `start` then removes. `keep`: more entry names
        rlk2 writes there (a tracker's folder)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise UserError(f"run.dir {p} exists and is not a directory")
        if not p.exists() or not any(p.iterdir()):
            return
        if not overwrite:
            hint = ""
            if self.is_run() and not list_checkpoints(p):
                hint = " (it holds a run that stopped before its first checkpoint; run.overwrite=true starts it again)"
            raise UserError(
                f"run.dir {p} exists and is not empty{hint}: continue it with --resume {p}, start "
                "afresh with run.overwrite=true, or choose another run.dir"
            )
        foreign = sorted(e.name for e in p.iterdir() if e.name not in RUN_ENTRIES + keep)
        if foreign:
            raise UserError(
                f"run.dir {p}: run.overwrite=true empties an rlk2 run directory, and '{foreign[0]}' is "
                "not something rlk2 wrote there; choose another run.dir"
            )

    def start(self, *, config_yaml: str, env: dict | None, overwrite: bool = False, keep: tuple[str, ...] = ()) -> None:
        """Create the directory (and rollouts/) and write config.yaml (and env.json for a new run). With
        `overwrite`, an earlier run's entries are removed first. A new run's `discard` undoes this."""
        if not self.main:
            return
        try:
            if env is not None:  # a new run
                self._made_dir = not self.path.exists()
                if overwrite and self.path.is_dir():
                    for entry in self.path.iterdir():
                        if entry.name in RUN_ENTRIES + keep:
                            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "rollouts").mkdir(exist_ok=True)
            _write_atomically(self.path / "config.yaml", config_yaml)
            if env is not None:
                _write_atomically(self.path / "env.json", json.dumps(env, indent=2))
        except OSError as exc:
            raise UserError(f"run.dir {self.path}: cannot write there ({exc.strerror or exc})") from None
        self._started = env is not None

    def discard(self) -> None:
        """Undo a new run's start that failed before its first step finished: a retry then starts cleanly."""
        if not (self.main and getattr(self, "_started", False)):
            return
        if self._made_dir:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for name in RUN_ENTRIES:
            entry = self.path / name
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.exists():
                entry.unlink()

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
        self,
        step: int,
        model,
        tokenizer,
        *,
        optimizer,
        scheduler,
        samplers: dict,
        config_yaml: str,
        keep_last: int,
        sharded: bool = False,
    ) -> None:
        """Write checkpoints/step-<step> (weights, tokenizer, trainer state); one line on a full disk. With `sharded`
        (FSDP2) every rank must call it: the weights are gathered and each rank's optimizer slice is written."""
        weights, extra, optim_state = None, [], None
        if sharded:
            weights = full_state_dict(model)  # collective: every rank takes part, the main process gets it
            optim_state = local_optimizer_state(optimizer)
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
            if rank:
                torch.save(optim_state, self.path / "checkpoints" / f".step-{step}.optimizer-rank{rank}.pt")
            torch.distributed.barrier()  # every slice is on disk before the main process moves them in
            extra = [self.path / "checkpoints" / f".step-{step}.optimizer-rank{r}.pt" for r in range(1, world)]
            optim_state = {**optim_state, "ranks": world}
        if not self.main:
            return
        state = {
            "step": step,
            "optimizer": optim_state if sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **{name: s.state_dict() for name, s in samplers.items()},
            "rng": rng_state(),
            "config": config_yaml,
        }
        try:
            save_checkpoint(
                self.path, step, model, tokenizer, state, keep_last=keep_last, state_dict=weights, extra_files=extra
            )
        except OSError as exc:  # disk full, quota, permissions: the partial copy is gone, older ones intact
            prev = latest_checkpoint(self.path)
            kept = f"the last complete checkpoint is {prev}" if prev else "no earlier checkpoint exists"
            raise UserError(
                f"checkpoint at step {step} could not be written ({exc.strerror or exc}); {kept}; "
                f"free space and resume with: rlk2 train --resume {self.path}"
            ) from None

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def latest_step(self) -> int | None:
        found = list_checkpoints(self.path)
        return found[-1][0] if found else None

    def open_checkpoint(self, load_model) -> tuple[Path, dict, object, object, list[str]]:
        """The newest intact checkpoint: (its path, its trainer state, model, tokenizer, notes about damaged newer
        ones). `load_model(path)` loads the weights; a checkpoint whose state or weights do not load is skipped,
        and saying so is the caller's (the notes)."""
        notes = []
        for step, path in reversed(list_checkpoints(self.path)):
            try:
                state = torch.load(path / "trainer_state.pt", weights_only=False)
                model, tokenizer = load_model(path)
            except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file raises whatever its reader raises
                notes.append(f"checkpoint step-{step} is damaged ({_one_line(exc)})")
                continue
            return path, state, model, tokenizer, notes
        why = f": {'; '.join(notes)}" if notes else ""
        raise UserError(f"--resume {self.path}: no intact checkpoint to resume from{why}")

    @staticmethod
    def restore(state: dict, *, optimizer, scheduler, samplers: dict, sharded_from: Path | None = None) -> int:
        """Load a checkpoint's trainer state into the optimizer, scheduler, samplers and RNGs; returns its step.
        (The weights were loaded from the checkpoint itself.) A sampler absent from the state keeps its start.
        `sharded_from`: an FSDP2 run's checkpoint directory, from which each rank loads its optimizer slice."""
        ranks = state["optimizer"].get("ranks")
        if sharded_from is None and ranks is not None:
            raise UserError(
                f"--resume: the checkpoint's optimizer state is FSDP2-sharded over {ranks} processes; resume it "
                f"with the same launch ({ranks} processes, an FSDP2 config)"
            )
        if sharded_from is not None:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            if ranks != world:
                held = f"sharded over {ranks} processes" if ranks else "whole (a run without FSDP2)"
                raise UserError(
                    f"--resume: the checkpoint's optimizer state is {held}; this launch has {world} FSDP2 "
                    "processes (an exact resume needs the launch that wrote it)"
                )
            try:
                mine = state["optimizer"]
                if rank:
                    mine = torch.load(shard_file(sharded_from, rank), weights_only=False)
            except Exception as exc:  # noqa: BLE001 - a missing or truncated file raises whatever its reader raises
                raise UserError(
                    f"--resume: {shard_file(sharded_from, rank)} (rank {rank}'s optimizer slice) does not load "
                    f"({_one_line(exc)})"
                ) from None
            load_local_optimizer_state(getattr(optimizer, "optimizer", optimizer), dict(mine))
        else:
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


# ================================================================================================ resume
class AlreadyFinished(Exception):
    """`--resume` of a run that already reached its `trainer.steps`: nothing to do (not an error)."""

    def __init__(self, path: Path, step: int) -> None:
        super().__init__(
            f"{path}: the run already finished at step {step}; nothing to do (give trainer.steps=N "
            f"with N > {step} to train it further)"
        )
        self.step = step


# What a run's weights were made from: a resume may change how it trains, never these (the checkpoint holds the
# weights of *that* model, tokenizer and data). policy.dtype and policy.attn_implementation may change: they are
# how the same weights are computed.
FROZEN = ("run.seed", "policy.path", "policy.chat_template", "policy.demo", "policy.lora", "warm_start")
FROZEN_PER_TASK = ("name", "source", "eval_size")


def check_resume(cfg: Config, state: dict, path: Path) -> None:
    """Refuse, in one line, a resume whose config (the saved one plus this resume's overrides) changes the model,
    tokenizer or data the checkpoint was trained on, or stops before the checkpoint's step; raise AlreadyFinished
    when there is nothing left to train."""
    saved = yaml.safe_load(state.get("config") or "{}") or {}
    now = to_dict(cfg)
    for key in FROZEN:
        before, after = _dotted(saved, key), _dotted(now, key)
        if before is _MISSING:
            continue
        where, before, after = _first_difference(key, before, after)
        if where is not None:
            raise UserError(
                f"--resume {path}: {where} differs from the run's ({_short(before)} -> {_short(after)}); the "
                "checkpoint holds the weights of the other one. Start a new run (another run.dir) to change the "
                "model, tokenizer or data"
            )
    old_tasks = [{k: t.get(k) for k in FROZEN_PER_TASK} for t in saved.get("tasks", [])]
    new_tasks = [{k: t[k] for k in FROZEN_PER_TASK} for t in now["tasks"]]
    if old_tasks and old_tasks != new_tasks:
        raise UserError(
            f"--resume {path}: the tasks' names, sources or eval sizes differ from the run's "
            f"({_short(old_tasks)} -> {_short(new_tasks)}); start a new run to change the data"
        )
    step = int(state["step"])
    if step > cfg.trainer.steps:
        raise UserError(
            f"--resume {path}: trainer.steps={cfg.trainer.steps} is behind the checkpoint (step {step}); "
            f"give trainer.steps >= {step}"
        )
    if step == cfg.trainer.steps:
        raise AlreadyFinished(path, step)


_MISSING = object()


def _first_difference(key: str, before, after) -> tuple[str | None, object, object]:
    """(the dotted key of the first difference, its two values), or (None, ...) when equal. Keys added to a section
    since the run began (present in `after` only) keep their defaults and are not a difference."""
    if isinstance(before, dict) and isinstance(after, dict):
        for k in before:
            found = _first_difference(f"{key}.{k}", before[k], after.get(k))
            if found[0] is not None:
                return found
        return None, before, after
    return (None, before, after) if before == after else (key, before, after)


def _dotted(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _write_atomically(path: Path, text: str) -> None:
    """Write a file through a temporary beside it: a crash never leaves half a config.yaml for --resume to read."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    *,
    keep_last: int,
    state_dict: dict | None = None,
    extra_files: list[Path] = (),
) -> Path:
    """Write `checkpoints/step-<step>` atomically and keep only the newest `keep_last` (0 = keep all). `state_dict`:
    the weights to write, when the model's own are sharded; `extra_files` are moved in (by their name less the
    `.step-<step>.` prefix) before the rename."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        for path in extra_files:
            os.replace(path, tmp / path.name.removeprefix(f".step-{step}."))
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
