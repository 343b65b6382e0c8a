"""Rollouts: the only seam between the loop and generation (DESIGN.md 3).

`generate_rollouts` turns a batch of prompt token ids into completions with the log-probs of the distribution
that sampled them. A faster engine (vLLM), partial rollouts or multi-turn environments replace this function
without touching the loss or the optimiser. `policy_logprobs` recomputes the same log-probs in the training
forward, with the same left padding, position ids and temperature, so pi_theta / pi_old is exactly 1 at the
start of an update (tested against `generate`'s scores).

Shapes: B sequences, P prompt tokens (left padded), T completion tokens (right padded after EOS).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def num_tokens(self) -> torch.Tensor:  # [B]
        return self.completion_mask.sum(dim=1)

    def to(self, device: torch.device) -> "Rollout":
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp", "truncated"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def encode_prompts(tokenizer, prompts: list[str], *, chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt, wrapped as a user turn by the tokenizer's chat template when asked and present."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        out = []
        for p in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return out
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int | None = None,
) -> Rollout:
    """Sample one completion per prompt (repeat prompts K times for groups) and record old log-probs."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    eos = _eos_ids(model, tokenizer)
    if seed is not None:
        # generate() draws from the global RNG: seed it from an explicit per-call seed so rollouts are reproducible.
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    model.train(was_training)
    completion = out.sequences[:, ids.shape[1] :]  # [B, T]
    scores = torch.stack(out.scores, dim=1).float()  # [B, T, V] processed (tempered, nucleus-masked) logits
    old_logp = torch.gather(F.log_softmax(scores, dim=-1), 2, completion.unsqueeze(-1)).squeeze(-1)  # [B, T]

    is_eos = torch.isin(completion, torch.tensor(eos, device=device))
    # mask = 1 up to and including the first EOS: count EOS strictly before each position.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    cmask = (before == 0).long()
    truncated = ~is_eos.any(dim=1)
    completion = torch.where(cmask.bool(), completion, torch.full_like(completion, pad_id))
    old_logp = old_logp * cmask
    texts = tokenizer.batch_decode(completion * cmask + pad_id * (1 - cmask), skip_special_tokens=True)
    return Rollout(ids, mask, completion, cmask, old_logp, truncated, texts)


def policy_logprobs(
    model, rollout: Rollout, *, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [B, T] of the rollout's tokens under `model`, computed as generate() saw them (+ entropy [B, T])."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [B, P+T]
    attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    # Same position ids as generate(): count of real tokens before each position (left padding skipped).
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    T = rollout.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature  # [B, T, V]: position t predicts completion token t
    logprobs = F.log_softmax(logits, dim=-1)
    logp = torch.gather(logprobs, 2, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


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
    )
