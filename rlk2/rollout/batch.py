"""The batch that every phase of a step passes along: prompts, sampled completions and what generation recorded.

Shapes: B sequences, P prompt tokens (left padded), T completion tokens (right padded after EOS).
`SharedPrompts` says which rows repeat a prompt (a group's K samples do), so the training forward can run each
distinct prompt once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left padded
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [B, T] right padded
    completion_mask: torch.Tensor  # [B, T] 1 on generated tokens up to and including EOS
    old_logp: torch.Tensor  # [B, T] log-prob of each sampled token under the sampling distribution
    truncated: torch.Tensor  # [B] bool: hit the token budget without EOS
    texts: list[str] = field(default_factory=list)  # decoded completions (special tokens dropped)
    # [L, B, P+T, k] int16: the experts each token was routed to in each MoE layer during generation, -1 where
    # nothing was recorded (padding, the never-fed-back last token); None unless recorded (rlk2.moe router replay).
    routed_experts: torch.Tensor | None = None
    # [B, T] entropy of the distribution each completion token was sampled from (after temperature and top-p), 0 on
    # padding; None unless recorded. The loop's `entropy` metric, free from the sampling loop (no training pass).
    entropy: torch.Tensor | None = None
    # [B, T] 1 on the tokens the policy sampled; None when that is every completion token (single-turn). Multi-turn
    # episodes (rlk2.envs) hold tool and user messages inside the completion: attended to (completion_mask 1) but
    # not the policy's, so they carry no loss and no log-prob.
    loss_mask: torch.Tensor | None = None

    @property
    def policy_mask(self) -> torch.Tensor:  # [B, T]
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    @property
    def num_tokens(self) -> torch.Tensor:  # [B]: tokens the policy generated
        return self.policy_mask.sum(dim=1)

    def to(self, device: torch.device) -> Rollout:
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp", "truncated"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("routed_experts", "entropy", "loss_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout of sequences `rows` only, without the columns that are padding in every one of them (the
        prompts' common left padding, the completions' common right padding): a training forward over a few
        sequences then costs what those sequences need. Texts are not carried."""
        prompt_mask, completion_mask = self.prompt_mask[rows], self.completion_mask[rows]
        used_p = prompt_mask.any(dim=0).nonzero()
        used_t = completion_mask.any(dim=0).nonzero()
        p0 = int(used_p[0]) if len(used_p) else prompt_mask.shape[1]
        t1 = int(used_t[-1]) + 1 if len(used_t) else 0
        P = self.prompt_ids.shape[1]
        return Rollout(
            self.prompt_ids[rows, p0:],
            prompt_mask[:, p0:],
            self.completion_ids[rows, :t1],
            completion_mask[:, :t1],
            self.old_logp[rows, :t1],
            self.truncated[rows],
            routed_experts=None if self.routed_experts is None else self.routed_experts[:, rows, p0 : P + t1],
            entropy=None if self.entropy is None else self.entropy[rows, :t1],
            loss_mask=None if self.loss_mask is None else self.loss_mask[rows, :t1],
        )

    def pad_prompts(self, width: int, pad_id: int) -> Rollout:
        """The same rollout with its prompts left-padded to `width` columns (more padding, nothing else: the
        position ids count real tokens only, and router records get -1, "no record", on the new columns)."""
        B, P = self.prompt_ids.shape
        extra = width - P
        if extra <= 0:
            return self
        routes = self.routed_experts
        if routes is not None:
            routes = torch.cat([routes.new_full((routes.shape[0], B, extra, routes.shape[3]), -1), routes], dim=2)
        return replace(
            self,
            prompt_ids=torch.cat([self.prompt_ids.new_full((B, extra), pad_id), self.prompt_ids], dim=1),
            prompt_mask=torch.cat([self.prompt_mask.new_zeros((B, extra)), self.prompt_mask], dim=1),
            routed_experts=routes,
        )


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Join rollouts of different prompt / completion widths (e.g. tasks with different token budgets)."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)

    def pad(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        extra = width - x.shape[1]
        return F.pad(x, (extra, 0) if left else (0, extra), value=value)

    return Rollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, P, pad_id, True) for r in parts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, P, 0, True) for r in parts]),
        completion_ids=torch.cat([pad(r.completion_ids, T, pad_id, False) for r in parts]),
        completion_mask=torch.cat([pad(r.completion_mask, T, 0, False) for r in parts]),
        old_logp=torch.cat([pad(r.old_logp, T, 0.0, False) for r in parts]),
        truncated=torch.cat([r.truncated for r in parts]),
        texts=[t for r in parts for t in r.texts],
        routed_experts=_concat_routes(parts, P, T),
        entropy=None
        if any(r.entropy is None for r in parts)
        else torch.cat([pad(r.entropy, T, 0.0, False) for r in parts]),
        loss_mask=None
        if all(r.loss_mask is None for r in parts)
        else torch.cat([pad(r.policy_mask, T, 0, False) for r in parts]),
    )


def _concat_routes(parts: list[Rollout], P: int, T: int) -> torch.Tensor | None:
    """Recorded routing [L, B, P+T, k] of joined rollouts: prompt part left padded, completion part right padded."""
    if any(r.routed_experts is None for r in parts):
        return None
    out = []
    for r in parts:
        p = r.prompt_ids.shape[1]
        prompt, completion = r.routed_experts[:, :, :p], r.routed_experts[:, :, p:]  # [L, b, p, k], [L, b, t, k]
        prompt = F.pad(prompt, (0, 0, P - p, 0), value=-1)
        completion = F.pad(completion, (0, 0, 0, T - completion.shape[2]), value=-1)
        out.append(torch.cat([prompt, completion], dim=2))
    return torch.cat(out, dim=1)


@dataclass(frozen=True)
class SharedPrompts:
    """Which rows of a rollout repeat a prompt (a group's K samples do): the training forward can then run each
    distinct prompt once and let every completion attend to its prompt's keys through a KV cache.

    The attention over a prompt never looks at what follows it, so the prompt's hidden states, keys and values are
    the same for every row that shares it; the completion tokens' log-probs come out the same (to float rounding)
    and the gradient reaching the prompt is the sum over its rows, as in the per-row forward. With group size K
    that removes (K - 1) / K of the prompt tokens from the forward and the backward; nothing else changes.
    `first` [U] is the first row holding each distinct prompt; `row_of` [B] is each row's distinct prompt.
    """

    first: torch.Tensor
    row_of: torch.Tensor

    @staticmethod
    def of(rollout: Rollout) -> SharedPrompts | None:
        """The sharing in `rollout`, or None when no prompt repeats (nothing to gain) or nothing was generated."""
        B, P = rollout.prompt_ids.shape
        if B < 2 or P == 0 or rollout.completion_ids.shape[1] == 0:
            return None
        key = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # a prompt is its tokens and its padding
        distinct, row_of = torch.unique(key, dim=0, return_inverse=True)
        if len(distinct) == B:
            return None
        rows = torch.arange(B, device=row_of.device)
        first = torch.full((len(distinct),), B, device=row_of.device).scatter_reduce(0, row_of, rows, "amin")
        return SharedPrompts(first, row_of)

    def saved_tokens(self, rollout: Rollout) -> int:
        """Real prompt tokens the shared forward does not run: those of every row but its prompt's first."""
        return int(rollout.prompt_mask.sum()) - int(rollout.prompt_mask[self.first].sum())

    def split(self, per_token: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-token record [L, B, P+T, ...] as the two forward calls see their tokens: [L, U*P, ...] for the
        distinct prompts, [L, B*T, ...] for the completions."""
        prompts = per_token[:, self.first, :prompt_len].flatten(1, 2)
        return prompts, per_token[:, :, prompt_len:].flatten(1, 2)

    def merge(self, prompts: torch.Tensor, completions: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The inverse of `split` for one layer: [U*P, ...] and [B*T, ...] -> [B*(P+T), ...], row-major like a
        per-row forward's tokens (each prompt repeated for its rows; differentiable)."""
        B = len(self.row_of)
        prompts = prompts.unflatten(0, (-1, prompt_len))[self.row_of]  # [B, P, ...]
        return torch.cat([prompts, completions.unflatten(0, (B, -1))], dim=1).flatten(0, 1)
