"""The critic on the live policy: backends that need a model in this process, and closed-loop refinement.

- `backends`: `PolicyCritic` (the policy being trained, as the rubric reward's `self` critic) and
  `CheckpointCritic` (`backend: checkpoint`, registered with `rewards.critic` on import); `generate_texts`.
- `refine`: closed-loop refinement (K2): verified pairs, critic prompts, agreement rewards and advantages.
- `loop`: `ClosedLoop`, what `rlk2 train` calls at set-up, every step and when it logs.

The critic protocol, the rubric reward and the HTTP critic live in `rewards` (`rewards.critic`, `rewards.rubric`),
which a user can use without rlk2.
"""

from rlk2.critic.backends import CheckpointCritic, PolicyCritic, generate_texts
from rlk2.critic.loop import ClosedLoop, critic_standard
from rlk2.critic.refine import (
    CriticRefiner,
    CriticSamples,
    VerifiedPair,
    agreement_metrics,
    agreement_reward,
    format_warmup_rows,
    pair_advantages,
    pairs_from_records,
    verified_pairs,
)

__all__ = [
    "CheckpointCritic",
    "ClosedLoop",
    "CriticRefiner",
    "CriticSamples",
    "PolicyCritic",
    "VerifiedPair",
    "agreement_metrics",
    "agreement_reward",
    "critic_standard",
    "format_warmup_rows",
    "generate_texts",
    "pair_advantages",
    "pairs_from_records",
    "verified_pairs",
]
