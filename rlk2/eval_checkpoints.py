"""`rlk2 eval CKPT [CKPT ...]`: evaluate checkpoints side by side on the same prompts with the same seeds.

A CKPT is a Hugging Face checkpoint directory, a PEFT adapter directory (its base model is read from
`adapter_config.json`), or an rlk2 run directory: its latest checkpoint, `RUN_DIR:step-N` for a given step, or
`RUN_DIR:start` for the policy the run started from (the warm-start model for the demo). Every checkpoint sees
the same prompts and the same sampling seeds (common random numbers), so differences between checkpoints are
paired and their intervals narrow. The first checkpoint is the baseline of the differences.

Writes to --out: report.json (stable keys), report.md, pass@k plots per task, training curves for run
directories, and samples/<checkpoint>/<task>.jsonl with every completion and its scores.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import yaml

from rewards.engine import RewardEngine
from rlk2.config import load_config
from rlk2.errors import UserError
from rlk2.eval.evaluate import evaluate_policy
from rlk2.eval.report import build_report, markdown_tables, write_outputs
from rlk2.eval.tasks import build_eval_task, find_task_file, from_run_task, load_task_config
from rlk2.policy import load_policy
from rlk2.policy.sources import KNOWN
from rlk2.policy.sources import resolve_checkpoint as resolve_checkpoint_dir
from rlk2.qat import quantize_for_eval
from rlk2.run_dir import list_checkpoints, read_metrics


# ================================================================================================ checkpoints
@dataclass
class Checkpoint:
    spec: str  # as given on the command line
    path: Path  # the directory `load_policy` reads
    kind: str  # "hf" | "peft"
    run_dir: Path | None = None  # the rlk2 run it belongs to, if any (for training curves)
    step: int | None = None  # its step in that run (0 for RUN_DIR:start)
    label: str = ""
    dtype: str = "float32"
    chat_template: bool = True
    quantize: dict | None = None  # weights rounded to INT4 before evaluating: --quantize, or a QAT run's own (rlk2.qat)


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").exists() or (path / "checkpoints").is_dir())


def _run_settings(run_dir: Path) -> tuple[str, bool]:
    try:
        policy = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("policy") or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{run_dir}/config.yaml: not valid YAML ({str(exc).splitlines()[0]})") from None
    return str(policy.get("dtype", "float32")), bool(policy.get("chat_template", True))


def run_qat(run_dir: Path) -> dict | None:
    """The run's `qat:` settings ({"modules", "group_size"}) when it trained with QAT (its config.yaml), else None."""
    qat = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("qat") or {}
    if not qat.get("enabled"):
        return None
    return {"modules": list(qat.get("modules", ["experts"])), "group_size": qat.get("group_size", 32)}


def resolve_checkpoint(spec: str) -> Checkpoint:
    """Turn one CKPT argument into the directory to load, with a one-line error for anything else."""
    path, selector = Path(spec), None
    if spec in KNOWN or (path.is_file() and path.suffix == ".gguf"):  # converted once into the cache
        path = resolve_checkpoint_dir(spec, what=f"checkpoint {spec}")
        return _leaf(spec, path, run_dir=None, step=None, dtype="float32", chat=True)
    if not path.exists() and ":" in spec:
        head, _, selector = spec.rpartition(":")
        path = Path(head)
        if not _is_run_dir(path):
            raise UserError(f"checkpoint {spec}: {head} is not an rlk2 run directory (no config.yaml / metrics.jsonl)")
    if not path.is_dir():
        raise UserError(f"checkpoint {spec}: no such directory")
    if _is_run_dir(path):
        dtype, chat = _run_settings(path)
        found = dict(list_checkpoints(path))
        if selector == "start":
            env = path / "env.json"
            source = json.loads(env.read_text()).get("policy_source") if env.is_file() else None
            if not source or not Path(source).is_dir():
                raise UserError(
                    f"checkpoint {spec}: the run's starting policy ({source or 'not recorded in env.json'}) is not on "
                    "this machine"
                )
            return _leaf(spec, Path(source), run_dir=path, step=0, dtype=dtype, chat=chat)
        if selector is None or selector == "latest":
            if not found:
                raise UserError(f"checkpoint {spec}: run directory has no complete checkpoint under checkpoints/")
            step = max(found)
        else:
            m = re.fullmatch(r"(?:step-)?(\d+)", selector)
            if not m:
                raise UserError(f"checkpoint {spec}: '{selector}' is not step-N, latest or start")
            step = int(m.group(1))
            if step not in found:
                have = ", ".join(f"step-{s}" for s in sorted(found)) or "none"
                raise UserError(f"checkpoint {spec}: no checkpoint step-{step} (have: {have})")
        return _leaf(spec, found[step], run_dir=path, step=step, dtype=dtype, chat=chat)
    # a checkpoints/step-N directory inside a run still gets the run's training curves
    run_dir = path.parent.parent if path.parent.name == "checkpoints" and _is_run_dir(path.parent.parent) else None
    m = re.fullmatch(r"step-(\d+)", path.name)
    dtype, chat = _run_settings(run_dir) if run_dir else ("float32", True)
    return _leaf(spec, path, run_dir=run_dir, step=int(m.group(1)) if run_dir and m else None, dtype=dtype, chat=chat)


def _leaf(spec: str, path: Path, *, run_dir: Path | None, step: int | None, dtype: str, chat: bool) -> Checkpoint:
    if (path / "adapter_config.json").is_file():
        kind = "peft"
    elif (path / "config.json").is_file():
        kind = "hf"
    else:
        raise UserError(
            f"checkpoint {spec}: {path} is not a Hugging Face checkpoint, PEFT adapter or rlk2 run directory"
        )
    if run_dir is not None:
        label = (
            f"{run_dir.resolve().name}@{'start' if step == 0 and path.parent.name != 'checkpoints' else f'step-{step}'}"
        )
    else:
        label = path.resolve().name
    return Checkpoint(spec, path, kind, run_dir, step, label, dtype, chat)


def _unique_labels(ckpts: list[Checkpoint]) -> None:
    seen: dict[str, int] = {}
    for c in ckpts:
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label}#{seen[c.label]}"


# ================================================================================================ arguments
def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--k: '{text}' is not a comma-separated list of integers, e.g. 1,4,8") from None
    if not ks or ks[0] < 1:
        raise UserError(f"--k: '{text}': every k must be >= 1")
    return ks


def _task_configs(arg: str | None, ckpts: list[Checkpoint]):
    if arg:
        names = [t.strip() for t in arg.split(",") if t.strip()]
        if not names:
            raise UserError("--tasks: no task given")
        cfgs = [load_task_config(find_task_file(n)) for n in names]
    else:
        run_dir = next((c.run_dir for c in ckpts if c.run_dir is not None), None)
        if run_dir is not None:
            cfgs = [from_run_task(t) for t in load_config(run_dir / "config.yaml").tasks]
        else:
            cfgs = [load_task_config(find_task_file("arith"))]
    dup = {c.name for c in cfgs if [d.name for d in cfgs].count(c.name) > 1}
    if dup:
        raise UserError(f"--tasks: task name {sorted(dup)[0]!r} appears twice")
    return cfgs


def _output_dir(out: Path) -> Path:
    """--out, checked and created before any evaluation: a file there, or an earlier report whose samples and plots
    would mix with the new ones, is refused now rather than after an hour of generation."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"--out {out}: is not empty (it would mix an earlier report with this one); give a new directory"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    return out


def _device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: '{name}' is not a torch device (cpu, cuda, cuda:0, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: '{name}' requested but CUDA is not available")
    return device


# ================================================================================================ run
def run(args: argparse.Namespace) -> int:
    """`rlk2 eval CKPT [CKPT ...]` (arguments: rlk2.cli)."""
    ks = parse_ks(args.k)
    samples = args.samples if args.samples is not None else max(ks)
    if samples < max(ks):
        raise UserError(f"--samples: {samples} samples per prompt cannot estimate pass@{max(ks)} (need n >= k)")
    if args.temperature <= 0:
        raise UserError("--temperature: must be > 0 (the greedy measurement is separate; see --no-greedy)")
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--bootstrap", args.bootstrap)):
        if value is not None and value < 1:
            raise UserError(f"{flag}: must be >= 1")
    if not 1 <= args.reward_workers <= 64:
        raise UserError(f"--reward-workers: {args.reward_workers} is not in 1..64")
    ckpts = [resolve_checkpoint(s) for s in args.checkpoints]
    quantize = _quantize_setting(args)
    for c in ckpts:  # a QAT run's checkpoints hold master weights: evaluated as the run trained them, in INT4
        c.quantize = quantize or (run_qat(c.run_dir) if c.run_dir else None)
        c.label += "+int4" if c.quantize else ""
    _unique_labels(ckpts)
    task_cfgs = _task_configs(args.tasks, ckpts)
    device = _device(args.device)
    out = _output_dir(Path(args.out) if args.out else Path("evals") / time.strftime("%Y%m%d-%H%M%S"))
    settings = {
        "ks": ks,
        "samples": samples,
        "temperature": args.temperature,
        "greedy": not args.no_greedy,
        "seed": args.seed,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "bootstrap_resamples": args.bootstrap,
        "confidence": 0.95,
        "device": str(device),
        "reward_workers": args.reward_workers,
        "quantize": quantize,
    }
    report = evaluate_checkpoints(ckpts, task_cfgs, settings, out, device=device)
    print(markdown_tables(report))
    print(f"report: {out / 'report.md'} (and report.json, {len(report['plots'])} plots)")
    return 0


def _quantize_setting(args: argparse.Namespace) -> dict | None:
    """--quantize and its options, checked (the weights themselves are checked on each checkpoint)."""
    if args.quantize is None:
        return None
    if args.quantize_group_size < 1:
        raise UserError("--quantize-group-size: must be >= 1")
    modules = [m.strip() for m in args.quantize_modules.split(",") if m.strip()]
    if not modules:
        raise UserError("--quantize-modules: name at least one module")
    return {"modules": modules, "group_size": args.quantize_group_size}  # --quantize's one scheme: INT4 (rlk2.qat)


def evaluate_checkpoints(ckpts: list[Checkpoint], task_cfgs: list, settings: dict, out: Path, *, device) -> dict:
    """Evaluate every checkpoint on every task, then write the report files into `out`; returns report.json's dict."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    engine = RewardEngine(num_workers=settings["reward_workers"])
    try:
        tasks = [build_eval_task(cfg, engine, limit=settings["limit"]) for cfg in task_cfgs]  # fail before loading
        results = []
        for ckpt in ckpts:
            model, tokenizer = load_policy(ckpt.path, dtype=ckpt.dtype)
            if ckpt.quantize:
                quantize_for_eval(model, ckpt.quantize["modules"], ckpt.quantize["group_size"])
            model.to(device)
            res = evaluate_policy(
                model,
                tokenizer,
                tasks,
                engine,
                samples=settings["samples"],
                temperature=settings["temperature"],
                greedy=settings["greedy"],
                batch_size=settings["batch_size"],
                chat_template=ckpt.chat_template,
                seed=settings["seed"],
                ks=settings["ks"],
                progress=True,
                desc=ckpt.label,
            )
            results.append(res)
            for task in tasks:
                t, m = res.timing[task.name], res.metrics
                print(
                    f"{ckpt.label} {task.name}: pass@1 {m[f'eval/{task.name}/pass@1']:.3f}, "
                    f"{t['sequences']} samples in {t['seconds']:.1f} s ({t['samples_per_s']:.0f} samples/s)"
                )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        engine.close()
    report = build_report(ckpts, task_cfgs, tasks, results, settings)
    run_metrics = {c.run_dir: read_metrics(c.run_dir) for c in ckpts if c.run_dir is not None}
    write_outputs(report, ckpts, tasks, results, out, run_metrics)
    return report
