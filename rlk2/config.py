"""The run configuration: one frozen dataclass tree, YAML recipes, dotted command-line overrides.

Defaults live here, with a docstring under every field. `load_config(path, overrides)` merges
defaults <- YAML <- overrides with OmegaConf (type-checked, unknown keys rejected), then checks every value's range
once (`Config.__post_init__`), and returns a frozen `Config`; every user mistake is a `UserError` whose one line
names the key. `load_structured` is the same loader for any other dataclass schema (the evaluation task files).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlk2.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
LOSS_NAMES = ("k2", "grpo", "dr_grpo", "dapo", "gspo")  # rlk2.algorithms.LOSSES (checked equal in the tests)


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"
    """Run name; the run directory is `runs/<name>` unless `dir` is set."""
    dir: Optional[str] = None
    """Run directory (overrides `runs/<name>`)."""
    seed: int = 0
    """Seed for model init, data order, sampling and every other random draw."""
    overwrite: bool = False
    """Allow writing into an existing non-empty run directory (otherwise an error; use --resume to continue)."""


@dataclass(frozen=True)
class TinyMoEShape:
    """Shape of the tiny DeepSeek-V3 demo MoE (used when policy.path is unset). Defaults give ~1 M parameters."""

    hidden_size: int = 96
    """Model width."""
    num_hidden_layers: int = 3
    """Decoder layers; the first `first_k_dense_replace` are dense, the rest MoE."""
    num_attention_heads: int = 4
    """MLA heads."""
    intermediate_size: int = 256
    """Width of the dense layers' MLP."""
    moe_intermediate_size: int = 64
    """Width of each expert's MLP."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer (sigmoid top-k router)."""
    num_experts_per_tok: int = 2
    """Experts chosen per token (k)."""
    n_shared_experts: int = 1
    """Shared experts every token goes through."""
    first_k_dense_replace: int = 1
    """Leading layers that are dense."""
    q_lora_rank: Optional[int] = None
    """Rank of the query compression (null: a plain query projection)."""
    kv_lora_rank: int = 32
    """Width of MLA's compressed key/value latent."""
    qk_nope_head_dim: int = 16
    """Per-head query/key width without rotary embedding."""
    qk_rope_head_dim: int = 8
    """Per-head query/key width with rotary embedding (even)."""
    v_head_dim: int = 16
    """Per-head value width."""
    max_position_embeddings: int = 256
    """Context length in tokens."""


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    """Train PEFT LoRA adapters instead of all weights."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"])
    """Module names to adapt (defaults: the MLA projections of DeepSeek-V3; Llama/Qwen use q_proj, k_proj, ...)."""


@dataclass(frozen=True)
class PolicyConfig:
    path: Optional[str] = None
    """Local Hugging Face checkpoint to train. Unset: build the tiny DeepSeek-V3 demo model."""
    dtype: str = "float32"
    """Parameter dtype: float32 | bfloat16 | float16."""
    attn_implementation: str = "eager"
    """transformers attention implementation: eager | sdpa."""
    chat_template: bool = True
    """Wrap prompts with the tokenizer's chat template (as a user turn) when it has one."""
    demo: TinyMoEShape = field(default_factory=TinyMoEShape)
    """Shape of the demo model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (PEFT)."""


@dataclass(frozen=True)
class WarmStartConfig:
    enabled: bool = True
    """Supervised warm start (TRL SFTTrainer) before RL. Cached by its settings; a second run reuses it."""
    steps: int = 300
    """SFT optimizer steps."""
    batch_size: int = 32
    """SFT batch size."""
    lr: float = 3e-3
    """SFT learning rate."""
    examples: int = 4000
    """Synthetic SFT examples drawn from the training split of each built-in task."""
    cache_dir: str = ".cache/rlk2/warmstart"
    """Where warm-start checkpoints are cached (keyed by a hash of everything that shapes them)."""


@dataclass(frozen=True)
class RewardConfig:
    name: str = "math"
    """A name in rewards.REWARDS, a dotted path `pkg.module:function`, or an entry point in group rlk2.rewards."""
    weight: float = 1.0
    """Weight in the total reward; 0 logs the reward without training on it."""
    timeout_s: float = 10.0
    """Process-level timeout for one call of this reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the reward function."""


@dataclass(frozen=True)
class TaskConfig:
    name: str = "arith"
    """Task name (used in metric names, e.g. eval/<name>/pass@1)."""
    source: str = "builtin:arith"
    """`builtin:<task>` for a synthetic task, or a local .jsonl / .parquet file with a `prompt` column."""
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    """Rewards scoring this task."""
    weight: float = 1.0
    """Relative share of this task in each batch of prompts."""
    max_new_tokens: int = 16
    """K2 budget control: the token budget of a response to this task; longer ones are truncated."""
    overlong_penalty: float = 0.0
    """Reward added (usually negative) to a response truncated at the budget."""
    mask_truncated: bool = False
    """Budget control: give responses truncated at the budget no loss at all (DAPO's overlong filtering)."""
    eval_size: int = 200
    """Held-out prompts for evaluation (taken from the eval split of builtin tasks, or the file's first rows)."""
    env: Optional[str] = None
    """Multi-turn episodes (DESIGN.md 2.6): an environment class, `pkg.module:Class`, `path/file.py:Class` or an entry
    point in group rlk2.envs; its reset(**row) gives the first message, its public methods are tools. The reward
    named `env` is the class's own reward(messages, **row); other rewards score the last assistant message."""
    tools: list[str] = field(default_factory=list)
    """Built-in tools the episodes may call besides the environment's methods: calculator, python (sandboxed)."""
    max_turns: int = 4
    """Assistant turns per episode; `max_new_tokens` is the budget of each turn."""
    tool_timeout_s: float = 10.0
    """Deadline of one tool call (and of reward(), close()); past it the model gets an error observation."""
    tool_parser: str = "hermes"
    """How tool calls are read from a turn: hermes (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`)."""
    describe_tools: str = "auto"
    """How the tools reach the model: template (the chat template's tools=), system (a system message listing their
    schemas), none (the policy knows them, e.g. from a warm start) or auto (template if it renders them, else
    system)."""


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 8
    """K responses sampled per prompt."""
    prompts_per_step: int = 16
    """Prompts per optimizer step (batch = prompts_per_step * group_size)."""
    temperature: float = 1.0
    """Sampling temperature (log-probs are taken from the same tempered distribution); the start value when
    `temperature_end` is set."""
    temperature_end: Optional[float] = None
    """K2 temperature decay: the temperature reached after `temperature_decay_steps` steps (null = constant).
    Each step samples and computes the training log-probs at that step's temperature; logged as
    `rollout/temperature`."""
    temperature_decay_steps: int = 0
    """Steps over which the temperature moves from `temperature` to `temperature_end`; 0 = trainer.steps - 1, so
    the last step samples at `temperature_end` (the schedule then follows trainer.steps, also on a resume)."""
    temperature_schedule: str = "linear"
    """Shape of the decay: linear | cosine."""
    top_p: float = 1.0
    """Nucleus sampling (1.0 = off; anything else makes the sampling distribution differ from the trained one)."""
    sampling: str = "uniform"
    """Prompt order within a task: uniform (seeded shuffle, epoch after epoch) | prioritized (Kimi k1.5: draw
    prompt i with probability proportional to max(1 - success_i, priority_floor), success_i its tracked success
    rate; never-seen prompts count as success 0, so they come first)."""
    success_threshold: float = 0.5
    """A response counts as a success for the tracked success rate when its total reward (weighted sum plus
    penalties) is above this; unscorable responses do not count. 0.5 suits 0/1 rewards."""
    priority_floor: float = 0.05
    """prioritized: the smallest sampling weight, so prompts that are always solved are still drawn now and then
    (weight 1 is an unsolved or unseen prompt)."""
    partial_tokens: Optional[int] = None
    """Partial rollouts (K2) for environment tasks: an episode that has generated this many policy tokens in a step
    and still calls tools is paused after its tools answer, and its group trains in the next step, where the
    episode is played to its end (null = off). Tokens keep the log-probs of the policy that sampled them; the loss
    weighs them by a truncated importance ratio (`algo.is_cap`). One process only."""
    engine: str = "local"
    """Who samples the rollouts: local (this process, rlk2's decoder) | server (an inference server at
    `server_url`: `rlk2 serve CKPT --weight-updates`, or vLLM; rlk2.rollout.server). With a server, the weights of
    the last finished step are pushed to it before each step samples, pi_old is recomputed by the trainer, and each
    token's loss is weighed by min(pi_old / pi_engine, algo.is_cap); `rollout/mismatch_kl` is logged. Under
    several processes the main one pushes and each samples its own groups from the server."""
    server_url: Optional[str] = None
    """engine=server: the server's base URL, e.g. http://127.0.0.1:8000/v1."""
    server_timeout_s: float = 600.0
    """engine=server: seconds one request (a step's sampling, a weight push) may take."""
    server_retries: int = 3
    """engine=server: retries of a failed request (with backoff 1, 2, 4 ... s) before the run stops with a
    checkpoint of its last finished step."""
    server_kind: str = "rlk2"
    """engine=server: rlk2 (`rlk2 serve --weight-updates`: weights pushed over HTTP, each sample drawn with its
    own seed, the weights version checked on every reply) | vllm (`vllm serve ... --weight-transfer-config
    '{"backend": "nccl"}'`: weights broadcast over NCCL from a CUDA device with TRL's VLLMClient, one seed per
    request)."""


@dataclass(frozen=True)
class PtxConfig:
    weight: float = 0.0
    """Weight of the PTX loss in the total: loss = policy loss + weight * PTX loss (0 = off). Logged as `loss`
    (the total), `loss/policy` and `loss/ptx` (mean negative log-likelihood per completion token)."""
    source: Optional[str] = None
    """PTX data: a built-in task (`builtin:max`, or just `max`; its training split with gold completions) or a
    .jsonl / .parquet file whose rows have `prompt` and `completion` text. Prompts are rendered as for rollouts
    (chat template); the loss covers the completion tokens and EOS only."""
    batch_size: int = 16
    """PTX rows per optimizer step (drawn in a seeded shuffled order, saved for exact resume)."""


@dataclass(frozen=True)
class AlgoConfig:
    loss: str = "k2"
    """Policy loss: k2 | grpo | dr_grpo | dapo | gspo (rlk2.algorithms.LOSSES)."""
    tau: float = 0.05
    """k2: regularisation strength tau of the squared mirror-descent objective (> 0)."""
    length_norm: bool = False
    """k2: average the per-token log-ratio instead of summing it."""
    clip_low: float = 0.2
    """Ratio clip below 1 (grpo family)."""
    clip_high: float = 0.2
    """Ratio clip above 1 (grpo family; dapo's clip-higher uses a larger value)."""
    is_cap: float = 2.0
    """Cap of the importance ratio pi_old / pi_sampler that weighs tokens pi_old did not sample itself: those an
    earlier step's policy sampled (partial rollouts) and those an inference server sampled (rollout.engine=server)
    (truncated importance sampling, as TRL and verl correct rollout/trainer mismatch)."""
    scale_rewards: Optional[bool] = None
    """Divide each group's advantages by its reward std: null = the loss's own convention (grpo, dapo, gspo scale;
    k2 and dr_grpo do not, as their papers define them); true / false force it either way."""
    inner_steps: int = 1
    """Optimizer steps per rollout batch (>1 makes the policy move off pi_old within the batch)."""
    filter_zero_std: bool = False
    """DAPO-style dynamic filtering: groups whose valid rewards all tie (advantage 0) are dropped from the loss, so
    they no longer dilute its normalisation nor, for k2, add the tau * log-ratio term (rlk2/controls.py lists the
    effect on each loss). No prompts are drawn to refill the batch; `groups/kept` logs how many groups trained."""
    ptx: PtxConfig = field(default_factory=PtxConfig)
    """K2's PTX loss: an auxiliary next-token loss on curated data added to the RL loss."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "muonclip"
    """Optimizer: muonclip (K2's Muon + QK-Clip, the default; see rlk2/optim/README.md) | adamw."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float = 1.0
    """Max global grad norm (0 = off)."""
    qk_clip_tau: Optional[float] = 100.0
    """muonclip: QK-Clip threshold on the max pre-softmax logit (null disables clipping)."""


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = 40
    """RL optimizer steps."""
    log_every: int = 1
    """Progress bar / tracker update period."""
    save_every: int = 0
    """Checkpoint period in steps (0 = only at the end)."""
    keep_last: int = 2
    """How many checkpoints to keep (0 = all)."""
    save_rollouts: bool = True
    """Write rollouts/step-<N>.jsonl."""
    trackers: list[str] = field(default_factory=list)
    """Accelerate trackers, e.g. [tensorboard]."""
    max_bad_steps: int = 3
    """A step whose loss or gradient is NaN/inf is skipped; this many in a row stop the run with an error."""
    shared_prompt_tokens: int = 256
    """The training forward runs each distinct prompt once (a group's K sequences attend to one copy through a KV
    cache; same log-probs and gradient) when that saves at least this many prompt tokens; below, the extra forward
    call costs more than the tokens it saves (measured on the demo model, CPU). 0 = always, -1 = never. One process
    only (DDP expects one forward per backward)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input during the training forward and recompute the rest in the backward
    (transformers' gradient checkpointing): activation memory falls from all layers' to about one layer's, for about
    one extra forward of compute. For real models whose training batch does not fit otherwise; dense policies only
    (a recomputed MoE forward would re-run router hooks), and the training forward then runs without shared prompts."""
    mixed_precision: str = "fp32"
    """The training forward's precision: "fp32", "bf16" (bfloat16 autocast: the products in bfloat16, the
    weights, gradients and optimizer state float32, the LM head and MoE routers float32 too) or "auto" (bf16 where the
    hardware multiplies it natively: CUDA, or a CPU with AVX512-BF16 or AMX; else float32). On SmolLM2 on this
    project's 2-core AVX512-BF16 machine, a forward and backward of 16 x 170 tokens takes 8.2-9.5 s instead of
    17.4-22 s. The rollouts decode in bfloat16 there already (`rlk2.hardware.fast_dtype`). An Accelerate launch config's
    own `mixed_precision` adds Accelerate's autocast; the LM head and routers stay float32 under it too.
    FSDP2 runs take their precision from the FSDP plugin."""
    reward_workers: int = 2
    """Worker processes of the reward engine (rewards that run apart from training: math, code, user rewards)."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0 = only at step 0 and at the end)."""
    samples: int = 4
    """Samples per held-out prompt (pass@1 is their mean success)."""
    temperature: float = 1.0
    """Sampling temperature for evaluation samples (> 0; the greedy measurement is `greedy`)."""
    greedy: bool = True
    """Also measure greedy pass@1."""
    batch_size: int = 256
    """Sequences generated at once."""


@dataclass(frozen=True)
class MoEConfig:
    router_replay: bool = True
    """Force the experts recorded during generation in the training forward (gate weights still come from the
    current router, which keeps its gradient). On by default: a top-k flip between the sampling and the training
    forward makes pi_theta / pi_old compare two different networks. No effect on dense policies (rlk2.moe)."""
    bias_update_rate: float = 1e-3
    """DeepSeek-V3 auxiliary-loss-free balancing: after each optimizer step, e_score_correction_bias_i +=
    rate * sign(mean load - load_i) in every MoE layer that has the buffer (0 = off; the paper used 1e-3)."""
    aux_loss_coef: float = 0.0
    """Weight of transformers' load-balancing loss over the training forward's router logits (Qwen3-MoE,
    Mixtral, ...; 0 = off). DeepSeek-V3-family routers have none: use bias_update_rate."""


@dataclass(frozen=True)
class QatConfig:
    enabled: bool = False
    """Quantization-aware training (K2-Thinking, rlk2.qat): the weights of `modules` are read as INT4 (symmetric,
    per group) in rollouts, the training forward and evaluation, with full-precision master weights and optimizer
    state and a straight-through gradient. Checkpoints hold the master weights."""
    group_size: int = 32
    """Weights per quantization group along the input dimension (K2-Thinking: 32); must divide it."""
    modules: list[str] = field(default_factory=lambda: ["experts"])
    """Modules whose weight matrices are quantized (routers never): a name with a dot is matched against whole
    module names (fnmatch, e.g. model.layers.*.mlp.experts), one without against their last part. Default: the
    routed experts; a dense policy has none (name e.g. mlp)."""


@dataclass(frozen=True)
class CriticConfig:
    refine: bool = False
    """Closed-loop critic refinement (K2, DESIGN.md 5): the policy, as critic, judges pairs of its own responses
    whose verifiable rewards differ; agreement with the verifier is the critic role's reward, in the same policy
    update. Single process only (see rlk2.critic.refine). The critic prompt template and rubrics are the rubric
    reward's own (`template` and `rubrics` in its kwargs), or the shipped ones when no task has a rubric reward."""
    tasks: list[str] = field(default_factory=list)
    """Tasks whose verifiable rewards ground the critic; empty = every task without a `rubric` reward."""
    pairs_per_prompt: int = 1
    """Verified pairs per prompt per step; each is judged in both orders, group_size sampled verdicts per order."""
    max_pairs: Optional[int] = None
    """Most verified pairs per step (null = no cap); the step's update holds up to 2 * max_pairs * group_size
    critic samples."""
    max_new_tokens: int = 64
    """Token budget of one critic reply (reason + verdict)."""
    unparsable_reward: Optional[float] = 0.0
    """Critic-role reward of a reply without a parsable verdict (null = unscorable; see rlk2.critic.refine)."""
    reward: str = "per_order"
    """per_order: each verdict earns 1.0 when it names the verifier's choice. both_orders: a verdict earns 1.0 only
    when its partner verdict on the same pair shown the other way round is right too, so a critic that names one
    position whatever it is shown earns nothing (0.5 a pair with per_order; see rlk2.critic.refine)."""
    pair_baseline: bool = True
    """Both orders of a pair form one advantage group (2 x group_size verdicts) instead of one group per order.
    A critic that always names the same position is then right in one order and wrong in the other, so its
    samples still get advantages (toward judging the responses, not the position); with one group per order
    every such group ties and carries no gradient (see rlk2.critic.refine.pair_advantages)."""
    heldout_pairs: int = 128
    """Held-out verified pairs (from the step-0 evaluation samples) on which critic/agreement is measured."""
    agreement_every: int = 1
    """Measure critic/agreement every N steps (always at step 0 and at the last step)."""
    warm_start_examples: int = 0
    """Critic-format rows added to the supervised warm start (for toy models that have never seen a critic prompt):
    a gold completion against another row's, in random order (rlk2.critic.refine.format_warmup_rows)."""
    warm_start_verdicts: str = "both"
    """both: each critic prompt once with each verdict (the reply format, no judgement: the critic starts at
    chance); gold: the gold completion's letter (a critic initialised on synthetic preference pairs, as K2's
    starts from preference data; the pairs' wrong answers are other rows' answers, not the policy's near misses)."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig()])
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    qat: QatConfig = field(default_factory=QatConfig)

    def __post_init__(self) -> None:
        _check_finite(self, "")
        for key, ok, rule in _rules(self):
            if not ok:
                raise UserError(f"{key}: {rule}")
        _check_critic_tasks(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


# ================================================================================================ validation
def _rules(c: Config) -> list[tuple[str, bool, str]]:
    """(key, value is acceptable, the rule in words) for every value with a range: checked once, at load."""
    ro, al, op, tr, ev, ws, sh, cr = (
        c.rollout,
        c.algo,
        c.optim,
        c.trainer,
        c.eval,
        c.warm_start,
        c.policy.demo,
        c.critic,
    )
    names = [t.name for t in c.tasks]
    rules = [
        ("run.seed", c.run.seed >= 0, "must be >= 0"),
        ("policy.dtype", c.policy.dtype in ("float32", "bfloat16", "float16"), "must be float32, bfloat16 or float16"),
        ("policy.attn_implementation", c.policy.attn_implementation in ("eager", "sdpa"), "must be eager or sdpa"),
        ("policy.lora.r", c.policy.lora.r >= 1, "must be >= 1"),
        ("warm_start.steps", not ws.enabled or ws.steps >= 1, "must be >= 1 (or warm_start.enabled=false)"),
        ("warm_start.batch_size", ws.batch_size >= 1, "must be >= 1"),
        ("warm_start.lr", ws.lr > 0, "must be > 0"),
        ("warm_start.examples", ws.examples >= 1, "must be >= 1"),
        ("tasks", bool(c.tasks), "at least one task is required"),
        (
            "tasks",
            len(set(names)) == len(names),
            f"task names must be distinct ('{next((n for n in names if names.count(n) > 1), '')}' appears twice): they "
            "name the metrics eval/<task>/...",
        ),
        ("rollout.group_size", ro.group_size >= 2, "must be >= 2 (advantages compare responses within a group)"),
        ("rollout.prompts_per_step", ro.prompts_per_step >= 1, "must be >= 1"),
        ("rollout.partial_tokens", ro.partial_tokens is None or ro.partial_tokens >= 1, "must be >= 1 (or null: off)"),
        ("algo.is_cap", c.algo.is_cap >= 1.0, "must be >= 1 (the largest importance weight of a token)"),
        ("rollout.engine", ro.engine in ("local", "server"), "must be local or server"),
        (
            "rollout.server_url",
            ro.engine != "server" or (ro.server_url or "").startswith(("http://", "https://")),
            "required with rollout.engine=server: the server's http:// or https:// base URL",
        ),
        ("rollout.server_timeout_s", ro.server_timeout_s > 0, "must be > 0"),
        ("rollout.server_kind", ro.server_kind in ("rlk2", "vllm"), "must be rlk2 or vllm"),
        ("rollout.server_retries", ro.server_retries >= 0, "must be >= 0"),
        ("rollout.temperature", ro.temperature > 0, "must be > 0 (log-probs are of the tempered distribution)"),
        (
            "rollout.temperature_end",
            ro.temperature_end is None or ro.temperature_end > 0,
            "must be > 0 (log-probs are of the tempered distribution)",
        ),
        ("rollout.temperature_decay_steps", ro.temperature_decay_steps >= 0, "must be >= 0"),
        ("rollout.temperature_schedule", ro.temperature_schedule in ("linear", "cosine"), "must be linear or cosine"),
        ("rollout.top_p", 0 < ro.top_p <= 1, "must be in (0, 1]"),
        ("rollout.sampling", ro.sampling in ("uniform", "prioritized"), "must be uniform or prioritized"),
        ("rollout.priority_floor", 0 < ro.priority_floor <= 1, "must be in (0, 1]"),
        ("algo.loss", al.loss in LOSS_NAMES, f"'{al.loss}' is not one of {', '.join(LOSS_NAMES)}"),
        ("algo.tau", al.tau > 0, "must be > 0 (the k2 loss's regularisation strength)"),
        ("algo.clip_low", 0 <= al.clip_low < 1, "must be in [0, 1)"),
        ("algo.clip_high", al.clip_high >= 0, "must be >= 0"),
        ("algo.inner_steps", al.inner_steps >= 1, "must be >= 1 (optimizer steps per rollout batch)"),
        ("algo.ptx.weight", al.ptx.weight >= 0, "must be >= 0 (0 turns the PTX loss off)"),
        (
            "algo.ptx.source",
            al.ptx.weight == 0 or bool(al.ptx.source),
            "required when algo.ptx.weight > 0 (a built-in task or a .jsonl file)",
        ),
        ("algo.ptx.batch_size", al.ptx.batch_size >= 1, "must be >= 1"),
        ("optim.name", op.name in ("adamw", "muonclip"), f"'{op.name}' is not one of adamw, muonclip"),
        ("optim.lr", op.lr > 0, "must be > 0"),
        ("optim.weight_decay", op.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_steps", op.warmup_steps >= 0, "must be >= 0"),
        ("optim.grad_clip", op.grad_clip >= 0, "must be >= 0 (0 = off)"),
        ("optim.qk_clip_tau", op.qk_clip_tau is None or op.qk_clip_tau > 0, "must be > 0 (or null to disable)"),
        ("trainer.steps", tr.steps >= 0, "must be >= 0"),
        ("trainer.log_every", tr.log_every >= 1, "must be >= 1"),
        ("trainer.save_every", tr.save_every >= 0, "must be >= 0 (0 = only at the end)"),
        ("trainer.keep_last", tr.keep_last >= 0, "must be >= 0 (0 = keep every checkpoint)"),
        ("trainer.max_bad_steps", tr.max_bad_steps >= 1, "must be >= 1"),
        ("trainer.shared_prompt_tokens", tr.shared_prompt_tokens >= -1, "must be >= 0, or -1 (never share prompts)"),
        ("trainer.reward_workers", 1 <= tr.reward_workers <= 64, "must be in 1..64"),
        ("trainer.mixed_precision", tr.mixed_precision in ("fp32", "bf16", "auto"), "must be fp32, bf16 or auto"),
        ("eval.every", ev.every >= 0, "must be >= 0 (0 = only at the start and the end)"),
        ("eval.samples", ev.samples >= 1, "must be >= 1"),
        ("eval.temperature", ev.temperature > 0, "must be > 0 (greedy pass@1 is measured by eval.greedy)"),
        ("eval.batch_size", ev.batch_size >= 1, "must be >= 1"),
        ("moe.bias_update_rate", c.moe.bias_update_rate >= 0, "must be >= 0 (0 turns the bias update off)"),
        ("moe.aux_loss_coef", c.moe.aux_loss_coef >= 0, "must be >= 0 (0 turns the loss off)"),
        ("critic.pairs_per_prompt", cr.pairs_per_prompt >= 1, "must be >= 1"),
        ("critic.max_new_tokens", cr.max_new_tokens >= 1, "must be >= 1"),
        ("critic.heldout_pairs", cr.heldout_pairs >= 1, "must be >= 1"),
        ("critic.agreement_every", cr.agreement_every >= 1, "must be >= 1"),
        ("critic.max_pairs", cr.max_pairs is None or cr.max_pairs >= 1, "must be >= 1 (or null for no cap)"),
        ("critic.warm_start_examples", cr.warm_start_examples >= 0, "must be >= 0"),
        ("critic.warm_start_verdicts", cr.warm_start_verdicts in ("both", "gold"), "must be both or gold"),
        ("critic.reward", cr.reward in ("per_order", "both_orders"), "must be per_order or both_orders"),
        ("qat.group_size", c.qat.group_size >= 1, "must be >= 1"),
        ("qat.modules", not c.qat.enabled or len(c.qat.modules) > 0, "must name at least one module"),
    ]
    return rules + _shape_rules(sh) + _task_rules(c.tasks)


def _shape_rules(sh: TinyMoEShape) -> list[tuple[str, bool, str]]:
    """The demo model's shape (policy.demo): sizes that transformers would otherwise reject with a traceback."""
    rules: list[tuple[str, bool, str]] = []
    shape = [
        (k, getattr(sh, k))
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "moe_intermediate_size",
            "n_routed_experts",
            "num_experts_per_tok",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
        )
    ]
    rules += [(f"policy.demo.{k}", v >= 1, "must be >= 1") for k, v in shape]
    rules += [
        (
            "policy.demo.num_experts_per_tok",
            sh.num_experts_per_tok <= sh.n_routed_experts,
            f"must be <= policy.demo.n_routed_experts ({sh.n_routed_experts})",
        ),
        ("policy.demo.qk_rope_head_dim", sh.qk_rope_head_dim % 2 == 0, "must be even (rotary pairs)"),
        # torch's grouped expert product needs 16-byte strides: multiples of 8 cover float32 and bfloat16 alike
        ("policy.demo.hidden_size", sh.hidden_size % 8 == 0, "must be a multiple of 8 (the experts' kernel)"),
        (
            "policy.demo.moe_intermediate_size",
            sh.moe_intermediate_size % 8 == 0,
            "must be a multiple of 8 (the experts' kernel)",
        ),
        ("policy.demo.n_shared_experts", sh.n_shared_experts >= 0, "must be >= 0"),
        (
            "policy.demo.first_k_dense_replace",
            0 <= sh.first_k_dense_replace <= sh.num_hidden_layers,
            "must be in 0..policy.demo.num_hidden_layers",
        ),
        ("policy.demo.q_lora_rank", sh.q_lora_rank is None or sh.q_lora_rank >= 1, "must be >= 1 (or null)"),
    ]
    return rules


def _task_rules(tasks: list[TaskConfig]) -> list[tuple[str, bool, str]]:
    rules: list[tuple[str, bool, str]] = []
    for i, t in enumerate(tasks):
        rules += [
            (f"tasks[{i}].rewards", bool(t.rewards), f"task '{t.name}' has no reward"),
            (f"tasks[{i}].name", bool(t.name.strip()), "must be a non-empty name"),
            (f"tasks[{i}].weight", t.weight > 0, "must be > 0 (the task's share of each batch)"),
            (f"tasks[{i}].max_new_tokens", t.max_new_tokens >= 1, "must be >= 1"),
            (f"tasks[{i}].eval_size", t.eval_size >= 1, "must be >= 1 (held-out prompts for evaluation)"),
            (f"tasks[{i}].max_turns", t.max_turns >= 1, "must be >= 1"),
            (f"tasks[{i}].tool_timeout_s", t.tool_timeout_s > 0, "must be > 0"),
            (
                f"tasks[{i}].describe_tools",
                t.describe_tools in ("auto", "template", "system", "none"),
                f"'{t.describe_tools}' is not one of auto, template, system, none",
            ),
            (
                f"tasks[{i}].tools",
                t.env is not None or not t.tools,
                "tools need an environment (set env:, e.g. rlk2.envs.builtin:Question)",
            ),
            (
                f"tasks[{i}].rewards",
                t.env is not None or all(r.name != "env" for r in t.rewards),
                "the reward 'env' is an environment's own reward; this task has no env",
            ),
        ]
        rules += [
            (f"tasks[{i}].rewards[{j}].timeout_s", r.timeout_s > 0, "must be > 0") for j, r in enumerate(t.rewards)
        ]
        rules.append(
            (
                f"tasks[{i}].rewards",
                not t.rewards or t.overlong_penalty != 0 or any(r.weight for r in t.rewards),
                f"every reward of task '{t.name}' has weight 0 (and no overlong_penalty): its responses "
                "could never produce a gradient",
            )
        )
    return rules


def _check_finite(node: Any, key: str) -> None:
    """NaN and infinity are refused in every float field (a NaN temperature would silently skip every step)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _check_finite(item, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise UserError(f"{key}: {node} is not a finite number")


def _check_critic_tasks(cfg: Config) -> None:
    names = [t.name for t in cfg.tasks]
    for i, name in enumerate(cfg.critic.tasks):
        if name not in names:
            raise UserError(f"critic.tasks[{i}]: '{name}' is not a task (tasks: {', '.join(names)})")
    if cfg.critic.refine and not critic_tasks(cfg):
        raise UserError(
            "critic.refine: no task with a verifiable reward to ground the critic (every task is scored "
            "by the rubric reward); add one or name it in critic.tasks"
        )


def critic_tasks(cfg: Config) -> list[str]:
    """Tasks whose verifiable rewards ground the critic: `critic.tasks`, or every task without a rubric reward."""
    if cfg.critic.tasks:
        return list(cfg.critic.tasks)
    return [t.name for t in cfg.tasks if not any(r.name.rsplit(":", 1)[-1] == "rubric" for r in t.rewards)]


# ================================================================================================ loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults <- YAML file <- `key=value` overrides, validated; returns the frozen Config."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    return load_structured(Config, _upgrade(read_yaml(path), path), where=path.name, overrides=overrides)


def _upgrade(data: DictConfig, path: Path) -> DictConfig:
    """A config.yaml written before critic.template / critic.rubrics were retired (they were the rubric reward's
    options twice): drop them when they hold the old defaults, else say where they went. Such a file is a full
    dump of that version's config, whose algo.scale_rewards (then `true`) was read nowhere: it becomes null, the
    behaviour that run trained with."""
    critic = data.get("critic")
    if not isinstance(critic, DictConfig) or "template" not in critic:
        return data
    for key, old_default in (("template", None), ("rubrics", ["core", "prescriptive"])):
        if key in critic:
            value = OmegaConf.to_container(critic)[key]
            if value != old_default:
                raise UserError(
                    f"{path}: critic.{key} is no longer a key: the refined critic uses the rubric "
                    f"reward's `{key}` option (tasks[i].rewards[j].kwargs.{key})"
                )
            del critic[key]
    algo = data.get("algo")
    if isinstance(algo, DictConfig) and algo.get("scale_rewards") is True:
        algo["scale_rewards"] = None
    return data


def read_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors and the like
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: {first}") from None
    if not isinstance(data, DictConfig):
        raise UserError(f"{path}: expected a mapping of sections or fields, got {type(data).__name__}")
    return data


def load_structured(schema: type, data: DictConfig, *, where: str, overrides: typing.Sequence[str] = ()) -> Any:
    """`data` merged onto the dataclass `schema`'s defaults, then each `key=value` override, validated by
    OmegaConf (types, unknown keys) and by the dataclasses' own checks; returns the frozen dataclass.

    Every mistake is one `UserError` line naming the key: `where` (the file) for the file's own values, the
    override for an override's."""
    base = OmegaConf.structured(schema)
    merged = _merge(base, data, where, schema)
    plain = OmegaConf.create(OmegaConf.to_container(merged))  # untyped: overrides may reach into lists
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r}: expected key=value, e.g. rollout.group_size=4")
        try:
            value = OmegaConf.from_dotlist([f"value={text}"])["value"]  # YAML scalars and flow collections
        except (OmegaConfBaseException, yaml.YAMLError):
            value = text  # not YAML (`a: b`, a tag): the text itself, which the schema then accepts or names
        try:
            OmegaConf.update(plain, key, value, merge=True)
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            raise UserError(f"override {item!r}: {_first_line(exc)}") from None
        merged = _merge(base, plain, f"override {key}", schema, key_hint=key)
    try:
        return OmegaConf.to_object(merged)  # runs the dataclasses' own checks (__post_init__), which raise UserError
    except OmegaConfBaseException as exc:
        raise UserError(f"{where}: {_first_line(exc)}") from None


def _merge(base: DictConfig, data: DictConfig, where: str, schema: type, key_hint: str | None = None) -> DictConfig:
    """OmegaConf.merge with errors that name the full key, also inside lists of dataclasses (`tasks[1].rewards[0]
    .weight`), where OmegaConf's own message names only the last segment."""
    _check_lists(schema, data, "", where)
    try:
        return OmegaConf.merge(base, data)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:  # OmegaConf raises TypeError for list-vs-mapping
        key = getattr(exc, "full_key", None) or key_hint or ""
        raise UserError(_message(exc, key, where)) from None


def _check_lists(schema: type, data: Any, prefix: str, where: str) -> None:
    """Validate each element of every list-of-dataclass field on its own, so that an error can name its index."""
    if not isinstance(data, DictConfig) or not dataclasses.is_dataclass(schema):
        return
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        key = f"{prefix}{f.name}"
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            if not isinstance(value, ListConfig):
                raise UserError(f"{where}: config key '{key}': expected a list of {args[0].__name__} entries")
            for i, item in enumerate(value):
                if not isinstance(item, DictConfig):
                    raise UserError(
                        f"{where}: config key '{key}[{i}]': expected a mapping of {args[0].__name__} fields"
                    )
                _check_lists(args[0], item, f"{key}[{i}].", where)
                try:
                    OmegaConf.merge(OmegaConf.structured(args[0]), item)
                except (OmegaConfBaseException, TypeError, ValueError) as exc:
                    inner = getattr(exc, "full_key", None) or ""
                    raise UserError(_message(exc, f"{key}[{i}]" + (f".{inner}" if inner else ""), where)) from None
        elif dataclasses.is_dataclass(hint):
            _check_lists(hint, value, f"{key}.", where)
        elif typing.get_origin(hint) is dict and not isinstance(value, DictConfig):
            raise UserError(f"{where}: config key '{key}': expected a mapping {{key: value}}")
        elif typing.get_origin(hint) is list and not isinstance(value, ListConfig):
            raise UserError(f"{where}: config key '{key}': expected a list")


def _message(exc: Exception, key: str, where: str) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    for part in {key, *key.split(".")} - {""}:  # a key typed with a line break: escaped where the error quotes it
        msg = msg.replace(part, _printable(part))
    msg = _first_line(msg)
    key, where = _printable(key), _printable(where)
    if "not in" in msg or ("Key '" in msg and "not" in msg):
        return f"unknown config key '{key}' ({where})"
    return f"config key '{key}': {msg} ({where})" if key else f"{where}: {msg}"


def _printable(text: str) -> str:
    """`text` with line breaks and other unprintable characters written as escapes (\\n, \\x1c, ...)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _first_line(exc: Exception | str) -> str:
    msg = exc if isinstance(exc, str) else getattr(exc, "msg", None) or str(exc)
    lines = msg.strip().splitlines()
    return lines[0] if lines else (type(exc).__name__ if not isinstance(exc, str) else "invalid value")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
