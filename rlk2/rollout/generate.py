"""Generation: the only path from a policy to sampled tokens (the loop, the critic, evaluation and `rlk2 serve`).

`generate_rollouts` turns a batch of prompt token ids into completions with the log-probs of the distribution
that sampled them. A faster engine (vLLM), partial rollouts or multi-turn environments replace this function
without touching the loss or the optimiser. `generate_replies` / `generate_texts` are the same generation for
callers that want text (the critic, `rlk2 serve`) and no log-probs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlk2.moe import RouterProbe, find_routers
from rlk2.rollout.batch import Rollout, left_pad
from rlk2.rollout.decode import LatentDecoder, absorbed_mla_decode
from rlk2.rollout.sampling import entropy_of, mix64, sampling_logprobs, sequence_exponentials, to_int64
from rlk2.rollout.text import eos_ids


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
    eos = torch.tensor(eos_ids(model, tokenizer), device=device)
    rng = keys = None
    if seeds is not None:
        if seed is not None or len(seeds) != B:
            raise ValueError(f"generate_rollouts: pass `seed` or one of `seeds` per sequence ({B}), not both")
        keys = mix64(torch.tensor([to_int64(s) for s in seeds], dtype=torch.long, device=device))  # [B]
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
                logprobs = sampling_logprobs(logits, temperature=temperature, top_p=top_p, greedy=greedy)  # [n, V]
                if greedy:
                    nxt = logprobs.argmax(dim=-1)
                else:
                    race = torch.empty_like(logprobs).exponential_(generator=rng) if keys is None \
                        else sequence_exponentials(keys[active], t, logprobs.shape[1])
                    nxt = (logprobs - race.log()).argmax(dim=-1)  # [n]
                tokens[active, t] = nxt
                if record_logprobs:
                    old_logp[active, t] = logprobs.gather(1, nxt.unsqueeze(1)).squeeze(1)
                    entropy[active, t] = entropy_of(logprobs)
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




def context_limit(model) -> int | None:
    """The model's context length in tokens (prompt + completion), when its config states one."""
    return getattr(model.config, "max_position_embeddings", None)


def generate_replies(model, tokenizer, encoded: list[list[int]], *, max_new_tokens: int, temperature: float,
                     seed: int, top_p: float = 1.0, batch_size: int = 64) -> list[tuple[list[int], bool]]:
    """(reply token ids without EOS, whether it ended with EOS) per encoded prompt; `temperature <= 0` is greedy.

    The same generation as the training loop's (`generate_rollouts`, no log-probs kept), in chunks of
    `batch_size` sequences; chunk c draws from a generator seeded with `seed + c * batch_size`, so replies are
    reproducible and the global RNG is left alone.
    """
    out: list[tuple[list[int], bool]] = []
    greedy = temperature <= 0
    for start in range(0, len(encoded), batch_size):
        ro = generate_rollouts(model, tokenizer, encoded[start : start + batch_size], max_new_tokens=max_new_tokens,
                               temperature=1.0 if greedy else temperature, top_p=top_p, greedy=greedy,
                               seed=seed + start, record_logprobs=False)
        lengths = ro.num_tokens.tolist()
        for row, n, cut in zip(ro.completion_ids.tolist(), lengths, ro.truncated.tolist()):
            out.append((row[:n], False) if cut else (row[: n - 1], True))  # n counts the EOS when it ended
    return out
