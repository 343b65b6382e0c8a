"""K2 training controls (DESIGN.md 3.1-3.2) as small pure functions the loop calls at a few places.

- `temperature_at`: the sampling-temperature decay schedule (high and exploratory early, lower later). The loop
  uses the step's value both to sample (old log-probs) and in the training forward, so pi_theta / pi_old is
  computed between two distributions at the same temperature.
- `group_success`: per prompt, how many of its K responses succeeded — fed to the prioritized prompt sampler
  (rlk2.data.PromptSampler, Kimi k1.5's "sample prompt i with probability proportional to 1 - success_i").
- `kept_sequences`: DAPO-style dynamic filtering of groups whose rewards all tie (the rows the loss keeps).
- `load_ptx_rows`, `ptx_batch`, `ptx_loss`: K2's PTX loss, an auxiliary next-token loss on curated
  (prompt, completion) pairs added to the RL loss with a weight.

What filtering zero-std groups changes, loss by loss (B sequences in the batch, B' after filtering). A group whose
valid rewards all tie has advantage 0 for every response, so it never contributes to the numerator of a
policy-gradient term; it only enters through normalisation and, for k2, through the tau * log-ratio term:
- `k2`: the loss is a mean over sequences of (A - tau * s)^2. On-policy (inner_steps = 1, s = 0 at the start) the
  gradient becomes B / B' times larger; off-policy (inner_steps > 1) the dropped responses also stop contributing
  (tau * s)^2, the term that pulls them back towards pi_old.
- `grpo`, `gspo`, `dr_grpo`: means over sequences, so the gradient is scaled by B / B' (the clipped ratio of a
  zero-advantage response has no gradient either way).
- `dapo`: one token-level mean, so the gradient is scaled by (tokens in the batch) / (tokens in kept groups).
With AdamW or Muon the overall scale matters little (both normalise the update), but it changes the balance
against the PTX loss and what gradient clipping sees. The training forward still covers the whole batch (every
process of a multi-process run keeps the same shapes, and MoE router replay works on the recorded rollout); the
dropped rows are cut from the loss only.
Unscorable responses (None) are left out of the tie test by `group_advantages`; a group with fewer than two
valid rewards counts as tied and is dropped too. Refilling the batch with new prompts (DAPO's over-sampling) is
not done: a step trains on the groups it kept, and on none when every group tied.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlk2.data import BUILTIN_TASKS, builtin_split, read_rows
from rlk2.errors import UserError
from rlk2.rollout import Rollout, encode_prompts, left_pad, policy_logprobs

SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------------------------- temperature
def temperature_at(step: int, *, start: float, end: float | None, decay_steps: int, schedule: str = "linear") -> float:
    """Sampling temperature of optimizer step `step` (1-based): `start` at step 1, `end` from step decay_steps + 1.

    `end=None` keeps `start` throughout. Linear: start + (end - start) * p; cosine: end + (start - end) *
    (1 + cos(pi * p)) / 2, with p = min(1, (step - 1) / decay_steps).
    >>> [round(temperature_at(s, start=1.5, end=0.5, decay_steps=4), 3) for s in (1, 2, 3, 5, 9)]
    [1.5, 1.25, 1.0, 0.5, 0.5]
    """
    if end is None or decay_steps <= 0:
        return start
    p = min(1.0, max(0, step - 1) / decay_steps)
    if schedule == "linear":
        return start + (end - start) * p
    if schedule == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
    raise ValueError(f"unknown temperature schedule {schedule!r} (have: {', '.join(SCHEDULES)})")


# ----------------------------------------------------------------------------------------------- success rates
def group_success(totals: list[float | None], group_size: int, *, threshold: float) -> list[tuple[int, int]]:
    """(successes, scored responses) per group of `group_size` consecutive totals; success is reward > threshold.

    Unscorable responses (None) count as neither: a prompt whose grader failed learns nothing about its difficulty.
    >>> group_success([1.0, 0.0, None, 1.0, 0.0, 0.0, 0.0, 0.0], 4, threshold=0.5)
    [(2, 3), (0, 4)]
    """
    out = []
    for g in range(0, len(totals), group_size):
        scored = [r for r in totals[g : g + group_size] if r is not None]
        out.append((sum(r > threshold for r in scored), len(scored)))
    return out


# ----------------------------------------------------------------------------------------------- dynamic filtering
def kept_sequences(zero_std: torch.Tensor, group_size: int) -> torch.Tensor:
    """Indices [B'] of the sequences whose group has a reward spread (zero_std [P] bool, groups of K consecutive)."""
    keep = (~zero_std.bool()).repeat_interleave(group_size)  # [P * K]
    return keep.nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------- PTX loss
def load_ptx_rows(source: str) -> list[dict]:
    """The curated PTX data: `builtin:<task>` (or a bare built-in name) uses the task's training split with its gold
    `completion`; otherwise a .jsonl / .parquet file whose every row has string `prompt` and `completion`."""
    name = source.split(":", 1)[1] if source.startswith("builtin:") else source
    if source.startswith("builtin:") or name in BUILTIN_TASKS:
        rows = builtin_split(name, "train")
    else:
        if not Path(source).exists():
            raise UserError(f"algo.ptx.source: '{source}' is neither a built-in task nor an existing file")
        rows = read_rows(source)
    if not rows:
        raise UserError(f"algo.ptx.source: {source} has no rows")
    for i, row in enumerate(rows):
        for col in ("prompt", "completion"):
            if not isinstance(row.get(col), str) or not row[col]:
                raise UserError(f"algo.ptx.source: {source} row {i + 1} has no '{col}' text")
    return rows


def ptx_batch(tokenizer, rows: list[dict], *, chat_template: bool) -> Rollout:
    """(prompt, completion) rows as a Rollout-shaped batch: prompts rendered exactly as for rollouts (left padded),
    completion tokens + EOS right padded, mask 1 on the completion tokens only (the loss ignores prompts)."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], chat_template=chat_template)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)  # [B, P]
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]  # rollouts end with EOS too
    completions = [tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + end for r in rows]
    T = max(len(c) for c in completions)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    no_logp, not_truncated = torch.zeros(len(rows), T), torch.zeros(len(rows), dtype=torch.bool)
    return Rollout(prompt_ids, prompt_mask, ids, mask, no_logp, not_truncated)


def ptx_loss(model, batch: Rollout) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the batch's completion tokens (temperature 1: the model itself)."""
    logp, _ = policy_logprobs(model, batch, temperature=1.0)  # [B, T]
    mask = batch.completion_mask.to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp(min=1.0)
