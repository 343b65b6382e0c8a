"""Rollouts: the one generation seam between a policy and the loop (DESIGN.md 3).

- `batch`: `Rollout`, the step's batch (prompt and completion ids, masks, old log-probs, recorded routing),
  joined and selected; `SharedPrompts`, which rows repeat a prompt.
- `text`: the one prompt encoder (`encode_messages`, `encode_prompts`) and the tokens that end a reply.
- `sampling`: the distribution a token is drawn from (temperature, top-p, greedy) and the seeded noise.
- `generate`: `generate_rollouts` (the loop's sampling, log-probs recorded), `generate_tokens` / `generate_replies`
  (the same generation in chunks, for `rlk2 serve` and the critic).
- `decode`: `LatentDecoder` and absorbed MLA attention, the DeepSeek-V3-family decode fast path.
- `logprobs`: `policy_logprobs`, the training forward's log-probs of the same tokens.

A faster engine, partial rollouts or multi-turn episodes plug in here without touching the loss or the optimizer.
"""

from rlk2.rollout.batch import Rollout, SharedPrompts, concat_rollouts, left_pad
from rlk2.rollout.generate import context_limit, generate_replies, generate_rollouts, generate_tokens
from rlk2.rollout.logprobs import policy_logprobs
from rlk2.rollout.text import encode_messages, encode_prompts, eos_ids

__all__ = [
    "Rollout",
    "SharedPrompts",
    "concat_rollouts",
    "context_limit",
    "encode_messages",
    "encode_prompts",
    "eos_ids",
    "generate_replies",
    "generate_rollouts",
    "generate_tokens",
    "left_pad",
    "policy_logprobs",
]
