"""Generation: the only path from a policy to sampled tokens (the loop, the critic, evaluation and `rlk2 serve`).

`generate_rollouts` turns a batch of prompt token ids into completions with the log-probs of the distribution
that sampled them. A faster engine (vLLM), partial rollouts or multi-turn environments replace this function
without touching the loss or the optimiser. `generate_replies` / `generate_texts` are the same generation for
callers that want text (the critic, `rlk2 serve`) and no log-probs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import parametrize

from rlk2.moe import find_routers
from rlk2.rollout.batch import Rollout, left_pad
from rlk2.rollout.decode import open_decoder
from rlk2.rollout.sampling import entropy_of, inverse_cdf, mix64, sampling_logprobs, sequence_uniforms, to_int64
from rlk2.rollout.text import eos_ids
from rlk2.signals import interruption_point


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

    A lean decoding loop instead of `model.generate` (profiling showed generation was most of an RL step, and for
    small models most of generate's time is its per-token machinery):
    - each distinct prompt is prefilled once and its cache row copied to the K samples of its group;
    - a sequence that emits EOS leaves the batch (its cache rows are dropped), so later tokens cost less;
    - the prefill and decode steps run through a decoder (`rlk2.rollout.decode.open_decoder`): a plain function over
      the weights with a static cache where the architecture allows (`use_latent_decoder=False` keeps the model's
      own forward and KV cache);
    - tokens are drawn by inverse transform sampling (`rlk2.rollout.sampling.inverse_cdf`): one uniform number per
      sequence and step, from a generator seeded by `seed` (the global RNG is left alone; unseeded calls use it);
    - or, with `seeds` (one per sequence), counter-based: sequence i's number at position t is a pure function of
      (seeds[i], t), whatever else is in the batch, so a prompt group sampled on one of N processes gets exactly
      the tokens it would get in a one-process batch (up to float rounding of the logits);
    - the log-prob of each sampled token is read from the same log-softmax it was drawn from: no `output_scores`.
    The sampling distribution is softmax(logits / temperature) restricted to the top-p nucleus (HF's
    TopPLogitsWarper rule, keeping at least one token) — or the argmax with raw-logit log-probs when `greedy` —
    and nothing else from the checkpoint's generation_config. Stops when every sequence has emitted EOS or
    `max_new_tokens` tokens, so T is the longest completion, as with `generate`.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_rollouts: every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)  # [B, P]
    ids, mask = ids.to(device), mask.to(device)
    draw = _Draw(len(prompt_ids), device, temperature=temperature, top_p=top_p, greedy=greedy, seed=seed, seeds=seeds)
    out = _Record(
        model,
        ids.shape[0],
        ids.shape[1],
        max_new_tokens,
        device,
        tokenizer.pad_token_id,
        logprobs=record_logprobs,
        routing=record_routing,
    )
    eos = torch.tensor(eos_ids(model, tokenizer), device=device)
    was_training = model.training
    model.eval()
    try:
        # Prefill the distinct prompts only (a group's K copies are identical), then expand the cache to B rows.
        distinct, row_of = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)  # [U, 2P], [B]
        P = ids.shape[1]
        # Weights read through a parametrization (QAT's INT4 ones, rlk2.qat) are computed once for the whole call.
        with (
            parametrize.cached(),
            open_decoder(
                model,
                distinct[:, :P],
                distinct[:, P:],
                max_new_tokens,
                record_routing=out.routing,
                fast=use_latent_decoder,
            ) as decoder,
        ):
            decoder.reorder(row_of)
            out.prompt_routes(decoder, row_of, mask)
            logits = decoder.logits[row_of]  # [B, V]
            active = torch.arange(len(ids), device=device)  # batch rows still generating, in cache order
            pos = mask.sum(dim=1)  # [n] position id of the token about to be sampled (same rule as policy_logprobs)
            for t in range(max_new_tokens):
                interruption_point()
                nxt = out.put(active, t, *draw(logits, active, t))
                going = ~torch.isin(nxt, eos)
                if t == max_new_tokens - 1 or not going.any():
                    break
                if not going.all():  # drop finished sequences from the batch and the cache
                    if on_finished is not None:
                        done = active[~going]
                        on_finished(done.tolist(), out.tokens[done, : t + 1].tolist())
                    keep = going.nonzero().squeeze(1)
                    decoder.reorder(keep)
                    active, nxt, pos = active[keep], nxt[keep], pos[keep]
                logits = decoder.step(nxt, pos)
                pos = pos + 1
                out.step_routes(decoder, active, t)
    finally:
        model.train(was_training)
    return out.rollout(tokenizer, ids, mask, eos)


class _Draw:
    """The sampling rule of one generation: temperature, top-p or greedy, and its noise (module docstring)."""

    def __init__(
        self,
        batch: int,
        device: torch.device,
        *,
        temperature: float,
        top_p: float,
        greedy: bool,
        seed: int | None,
        seeds: list[int] | None,
    ) -> None:
        self.temperature, self.top_p, self.greedy = temperature, top_p, greedy
        self.rng = self.keys = None
        if seeds is not None:
            if seed is not None or len(seeds) != batch:
                raise ValueError(f"generate_rollouts: pass `seed` or one of `seeds` per sequence ({batch}), not both")
            self.keys = mix64(torch.tensor([to_int64(s) for s in seeds], dtype=torch.long, device=device))  # [B]
        elif seed is not None and not greedy:
            self.rng = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, active: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(next token [n], the log-probs [n, V] it was drawn from) for the active rows at completion position t."""
        logprobs = sampling_logprobs(logits, temperature=self.temperature, top_p=self.top_p, greedy=self.greedy)
        if self.greedy:
            return logprobs.argmax(dim=-1), logprobs
        if self.keys is None:
            uniforms = torch.rand(len(active), generator=self.rng, dtype=torch.float64, device=logits.device)
        else:
            uniforms = sequence_uniforms(self.keys[active], t)
        return inverse_cdf(logprobs, uniforms), logprobs  # [n]


class _Record:
    """What generation records: tokens, their log-probs and entropies, and (router replay) the experts used."""

    def __init__(
        self,
        model,
        batch: int,
        prompt_len: int,
        max_new_tokens: int,
        device: torch.device,
        pad_id: int,
        *,
        logprobs: bool,
        routing: bool,
    ) -> None:
        self.P, self.pad_id, self.steps = prompt_len, pad_id, 0
        self.tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, T_max]
        self.old_logp = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
        self.entropy = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device) if logprobs else None
        routers = find_routers(model) if routing else []
        self.routing = bool(routers)
        self.routes = None
        if routers:  # [L, B, P + T_max, k]; experts fit int16 (the largest MoEs have a few hundred)
            self.routes = torch.full(
                (len(routers), batch, prompt_len + max_new_tokens, routers[0][1].top_k),
                -1,
                dtype=torch.int16,
                device=device,
            )

    def put(self, active: torch.Tensor, t: int, nxt: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        self.tokens[active, t] = nxt
        if self.entropy is not None:
            self.old_logp[active, t] = logprobs.gather(1, nxt.unsqueeze(1)).squeeze(1)
            self.entropy[active, t] = entropy_of(logprobs)
        self.steps = t + 1
        return nxt

    def prompt_routes(self, decoder, row_of: torch.Tensor, mask: torch.Tensor) -> None:
        """The prefill's routing: its rows are the U distinct prompts, expanded to B; left padding is not a token."""
        if self.routes is not None:
            fed = decoder.routes()  # [L, U * P, k]
            used = fed.view(fed.shape[0], -1, self.P, fed.shape[-1])[:, row_of]  # [L, B, P, k]
            self.routes[:, :, : self.P] = used.masked_fill(~mask.bool()[None, :, :, None], -1).to(self.routes.dtype)

    def step_routes(self, decoder, active: torch.Tensor, t: int) -> None:
        if self.routes is not None:  # the forward just fed completion token t of the active rows
            self.routes[:, active, self.P + t] = decoder.routes().to(self.routes.dtype)

    def rollout(self, tokenizer, ids: torch.Tensor, mask: torch.Tensor, eos: torch.Tensor) -> Rollout:
        steps = self.steps
        completion, old_logp = self.tokens[:, :steps], self.old_logp[:, :steps]  # [B, T]
        is_eos = torch.isin(completion, eos)
        # mask = 1 up to and including the first EOS: count EOS strictly before each position.
        before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        cmask = (before == 0).long()
        truncated = ~is_eos.any(dim=1)
        completion = torch.where(cmask.bool(), completion, torch.full_like(completion, self.pad_id))
        old_logp = old_logp * cmask
        entropy = None if self.entropy is None else self.entropy[:, :steps] * cmask
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        routes = None if self.routes is None else self.routes[:, :, : self.P + steps]
        with torch.inference_mode(False):  # ordinary tensors for the caller: inference tensors cannot enter autograd
            return Rollout(
                *(t.clone() for t in (ids, mask, completion, cmask, old_logp, truncated)),
                texts,
                *(None if t is None else t.clone() for t in (routes, entropy)),
            )


def context_limit(model) -> int | None:
    """The model's context length in tokens (prompt + completion), when its config states one."""
    return getattr(model.config, "max_position_embeddings", None)


def generate_tokens(
    model,
    tokenizer,
    encoded: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int | None = 0,
    seeds: list[int] | None = None,
    batch_size: int = 64,
    record_logprobs: bool = True,
) -> list[tuple[list[int], list[float], bool]]:
    """(completion token ids, EOS included when it ended; their log-probs; whether it ended with EOS) per encoded
    prompt; `temperature <= 0` is greedy.

    The training loop's generation (`generate_rollouts`) in chunks of `batch_size` sequences, so the log-probs are
    those of the distribution each token was drawn from. With `seeds` (one per prompt) a sequence's draws depend on
    its seed alone; otherwise chunk c draws from a generator seeded with `seed + c * batch_size`, so results are
    reproducible and the global RNG is left alone.
    """
    greedy, out = temperature <= 0, []
    for start in range(0, len(encoded), batch_size):
        ro = generate_rollouts(
            model,
            tokenizer,
            encoded[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=1.0 if greedy else temperature,
            top_p=top_p,
            greedy=greedy,
            seed=None if seeds is not None else seed + start,
            seeds=None if seeds is None else seeds[start : start + batch_size],
            record_logprobs=record_logprobs,
        )
        rows = zip(ro.completion_ids.tolist(), ro.old_logp.tolist(), ro.num_tokens.tolist(), ro.truncated.tolist())
        out += [(ids[:n], lps[:n], not cut) for ids, lps, n, cut in rows]
    return out


def generate_replies(
    model,
    tokenizer,
    encoded: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    batch_size: int = 64,
) -> list[tuple[list[int], bool]]:
    """(reply token ids without EOS, whether it ended with EOS) per encoded prompt; `temperature <= 0` is greedy:
    `generate_tokens` without the log-probs."""
    replies = generate_tokens(
        model,
        tokenizer,
        encoded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        record_logprobs=False,
    )
    return [(ids[:-1] if ended else ids, ended) for ids, _, ended in replies]  # an ended reply's last id is EOS
