"""The run configuration: one frozen dataclass tree, YAML recipes, dotted command-line overrides.

Defaults live here, with a docstring under every field. `load_config(path, overrides)` merges
defaults <- YAML <- overrides with OmegaConf (type-checked, unknown keys rejected) and returns a frozen `Config`;
every user mistake becomes a `UserError` whose one line names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlk2.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


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
class DemoModelConfig:
    hidden_size: int = 96
    """Width of the tiny DeepSeek-V3 demo model (used when policy.path is unset)."""
    num_hidden_layers: int = 3
    """Layers; the first is dense, the rest MoE."""
    num_attention_heads: int = 4
    """MLA heads."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer (sigmoid top-k router)."""
    num_experts_per_tok: int = 2
    """Experts chosen per token."""


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
    demo: DemoModelConfig = field(default_factory=DemoModelConfig)
    """Shape of the demo model."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (PEFT)."""

    def __post_init__(self) -> None:
        _choice("policy.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("policy.attn_implementation", self.attn_implementation, ("eager", "sdpa"))


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
    """k2: regularisation strength tau of the squared mirror-descent objective."""
    length_norm: bool = False
    """k2: average the per-token log-ratio instead of summing it."""
    clip_low: float = 0.2
    """Ratio clip below 1 (grpo family)."""
    clip_high: float = 0.2
    """Ratio clip above 1 (grpo family; dapo's clip-higher uses a larger value)."""
    scale_rewards: bool = True
    """grpo: divide advantages by the group's reward std."""
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

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "muonclip"))


@dataclass(frozen=True)
class TrainerConfig:
    steps: int = 40
    """RL optimizer steps."""
    log_every: int = 1
    """Progress bar / tracker update period."""
    save_every: int = 0
    """Checkpoint period in steps (0 = only at the end)."""
    keep_last: int = 2
    """How many checkpoints to keep."""
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


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Evaluate every N steps (0 = only at step 0 and at the end)."""
    samples: int = 4
    """Samples per held-out prompt (pass@1 is their mean success)."""
    temperature: float = 1.0
    """Sampling temperature for evaluation samples."""
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

    def __post_init__(self) -> None:
        if self.bias_update_rate < 0:
            raise UserError("moe.bias_update_rate: must be >= 0 (0 turns the bias update off)")
        if self.aux_loss_coef < 0:
            raise UserError("moe.aux_loss_coef: must be >= 0 (0 turns the loss off)")


@dataclass(frozen=True)
class CriticConfig:
    refine: bool = False
    """Closed-loop critic refinement (K2, DESIGN.md 5): the policy, as critic, judges pairs of its own responses
    whose verifiable rewards differ; agreement with the verifier is the critic role's reward, in the same policy
    update. Single process only (see rlk2.critic_refine)."""
    template: Optional[str] = None
    """Critic prompt template (.txt); null = rewards/critic_prompt.txt. Use the same one as the rubric reward."""
    rubrics: list[str] = field(default_factory=lambda: ["core", "prescriptive"])
    """Rubric sets by name, or .toml / .yaml paths, shown to the critic (as for the rubric reward)."""
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
    """Critic-role reward of a reply without a parsable verdict (null = unscorable; see rlk2.critic_refine)."""
    pair_baseline: bool = True
    """Both orders of a pair form one advantage group (2 x group_size verdicts) instead of one group per order.
    A critic that always names the same position is then right in one order and wrong in the other, so its
    samples still get advantages (toward judging the responses, not the position); with one group per order
    every such group ties and carries no gradient (see rlk2.critic_refine.pair_advantages)."""
    heldout_pairs: int = 128
    """Held-out verified pairs (from the step-0 evaluation samples) on which critic/agreement is measured."""
    agreement_every: int = 1
    """Measure critic/agreement every N steps (always at step 0 and at the last step)."""
    warm_start_examples: int = 0
    """Critic-format rows added to the supervised warm start (for toy models that have never seen a critic prompt):
    a gold completion against another row's, in random order (rlk2.critic_refine.format_warmup_rows)."""
    warm_start_verdicts: str = "both"
    """both: each critic prompt once with each verdict (the reply format, no judgement: the critic starts at
    chance); gold: the gold completion's letter (a critic initialised on synthetic preference pairs, as K2's
    starts from preference data; the pairs' wrong answers are other rows' answers, not the policy's near misses)."""

    def __post_init__(self) -> None:
        for key in ("pairs_per_prompt", "max_new_tokens", "heldout_pairs", "agreement_every"):
            if getattr(self, key) < 1:
                raise UserError(f"critic.{key}: must be >= 1")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise UserError("critic.max_pairs: must be >= 1 (or null for no cap)")
        if self.warm_start_examples < 0:
            raise UserError("critic.warm_start_examples: must be >= 0")
        _choice("critic.warm_start_verdicts", self.warm_start_verdicts, ("both", "gold"))


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

    def __post_init__(self) -> None:
        if not self.tasks:
            raise UserError("tasks: at least one task is required")
        for i, task in enumerate(self.tasks):
            if not task.rewards:
                raise UserError(f"tasks[{i}].rewards: task '{task.name}' has no reward")
            if task.max_new_tokens < 1:
                raise UserError(f"tasks[{i}].max_new_tokens: must be >= 1")
        if self.rollout.group_size < 2:
            raise UserError("rollout.group_size: must be >= 2 (advantages compare responses within a group)")
        if self.rollout.prompts_per_step < 1:
            raise UserError("rollout.prompts_per_step: must be >= 1")
        if self.rollout.temperature <= 0:
            raise UserError("rollout.temperature: must be > 0 (log-probs are of the tempered distribution)")
        if self.trainer.steps < 0:
            raise UserError("trainer.steps: must be >= 0")
        if self.trainer.shared_prompt_tokens < -1:
            raise UserError("trainer.shared_prompt_tokens: must be >= 0, or -1 (never share prompts)")
        ro = self.rollout
        if ro.temperature_end is not None and ro.temperature_end <= 0:
            raise UserError("rollout.temperature_end: must be > 0 (log-probs are of the tempered distribution)")
        if ro.temperature_decay_steps < 0:
            raise UserError("rollout.temperature_decay_steps: must be >= 0")
        _choice("rollout.temperature_schedule", ro.temperature_schedule, ("linear", "cosine"))
        _choice("rollout.sampling", ro.sampling, ("uniform", "prioritized"))
        if not 0 < ro.priority_floor <= 1:
            raise UserError("rollout.priority_floor: must be in (0, 1]")
        ptx = self.algo.ptx
        if ptx.weight < 0:
            raise UserError("algo.ptx.weight: must be >= 0 (0 turns the PTX loss off)")
        if ptx.weight > 0 and not ptx.source:
            raise UserError("algo.ptx.source: required when algo.ptx.weight > 0 (a built-in task or a .jsonl file)")
        if ptx.batch_size < 1:
            raise UserError("algo.ptx.batch_size: must be >= 1")
        if self.algo.inner_steps < 1:
            raise UserError("algo.inner_steps: must be >= 1 (optimizer steps per rollout batch)")
        from rlk2.algorithms import LOSSES

        _choice("algo.loss", self.algo.loss, tuple(LOSSES))
        _check_critic_tasks(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


def _check_critic_tasks(cfg: Config) -> None:
    names = [t.name for t in cfg.tasks]
    for i, name in enumerate(cfg.critic.tasks):
        if name not in names:
            raise UserError(f"critic.tasks[{i}]: '{name}' is not a task (tasks: {', '.join(names)})")
    if cfg.critic.refine and not critic_tasks(cfg):
        raise UserError("critic.refine: no task with a verifiable reward to ground the critic (every task is scored "
                        "by the rubric reward); add one or name it in critic.tasks")


def critic_tasks(cfg: Config) -> list[str]:
    """Tasks whose verifiable rewards ground the critic: `critic.tasks`, or every task without a rubric reward."""
    if cfg.critic.tasks:
        return list(cfg.critic.tasks)
    return [t.name for t in cfg.tasks if not any(r.name.rsplit(":", 1)[-1] == "rubric" for r in t.rewards)]


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults <- YAML file <- `key=value` overrides, validated; returns the frozen Config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r}: expected key=value, e.g. rollout.group_size=4")
    try:
        schema = OmegaConf.structured(Config)
        file_cfg = OmegaConf.load(path)
        plain = OmegaConf.to_container(OmegaConf.merge(schema, file_cfg))
        for item in overrides:
            key, value = item.split("=", 1)
            _set_dotted(plain, key, _parse_value(value))
        merged = OmegaConf.merge(schema, plain)  # validates every key and type, overrides included
        obj = OmegaConf.to_object(merged)
    except UserError:
        raise
    except OmegaConfBaseException as exc:
        raise UserError(_omegaconf_message(exc, path)) from None
    except Exception as exc:  # yaml syntax errors and the like
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: {first}") from None
    return obj


def _set_dotted(tree: dict, key: str, value) -> None:
    """Set `a.b.0.c` in a plain dict/list tree; list segments are indices. Unknown dict keys are created here and
    rejected by the schema merge that follows, so the error names the key either way."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override {key!r}: '{'.'.join(parts[:i])}' has {len(node)} entries; '{part}' is not an index")
            part = int(part)
        elif not isinstance(node, dict):
            raise UserError(f"override {key!r}: '{'.'.join(parts[:i])}' is a value, not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _parse_value(text: str):
    """Override values are YAML scalars or flow collections: 3, 0.5, true, null, [a, b], {k: v}."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _omegaconf_message(exc: Exception, path: Path) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = getattr(exc, "msg", None) or str(exc)
    msg = msg.strip().splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key '{key}' (in {path.name} or an override)"
    if key:
        return f"config key '{key}': {msg}"
    return f"{path.name}: {msg}"


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
