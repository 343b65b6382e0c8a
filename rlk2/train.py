"""`rlk2 train`: the K2-style RL loop, top to bottom.

Algorithm (one optimizer step):
  1. sample `prompts_per_step` prompts (tasks mixed by weight) and K = `group_size` responses each from the
     current policy pi_old, recording the sampled tokens' log-probs (rlk2.rollout, the one generation seam);
  2. score every response with its task's rewards (rewards.engine: concurrent, process-level timeouts,
     unscorable = None); a response that hits its task's token budget gets the task's overlong penalty;
  3. group-relative advantages r - mean(r) over the K responses of a prompt (std-scaled for the GRPO family),
     unscorable responses left out of the baseline with advantage 0;
  3b. with `critic.refine`, closed-loop critic refinement (rlk2.critic_refine): the policy, prompted as critic,
     judges pairs of this step's responses whose verifiable rewards differ; agreement with the verifier is the
     reward of those critic samples, which join the same update as K more groups;
  4. the policy loss (`algo.loss`, default `k2`: the squared mirror-descent objective of Kimi k1.5 / K2),
     `inner_steps` optimizer steps on the batch (AdamW or MuonClip), then QK-Clip inside MuonClip's step;
  5. log (metrics.jsonl, trackers, progress bar), evaluate every `eval.every` steps, checkpoint.
K2 training controls (rlk2/controls.py; all off by default): a decaying sampling temperature (used for sampling and
for the training log-probs alike), prioritized prompt sampling by tracked success rate, dropping groups whose
rewards all tie from the loss, and the PTX loss on curated (prompt, completion) data added with a weight.

Deliberate simplifications: rollouts come from HF `generate` on the training process (no separate inference
engine); one rollout batch per step (no partial rollouts); the KL-to-reference term is not implemented
(off by default in DESIGN.md); multi-process (DDP) runs split the prompt groups across ranks and reproduce
the one-process run (rlk2.distributed); sharded parameters (FSDP, DeepSpeed) are refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from rlk2.config import Config, critic_tasks, load_config, to_yaml
from rlk2.errors import UserError


# ================================================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (default configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=4")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")


def run(args: argparse.Namespace) -> int:
    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)  # `rlk2 train a.b=1` : no config file given, only overrides
        config_path = None
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        if not (resume / "config.yaml").is_file() or not (resume / "metrics.jsonl").exists():
            raise UserError(f"--resume {resume}: not an rlk2 run directory (no config.yaml / metrics.jsonl)")
        config_path = config_path or str(resume / "config.yaml")
        overrides.append(f"run.dir={resume}")
    cfg = load_config(config_path, overrides)
    train(cfg, resume=resume is not None)
    return 0


# ================================================================================================ helpers
def _quiet_libraries() -> None:
    import transformers
    from datasets.utils.logging import disable_progress_bar as ds_no_bar

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ds_no_bar()


def _env_info() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

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


def _prepare_policy(cfg: Config, task_rows: dict, accelerator) -> tuple:
    """Load `policy.path`, or build the demo MoE and its warm start (cached). Returns (model, tokenizer, path)."""
    from rlk2.policy import TinyMoEShape, build_demo_policy, load_policy
    from rlk2.warmstart import cache_key, run_sft

    if cfg.policy.path:
        model, tok = load_policy(cfg.policy.path, dtype=cfg.policy.dtype, attn_implementation=cfg.policy.attn_implementation)
        return model, tok, cfg.policy.path

    shape = TinyMoEShape(**{k: getattr(cfg.policy.demo, k) for k in cfg.policy.demo.__dataclass_fields__})
    ws = cfg.warm_start
    critic_rows = _critic_warm_start_rows(cfg, task_rows)
    key = cache_key(**({"critic": _critic_warm_start_key(cfg)} if critic_rows else {}),  # old keys unchanged
                    shape=shape, tasks=sorted(t.source for t in cfg.tasks),
                    ws=[ws.steps, ws.batch_size, ws.lr, ws.examples], enabled=ws.enabled, seed=cfg.run.seed, version=1)
    out = Path(ws.cache_dir) / key
    if not (out / "config.json").exists():
        if accelerator.is_main_process:
            corpus = _demo_corpus({**task_rows, "critic": critic_rows})
            base = Path(ws.cache_dir) / f"{key}-base"
            build_demo_policy(base, corpus, seed=cfg.run.seed, shape=shape)
            if ws.enabled:
                accelerator.print(f"warm start: SFT {ws.steps} steps on built-in tasks (cached in {out})")
                _, tok = load_policy(base)
                rows = _interleave([[r for r in rs if "completion" in r] for rs in task_rows.values()])[: ws.examples]
                rows += critic_rows  # the critic's reply format (balanced verdicts: format, not judgement)
                from rlk2.rollout import encode_prompts

                texts = [tok.decode(ids) for ids in encode_prompts(tok, [r["prompt"] for r in rows], chat_template=cfg.policy.chat_template)]
                from rlk2.distributed import run_alone

                run_alone(accelerator.num_processes, run_sft, base, out, rows, prompt_texts=texts, steps=ws.steps,
                          batch_size=ws.batch_size, lr=ws.lr, seed=cfg.run.seed)
            else:
                os.replace(base, out)
    else:
        accelerator.print(f"warm start: reusing {out}")
    accelerator.wait_for_everyone()  # on every rank, whichever branch it took (ranks may see the cache at different times)
    model, tok = load_policy(out, dtype=cfg.policy.dtype, attn_implementation=cfg.policy.attn_implementation)
    return model, tok, str(out)


def _interleave(lists: list[list]) -> list:
    """Round-robin over the lists, so every task is in the warm start however long the others are."""
    out = []
    for i in range(max(map(len, lists), default=0)):
        out += [rows[i] for rows in lists if i < len(rows)]
    return out


def _critic_refiner(cfg: Config, num_processes: int):
    """The closed-loop critic refiner when critic.refine is on (template and rubric files checked now), else None."""
    if not cfg.critic.refine:
        return None
    from rewards.rubric import RubricError
    from rlk2.critic_refine import CriticRefiner, check_refine_launch

    check_refine_launch(num_processes)
    c = cfg.critic
    try:
        return CriticRefiner(template=c.template, rubrics=c.rubrics, pairs_per_prompt=c.pairs_per_prompt,
                             max_pairs=c.max_pairs, max_new_tokens=c.max_new_tokens,
                             chat_template=cfg.policy.chat_template, unparsable_reward=c.unparsable_reward)
    except RubricError as exc:
        raise UserError(f"critic.template / critic.rubrics: {exc}") from None


def _critic_warm_start_key(cfg: Config) -> list:
    c = cfg.critic
    return [c.warm_start_examples, c.template, list(c.rubrics), critic_tasks(cfg), c.max_new_tokens] + (
        [c.warm_start_verdicts] if c.warm_start_verdicts != "both" else [])  # earlier caches keep their key


def _critic_warm_start_rows(cfg: Config, task_rows: dict) -> list[dict]:
    """critic.warm_start_examples critic-format rows from the grounding tasks' gold completions (rlk2.critic_refine)."""
    if not (cfg.critic.refine and cfg.critic.warm_start_examples):
        return []
    from rlk2.critic_refine import CriticRefiner, format_warmup_rows

    grounding = [r for name in critic_tasks(cfg) for r in task_rows.get(name, [])]
    fmt = CriticRefiner(template=cfg.critic.template, rubrics=cfg.critic.rubrics)
    return format_warmup_rows(grounding, n=cfg.critic.warm_start_examples, refiner=fmt, seed=cfg.run.seed,
                              verdicts=cfg.critic.warm_start_verdicts)


def _demo_corpus(task_rows: dict) -> list[str]:
    """Tokenizer training text: chat-rendered prompts and completions, separately (no merge across the seam)."""
    out = []
    for rows in task_rows.values():
        for r in rows:
            out.append(f"Q: {r['prompt']}\nA: ")
            if "completion" in r:
                out.append(r["completion"])
    return out


def _build_optimizer(cfg: Config, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.name == "muonclip":
        from rlk2.optim import MuonClip

        return MuonClip(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, qk_clip_tau=cfg.optim.qk_clip_tau)
    # torch's fused AdamW kernel (one pass per tensor instead of ~10 ops): 1.7 -> 0.4 ms per step on the demo
    # policy's 39 tensors on CPU; the same update to float rounding. Plain tensors on CPU/CUDA only (not DTensors).
    fused = all(type(p) is torch.nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=(0.9, 0.95),
                             fused=fused or None)


class _GracefulStop:
    """SIGINT/SIGTERM finish the current step, write a checkpoint and exit 0 (instead of dying mid-step)."""

    def __init__(self) -> None:
        import signal

        self.requested: str | None = None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, _frame) -> None:
        import signal

        if self.requested:  # a second signal: the user really wants out now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class MetricsFile:
    """Append-only metrics.jsonl; every row is flushed so a crash loses nothing already logged."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, row: dict) -> None:
        if self.enabled:
            try:
                with self.path.open("a") as fh:
                    fh.write(json.dumps(row, allow_nan=True) + "\n")
                    fh.flush()
            except OSError as exc:
                raise UserError(f"{self.path}: cannot append step {row.get('step')} ({exc.strerror or exc}); "
                                f"resume from the last checkpoint with: rlk2 train --resume {self.path.parent}") from None

    def read(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()] if self.path.exists() else []

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint we restart from (they will be re-done)."""
        if self.enabled and self.path.exists():
            rows = [r for r in self.read() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ================================================================================================ the loop
def train(cfg: Config, *, resume: bool = False) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed
    from tqdm.auto import tqdm

    from rewards.engine import RewardEngine, RewardSpec
    from rewards.format import budget_penalty
    from rlk2.algorithms import LOSSES, SCALE_ADVANTAGES, group_advantages, trained_rows
    from rlk2.checkpoint import latest_checkpoint, rng_state, save_checkpoint, set_rng_state
    from rlk2.controls import group_success, kept_sequences, load_ptx_rows, ptx_batch, ptx_loss, temperature_at
    from rlk2.critic import bind_policy, unbind_policy
    from rlk2.critic_refine import load_pairs, pair_advantages, pairs_from_records, save_pairs
    from rlk2.data import PromptSampler, check_columns, load_task_rows
    from rlk2.distributed import (any_rank, check_launch, cpu_only_launch, ddp_kwargs, gather_step, global_loss,
                                  local_groups, loss_scale, pad_to_global_width, sequence_seeds)
    from rlk2.evaluate import EvalTask, evaluate_policy
    from rlk2.moe import RouterControl
    from rlk2.rollout import SharedPrompts, concat_rollouts, encode_prompts, generate_rollouts, policy_logprobs

    # ------------------------------------------------------------------------------------ setup
    _quiet_libraries()
    run_dir = cfg.run_dir
    if not resume and run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.overwrite:
        raise UserError(f"run.dir {run_dir} exists and is not empty (use --resume {run_dir}, or run.overwrite=true)")
    accelerator = Accelerator(log_with=list(cfg.trainer.trackers) or None, project_dir=str(run_dir),
                              kwargs_handlers=ddp_kwargs(), cpu=cpu_only_launch())
    check_launch(distributed_type=accelerator.distributed_type, num_processes=accelerator.num_processes,
                 prompts_per_step=cfg.rollout.prompts_per_step, optimizer=cfg.optim.name, loss=cfg.algo.loss)
    refiner, grounding, heldout = _critic_refiner(cfg, accelerator.num_processes), critic_tasks(cfg), []
    accelerator.wait_for_everyone()  # every rank has checked run.dir before any rank writes to it
    if accelerator.num_processes > 1:
        accelerator.print(f"data parallel: {accelerator.num_processes} processes "
                          f"({accelerator.distributed_type.value})")
    set_seed(cfg.run.seed)
    cfg = _drop_tasks_without_sandbox(cfg, accelerator)
    engine = RewardEngine(num_workers=2)
    specs = {t.name: [RewardSpec(r.name, r.weight, r.timeout_s, dict(r.kwargs)) for r in t.rewards] for t in cfg.tasks}

    # Validate everything a user can get wrong before writing anything to the run directory.
    train_rows, eval_tasks = {}, []
    for i, task in enumerate(cfg.tasks):
        rows = load_task_rows(task.source, "train", eval_size=task.eval_size)
        held = load_task_rows(task.source, "eval", eval_size=task.eval_size)
        if not rows:
            raise UserError(f"tasks[{i}] ({task.source}): no training rows")
        columns = sorted({k for r in rows[:1] for k in r} - {"prompt", "completion"})
        engine.check_columns(specs[task.name], columns, where=f"task '{task.name}' ({task.source})")
        needed = sorted({c for s in specs[task.name] for c in _required(s.name)})
        check_columns(rows, needed, source=task.source)
        check_columns(held, needed, source=task.source)
        train_rows[task.name] = rows
        eval_tasks.append(
            EvalTask(task.name, [r["prompt"] for r in held], {c: [r.get(c) for r in held] for c in columns},
                     specs[task.name], task.max_new_tokens)
        )
    ptx_rows = load_ptx_rows(cfg.algo.ptx.source) if cfg.algo.ptx.weight > 0 else None
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"--resume {run_dir}: no complete checkpoint to resume from")
        from rlk2.policy import load_policy

        model, tokenizer = load_policy(ckpt, dtype=cfg.policy.dtype, attn_implementation=cfg.policy.attn_implementation)
        policy_source = str(ckpt)
    else:
        model, tokenizer, policy_source = _prepare_policy(cfg, train_rows, accelerator)
    # MoE router health and replay (rlk2.moe); every call below is a no-op for a dense policy.
    moe = RouterControl(model, router_replay=cfg.moe.router_replay, bias_update_rate=cfg.moe.bias_update_rate,
                        aux_loss_coef=cfg.moe.aux_loss_coef, reduce=lambda t: accelerator.reduce(t, "sum"))
    if cfg.policy.chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"policy.chat_template=true but the tokenizer of {policy_source} has no chat template; "
                        "set policy.chat_template=false to use prompts as plain text, or add one to its tokenizer_config.json")

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "rollouts").mkdir(exist_ok=True)
    metrics_file = MetricsFile(run_dir / "metrics.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process and not resume:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        (run_dir / "env.json").write_text(json.dumps({**_env_info(), "policy_source": policy_source,
                                                       "processes": accelerator.num_processes}, indent=2))

    if cfg.policy.lora.enabled and ckpt is None:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        lora = cfg.policy.lora
        model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
    model.train()
    optimizer = _build_optimizer(cfg, model)
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    sampler = PromptSampler(train_rows, {t.name: t.weight for t in cfg.tasks}, seed=cfg.run.seed,
                            sampling=cfg.rollout.sampling, priority_floor=cfg.rollout.priority_floor)
    ptx_sampler = PromptSampler({"ptx": ptx_rows}, {"ptx": 1.0}, seed=cfg.run.seed + 1) if ptx_rows else None
    # The `self` critic of the rubric reward is the live policy: the unwrapped module is the very object the
    # optimizer updates in place, so one binding sees every update.
    bind_policy(accelerator.unwrap_model(model), tokenizer, chat_template=cfg.policy.chat_template)
    rubric_tasks = {t.name for t in cfg.tasks if any(_metric_name(r.name) == "rubric" for r in t.rewards)}
    tasks_by_name = {t.name: t for t in cfg.tasks}
    loss_fn = LOSSES[cfg.algo.loss]
    scale_adv = SCALE_ADVANTAGES[cfg.algo.loss]
    K = cfg.rollout.group_size
    start_step = 0

    if ckpt is not None:
        # The weights came from the checkpoint itself; restore the rest of the trainer's state.
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if ptx_sampler is not None and "ptx_sampler" in state:
            ptx_sampler.load_state_dict(state["ptx_sampler"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        metrics_file.truncate_after(start_step)
        accelerator.print(f"resumed from {ckpt} at step {start_step}")

    eval_samples: dict[int, dict] = {}  # step -> per-task sample records (held-out critic pairs come from step 0)

    def run_eval(step: int) -> dict:
        if not accelerator.is_main_process:  # replicas are identical: the main process evaluates, the rest wait
            accelerator.wait_for_everyone()
            return {}
        t0 = time.perf_counter()
        res = evaluate_policy(
            accelerator.unwrap_model(model), tokenizer, eval_tasks, engine,
            samples=cfg.eval.samples, temperature=cfg.eval.temperature, greedy=cfg.eval.greedy,
            batch_size=cfg.eval.batch_size, chat_template=cfg.policy.chat_template, seed=cfg.run.seed + 7919,
            ks=sorted({1, cfg.eval.samples}),
        )
        eval_samples[step] = res.samples
        row = {"step": step, **res.metrics, "time/eval": time.perf_counter() - t0}
        metrics_file.write(row)
        if cfg.trainer.trackers:
            accelerator.log(res.metrics, step=step)
        accelerator.wait_for_everyone()
        return res.metrics

    def checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "sampler": sampler.state_dict(), "rng": rng_state(), "config": to_yaml(cfg)}
            if ptx_sampler is not None:
                state["ptx_sampler"] = ptx_sampler.state_dict()
            try:
                save_checkpoint(run_dir, step, accelerator.unwrap_model(model), tokenizer, state,
                                keep_last=cfg.trainer.keep_last)
            except OSError as exc:  # disk full, quota, permissions: the partial copy is gone, older ones intact
                prev = latest_checkpoint(run_dir)
                kept = f"the last complete checkpoint is {prev}" if prev else "no earlier checkpoint exists"
                raise UserError(f"checkpoint at step {step} could not be written ({exc.strerror or exc}); {kept}; "
                                f"free space and resume with: rlk2 train --resume {run_dir}") from None
        accelerator.wait_for_everyone()

    if cfg.trainer.trackers:
        accelerator.init_trackers(cfg.run.name, config={"run": cfg.run.name})
    before = run_eval(0) if start_step == 0 else {}

    def critic_agreement() -> dict:
        """critic/agreement on the held-out verified pairs (greedy, both orders), with its time."""
        t0 = time.perf_counter()
        res = refiner.agreement(accelerator.unwrap_model(model), tokenizer, heldout) if heldout else {
            "critic/agreement": float("nan"), "critic/heldout_pairs": 0.0}
        return {**res, "time/critic_agreement": time.perf_counter() - t0}

    if refiner is not None:  # held-out verified pairs: from the step-0 evaluation samples, kept in the run dir
        heldout_file = run_dir / "critic_heldout.jsonl"
        if start_step == 0:  # (an overwritten run's old file is replaced)
            records = [r for name in grounding for r in eval_samples[0].get(name, [])]
            heldout = pairs_from_records(records, n_pairs=cfg.critic.heldout_pairs, seed=cfg.run.seed)
            save_pairs(heldout_file, heldout)
        elif heldout_file.exists():  # resumed: the same pairs as before the interruption
            heldout = load_pairs(heldout_file)
        if not heldout:
            accelerator.print("warning: critic.refine: no held-out verified pairs (no evaluation prompt of "
                              f"{', '.join(grounding)} had both a passed and a failed sample; raise eval.samples or "
                              "eval_size); critic/agreement is logged as NaN")
        if start_step == 0:
            crit0 = critic_agreement()
            metrics_file.write({"step": 0, **crit0})
            accelerator.print(f"critic/agreement at step 0: {crit0['critic/agreement']:.3f} "
                              f"on {len(heldout)} held-out pairs")

    # A task whose rewards all run in the worker processes is scored while the next task generates; one with a
    # caller-run reward (the rubric critic uses the policy itself) is scored after generation, in this process.
    overlap = {name: engine.runs_apart(task_specs) for name, task_specs in specs.items()}
    # ... and if every one of them scores samples one by one, each response is scored as soon as it ends.
    streamed = {name: overlap[name] and engine.elementwise(task_specs) for name, task_specs in specs.items()}

    # ------------------------------------------------------------------------------------ steps
    bar = tqdm(range(start_step + 1, cfg.trainer.steps + 1), desc="rl", disable=not accelerator.is_main_process,
               dynamic_ncols=True, initial=start_step, total=cfg.trainer.steps)
    history: list[dict] = []
    bad_in_a_row = bad_total = 0
    stop = _GracefulStop()
    for step in bar:
        step_seed = cfg.run.seed * 1_000_003 + step
        # K2 temperature decay: this step samples AND computes training log-probs at this temperature.
        temperature = temperature_at(step, start=cfg.rollout.temperature, end=cfg.rollout.temperature_end,
                                     decay_steps=cfg.rollout.temperature_decay_steps or cfg.trainer.steps - 1,
                                     schedule=cfg.rollout.temperature_schedule)
        # ---------------------------------------------------------------- rollout
        t0 = time.perf_counter()
        # This rank's whole groups of the global batch; `first` is the global index of its first group.
        picked, first = local_groups(sampler.sample(cfg.rollout.prompts_per_step, step), list(tasks_by_name),
                                     rank=accelerator.process_index, world=accelerator.num_processes)
        parts, rows_in_order, task_of_group = [], [], []
        scoring: dict[str, concurrent.futures.Future] = {}  # task -> its scores, computed while later tasks generate
        unwrapped = accelerator.unwrap_model(model)
        for name in tasks_by_name:
            group_rows = [row for t, row in picked if t == name]
            if not group_rows:
                continue
            ids = encode_prompts(tokenizer, [r["prompt"] for r in group_rows], chat_template=cfg.policy.chat_template)
            # Elementwise worker rewards score each response as soon as it ends, while the rest still generate.
            stream = engine.stream(specs[name], *_reward_inputs(group_rows, K)) if streamed[name] else None
            parts.append(generate_rollouts(
                unwrapped, tokenizer, [i for i in ids for _ in range(K)],
                max_new_tokens=tasks_by_name[name].max_new_tokens, temperature=temperature,
                top_p=cfg.rollout.top_p, record_routing=moe.enabled,
                seeds=sequence_seeds(step_seed, first + len(rows_in_order), len(group_rows), K),
                on_finished=None if stream is None else _scorer_of_finished(stream, tokenizer),
            ))
            if stream is not None:
                scoring[name] = stream.finish(parts[-1].texts)
            elif overlap[name]:  # the worker processes score this task while this process generates the next
                scoring[name] = engine.submit(specs[name], parts[-1].texts, *_reward_inputs(group_rows, K))
            rows_in_order += group_rows
            task_of_group += [name] * len(group_rows)
        ro = concat_rollouts(parts, tokenizer.pad_token_id).to(accelerator.device)
        ro = pad_to_global_width(accelerator, ro, tokenizer.pad_token_id)
        t_rollout = time.perf_counter() - t0

        # ---------------------------------------------------------------- score
        t0 = time.perf_counter()
        totals: list[float | None] = []
        per_reward: dict[str, list] = {}
        errors: dict[str, int] = {}
        sample_extras: list[dict] = []  # per sample: reward extras, e.g. the rubric critic's judgments and reasons
        rubric_stats: list[dict] = []
        t_rubric = 0.0  # scoring time of tasks with a rubric reward: the critic judging the policy's responses
        offset = 0
        for name in tasks_by_name:
            idx = [g for g, t in enumerate(task_of_group) if t == name]
            if not idx:
                continue
            n = len(idx) * K
            t_task = time.perf_counter()
            scored = scoring.pop(name).result() if name in scoring else engine.score(
                specs[name], ro.texts[offset : offset + n], *_reward_inputs([rows_in_order[g] for g in idx], K))
            if name in rubric_tasks:
                t_rubric += time.perf_counter() - t_task
            task = tasks_by_name[name]
            ntok = ro.num_tokens[offset : offset + n].tolist()
            trunc = ro.truncated[offset : offset + n].tolist()
            penalty = budget_penalty(ntok, trunc, budget=task.max_new_tokens, penalty=task.overlong_penalty)
            totals += [None if r is None else r + p for r, p in zip(scored.total, penalty)]
            for rname, vals in scored.rewards.items():
                # A reward another task lacks is None (not scored) on that task's rows: lists stay aligned.
                per_reward.setdefault(_metric_name(rname), [None] * offset).extend(vals)
            for vals in per_reward.values():
                vals.extend([None] * (offset + n - len(vals)))
            sample_extras += [{k: _shift_pair_index(v[i], offset) for k, v in scored.extras.items() if v[i] is not None}
                              for i in range(n)]
            if "rubric/judgments" in scored.extras:
                from rewards.rubric import summarize

                rubric_stats.append(summarize([j or [] for j in scored.extras["rubric/judgments"]]))
            for rname, cnt in scored.errors.items():
                errors[_metric_name(rname)] = errors.get(_metric_name(rname), 0) + cnt
            for msg in scored.messages[:3]:
                accelerator.print(f"step {step}: reward error: {msg}")
            offset += n
        t_reward = time.perf_counter() - t0
        n_unscorable = sum(r is None for r in totals)
        if n_unscorable:  # loud on purpose: a sandbox or verifier outage must not pass silently
            counts = ", ".join(f"{k}: {v} errors" for k, v in errors.items() if v)
            accelerator.print(f"warning: step {step}: {n_unscorable}/{len(totals)} responses unscorable "
                              f"({counts or 'returned None by their reward'}); they carry no loss")
        # Success counts for prioritized sampling; every rank records every group so the samplers stay identical.
        outcomes = [(t, sampler.index_of(t, r), succ, n) for t, r, (succ, n) in
                    zip(task_of_group, rows_in_order, group_success(totals, K, threshold=cfg.rollout.success_threshold))]
        for t, i, succ, n in (gather_object(outcomes) if accelerator.num_processes > 1 else outcomes):
            sampler.record(t, i, succ, n)

        # ---------------------------------------------------------------- critic (closed-loop refinement)
        t0 = time.perf_counter()
        n_policy = len(totals)  # the policy's own samples come first in the batch, critic samples after them
        critic_batch = None
        if refiner is not None:
            groups = [g for g, t in enumerate(task_of_group) if t in grounding]
            flat = [g * K + k for g in groups for k in range(K)]
            critic_batch = refiner.samples(
                unwrapped, tokenizer, [rows_in_order[g]["prompt"] for g in groups for _ in range(K)],
                [ro.texts[j] for j in flat], [totals[j] for j in flat], group_size=K,
                temperature=temperature, seed=step_seed + 7919, record_routing=moe.enabled)
            if critic_batch is not None:  # K verdicts per critic prompt: ordinary groups for the advantage
                ro = concat_rollouts([ro, critic_batch.rollout.to(accelerator.device)], tokenizer.pad_token_id)
                totals = totals + critic_batch.rewards
        t_critic = time.perf_counter() - t0

        # ---------------------------------------------------------------- advantage
        P = len(totals) // K
        valid = torch.tensor([r is not None for r in totals]).view(P, K)
        rewards = torch.tensor([r if r is not None else 0.0 for r in totals], dtype=torch.float32).view(P, K)
        adv, zero_std = group_advantages(rewards, valid, scale=scale_adv)
        if critic_batch is not None and cfg.critic.pair_baseline:  # both orders of a pair share one baseline
            c0 = n_policy // K
            adv[c0:], zero_std[c0:] = pair_advantages(rewards[c0:], valid[c0:], scale=scale_adv)
        adv = adv.view(-1).to(accelerator.device)
        # Unscorable responses (reward None) carry no loss at all: nothing is learned from a sandbox outage.
        mask = ro.completion_mask.float() * valid.view(-1, 1).to(ro.completion_mask.device)
        masked_tasks = {name for name, t in tasks_by_name.items() if t.mask_truncated}
        if masked_tasks:  # [B]: truncated responses of those tasks carry no loss
            drop = torch.tensor([j < n_policy and task_of_group[j // K] in masked_tasks for j in range(len(totals))],
                                device=mask.device)
            mask = mask * (~(drop & ro.truncated)).float().unsqueeze(1)
        # Dynamic filtering: groups whose rewards all tie leave the loss. The forward still covers the whole batch
        # (the same shapes on every process, router replay on the recorded rollout); only the loss is cut.
        keep = kept_sequences(zero_std, K).to(accelerator.device) if cfg.algo.filter_zero_std else None  # [B']
        train_adv, train_mask = (adv, mask) if keep is None else (adv[keep], mask[keep])
        has_rl = any_rank(accelerator, len(train_adv) > 0)
        ptx = None
        if ptx_sampler is not None:
            ptx_rows_now = [row for _, row in ptx_sampler.sample(cfg.algo.ptx.batch_size, step)]
            ptx = ptx_batch(tokenizer, ptx_rows_now, chat_template=cfg.policy.chat_template).to(accelerator.device)

        # ---------------------------------------------------------------- update
        t0 = time.perf_counter()
        hp = {"tau": cfg.algo.tau, "length_norm": cfg.algo.length_norm,
              "clip_low": cfg.algo.clip_low, "clip_high": cfg.algo.clip_high}
        skipped = 0
        moe_row: dict = {}
        scale = loss_scale(accelerator, cfg.algo.loss, train_mask)  # 1.0 on one process (see rlk2.distributed)
        loss, loss_metrics, grad_norm = torch.zeros(()), {}, torch.tensor(0.0)
        entropy = ro.entropy if ro.entropy is not None else torch.full_like(mask, math.nan)  # from the sampling loop
        # The training forward covers only the sequences that can move the weights (a tied group's have advantage
        # 0 and add nothing): the others keep log-prob = old log-prob, so loss and gradient are the whole batch's.
        rows = trained_rows(adv, mask, loss=cfg.algo.loss, inner_steps=cfg.algo.inner_steps)
        if rows is not None and (moe.needs_every_sequence(ro) or len(rows) == len(adv)):
            rows = None
        elif rows is not None and len(rows) == 0:  # nothing moves the weights here: one sequence keeps DDP in step
            rows = torch.zeros(1, dtype=torch.long, device=adv.device)
        sub = ro if rows is None else ro.select(rows)
        if sub.prompt_ids.shape[1] + sub.completion_ids.shape[1] < 16 and sub.prompt_ids.device.type == "cpu":
            # torch's CPU softmax takes a scalar path on rows shorter than 16 (~12x slower per element): sequences
            # this short get left padding up to 16 positions, which costs less than the slow path (~5 % of the
            # training pass on the demo, measured). Padding changes no log-prob: it is masked and has no position.
            sub = sub.pad_prompts(16 - sub.completion_ids.shape[1], tokenizer.pad_token_id)
        whole = ro if rows is not None and moe.loads_from_record(ro) else None
        # A group's K sequences share their prompt: the training forward runs each distinct prompt once
        # (rlk2.rollout.SharedPrompts; same log-probs and gradient) when that saves enough tokens. Two forward calls
        # per backward: one process only, since DDP expects one forward per backward.
        shared = None
        if accelerator.num_processes == 1 and cfg.trainer.shared_prompt_tokens >= 0:
            shared = SharedPrompts.of(sub)
            if shared is not None and shared.saved_tokens(sub) < cfg.trainer.shared_prompt_tokens:
                shared = None
        plain_grads = accelerator.scaler is None and accelerator.distributed_type in (
            DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)  # whole, unscaled, all-reduced
        # Nothing to train on (every group filtered out, no PTX): no update at all, not even optimizer momentum.
        for _ in range(cfg.algo.inner_steps if has_rl or ptx is not None else 0):
            with moe.training_forward(sub, whole=whole, shared=shared) as routed:  # replays the recorded experts
                logp, _ = policy_logprobs(model, sub, temperature=temperature, shared=shared)
            if rows is not None:  # [B, T]: computed rows in place, the old log-probs elsewhere
                logp = ro.old_logp.index_put((rows.unsqueeze(1), torch.arange(logp.shape[1], device=logp.device)),
                                             logp)
            if len(train_adv):
                kept_logp, kept_old = (logp, ro.old_logp) if keep is None else (logp[keep], ro.old_logp[keep])
                loss, loss_metrics = loss_fn(kept_logp, kept_old, train_adv, train_mask, **hp)
            else:  # no group kept on this process (others may have some): a zero loss, DDP still gets a backward
                loss, loss_metrics = logp.sum() * 0.0, {}
            loss = loss + routed.aux_loss
            moe_row = moe_row or routed.metrics()  # routing of the step's first forward (pi_old's weights)
            total = loss * scale if scale != 1.0 else loss
            if ptx is not None:  # the same PTX batch on every process: DDP's average is the one-process gradient
                lm = ptx_loss(model, ptx)
                total = total + cfg.algo.ptx.weight * lm
            accelerator.backward(total)
            if accelerator.num_processes > 1 and has_rl:  # log (and judge finiteness by) the global batch's loss
                loss, loss_metrics = global_loss(accelerator, loss_fn, logp, ro.old_logp, adv, mask, hp, rows=keep)
            if ptx is not None:
                loss_metrics = {**loss_metrics, "loss/policy": float(loss.detach()), "loss/ptx": float(lm.detach())}
                loss = loss.detach() + cfg.algo.ptx.weight * lm.detach()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                # A NaN/inf loss or gradient would poison the weights and the optimizer state: skip the update.
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            if cfg.optim.grad_clip > 0:
                if plain_grads:  # the norm just computed is the one to clip by: no second pass over the gradients
                    torch.nn.utils.clip_grads_with_norm_(grads, cfg.optim.grad_clip, grad_norm)
                else:  # sharded or loss-scaled gradients: accelerate knows how to reduce and unscale them
                    accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            moe.update_bias(routed)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        bad_total += 1 if skipped else 0
        if bad_in_a_row >= cfg.trainer.max_bad_steps:
            raise UserError(
                f"step {step}: loss or gradient not finite for {bad_in_a_row} steps in a row "
                f"(trainer.max_bad_steps={cfg.trainer.max_bad_steps}); lower optim.lr or check the rewards"
            )
        t_update = time.perf_counter() - t0

        # ---------------------------------------------------------------- log
        if accelerator.num_processes > 1:  # from here on every name holds the global batch, as on one process
            ro, entropy, mask, adv, zero_std, totals, per_reward, errors, rows_in_order, task_of_group = gather_step(
                accelerator, ro=ro, entropy=entropy, mask=mask, adv=adv, zero_std=zero_std, totals=totals,
                per_reward=per_reward, errors=errors, rows=rows_in_order, task_of_group=task_of_group)
        n_samples = len(totals)
        # Policy metrics describe the policy's own samples; critic samples (after n_policy) get critic/* below.
        pol = n_policy if critic_batch is not None else n_samples
        good = [r for r in totals[:pol] if r is not None]
        ntokens = int(ro.completion_mask.sum())
        row = {
            "step": step,
            "loss": float(loss.detach()),
            "reward/mean": sum(good) / len(good) if good else float("nan"),
            "frac_reward_zero_std": float(zero_std[: pol // K].float().mean()),
            "frac_unscorable": 1.0 - len(good) / pol,
            "entropy": float((entropy[:pol] * mask[:pol]).sum() / mask[:pol].sum().clamp(min=1)),
            "completion/mean_length": float(ro.num_tokens[:pol].float().mean()),
            "completion/clipped_ratio": float(ro.truncated[:pol].float().mean()),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "skipped_steps": bad_total,
            "rollout/temperature": temperature,
            "groups/kept": int((~zero_std).sum()) if cfg.algo.filter_zero_std else len(zero_std),
            **loss_metrics,
            **moe_row,
            "time/rollout": t_rollout,
            "time/reward": t_reward,
            "time/update": t_update,
            "throughput/samples_per_s": n_samples / (t_rollout + t_reward + t_critic + t_update),
            "throughput/tokens_per_s": ntokens / (t_rollout + t_reward + t_critic + t_update),
        }
        if refiner is not None:
            if critic_batch is not None:
                row.update(critic_batch.metrics)
                row["critic/batch_share"] = (n_samples - n_policy) / n_samples  # of the update's sequences
                row["critic/frac_reward_zero_std"] = float(zero_std[n_policy // K :].float().mean())
            if step % cfg.critic.agreement_every == 0 or step == cfg.trainer.steps:
                crit = critic_agreement()
                t_critic += crit["time/critic_agreement"]
                row.update(crit)
        if refiner is not None or rubric_tasks:
            # Every critic generation of the step: refinement samples + held-out agreement (time/critic, in no
            # other time/*) and the rubric reward's judgments (inside time/reward).
            row["time/critic"] = t_critic
            row["time/critic_share"] = (t_critic + t_rubric) / (t_rollout + t_reward + t_critic + t_update)
        if rubric_stats:  # summed over tasks; consistency weighted by the pairs judged in both orders
            both = sum(r["pairs_both_orders"] for r in rubric_stats)
            row["rewards/rubric/verdicts"] = sum(r["verdicts"] for r in rubric_stats)
            row["rewards/rubric/unparsable"] = sum(r["unparsable"] for r in rubric_stats)
            row["rewards/rubric/position_consistency"] = (sum(
                r["position_consistency"] * r["pairs_both_orders"] for r in rubric_stats if r["pairs_both_orders"])
                / both if both else float("nan"))
        for rname, vals in per_reward.items():
            vs = [v for v in vals if v is not None]
            mean = sum(vs) / len(vs) if vs else float("nan")
            row[f"rewards/{rname}/mean"] = mean
            row[f"rewards/{rname}/std"] = math.sqrt(sum((v - mean) ** 2 for v in vs) / len(vs)) if vs else float("nan")
            row[f"rewards/{rname}/errors"] = errors.get(rname, 0)
        opt_metrics = getattr(getattr(optimizer, "optimizer", optimizer), "metrics", None)
        if callable(opt_metrics):
            row.update(opt_metrics())
        metrics_file.write(row)
        history.append(row)
        if cfg.trainer.trackers:
            accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if step % cfg.trainer.log_every == 0:
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}", loss=f"{row['loss']:.4f}",
                            sps=f"{row['throughput/samples_per_s']:.0f}")
        if cfg.trainer.save_rollouts and accelerator.is_main_process:
            with (run_dir / "rollouts" / f"step-{step}.jsonl").open("w") as fh:
                for j, text in enumerate(ro.texts):
                    if j >= pol:  # critic-role samples: prompt, reply, verdict, reason, expected verdict, reward
                        fh.write(json.dumps({**critic_batch.records[j - pol], "advantage": float(adv[j])}) + "\n")
                        continue
                    src = rows_in_order[j // K]
                    rec = {"task": task_of_group[j // K], "prompt": src["prompt"], "completion": text,
                           "reward": totals[j], "advantage": float(adv[j]), "truncated": bool(ro.truncated[j]),
                           "rewards": {k: v[j] for k, v in per_reward.items()}}
                    if accelerator.num_processes == 1 and sample_extras[j]:  # e.g. rubric verdicts and reasons
                        rec["extras"] = sample_extras[j]
                    fh.write(json.dumps(rec) + "\n")

        # ---------------------------------------------------------------- eval / checkpoint
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
            run_eval(step)
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step != cfg.trainer.steps:
            checkpoint(step)
        if any_rank(accelerator, bool(stop.requested)) and step != cfg.trainer.steps:
            checkpoint(step)
            stop.restore()
            engine.close()
            unbind_policy()
            accelerator.print(f"stopped by {stop.requested} after step {step}; resume with: rlk2 train --resume {run_dir}")
            return {"before": before, "after": {}, "run_dir": str(run_dir), "stopped_at": step}
    stop.restore()

    # ------------------------------------------------------------------------------------ finish
    after = run_eval(cfg.trainer.steps)
    checkpoint(cfg.trainer.steps)
    engine.close()
    unbind_policy()
    if cfg.trainer.trackers:
        accelerator.end_training()
    if accelerator.is_main_process:
        from rlk2.report import write_run_report

        if not before:
            before = next((r for r in metrics_file.read() if r.get("step") == 0 and any(k.startswith("eval/") for k in r)), {})
        table = write_run_report(run_dir, metrics_file.read(), before, after)
        print(table)
        print(f"run directory: {run_dir}")
    return {"before": before, "after": after, "run_dir": str(run_dir)}


def _drop_tasks_without_sandbox(cfg: Config, accelerator) -> Config:
    """Tasks scored by the `code` reward need a sandbox backend. Without one, a built-in task (the demo's) is left
    out with a one-line note; a user's task is an error naming it (never a run whose code rewards are all None)."""
    import dataclasses

    from rewards import resolve_reward
    from rewards.code import code

    problem: str | None = None
    checked = False
    kept = []
    for i, task in enumerate(cfg.tasks):
        if any(resolve_reward(r.name) is code for r in task.rewards):
            if not checked:
                problem, checked = _sandbox_problem(), True
            if problem and task.source.startswith("builtin:"):
                accelerator.print(f"note: no sandbox backend works here ({problem}); the '{task.name}' code task is "
                                  "left out (see `rlk2 sandbox doctor`)")
                continue
            if problem:
                raise UserError(f"tasks[{i}] ({task.name}): the code reward needs a sandbox and none works here "
                                f"({problem}); see `rlk2 sandbox doctor`")
        kept.append(task)
    if not kept:
        raise UserError("tasks: no task left to train (every task needs a sandbox, and none works here)")
    return cfg if len(kept) == len(cfg.tasks) else dataclasses.replace(cfg, tasks=kept)


def _sandbox_problem() -> str | None:
    """None when the sandbox backend the code reward would open works here, else why not (one line)."""
    from sandboxes import SandboxError, choose_backend, probe

    try:
        name = choose_backend()
    except SandboxError as exc:
        return " ".join(str(exc).split())
    problem = probe()[name]
    return f"{name}: {' '.join(problem.split())}" if problem else None


def _shift_pair_index(extra, offset: int):
    """The rubric reward's judgments name the other response by its index in the task's block (`vs`); in the
    rollouts file that is line `offset + vs`."""
    if isinstance(extra, list) and all(isinstance(j, dict) and "vs" in j for j in extra):
        return [{**j, "vs": j["vs"] + offset} for j in extra]
    return extra


def _scorer_of_finished(stream, tokenizer):
    """generate_rollouts' `on_finished`: decode the responses that just ended, as the Rollout's texts are decoded,
    and hand them to the reward stream (rewards.engine.ScoreStream)."""
    def score(rows: list[int], token_ids: list[list[int]]) -> None:
        stream.add(rows, tokenizer.batch_decode(token_ids, skip_special_tokens=True))

    return score


def _reward_inputs(group_rows: list[dict], K: int) -> tuple[list[str], dict[str, list]]:
    """The prompts and dataset columns (answer, tests, ...) of K samples per row, as the reward engine takes them."""
    rows = [r for r in group_rows for _ in range(K)]
    columns = {c: [r.get(c) for r in rows] for c in rows[0] if c not in ("prompt", "completion")}
    return [r["prompt"] for r in rows], columns


def _metric_name(reward_name: str) -> str:
    """`rewards/<name>/...` uses the function's own name for `pkg.module:fn` and `path/file.py:fn` rewards."""
    return reward_name.rsplit(":", 1)[-1]


def _required(reward_name: str) -> list[str]:
    from rewards import required_columns, resolve_reward

    return required_columns(resolve_reward(reward_name))
