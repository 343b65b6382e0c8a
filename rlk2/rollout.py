"""Rollouts: the only seam between the loop and generation (DESIGN.md 3).

`generate_rollouts` turns a batch of prompt token ids into completions with the log-probs of the distribution
that sampled them. A faster engine (vLLM), partial rollouts or multi-turn environments replace this function
without touching the loss or the optimiser. `policy_logprobs` recomputes the same log-probs in the training
forward, with the same left padding, position ids and temperature, so pi_theta / pi_old is exactly 1 at the
start of an update (tested against `generate`'s scores).

Shapes: B sequences, P prompt tokens (left padded), T completion tokens (right padded after EOS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from rlk2.decode import LatentDecoder, absorbed_mla_decode
from rlk2.moe import RouterProbe, find_routers


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

    @property
    def num_tokens(self) -> torch.Tensor:  # [B]
        return self.completion_mask.sum(dim=1)

    def to(self, device: torch.device) -> "Rollout":
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logp", "truncated"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("routed_experts", "entropy"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def select(self, rows: torch.Tensor) -> "Rollout":
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
            self.prompt_ids[rows, p0:], prompt_mask[:, p0:], self.completion_ids[rows, :t1], completion_mask[:, :t1],
            self.old_logp[rows, :t1], self.truncated[rows],
            routed_experts=None if self.routed_experts is None else self.routed_experts[:, rows, p0 : P + t1],
            entropy=None if self.entropy is None else self.entropy[rows, :t1],
        )

    def pad_prompts(self, width: int, pad_id: int) -> "Rollout":
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
            self, prompt_ids=torch.cat([self.prompt_ids.new_full((B, extra), pad_id), self.prompt_ids], dim=1),
            prompt_mask=torch.cat([self.prompt_mask.new_zeros((B, extra)), self.prompt_mask], dim=1),
            routed_experts=routes)


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
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


@torch.inference_mode()  # no autograd bookkeeping at all (not even version counters): ~10 % off small-model decoding
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
    seeds: list[int] | None = None,
    record_logprobs: bool = True,
    record_routing: bool = False,
    on_finished: Callable[[list[int], list[list[int]]], None] | None = None,
    use_latent_decoder: bool = True,
) -> Rollout:
    """Sample one completion per prompt (repeat prompts K times for groups) and record old log-probs.

    `record_logprobs=False` (evaluation) leaves `old_logp` at zero. `record_routing=True` stores the top-k experts
    of every fed token in every MoE layer as `routed_experts` (router replay, rlk2.moe; nothing for dense models).
    `on_finished(rows, token_ids)` is called during decoding with the batch rows that just emitted EOS and their
    completion tokens (EOS included), while the other rows still generate (the loop scores them meanwhile); rows
    that end at the last step or run out of tokens are not reported: the returned Rollout has every row.

    A lean decoding loop over the model's forward and KV cache instead of `model.generate` (profiling showed
    generation was most of an RL step, and for small models most of generate's time is its per-token machinery):
    - each distinct prompt is prefilled once and its cache row copied to the K samples of its group;
    - a sequence that emits EOS leaves the batch (its cache rows are dropped), so later tokens cost less;
    - the prefill and decode steps of DeepSeek-V3-family models run through `rlk2.decode.LatentDecoder` (a plain
      function over the weights with a static latent cache; `use_latent_decoder=False` keeps the model's forward);
    - tokens are drawn by an exponential race, argmax(log p - log E) with E ~ Exp(1), which is exactly a draw
      from p, from a generator seeded by `seed` (the global RNG is left alone; unseeded calls use it);
    - or, with `seeds` (one per sequence), from counter-based noise: sequence i's draw at position t is a pure
      function of (seeds[i], t), whatever else is in the batch, so a prompt group sampled on one of N processes
      gets exactly the tokens it would get in a one-process batch (up to float ties);
    - the log-prob of each sampled token is read from the same log-softmax it was drawn from: no `output_scores`.
    The sampling distribution is softmax(logits / temperature) restricted to the top-p nucleus (HF's
    TopPLogitsWarper rule, keeping at least one token) — or the argmax with raw-logit log-probs when `greedy` —
    and nothing else from the checkpoint's generation_config. Stops when every sequence has emitted EOS or
    `max_new_tokens` tokens, so T is the longest completion, as with `generate`.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    ids, mask = left_pad(prompt_ids, pad_id)  # [B, P]
    ids, mask = ids.to(device), mask.to(device)
    B, P = ids.shape
    eos_ids = _eos_ids(model, tokenizer)
    eos = torch.tensor(eos_ids, device=device)
    rng = keys = None
    if seeds is not None:
        if seed is not None or len(seeds) != B:
            raise ValueError(f"generate_rollouts: pass `seed` or one of `seeds` per sequence ({B}), not both")
        keys = _mix64(torch.tensor([_to_int64(s) for s in seeds], dtype=torch.long, device=device))  # [B]
    elif seed is not None and not greedy:
        rng = torch.Generator(device=device).manual_seed(seed)

    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, T_max]
    old_logp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    entropy = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if record_logprobs else None
    routers = find_routers(model) if record_routing else []
    probe = RouterProbe(routers)
    routes = None
    if routers:  # [L, B, P + T_max, k]; experts fit int16 (the largest MoEs have a few hundred)
        top_k = routers[0][1].top_k
        routes = torch.full((len(routers), B, P + max_new_tokens, top_k), -1, dtype=torch.int16, device=device)
    was_training = model.training
    model.eval()
    try:
        with probe, absorbed_mla_decode(model):
            # Prefill the distinct prompts only (a group's K copies are identical), then expand the cache to B rows.
            distinct, row_of = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)  # [U, 2P], [B]
            d_ids, d_mask = distinct[:, :P], distinct[:, P:]
            # The plain-function decoder where the architecture allows (rlk2.decode), else the model's forward.
            lean = LatentDecoder(model, d_ids, d_mask, max_new_tokens, record_routing=routes is not None) \
                if use_latent_decoder and LatentDecoder.supports(model) else None
            if lean is None:
                out = model(input_ids=d_ids, attention_mask=d_mask, position_ids=(d_mask.cumsum(1) - 1).clamp(min=0),
                            use_cache=True, logits_to_keep=1)
                cache, first_logits = out.cache, out.logits[:, -1]
                cache.reorder_cache(row_of)
            else:
                first_logits = lean.logits
                lean.reorder(row_of)
            if routes is not None:  # prefill rows are the U distinct prompts: expand to B; left padding is not a token
                fed = torch.stack(lean.routes) if lean is not None else probe.take()
                used = fed.view(len(routers), d_ids.shape[0], P, -1)[:, row_of]  # [L, B, P, k]
                routes[:, :, :P] = used.masked_fill(~mask.bool()[None, :, :, None], -1).to(routes.dtype)
            logits = first_logits[row_of]  # [B, V]
            active = torch.arange(B, device=device)  # batch rows still generating, in cache order
            attn = mask  # [n, P + t] attention mask of the active rows
            pos = mask.sum(dim=1)  # [n] position id of the token about to be sampled (same rule as policy_logprobs)
            steps = 0
            for t in range(max_new_tokens):
                logprobs = _sampling_logprobs(logits, temperature=temperature, top_p=top_p, greedy=greedy)  # [n, V]
                if greedy:
                    nxt = logprobs.argmax(dim=-1)
                else:
                    race = torch.empty_like(logprobs).exponential_(generator=rng) if keys is None \
                        else _sequence_exponentials(keys[active], t, logprobs.shape[1])
                    nxt = (logprobs - race.log()).argmax(dim=-1)  # [n]
                tokens[active, t] = nxt
                if record_logprobs:
                    old_logp[active, t] = logprobs.gather(1, nxt.unsqueeze(1)).squeeze(1)
                    entropy[active, t] = _entropy(logprobs)
                steps = t + 1
                going = ~torch.isin(nxt, eos)
                if t == max_new_tokens - 1 or not going.any():
                    break
                if not going.all():  # drop finished sequences from the batch and the cache
                    if on_finished is not None:
                        done = active[~going]
                        on_finished(done.tolist(), tokens[done, : t + 1].tolist())
                    keep = going.nonzero().squeeze(1)
                    lean.reorder(keep) if lean is not None else cache.reorder_cache(keep)
                    active, nxt, attn, pos = active[keep], nxt[keep], attn[keep], pos[keep]
                if lean is not None:
                    logits = lean.step(nxt, pos)
                else:
                    attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
                    logits = model(input_ids=nxt.unsqueeze(1), attention_mask=attn, position_ids=pos.unsqueeze(1),
                                   cache=cache, use_cache=True).logits[:, -1]
                pos = pos + 1
                if routes is not None:  # the forward just fed completion token t of the active rows
                    fed = torch.stack(lean.routes) if lean is not None else probe.take()
                    routes[:, active, P + t] = fed.to(routes.dtype)
    finally:
        model.train(was_training)

    completion, old_logp = tokens[:, :steps], old_logp[:, :steps]  # [B, T]
    is_eos = torch.isin(completion, eos)
    # mask = 1 up to and including the first EOS: count EOS strictly before each position.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    cmask = (before == 0).long()
    truncated = ~is_eos.any(dim=1)
    completion = torch.where(cmask.bool(), completion, torch.full_like(completion, pad_id))
    old_logp = old_logp * cmask
    if entropy is not None:
        entropy = entropy[:, :steps] * cmask
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    if routes is not None:
        routes = routes[:, :, : P + steps]
    with torch.inference_mode(False):  # ordinary tensors for the caller: inference tensors cannot enter autograd
        return Rollout(*(None if t is None else t.clone() for t in (ids, mask, completion, cmask, old_logp, truncated)),
                       texts, *(None if t is None else t.clone() for t in (routes, entropy)))


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy [n] of each row's distribution from its log-probs [n, V]; tokens outside top-p (-inf) add 0."""
    return -(logprobs.exp() * logprobs.clamp(min=torch.finfo(logprobs.dtype).min)).sum(dim=-1)


# Counter-based noise (the splitmix64 generator, as a pure function of (key, counter)) on int64 tensors.
# torch's int64 multiply wraps modulo 2**64 and `>>` is arithmetic, so shifts are masked to be logical.
_GOLDEN, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _to_int64(x: int) -> int:
    x %= 1 << 64
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function: a bijection on 64-bit words that scrambles every input bit."""
    z = (z ^ _shr(z, 30)) * _to_int64(_M1)
    z = (z ^ _shr(z, 27)) * _to_int64(_M2)
    return z ^ _shr(z, 31)


def _sequence_exponentials(keys: torch.Tensor, t: int, vocab: int) -> torch.Tensor:
    """[n, V] Exp(1) draws for decoding position t of n sequences: element (i, v) is word number t * V + v of the
    splitmix64 stream that starts at keys[i], so a row depends on its own key only (not on the batch)."""
    counter = torch.arange(t * vocab, (t + 1) * vocab, dtype=torch.long, device=keys.device)  # [V]
    z = _mix64(keys.unsqueeze(1) + counter * _to_int64(_GOLDEN))  # [n, V]
    uniform = (_shr(z, 11).double() + 0.5) * 2.0**-53  # 53 random bits -> (0, 1), never 0 or 1
    return -torch.log(uniform)


def _sampling_logprobs(logits: torch.Tensor, *, temperature: float, top_p: float, greedy: bool) -> torch.Tensor:
    """Log-probs [n, V] of the distribution tokens are drawn from (float32; -inf outside the top-p nucleus)."""
    scores = logits.float()
    if greedy:
        return F.log_softmax(scores, dim=-1)
    scores = scores / temperature
    if top_p < 1.0:
        # HF's TopPLogitsWarper: drop the tokens whose ascending cumulative probability is <= 1 - top_p,
        # always keeping the most likely one.
        sorted_scores, order = torch.sort(scores, dim=-1)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return F.log_softmax(scores, dim=-1)


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
    def of(rollout: Rollout) -> "SharedPrompts | None":
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
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1,
                       use_cache=False).logits[:, :-1]  # [B, T, V]: position t predicts completion token t
    else:
        first = shared.first
        head = model(input_ids=rollout.prompt_ids[first], attention_mask=rollout.prompt_mask[first],
                     position_ids=pos[first, :P], use_cache=True, logits_to_keep=1)
        cache = head.cache
        cache.reorder_cache(shared.row_of)  # [U, ...] -> [B, ...]
        tail = model(input_ids=rollout.completion_ids, attention_mask=attn, position_ids=pos[:, P:], cache=cache,
                     use_cache=True, logits_to_keep=T).logits  # [B, T, V]
        logits = torch.cat([head.logits[shared.row_of], tail[:, :-1]], dim=1)
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
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
        routed_experts=_concat_routes(parts, P, T),
        entropy=None if any(r.entropy is None for r in parts)
        else torch.cat([pad(r.entropy, T, 0.0, False) for r in parts]),
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
