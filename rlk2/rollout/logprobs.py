"""Log-probs of a rollout's tokens under the policy, computed as generation saw them (the training forward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlk2.rollout.batch import Rollout, SharedPrompts


def policy_logprobs(
    model, rollout: Rollout, *, temperature: float, with_entropy: bool = False, shared: SharedPrompts | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the rollout's tokens under `model`, computed as generate() saw them (+ entropy [B, T]).

    `shared` (from `SharedPrompts.of(rollout)`) runs each distinct prompt once: one forward over the U distinct
    prompts with a KV cache, whose rows are then copied to the B sequences (`index_select`, so gradients add up
    over the copies), and one forward over the B completions attending to it. Same log-probs, fewer tokens.
    """
    attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [B, P+T]
    # Same position ids as generate(): count of real tokens before each position (left padding skipped).
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    P, T = rollout.prompt_ids.shape[1], rollout.completion_ids.shape[1]
    if shared is None:
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [B, P+T]
        logits = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False
        ).logits[:, :-1]  # [B, T, V]: position t predicts completion token t
    else:
        first = shared.first
        head = model(
            input_ids=rollout.prompt_ids[first],
            attention_mask=rollout.prompt_mask[first],
            position_ids=pos[first, :P],
            use_cache=True,
            logits_to_keep=1,
        )
        cache = head.cache
        cache.reorder_cache(shared.row_of)  # [U, ...] -> [B, ...]
        tail = model(
            input_ids=rollout.completion_ids,
            attention_mask=attn,
            position_ids=pos[:, P:],
            cache=cache,
            use_cache=True,
            logits_to_keep=T,
        ).logits  # [B, T, V]
        logits = torch.cat([head.logits[shared.row_of], tail[:, :-1]], dim=1)
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = torch.gather(logprobs, 2, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy
