"""`rlk2 train`: the K2-style RL loop, top to bottom.

Algorithm (one optimizer step):
  1. `generate`: sample `prompts_per_step` prompts (tasks mixed by weight) and K = `group_size` responses each from
     the current policy pi_old, recording the sampled tokens' log-probs (rlk2.rollout, the one generation seam);
  2. `score`: score every response with its task's rewards (rewards.engine: concurrent, process-level timeouts,
     unscorable = None; overlapping generation where the rewards run apart); a response that hits its task's token
     budget gets the task's overlong penalty;
  3. `refine_critic` (with `critic.refine`, rlk2.critic): the policy, prompted as critic, judges pairs of this step's
     responses whose verifiable rewards differ; agreement with the verifier is the reward of those critic samples,
     which join the same update as more groups;
  4. `advantages`: group-relative advantages r - mean(r) over the K responses of a prompt (std-scaled for the GRPO
     family), unscorable responses left out of the baseline with advantage 0;
  5. `update`: the policy loss (`algo.loss`, default `k2`: the squared mirror-descent objective of Kimi k1.5 / K2),
     `inner_steps` optimizer steps on the batch (AdamW or MuonClip), QK-Clip inside MuonClip's step;
  6. `log`: metrics.jsonl, trackers, progress bar, rollouts file; then evaluation every `eval.every` steps and
     checkpoints (`periodic`).
`setup` builds the run once; each phase is one function reading the `Run` and filling the step's `Batch`.
K2 training controls (rlk2.controls; all off by default): a decaying sampling temperature (used for sampling and
for the training log-probs alike), prioritized prompt sampling by tracked success rate, dropping groups whose
rewards all tie from the loss, and the PTX loss on curated (prompt, completion) data added with a weight.

Deliberate simplifications: the KL-to-reference term is not implemented (off by default in DESIGN.md).
Multi-process runs split the prompt groups across ranks and reproduce the one-process run (rlk2.distributed), with
replicated (DDP) or FSDP2-sharded parameters (rlk2.sharding); DeepSpeed launches are refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, LoggerType, gather_object, set_seed
from datasets.utils.logging import disable_progress_bar as datasets_no_progress_bar
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from tqdm.auto import tqdm

from rewards import RewardEngine, budget_penalty
from rewards.rubric import summarize as summarize_judgments
from rlk2.algorithms import LOSSES, SCALE_ADVANTAGES, group_advantages, trained_rows
from rlk2.config import Config, load_config, to_yaml
from rlk2.controls import group_success, kept_sequences, load_ptx_rows, ptx_batch, ptx_loss, temperature_at
from rlk2.critic import ClosedLoop, CriticSamples, PolicyCritic, pair_advantages
from rlk2.data import PromptSampler
from rlk2.distributed import (
    any_rank,
    check_launch,
    cpu_only_launch,
    ddp_kwargs,
    gather_step,
    global_loss,
    local_groups,
    loss_scale,
    pad_to_global_width,
    sequence_seeds,
)
from rlk2.envs import (
    Episode,
    PausedGroups,
    SampledTurns,
    ToolRunner,
    as_rollout,
    end_episodes,
    episode_stats,
    play,
    stale_mask,
    start_episodes,
    unscorable,
)
from rlk2.errors import UserError
from rlk2.eval.evaluate import Split, evaluate_policy
from rlk2.hardware import keep_in_float32, training_autocast_dtype
from rlk2.moe import RouterControl
from rlk2.optim import build_optimizer
from rlk2.policy import load_policy
from rlk2.policy.warmstart import prepare_policy
from rlk2.qat import quantize_weights
from rlk2.rollout import (
    Rollout,
    SharedPrompts,
    concat_rollouts,
    context_limit,
    encode_prompts,
    generate_rollouts,
    policy_logprobs,
)
from rlk2.rollout.server import EngineUnavailable, RolloutServer
from rlk2.run_dir import AlreadyFinished, RunDir, check_resume, env_info
from rlk2.sharding import (
    clip_grads,
    drop_unused_grads,
    fsdp_plugin,
    full_state_dict,
    grad_norm,
    shard_policy,
    whole_weights,
)
from rlk2.signals import GracefulStop, interruption_point
from rlk2.tasks import Task, bind_critic, check_prompt_lengths, load_tasks, metric_name, reward_inputs


# ================================================================================================ CLI
def run(args: argparse.Namespace) -> int:
    """`rlk2 train [CONFIG] [key=value ...] [--resume RUN_DIR]` (arguments: rlk2.cli)."""
    config_path, overrides = args.config, list(args.overrides)
    if config_path and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        overrides.insert(0, config_path)  # `rlk2 train a.b=1` : no config file given, only overrides
        config_path = None
    resume = Path(args.resume) if args.resume else None
    if resume is not None:
        if not RunDir(resume).is_run():
            raise UserError(f"--resume {resume}: not an rlk2 run directory (no config.yaml / metrics.jsonl)")
        config_path = config_path or str(resume / "config.yaml")
        overrides.append(f"run.dir={resume}")
    cfg = load_config(config_path, overrides)
    train(cfg, resume=resume is not None)
    return 0


# ================================================================================================ state
@dataclass
class Run:
    """Everything `setup` builds, read by every phase."""

    cfg: Config
    accelerator: Accelerator
    run_dir: RunDir
    model: torch.nn.Module
    """As Accelerate prepared it (a DDP wrapper on several processes); `policy` is the module itself."""
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: RewardEngine
    tasks: list[Task]
    sampler: PromptSampler
    ptx_sampler: PromptSampler | None
    moe: RouterControl
    critic: ClosedLoop | None
    start_step: int
    on_step: Callable[[int, dict], None] | None = None
    """`on_step(step, row)`: called with (the start step, {}) when the steps begin (after the step-0 evaluation),
    then after each step with its metrics row. A plain seam for timing and tests."""
    stop: GracefulStop | None = None
    bar: tqdm | None = None
    done_step: int | None = 0
    """The last step whose update and log finished (the weights are that step's); None while an update runs."""
    step_start: _Snapshot | None = None
    bad_in_a_row: int = 0
    bad_total: int = 0
    eval_records: dict[int, dict] = field(default_factory=dict)
    """step -> per-task evaluation sample records (the critic's held-out pairs come from step 0)."""
    paused: PausedGroups = field(default_factory=PausedGroups)
    """Partial rollouts: the groups paused at the end of the last step (saved with the prompt samplers)."""
    tool_runners: dict[str, ToolRunner] = field(default_factory=dict)
    """task -> the runner of its episodes' tool calls (environment tasks), made on first use."""
    rollout_server: RolloutServer | None = None
    """rollout.engine=server: the inference server that samples the rollouts (rlk2.rollout.server)."""
    sharded: bool = False
    """FSDP2: each rank holds a slice of every parameter (rlk2.sharding)."""
    autocast: torch.dtype | None = None
    """trainer.mixed_precision, resolved: the training forward's autocast dtype (None: float32)."""

    def training_precision(self):
        """The context the training forward runs in (its backward runs outside, as autocast wants). Without autocast's
        cache of bfloat16 weight copies: same numbers and speed, and on SmolLM2's recipe (3 steps, gradient
        checkpointing) peak memory 5.9 GB instead of 8.0 GB (float32: 6.9 GB)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.accelerator.device.type, dtype=self.autocast, cache_enabled=False)

    def tool_runner(self, task: Task) -> ToolRunner:
        if task.name not in self.tool_runners:
            self.tool_runners[task.name] = ToolRunner(task.cfg.tool_timeout_s)
        return self.tool_runners[task.name]

    @property
    def policy(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def k(self) -> int:
        return self.cfg.rollout.group_size


@dataclass
class Batch:
    """One step's batch, filled phase by phase. B sequences: the policy's own (the first `n_policy`, K per group,
    grouped by task) and then the critic's."""

    step: int
    seed: int
    temperature: float
    ro: Rollout | None = None
    rows: list[dict] = field(default_factory=list)
    """The dataset row of each group."""
    task_of_group: list[str] = field(default_factory=list)
    scoring: dict[str, concurrent.futures.Future] = field(default_factory=dict)
    """task -> its ScoreBatch, computed while later tasks generated."""
    totals: list[float | None] = field(default_factory=list)
    per_reward: dict[str, list] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    extras: list[dict] = field(default_factory=list)
    """Per sample: reward extras, e.g. the rubric critic's judgments and reasons."""
    rubric_stats: list[dict] = field(default_factory=list)
    episodes: dict[int, Episode] = field(default_factory=dict)
    """Sample index -> its episode, for environment tasks (rlk2.envs)."""
    env_errors: int = 0
    stale: torch.Tensor | None = None
    """[B, T] partial rollouts: 1 on tokens an earlier step's policy sampled (None: none this step)."""
    is_weight: float | None = None
    """Mean truncated importance weight of the tokens pi_old did not sample (partial rollouts, a rollout server)."""
    mismatch_kl: float | None = None
    """rollout.engine=server: KL(engine || trainer) over the sampled tokens (k3 estimate)."""
    played: int = 0
    """Episodes played in this step (partial rollouts: finished, and paused ones)."""
    paused: int = 0
    """Episodes in groups paused at the end of this step (they train in the next one)."""
    n_policy: int = 0
    critic: CriticSamples | None = None
    adv: torch.Tensor | None = None  # [B]
    zero_std: torch.Tensor | None = None  # [B / K]
    mask: torch.Tensor | None = None  # [B, T]: tokens that carry loss
    keep: torch.Tensor | None = None  # [B']: sequences the loss keeps (zero-std filtering), None = all
    entropy: torch.Tensor | None = None  # [B, T]
    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    loss_metrics: dict = field(default_factory=dict)
    grad_norm: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    moe_row: dict = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    """rollout, reward, rubric (inside reward), critic, update (seconds)."""


# ================================================================================================ the loop
def train(cfg: Config, *, resume: bool = False, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run `cfg` (or continue the run in `cfg.run_dir` with `resume`); returns the before/after evaluation."""
    try:
        run = setup(cfg, resume=resume, on_step=on_step)
    except AlreadyFinished as done:
        print(done)
        return {"before": {}, "after": {}, "run_dir": str(cfg.run_dir), "finished_at": done.step}
    try:
        before = start(run)
        for step in range(run.start_step + 1, cfg.trainer.steps + 1):
            run.step_start = _Snapshot.take(run, step)  # what a Ctrl-C in this step rolls back to
            batch = generate(run, step)
            interruption_point()
            score(run, batch)
            refine_critic(run, batch)
            interruption_point()
            advantages(run, batch)
            with run.stop.critical():  # a second Ctrl-C waits for these, so the step can be checkpointed
                update(run, batch)
                log(run, batch)
                run.done_step = step
            if periodic(run, step):
                return {"before": before, "after": {}, "run_dir": str(run.run_dir.path), "stopped_at": step}
        return finish(run, before)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        print(f"interrupted: {_keep_finished(run)}", file=sys.stderr)
        raise
    except EngineUnavailable as exc:  # the rollout server is gone: stop as a Ctrl-C would, resumable
        raise EngineUnavailable(f"{exc}; {_keep_finished(run)}") from None
    except BaseException:
        if not resume and run.done_step == 0:  # a start that failed leaves nothing: a retry starts cleanly
            run.run_dir.discard()
        raise
    finally:
        if run.stop is not None:
            run.stop.restore()
        if run.bar is not None:
            run.bar.close()
        for runner in run.tool_runners.values():
            runner.close()
        run.engine.close()


@dataclass
class _Snapshot:
    """What a step changes before its update (the prompt samplers' positions and success counts), taken at the
    step's start: a step interrupted before its update rolls back to it and checkpoints the step before."""

    step: int
    samplers: dict

    @staticmethod
    def take(run: Run, step: int) -> _Snapshot:
        states = {
            k: copy.deepcopy(s.state_dict()) for k, s in _samplers(run.sampler, run.ptx_sampler, run.paused).items()
        }
        return _Snapshot(step, states)

    def restore(self, run: Run) -> None:
        for name, sampler in _samplers(run.sampler, run.ptx_sampler, run.paused).items():
            sampler.load_state_dict(self.samplers[name])


def _keep_finished(run: Run) -> str:
    """A run stopping mid-way (a second Ctrl-C, a rollout server gone): the weights are those of the last finished
    step unless the stop hit an update; that step is checkpointed so `--resume` loses nothing. Says what was kept."""
    if run.done_step is None:
        return (
            f"stopped during an update: the weights are half-updated, so no checkpoint was written; resume from the "
            f"last one with: rlk2 train --resume {run.run_dir.path}"
        )
    if run.done_step == 0 and run.start_step == 0:
        run.run_dir.discard()  # nothing trained yet: as if the run had not started
        return "stopped before the first step finished: nothing was kept"
    if run.done_step > run.start_step and run.run_dir.latest_step() != run.done_step:
        if run.step_start is not None and run.step_start.step == run.done_step + 1:  # stopped inside the next step
            run.step_start.restore(run)
        checkpoint(run, run.done_step)
    return f"step {run.done_step} is checkpointed; resume with: rlk2 train --resume {run.run_dir.path}"


# ================================================================================================ setup
def setup(cfg: Config, *, resume: bool, on_step: Callable[[int, dict], None] | None = None) -> Run:
    """Everything a run needs, checked before anything is written to the run directory."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets_no_progress_bar()
    run_dir = RunDir(cfg.run_dir)
    if not resume:
        run_dir.check_new(overwrite=cfg.run.overwrite, keep=(cfg.run.name,))
    unknown = [t for t in cfg.trainer.trackers if t not in LoggerType.list()]
    if unknown:
        raise UserError(
            f"trainer.trackers: '{unknown[0]}' is not a tracker Accelerate knows ({', '.join(LoggerType.list())})"
        )
    # A fresh accelerate state for this run (the process group is kept): an earlier run in the same process, or the
    # warm start's SFT (transformers' Trainer resets the shared state and sets its own mixed precision, TRL's default
    # bf16), would otherwise hand its mixed precision to this run's Accelerator. A launcher's settings come back from
    # its environment variables.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        log_with=list(cfg.trainer.trackers) or None,
        project_dir=str(run_dir.path),
        kwargs_handlers=ddp_kwargs(),
        cpu=cpu_only_launch(),
    )
    run_dir.main = accelerator.is_main_process
    plugin = fsdp_plugin(accelerator)
    check_launch(
        distributed_type=accelerator.distributed_type,
        num_processes=accelerator.num_processes,
        prompts_per_step=cfg.rollout.prompts_per_step,
        optimizer=cfg.optim.name,
        loss=cfg.algo.loss,
    )
    if cfg.rollout.partial_tokens and accelerator.num_processes > 1:
        raise UserError("rollout.partial_tokens: partial rollouts run on one process only (for now)")
    if plugin is not None:
        _check_sharded(cfg)
    server = _rollout_server(cfg, accelerator.is_main_process)
    critic = ClosedLoop.from_config(cfg, accelerator.num_processes)
    accelerator.wait_for_everyone()  # every rank has checked run.dir before any rank writes to it
    if accelerator.num_processes > 1:
        how = "FSDP2-sharded, " if plugin is not None else ""
        accelerator.print(
            f"data parallel: {accelerator.num_processes} processes ({how}{accelerator.distributed_type.value})"
        )
    set_seed(cfg.run.seed)
    engine = RewardEngine(num_workers=cfg.trainer.reward_workers)
    try:
        run = _build(cfg, resume, accelerator, engine, critic, run_dir, on_step, plugin)
    except BaseException:
        engine.close()
        raise
    run.rollout_server = server
    return run


def _check_sharded(cfg: Config) -> None:
    """What an FSDP2 run does not do yet, refused in one line before anything is written."""
    if cfg.policy.lora.enabled:
        raise UserError("policy.lora.enabled: LoRA adapters are trained with DDP; FSDP2 launches train full weights")
    if cfg.qat.enabled:
        raise UserError("qat.enabled: quantization-aware runs train on one process or with DDP, not FSDP2 (yet)")
    if cfg.trainer.mixed_precision == "bf16":
        raise UserError(
            "trainer.mixed_precision: FSDP2 runs take their precision from the FSDP plugin's mixed_precision_policy"
        )
    rewards = [r for t in cfg.tasks for r in t.rewards]
    if any(metric_name(r.name) == "rubric" and r.kwargs.get("backend", "self") == "self" for r in rewards):
        raise UserError(
            "FSDP2: the `self` critic judges with the live policy outside the rollout phase, which sharded weights "
            "do not allow yet; use DDP, or a checkpoint/openai critic backend"
        )


def _rollout_server(cfg: Config, main: bool) -> RolloutServer | None:
    """rollout.engine=server: the server client, once the server has answered (a run does not start without it)."""
    ro = cfg.rollout
    if ro.engine != "server":
        return None
    if any(t.env for t in cfg.tasks):
        raise UserError("rollout.engine=server: environment tasks (tasks.N.env) sample on the local engine only")
    if cfg.policy.lora.enabled:
        raise UserError("rollout.engine=server: LoRA policies cannot push their weights (the server holds full ones)")
    if cfg.qat.enabled:
        raise UserError("rollout.engine=server: a QAT run samples its INT4 weights on the local engine only")
    server = RolloutServer(ro.server_url, timeout_s=ro.server_timeout_s, retries=ro.server_retries, kind=ro.server_kind)
    server.check()
    if server.nccl is not None and main:  # the process that pushes joins the NCCL group now, or refuses to start
        server.nccl.connect()
    return server


def _build(
    cfg: Config,
    resume: bool,
    accelerator: Accelerator,
    engine: RewardEngine,
    critic: ClosedLoop | None,
    run_dir: RunDir,
    on_step,
    plugin,
) -> Run:
    tasks = load_tasks(cfg.tasks, engine, note=accelerator.print)
    ptx_rows = load_ptx_rows(cfg.algo.ptx.source) if cfg.algo.ptx.weight > 0 else None
    model, tokenizer, policy_source, state = _starting_policy(cfg, resume, run_dir, tasks, critic, accelerator)
    p = cfg.policy
    if p.chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"policy.chat_template=true but the tokenizer of {policy_source} has no chat template; set "
            "policy.chat_template=false to use prompts as plain text, or add one to its tokenizer_config.json"
        )
    check_prompt_lengths(tasks, tokenizer, context_limit(model), chat_template=p.chat_template)
    # MoE router health and replay (rlk2.moe); every call below is a no-op for a dense policy.
    moe = RouterControl(
        model,
        router_replay=cfg.moe.router_replay,
        bias_update_rate=cfg.moe.bias_update_rate,
        aux_loss_coef=cfg.moe.aux_loss_coef,
        reduce=lambda t: accelerator.reduce(t, "sum"),
    )
    if cfg.qat.enabled:  # before the optimizer and LoRA: the parameters stay the master weights (rlk2.qat)
        q = quantize_weights(model, list(cfg.qat.modules), cfg.qat.group_size)
        accelerator.print(f"QAT: {len(q.names)} weight matrices read as INT4 (groups of {q.group_size})")
    autocast = None if plugin is not None else training_autocast_dtype(cfg.trainer.mixed_precision, accelerator.device)
    if plugin is None and (autocast is not None or accelerator.native_amp):
        # Under autocast (rlk2's, or Accelerate's from a launch config) the LM head and the routers stay float32.
        keep_in_float32([model.get_output_embeddings(), *(m for _, m in moe.routers)])
    # Everything checked: write config.yaml (a resume saves its overrides for the next one) and, new, env.json.
    env = None if resume else {**env_info(), "policy_source": policy_source, "processes": accelerator.num_processes}
    run_dir.start(config_yaml=to_yaml(cfg), env=env, overwrite=cfg.run.overwrite, keep=(cfg.run.name,))
    try:
        if p.lora.enabled and state is None:
            lora = PeftLoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, target_modules=list(p.lora.target_modules))
            model = get_peft_model(model, lora)
        if cfg.trainer.gradient_checkpointing:
            if moe.routers:
                raise UserError("trainer.gradient_checkpointing: dense policies only (this one is an MoE)")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name for it
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if plugin is not None:  # before the optimizer: MuonClip is built over the parameters it steps
            shard_policy(model, plugin, accelerator.device)
        optimizer = build_optimizer(
            cfg.optim.name,
            model,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            qk_clip_tau=cfg.optim.qk_clip_tau,
        )
        warmup = cfg.optim.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        if plugin is None:
            model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        # else rlk2 owns the sharding (rlk2.sharding), on GPUs and CPUs alike: Accelerate's FSDP2 preparation would
        # swap the optimizer's parameters again, and on a CPU launch it would wrap the sharded model in DDP.
        sampler = PromptSampler(
            {t.name: t.rows for t in tasks},
            {t.name: t.cfg.weight for t in tasks},
            seed=cfg.run.seed,
            sampling=cfg.rollout.sampling,
            priority_floor=cfg.rollout.priority_floor,
        )
        ptx_sampler = PromptSampler({"ptx": ptx_rows}, {"ptx": 1.0}, seed=cfg.run.seed + 1) if ptx_rows else None
        paused = PausedGroups()
        # The rubric reward's `self` critic is the live policy: the unwrapped module is the very object the
        # optimizer updates in place, so the critic always judges with the current weights.
        bind_critic(tasks, PolicyCritic(accelerator.unwrap_model(model), tokenizer, chat_template=p.chat_template))
        start_step = 0
        if state is not None:  # the weights came from the checkpoint itself; restore the rest of the trainer's state
            start_step = run_dir.restore(
                state,
                optimizer=optimizer,
                scheduler=scheduler,
                samplers=_samplers(sampler, ptx_sampler, paused),
                sharded_from=Path(policy_source) if plugin is not None else None,
            )
            run_dir.truncate_metrics_after(start_step)
            accelerator.print(f"resumed from {policy_source} at step {start_step}")
        if cfg.trainer.trackers:
            try:
                accelerator.init_trackers(cfg.run.name, config={"run": cfg.run.name})
            except (ImportError, ModuleNotFoundError) as exc:  # a known tracker whose package is not installed
                raise UserError(f"trainer.trackers: {exc}") from None
    except BaseException:
        if not resume:
            run_dir.discard()
        raise
    return Run(
        cfg,
        accelerator,
        run_dir,
        model,
        tokenizer,
        optimizer,
        scheduler,
        engine,
        tasks,
        sampler,
        ptx_sampler,
        moe,
        critic,
        start_step,
        on_step,
        done_step=start_step,
        paused=paused,
        sharded=plugin is not None,
        autocast=autocast,
    )


def _starting_policy(
    cfg: Config, resume: bool, run_dir: RunDir, tasks: list[Task], critic: ClosedLoop | None, accelerator
) -> tuple:
    """(model, tokenizer, where it came from, the checkpoint's trainer state or None for a new run). A resume opens
    the newest intact checkpoint, and refuses a config that changes what it trained."""
    p = cfg.policy
    if resume:

        def load(path: Path):
            return load_policy(path, dtype=p.dtype, attn_implementation=p.attn_implementation, what="checkpoint")

        ckpt, state, model, tokenizer, notes = run_dir.open_checkpoint(load)
        for note in notes:
            accelerator.print(f"warning: {note}; resuming from {ckpt.name}, the newest intact one")
        check_resume(cfg, state, run_dir.path)
        return model, tokenizer, str(ckpt), state
    task_rows = {t.name: t.rows for t in tasks}
    extra = critic.warm_start_rows(task_rows, seed=cfg.run.seed) if critic else []
    model, tokenizer, source = prepare_policy(
        path=p.path,
        dtype=p.dtype,
        attn_implementation=p.attn_implementation,
        chat_template=p.chat_template,
        shape=p.demo,
        warm=cfg.warm_start,
        sources=[t.source for t in cfg.tasks],
        task_rows=task_rows,
        extra_rows=extra,
        extra_key=critic.warm_start_key() if critic else None,
        seed=cfg.run.seed,
        accelerator=accelerator,
    )
    return model, tokenizer, source, None


def _samplers(sampler: PromptSampler, ptx_sampler: PromptSampler | None, paused: PausedGroups) -> dict:
    """The prompt samplers (and the paused episode groups of partial rollouts) by their key in trainer_state.pt."""
    extra = {"ptx_sampler": ptx_sampler} if ptx_sampler is not None else {}
    return {"sampler": sampler, **extra, "paused": paused}


def start(run: Run) -> dict:
    """The step-0 evaluation (a new run) and the critic's held-out pairs; installs the graceful-stop handlers."""
    before = evaluate(run, 0) if run.start_step == 0 else {}
    if run.critic is not None:
        for warning in run.critic.start(
            run.run_dir.heldout_path, run.eval_records.get(0) if run.start_step == 0 else None, seed=run.cfg.run.seed
        ):
            run.accelerator.print(warning)
        if run.start_step == 0:
            row = run.critic.agreement(run.policy, run.tokenizer)
            run.run_dir.append_metrics({"step": 0, **row})
            run.accelerator.print(
                f"critic/agreement at step 0: {row['critic/agreement']:.3f} on {len(run.critic.heldout)} held-out pairs"
            )
    run.stop = GracefulStop()
    run.bar = tqdm(
        desc="rl",
        dynamic_ncols=True,
        disable=not run.accelerator.is_main_process,
        initial=run.start_step,
        total=run.cfg.trainer.steps,
    )
    if run.on_step is not None:
        run.on_step(run.start_step, {})
    return before


# ================================================================================================ phases
def generate(run: Run, step: int) -> Batch:
    """Sample this rank's groups (K responses per prompt) task by task; worker-run rewards start scoring each task
    while the next one generates (elementwise ones: each response as soon as it ends)."""
    pushed = None
    if run.rollout_server is not None and run.rollout_server.version != step - 1:
        pushed = _push_weights(run, step - 1)
    with whole_weights(run.model):  # FSDP2: gathered once for the whole phase (rlk2.sharding)
        batch = _generate(run, step)
    if pushed is not None:
        batch.times["push"] = pushed
    return batch


def _generate(run: Run, step: int) -> Batch:
    cfg, k = run.cfg, run.k
    # K2 temperature decay: this step samples AND computes training log-probs at this temperature.
    temperature = temperature_at(
        step,
        start=cfg.rollout.temperature,
        end=cfg.rollout.temperature_end,
        decay_steps=cfg.rollout.temperature_decay_steps or cfg.trainer.steps - 1,
        schedule=cfg.rollout.temperature_schedule,
    )
    batch = Batch(step, cfg.run.seed * 1_000_003 + step, temperature)
    t0 = time.perf_counter()
    # This rank's whole groups of the global batch; `first` is the global index of its first group.
    picked, first = local_groups(
        run.sampler.sample(cfg.rollout.prompts_per_step, step),
        [t.name for t in run.tasks],
        rank=run.accelerator.process_index,
        world=run.accelerator.num_processes,
    )
    parts, stale_parts = [], {}  # stale_parts: part index -> [b, T] tokens sampled by an earlier policy
    for task in run.tasks:
        group_rows = [row for t, row in picked if t == task.name]
        if not group_rows:
            continue
        if task.env is not None:  # multi-turn episodes, scored once they have all ended
            ro, stale = _play_episodes(run, task, batch, group_rows, first, temperature)
            parts.append(ro)
            stale_parts[len(parts) - 1] = stale
            continue
        ids = encode_prompts(run.tokenizer, [r["prompt"] for r in group_rows], chat_template=cfg.policy.chat_template)
        seeds = sequence_seeds(batch.seed, first + len(batch.rows), len(group_rows), k)
        stream = None
        if run.rollout_server is not None:
            sample = functools.partial(run.rollout_server.generate, run.tokenizer, run.policy)
        else:
            stream = run.engine.stream(task.specs, *reward_inputs(group_rows, k)) if task.streamed else None
            sample = functools.partial(
                generate_rollouts,
                run.policy,
                run.tokenizer,
                record_routing=run.moe.enabled,
                on_finished=None if stream is None else _scorer_of_finished(stream, run.tokenizer),
            )
        parts.append(
            sample(
                [i for i in ids for _ in range(k)],
                max_new_tokens=task.cfg.max_new_tokens,
                temperature=temperature,
                top_p=cfg.rollout.top_p,
                seeds=seeds,
            )
        )
        if stream is not None:
            batch.scoring[task.name] = stream.finish(parts[-1].texts)
        elif task.overlap:  # the worker processes score this task while this process generates the next
            batch.scoring[task.name] = run.engine.submit(task.specs, parts[-1].texts, *reward_inputs(group_rows, k))
        batch.rows += group_rows
        batch.task_of_group += [task.name] * len(group_rows)
    ro = concat_rollouts(parts, run.tokenizer.pad_token_id).to(run.accelerator.device)
    if any(m.any() for m in stale_parts.values()):  # partial rollouts: tokens an earlier step's policy sampled
        width = ro.completion_ids.shape[1]
        batch.stale = torch.cat(
            [
                F.pad(stale_parts[i], (0, width - stale_parts[i].shape[1]))
                if i in stale_parts
                else torch.zeros(len(p.completion_ids), width, dtype=torch.bool)
                for i, p in enumerate(parts)
            ]
        ).to(run.accelerator.device)
    batch.ro = pad_to_global_width(run.accelerator, ro, run.tokenizer.pad_token_id)
    batch.times["rollout"] = time.perf_counter() - t0
    return batch


def _push_weights(run: Run, version: int) -> float:
    """The server samples with the weights of the last finished step: the main process pushes them (every process
    holds the same ones; FSDP2 processes gather them first), and every process learns whether that worked, so all
    stop together if it did not."""
    acc, server, seconds, failure = run.accelerator, run.rollout_server, 0.0, None
    t0 = time.perf_counter()
    state = full_state_dict(run.model) if run.sharded else None  # FSDP2: gathered (collective), on the main process
    if acc.is_main_process:
        try:
            server.push(run.policy, version, state)
            seconds = time.perf_counter() - t0
        except EngineUnavailable as exc:
            failure = str(exc)
    if acc.num_processes > 1:
        told = [failure]
        torch.distributed.broadcast_object_list(told, src=0)
        failure = told[0]
    if failure is not None:
        raise EngineUnavailable(failure)
    server.version = version
    return seconds


def _play_episodes(run: Run, task: Task, batch: Batch, group_rows: list[dict], first: int, temperature: float):
    """K episodes per row in the task's environment (rlk2.envs), and with partial rollouts the groups paused in the
    last step; the groups that end join the batch (their rows appended to `batch.rows`), their scoring starts at
    once. Returns their Rollout and which of its tokens an earlier policy sampled, or None when no group ended."""
    cfg, k, tok = run.cfg, run.k, run.tokenizer
    env_rows = [{c: v for c, v in r.items() if c != "completion"} for r in group_rows for _ in range(k)]
    started = start_episodes(
        task.env,
        env_rows,
        tok,
        describe=task.cfg.describe_tools,
        chat_template=cfg.policy.chat_template,
        seeds=sequence_seeds(batch.seed, first + len(batch.rows), len(group_rows), k),
    )
    budget = cfg.rollout.partial_tokens
    rows_of = run.sampler.task_rows[task.name]
    resumed = [(rows_of[i], eps) for i, eps in run.paused.take(task.name)] if budget else []
    for _, episodes in resumed:
        for e in episodes:
            e.resume()
    groups = resumed + [(row, started[g * k : (g + 1) * k]) for g, row in enumerate(group_rows)]
    turns = SampledTurns(
        run.policy,
        tok,
        max_new_tokens=task.cfg.max_new_tokens,
        temperature=temperature,
        top_p=cfg.rollout.top_p,
        record_routing=run.moe.enabled,
    )
    play_kw = dict(max_turns=task.cfg.max_turns, runner=run.tool_runner(task), chat_template=cfg.policy.chat_template)
    # Episodes resumed from the last step are played to their end; new ones stop at the step's token budget.
    play(turns, tok, task.env, [e for _, eps in resumed for e in eps], **play_kw)
    play(turns, tok, task.env, [e for _, eps in groups[len(resumed) :] for e in eps], step_budget=budget, **play_kw)
    ended = [g for g in groups if all(e.done for e in g[1])]
    waiting = [g for g in groups if not all(e.done for e in g[1])]
    if waiting and not ended:  # a step trains on something: its newest group is played to its end
        play(turns, tok, task.env, waiting[-1][1], **play_kw)
        ended, waiting = [waiting[-1]], waiting[:-1]
    run.paused.put(task.name, [(run.sampler.index_of(task.name, row), eps) for row, eps in waiting])
    batch.paused += k * len(waiting)
    batch.played += k * len(groups)
    episodes = [e for _, eps in ended for e in eps]
    end_episodes(task.env, episodes, run.tool_runner(task))
    ro = as_rollout(episodes, tok.pad_token_id)
    rows = [row for row, _ in ended]
    prompts, columns = reward_inputs(rows, k)
    columns["env_reward"] = [e.reward for e in episodes]
    batch.scoring[task.name] = run.engine.score_later(task.specs, ro.texts, prompts, columns)
    offset = len(batch.rows) * k
    for j, e in enumerate(episodes):
        batch.episodes[offset + j] = e
        for problem in (e.error, e.reward_error):
            if problem and batch.env_errors < 3:
                run.accelerator.print(f"step {batch.step}: task '{task.name}': episode unscorable: {problem}")
        batch.env_errors += bool(e.error or e.reward_error)
    batch.rows += rows
    batch.task_of_group += [task.name] * len(rows)
    return ro, stale_mask(episodes, ro.completion_ids.shape[1])


def _scorer_of_finished(stream, tokenizer):
    """generate_rollouts' `on_finished`: decode the responses that just ended, as the Rollout's texts are decoded,
    and hand them to the reward stream (rewards.engine.ScoreStream)."""

    def score_them(rows: list[int], token_ids: list[list[int]]) -> None:
        stream.add(rows, tokenizer.batch_decode(token_ids, skip_special_tokens=True))

    return score_them


def score(run: Run, batch: Batch) -> None:
    """Every response's rewards (waiting for what generation did not hide), budget penalties, error counts."""
    k, ro = run.k, batch.ro
    t0 = time.perf_counter()
    rubric_time, offset = 0.0, 0  # rubric: the critic judging the policy's responses (caller-run, after generation)
    for task in run.tasks:
        idx = [g for g, t in enumerate(batch.task_of_group) if t == task.name]
        if not idx:
            continue
        n = len(idx) * k
        t_task = time.perf_counter()
        scored = (
            batch.scoring.pop(task.name).result()
            if task.name in batch.scoring
            else run.engine.score(
                task.specs, ro.texts[offset : offset + n], *reward_inputs([batch.rows[g] for g in idx], k)
            )
        )
        if task.rubric:
            rubric_time += time.perf_counter() - t_task
        ntok = ro.num_tokens[offset : offset + n].tolist()
        trunc = ro.truncated[offset : offset + n].tolist()
        budget = task.cfg.max_new_tokens * (task.cfg.max_turns if task.env is not None else 1)  # episodes: per turn
        penalty = budget_penalty(ntok, trunc, budget=budget, penalty=task.cfg.overlong_penalty)
        failed = [False] * n
        if task.env is not None:  # an environment that raised makes its episode unscorable, never 0.0
            failed = unscorable([batch.episodes[offset + j] for j in range(n)])
        batch.totals += [None if r is None or bad else r + p for r, p, bad in zip(scored.total, penalty, failed)]
        for rname, vals in scored.rewards.items():
            # A reward another task lacks is None (not scored) on that task's rows: lists stay aligned.
            batch.per_reward.setdefault(metric_name(rname), [None] * offset).extend(vals)
        for vals in batch.per_reward.values():
            vals.extend([None] * (offset + n - len(vals)))
        batch.extras += [
            {key: _shift_pair_index(v[i], offset) for key, v in scored.extras.items() if v[i] is not None}
            for i in range(n)
        ]
        if "rubric/judgments" in scored.extras:
            batch.rubric_stats.append(summarize_judgments([j or [] for j in scored.extras["rubric/judgments"]]))
        for rname, cnt in scored.errors.items():
            batch.errors[metric_name(rname)] = batch.errors.get(metric_name(rname), 0) + cnt
        for msg in scored.messages[:3]:
            run.accelerator.print(f"step {batch.step}: reward error: {msg}")
        offset += n
    batch.times["reward"], batch.times["rubric"] = time.perf_counter() - t0, rubric_time
    batch.n_policy = len(batch.totals)
    n_unscorable = sum(r is None for r in batch.totals)
    if n_unscorable:  # loud on purpose: a sandbox or verifier outage must not pass silently
        counts = ", ".join(f"{name}: {v} errors" for name, v in batch.errors.items() if v)
        run.accelerator.print(
            f"warning: step {batch.step}: {n_unscorable}/{len(batch.totals)} responses unscorable "
            f"({counts or 'returned None by their reward'}); they carry no loss"
        )
    # Success counts for prioritized sampling; every rank records every group so the samplers stay identical.
    outcomes = [
        (t, run.sampler.index_of(t, r), succ, n)
        for t, r, (succ, n) in zip(
            batch.task_of_group, batch.rows, group_success(batch.totals, k, threshold=run.cfg.rollout.success_threshold)
        )
    ]
    for t, i, succ, n in gather_object(outcomes) if run.accelerator.num_processes > 1 else outcomes:
        run.sampler.record(t, i, succ, n)


def _shift_pair_index(extra, offset: int):
    """The rubric reward's judgments name the other response by its index in the task's block (`vs`); in the
    rollouts file that is line `offset + vs`."""
    if isinstance(extra, list) and all(isinstance(j, dict) and "vs" in j for j in extra):
        return [{**j, "vs": j["vs"] + offset} for j in extra]
    return extra


def refine_critic(run: Run, batch: Batch) -> None:
    """Closed-loop critic refinement: critic-role samples on this step's verified pairs join the batch."""
    t0 = time.perf_counter()
    if run.critic is not None:
        k = run.k
        groups = [g for g, t in enumerate(batch.task_of_group) if t in run.critic.grounding]
        flat = [g * k + j for g in groups for j in range(k)]
        batch.critic = run.critic.samples(
            run.policy,
            run.tokenizer,
            prompts=[batch.rows[g]["prompt"] for g in groups for _ in range(k)],
            texts=[batch.ro.texts[j] for j in flat],
            totals=[batch.totals[j] for j in flat],
            group_size=k,
            temperature=batch.temperature,
            seed=batch.seed + 7919,
            record_routing=run.moe.enabled,
        )
        if batch.critic is not None:  # K verdicts per critic prompt: ordinary groups for the advantage
            batch.ro = concat_rollouts(
                [batch.ro, batch.critic.rollout.to(run.accelerator.device)], run.tokenizer.pad_token_id
            )
            batch.totals = batch.totals + batch.critic.rewards
    batch.times["critic"] = time.perf_counter() - t0


def advantages(run: Run, batch: Batch) -> None:
    """Group-relative advantages; the loss mask (unscorable and, per task, truncated responses carry none)."""
    cfg, k, totals, ro = run.cfg, run.k, batch.totals, batch.ro
    scale = SCALE_ADVANTAGES[cfg.algo.loss] if cfg.algo.scale_rewards is None else cfg.algo.scale_rewards
    n_groups = len(totals) // k
    valid = torch.tensor([r is not None for r in totals]).view(n_groups, k)
    rewards = torch.tensor([r if r is not None else 0.0 for r in totals], dtype=torch.float32).view(n_groups, k)
    adv, zero_std = group_advantages(rewards, valid, scale=scale)
    if batch.critic is not None and cfg.critic.pair_baseline:  # both orders of a pair share one baseline
        c0 = batch.n_policy // k
        adv[c0:], zero_std[c0:] = pair_advantages(rewards[c0:], valid[c0:], scale=scale)
    batch.adv, batch.zero_std = adv.view(-1).to(run.accelerator.device), zero_std
    # Unscorable responses (reward None) carry no loss at all: nothing is learned from a sandbox outage.
    mask = ro.policy_mask.float() * valid.view(-1, 1).to(ro.completion_mask.device)
    masked_tasks = {t.name for t in run.tasks if t.cfg.mask_truncated}
    if masked_tasks:  # [B]: truncated responses of those tasks carry no loss
        drop = torch.tensor(
            [j < batch.n_policy and batch.task_of_group[j // k] in masked_tasks for j in range(len(totals))],
            device=mask.device,
        )
        mask = mask * (~(drop & ro.truncated)).float().unsqueeze(1)
    if batch.stale is not None or run.rollout_server is not None:
        mask = _off_policy_correction(run, batch, mask)
    batch.mask = mask
    # Dynamic filtering: groups whose rewards all tie leave the loss. The forward still covers the whole batch
    # (the same shapes on every process, router replay on the recorded rollout); only the loss is cut.
    batch.keep = kept_sequences(zero_std, k).to(run.accelerator.device) if cfg.algo.filter_zero_std else None  # [B']


def _off_policy_correction(run: Run, batch: Batch, mask: torch.Tensor) -> torch.Tensor:
    """Tokens that pi_old did not sample itself: those of resumed episodes (partial rollouts: an earlier step's
    policy sampled them) and, with a rollout server, every token (the server's copy of the weights, in its own
    numerics). Their pi_old becomes this step's policy (one forward without gradient), and their loss is weighed by
    the truncated importance ratio min(pi_old / pi_sampler, algo.is_cap), as TRL and verl weigh tokens from a
    stale or mismatched rollout engine."""
    ro, server = batch.ro, run.rollout_server is not None
    with torch.no_grad(), run.training_precision():
        now, entropy = policy_logprobs(run.model, ro, temperature=batch.temperature, with_entropy=ro.entropy is None)
    sampled = ro.policy_mask.bool()
    elsewhere = sampled if server else batch.stale & sampled
    log_ratio = now - ro.old_logp
    ratio = torch.exp(log_ratio).clamp(max=run.cfg.algo.is_cap)
    batch.is_weight = float(ratio[elsewhere].mean()) if elsewhere.any() else None
    if server:  # over the global batch: sums and counts of every process
        r = log_ratio[sampled]  # k3 estimate of KL(engine || trainer) from the engine's own samples
        count = torch.tensor(float(len(r)), device=r.device)
        sums = torch.stack([(torch.exp(r) - 1 - r).sum(), ratio[sampled].sum(), count])
        if run.accelerator.num_processes > 1:
            sums = run.accelerator.reduce(sums.to(run.accelerator.device), "sum").cpu()
        kl, weight, n = sums.tolist()
        batch.mismatch_kl, batch.is_weight = kl / max(n, 1.0), weight / max(n, 1.0)
    if ro.entropy is None and entropy is not None:  # the server does not report it: from this forward instead
        ro.entropy = entropy * ro.completion_mask
    ro.old_logp = torch.where(elsewhere, now, ro.old_logp)
    return mask * torch.where(elsewhere, ratio, torch.ones_like(ratio))


def update(run: Run, batch: Batch) -> None:
    """`algo.inner_steps` optimizer steps on the batch (the training forward over the sequences that can move the
    weights), with QK-Clip, the MoE bias update and the learning-rate schedule; a non-finite step is skipped."""
    cfg, acc, ro = run.cfg, run.accelerator, batch.ro
    t0 = time.perf_counter()
    adv, mask, keep = batch.adv, batch.mask, batch.keep
    train_adv, train_mask = (adv, mask) if keep is None else (adv[keep], mask[keep])
    has_rl = any_rank(acc, len(train_adv) > 0)
    ptx = _ptx_batch(run, batch.step)
    hp = {
        "tau": cfg.algo.tau,
        "length_norm": cfg.algo.length_norm,
        "clip_low": cfg.algo.clip_low,
        "clip_high": cfg.algo.clip_high,
    }
    loss_fn = LOSSES[cfg.algo.loss]
    scale = loss_scale(acc, cfg.algo.loss, train_mask)  # 1.0 on one process (see rlk2.distributed)
    batch.entropy = ro.entropy if ro.entropy is not None else torch.full_like(mask, math.nan)  # from the sampling loop
    rows, sub, whole, shared = _training_rows(run, batch)
    plain_grads = acc.scaler is None and acc.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
    )  # whole, unscaled, all-reduced
    skipped = 0
    inner_steps = cfg.algo.inner_steps if has_rl or ptx is not None else 0
    if inner_steps:
        run.done_step = None  # from here until the step is logged the weights belong to no finished step
    # Nothing to train on (every group filtered out, no PTX): no update at all, not even optimizer momentum.
    for _ in range(inner_steps):
        with run.moe.training_forward(sub, whole=whole, shared=shared) as routed, run.training_precision():
            logp, _ = policy_logprobs(run.model, sub, temperature=batch.temperature, shared=shared)  # replays experts
        if rows is not None:  # [B, T]: computed rows in place, the old log-probs elsewhere
            logp = ro.old_logp.index_put((rows.unsqueeze(1), torch.arange(logp.shape[1], device=logp.device)), logp)
        if len(train_adv):
            kept_logp, kept_old = (logp, ro.old_logp) if keep is None else (logp[keep], ro.old_logp[keep])
            loss, loss_metrics = loss_fn(kept_logp, kept_old, train_adv, train_mask, **hp)
        else:  # no group kept on this process (others may have some): a zero loss, DDP still gets a backward
            loss, loss_metrics = logp.sum() * 0.0, {}
        loss = loss + routed.aux_loss
        batch.moe_row = batch.moe_row or routed.metrics()  # routing of the step's first forward (pi_old's weights)
        total = loss * scale if scale != 1.0 else loss
        if ptx is not None:  # the same PTX batch on every process: DDP's average is the one-process gradient
            with run.training_precision():
                lm = ptx_loss(run.model, ptx)
            total = total + cfg.algo.ptx.weight * lm
        acc.backward(total)
        if run.sharded:  # FSDP2: the parameters no rank used get no gradient, as on one process
            drop_unused_grads(run.model)
        if acc.num_processes > 1 and has_rl:  # log (and judge finiteness by) the global batch's loss
            loss, loss_metrics = global_loss(acc, loss_fn, logp, ro.old_logp, adv, mask, hp, rows=keep)
        if ptx is not None:
            loss_metrics = {**loss_metrics, "loss/policy": float(loss.detach()), "loss/ptx": float(lm.detach())}
            loss = loss.detach() + cfg.algo.ptx.weight * lm.detach()
        batch.loss, batch.loss_metrics = loss, loss_metrics
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        batch.grad_norm = grad_norm(grads) if grads else torch.tensor(0.0)  # of whole gradients, FSDP2 shards too
        if not (torch.isfinite(loss) and torch.isfinite(batch.grad_norm)):
            # A NaN/inf loss or gradient would poison the weights and the optimizer state: skip the update.
            run.optimizer.zero_grad(set_to_none=True)
            skipped += 1
            continue
        if cfg.optim.grad_clip > 0:
            if run.sharded or plain_grads:  # by the norm just computed (of whole gradients, FSDP2 shards too)
                clip_grads(grads, cfg.optim.grad_clip, batch.grad_norm)
            else:  # loss-scaled (fp16) gradients: accelerate knows how to unscale them
                acc.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
        run.optimizer.step()
        run.moe.update_bias(routed)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.bad_in_a_row = run.bad_in_a_row + 1 if skipped else 0
    run.bad_total += 1 if skipped else 0
    if run.bad_in_a_row >= cfg.trainer.max_bad_steps:
        raise UserError(
            f"step {batch.step}: loss or gradient not finite for {run.bad_in_a_row} steps in a row "
            f"(trainer.max_bad_steps={cfg.trainer.max_bad_steps}); lower optim.lr or check the rewards"
        )
    batch.times["update"] = time.perf_counter() - t0


def _ptx_batch(run: Run, step: int) -> Rollout | None:
    if run.ptx_sampler is None:
        return None
    rows = [row for _, row in run.ptx_sampler.sample(run.cfg.algo.ptx.batch_size, step)]
    return ptx_batch(run.tokenizer, rows, chat_template=run.cfg.policy.chat_template).to(run.accelerator.device)


def _training_rows(run: Run, batch: Batch) -> tuple:
    """(rows, sub, whole, shared): the sequences the training forward computes (None = all), that sub-rollout, the
    batch whose recorded routing gives the expert loads, and the shared-prompt plan (or None)."""
    ro = batch.ro
    # The training forward covers only the sequences that can move the weights (a tied group's have advantage 0 and
    # add nothing): the others keep log-prob = old log-prob, so loss and gradient are the whole batch's.
    rows = trained_rows(batch.adv, batch.mask, loss=run.cfg.algo.loss, inner_steps=run.cfg.algo.inner_steps)
    if rows is not None and (run.moe.needs_every_sequence(ro) or len(rows) == len(batch.adv)):
        rows = None
    elif rows is not None and len(rows) == 0:  # nothing moves the weights here: one sequence keeps DDP in step
        rows = torch.zeros(1, dtype=torch.long, device=batch.adv.device)
    sub = ro if rows is None else ro.select(rows)
    if sub.prompt_ids.shape[1] + sub.completion_ids.shape[1] < 16 and sub.prompt_ids.device.type == "cpu":
        # torch's CPU softmax takes a scalar path on rows shorter than 16 (~12x slower per element): sequences this
        # short get left padding up to 16 positions, which costs less than the slow path (~5 % of the training pass
        # on the demo, measured). Padding changes no log-prob: it is masked and has no position.
        sub = sub.pad_prompts(16 - sub.completion_ids.shape[1], run.tokenizer.pad_token_id)
    whole = ro if rows is not None and run.moe.loads_from_record(ro) else None
    # A group's K sequences share their prompt: the training forward runs each distinct prompt once
    # (rlk2.rollout.SharedPrompts; same log-probs and gradient) when that saves enough tokens. Two forward calls per
    # backward: one process only, since DDP expects one forward per backward.
    shared = None
    tr = run.cfg.trainer
    if run.accelerator.num_processes == 1 and tr.shared_prompt_tokens >= 0 and not tr.gradient_checkpointing:
        shared = SharedPrompts.of(sub)
        if shared is not None and shared.saved_tokens(sub) < tr.shared_prompt_tokens:
            shared = None
    return rows, sub, whole, shared


def log(run: Run, batch: Batch) -> dict:
    """The step's metrics row (DESIGN.md 2.5) over the global batch: metrics.jsonl, trackers, progress bar, and the
    rollouts file."""
    cfg, acc, k = run.cfg, run.accelerator, run.k
    ro, entropy, mask, adv, zero_std = batch.ro, batch.entropy, batch.mask, batch.adv, batch.zero_std
    totals, per_reward, errors, rows, task_of_group = (
        batch.totals,
        batch.per_reward,
        batch.errors,
        batch.rows,
        batch.task_of_group,
    )
    if acc.num_processes > 1:  # from here on every name holds the global batch, as on one process
        ro, entropy, mask, adv, zero_std, totals, per_reward, errors, rows, task_of_group = gather_step(
            acc,
            ro=ro,
            entropy=entropy,
            mask=mask,
            adv=adv,
            zero_std=zero_std,
            totals=totals,
            per_reward=per_reward,
            errors=errors,
            rows=rows,
            task_of_group=task_of_group,
        )
    n_samples = len(totals)
    # Policy metrics describe the policy's own samples; critic samples (after n_policy) get critic/* below.
    pol = batch.n_policy if batch.critic is not None else n_samples
    good = [r for r in totals[:pol] if r is not None]
    t = batch.times
    step_time = t["rollout"] + t["reward"] + t["critic"] + t["update"]
    row = {
        "step": batch.step,
        "loss": float(batch.loss.detach()),
        "reward/mean": sum(good) / len(good) if good else float("nan"),
        "frac_reward_zero_std": float(zero_std[: pol // k].float().mean()),
        "frac_unscorable": 1.0 - len(good) / pol,
        "entropy": float((entropy[:pol] * mask[:pol]).sum() / mask[:pol].sum().clamp(min=1)),
        "completion/mean_length": float(ro.num_tokens[:pol].float().mean()),
        "completion/clipped_ratio": float(ro.truncated[:pol].float().mean()),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(batch.grad_norm),
        "skipped_steps": run.bad_total,
        "rollout/temperature": batch.temperature,
        "groups/kept": int((~zero_std).sum()) if cfg.algo.filter_zero_std else len(zero_std),
        **batch.loss_metrics,
        **batch.moe_row,
        "time/rollout": t["rollout"],
        "time/reward": t["reward"],
        "time/update": t["update"],
        "throughput/samples_per_s": n_samples / step_time,
        "throughput/tokens_per_s": int(ro.policy_mask.sum()) / step_time,
    }
    row.update(_critic_metrics(run, batch, zero_std, n_samples, step_time))
    if run.rollout_server is not None:
        row["rollout/mismatch_kl"] = batch.mismatch_kl
        row["rollout/is_weight"] = batch.is_weight
        row["time/weight_push"] = t.get("push", 0.0)
    if any(t.env is not None for t in run.tasks):
        row.update(_episode_metrics(run, batch))
    for rname, vals in per_reward.items():
        vs = [v for v in vals if v is not None]
        mean = sum(vs) / len(vs) if vs else float("nan")
        row[f"rewards/{rname}/mean"] = mean
        row[f"rewards/{rname}/std"] = math.sqrt(sum((v - mean) ** 2 for v in vs) / len(vs)) if vs else float("nan")
        row[f"rewards/{rname}/errors"] = errors.get(rname, 0)
    opt_metrics = getattr(getattr(run.optimizer, "optimizer", run.optimizer), "metrics", None)
    if callable(opt_metrics):
        row.update(opt_metrics())
    run.run_dir.append_metrics(row)
    if cfg.trainer.trackers:
        acc.log({key: v for key, v in row.items() if key != "step"}, step=batch.step)
    if batch.step % cfg.trainer.log_every == 0:
        run.bar.set_postfix(
            reward=f"{row['reward/mean']:.3f}", loss=f"{row['loss']:.4f}", sps=f"{row['throughput/samples_per_s']:.0f}"
        )
    run.bar.update(1)
    if cfg.trainer.save_rollouts:
        run.run_dir.write_rollouts(
            batch.step, _rollout_records(run, batch, ro, totals, adv, per_reward, rows, task_of_group, pol)
        )
    if run.on_step is not None:
        run.on_step(batch.step, row)
    return row


def _episode_metrics(run: Run, batch: Batch) -> dict:
    """episodes/* over the step's episodes (all processes): per-episode means of turns, tool calls, tool errors and
    truncations (DESIGN.md 2.5)."""
    stats = episode_stats(list(batch.episodes.values()))
    sums = torch.tensor(
        [stats.episodes, stats.turns, stats.tool_calls, stats.tool_errors, stats.truncated, stats.env_errors],
        dtype=torch.float64,
        device=run.accelerator.device,
    )
    if run.accelerator.num_processes > 1:
        sums = run.accelerator.reduce(sums, "sum")
    n, turns, calls, errors, truncated, env_errors = sums.tolist()
    n = max(n, 1.0)
    row = {
        "episodes/turns": turns / n,
        "episodes/tool_calls": calls / n,
        "episodes/tool_errors": errors / n,
        "episodes/truncated": truncated / n,
        "episodes/env_errors": env_errors,
    }
    if run.cfg.rollout.partial_tokens:  # one process only: the local batch is the batch
        row["episodes/resumed"] = sum(e.resumed for e in batch.episodes.values()) / n
        row["episodes/paused"] = batch.paused / max(batch.played, 1)
        if batch.is_weight is not None:
            row["rollout/is_weight"] = batch.is_weight
    return row


def _critic_metrics(run: Run, batch: Batch, zero_std: torch.Tensor, n_samples: int, step_time: float) -> dict:
    """critic/* (refinement samples, held-out agreement when due), time/critic and the rubric reward's counts."""
    row: dict = {}
    t_critic = batch.times["critic"]
    if run.critic is not None:
        if batch.critic is not None:
            row.update(batch.critic.metrics)
            row["critic/batch_share"] = (n_samples - batch.n_policy) / n_samples  # of the update's sequences
            row["critic/frac_reward_zero_std"] = float(zero_std[batch.n_policy // run.k :].float().mean())
        if run.critic.due(batch.step, run.cfg.trainer.steps):
            crit = run.critic.agreement(run.policy, run.tokenizer)
            t_critic += crit["time/critic_agreement"]
            step_time += crit["time/critic_agreement"]
            row.update(crit)
    if run.critic is not None or any(t.rubric for t in run.tasks):
        # Every critic generation of the step: refinement samples + held-out agreement (time/critic, in no other
        # time/*) and the rubric reward's judgments (inside time/reward).
        row["time/critic"] = t_critic
        row["time/critic_share"] = (t_critic + batch.times["rubric"]) / step_time
    if batch.rubric_stats:  # summed over tasks; consistency weighted by the pairs judged in both orders
        stats = batch.rubric_stats
        both = sum(r["pairs_both_orders"] for r in stats)
        row["rewards/rubric/verdicts"] = sum(r["verdicts"] for r in stats)
        row["rewards/rubric/unparsable"] = sum(r["unparsable"] for r in stats)
        row["rewards/rubric/position_consistency"] = (
            sum(r["position_consistency"] * r["pairs_both_orders"] for r in stats if r["pairs_both_orders"]) / both
            if both
            else float("nan")
        )
    return row


def _rollout_records(
    run: Run,
    batch: Batch,
    ro: Rollout,
    totals: list,
    adv: torch.Tensor,
    per_reward: dict,
    rows: list[dict],
    task_of_group: list[str],
    pol: int,
) -> list[dict]:
    """rollouts/step-N.jsonl: one record per sample (the policy's, then the critic's)."""
    records = []
    for j, text in enumerate(ro.texts):
        if j >= pol:  # critic-role samples: prompt, reply, verdict, reason, expected verdict, reward
            records.append({**batch.critic.records[j - pol], "advantage": float(adv[j])})
            continue
        rec = {
            "task": task_of_group[j // run.k],
            "prompt": rows[j // run.k]["prompt"],
            "completion": text,
            "reward": totals[j],
            "advantage": float(adv[j]),
            "truncated": bool(ro.truncated[j]),
            "rewards": {name: v[j] for name, v in per_reward.items()},
        }
        if run.accelerator.num_processes == 1 and batch.extras[j]:  # e.g. rubric verdicts and reasons
            rec["extras"] = batch.extras[j]
        if run.accelerator.num_processes == 1 and j in batch.episodes:  # the whole conversation of an episode
            rec["messages"] = batch.episodes[j].messages
        records.append(rec)
    return records


# ================================================================================================ eval / checkpoint
def periodic(run: Run, step: int) -> bool:
    """Evaluation and checkpoints due after `step`; True when a stop signal ends the run here (checkpoint written)."""
    cfg = run.cfg
    if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.trainer.steps:
        evaluate(run, step)
    if cfg.trainer.save_every and step % cfg.trainer.save_every == 0 and step != cfg.trainer.steps:
        checkpoint(run, step)
    if any_rank(run.accelerator, bool(run.stop.requested)) and step != cfg.trainer.steps:
        checkpoint(run, step)
        run.accelerator.print(
            f"stopped by {run.stop.requested} after step {step}; resume with: rlk2 train --resume {run.run_dir.path}"
        )
        return True
    return False


def evaluate(run: Run, step: int) -> dict:
    """Held-out evaluation of the current policy: eval/<task>/<metric> rows in metrics.jsonl at `step`."""
    with whole_weights(run.model):  # FSDP2: gathered once for the whole evaluation
        return _evaluate(run, step)


def _evaluate(run: Run, step: int) -> dict:
    acc, cfg = run.accelerator, run.cfg
    t0 = time.perf_counter()
    # Every process evaluates a share of the batches, and every one gets the whole result (rlk2.eval.evaluate.Split).
    split = Split(acc.process_index, acc.num_processes, gather_object) if acc.num_processes > 1 else None
    res = evaluate_policy(
        run.policy,
        run.tokenizer,
        [t.eval for t in run.tasks],
        run.engine,
        samples=cfg.eval.samples,
        temperature=cfg.eval.temperature,
        greedy=cfg.eval.greedy,
        batch_size=cfg.eval.batch_size,
        chat_template=cfg.policy.chat_template,
        seed=cfg.run.seed + 7919,
        ks=sorted({1, cfg.eval.samples}),
        split=split,
    )
    run.eval_records[step] = res.samples
    run.run_dir.append_metrics({"step": step, **res.metrics, "time/eval": time.perf_counter() - t0})  # main only
    if cfg.trainer.trackers:
        acc.log(res.metrics, step=step)
    return res.metrics


def checkpoint(run: Run, step: int) -> None:
    run.run_dir.save_checkpoint(
        step,
        run.policy,
        run.tokenizer,
        sharded=run.sharded,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        samplers=_samplers(run.sampler, run.ptx_sampler, run.paused),
        config_yaml=to_yaml(run.cfg),
        keep_last=run.cfg.trainer.keep_last,
    )
    run.accelerator.wait_for_everyone()


def finish(run: Run, before: dict) -> dict:
    """The last evaluation and checkpoint, then report.md with the before/after table."""
    run.stop.restore()
    after = before if run.cfg.trainer.steps == 0 else evaluate(run, run.cfg.trainer.steps)  # one step-0 row only
    checkpoint(run, run.cfg.trainer.steps)
    if run.cfg.trainer.trackers:
        run.accelerator.end_training()
    if run.accelerator.is_main_process:
        if not before:
            before = next(
                (
                    r
                    for r in run.run_dir.read_metrics()
                    if r.get("step") == 0 and any(key.startswith("eval/") for key in r)
                ),
                {},
            )
        print(run.run_dir.write_report(before, after))
        print(f"run directory: {run.run_dir.path}")
    return {"before": before, "after": after, "run_dir": str(run.run_dir.path)}
