"""The training forward must see exactly the distribution that sampled the tokens (padding, positions, EOS, T)."""

import pytest
import torch

from rlk2.policy import load_policy
from rlk2.rollout import concat_rollouts, encode_prompts, generate_rollouts, policy_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_match_generate_scores(tiny_policy, temperature):
    model, tok = load_policy(tiny_policy)
    prompts = ["1+2=?", "45+67=?", "9+99=?", "12+3=?"] * 8  # different lengths -> left padding
    ids = encode_prompts(tok, prompts, chat_template=True)
    assert len({len(i) for i in ids}) > 1
    ro = generate_rollouts(model, tok, ids, max_new_tokens=20, temperature=temperature, seed=3)
    logp, _ = policy_logprobs(model, ro, temperature=temperature)
    diff = ((logp - ro.old_logp) * ro.completion_mask).abs().max().item()
    assert diff < 1e-4
    # the masked positions really are excluded: old_logp is zero there
    assert torch.all(ro.old_logp[ro.completion_mask == 0] == 0)


def test_mask_stops_after_eos_and_truncation_flagged(tiny_policy):
    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["3+4=?"] * 64, chat_template=True)
    ro = generate_rollouts(model, tok, ids, max_new_tokens=24, temperature=1.0, seed=0)
    eos = tok.eos_token_id
    ended = ~ro.truncated
    assert ended.any() and ro.truncated.any()  # a random tiny model does both within 24 tokens
    for i in range(len(ids)):
        n = int(ro.completion_mask[i].sum())
        if ro.truncated[i]:
            assert n == 24 and eos not in ro.completion_ids[i].tolist()
        else:
            assert ro.completion_ids[i, n - 1].item() == eos  # EOS is the last masked token
            assert torch.all(ro.completion_ids[i, n:] == tok.pad_token_id)


def test_seeded_rollouts_are_reproducible(tiny_policy):
    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["5+6=?"] * 8, chat_template=True)
    a = generate_rollouts(model, tok, ids, max_new_tokens=8, seed=11)
    b = generate_rollouts(model, tok, ids, max_new_tokens=8, seed=11)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_concat_rollouts_pads_to_common_width(tiny_policy):
    model, tok = load_policy(tiny_policy)
    a = generate_rollouts(model, tok, encode_prompts(tok, ["1+1=?"] * 2, chat_template=True), max_new_tokens=4, seed=1)
    b = generate_rollouts(
        model, tok, encode_prompts(tok, ["10+10=?"] * 3, chat_template=True), max_new_tokens=9, seed=2
    )
    c = concat_rollouts([a, b], tok.pad_token_id)
    assert c.completion_ids.shape == (5, 9) and c.prompt_ids.shape[0] == 5
    logp, _ = policy_logprobs(model, c, temperature=1.0)
    assert ((logp - c.old_logp) * c.completion_mask).abs().max().item() < 1e-4


def test_top_p_logprobs_are_the_nucleus_distribution(tiny_policy):
    """With top_p < 1, old_logp is the log-prob under HF's TopPLogitsWarper nucleus, renormalised (not the full
    softmax)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["1+2=?", "45+67=?"] * 8, chat_template=True)
    ro = generate_rollouts(model, tok, ids, max_new_tokens=10, temperature=0.8, top_p=0.5, seed=5)
    full = torch.cat([ro.prompt_ids, ro.completion_ids], dim=1)
    attn = torch.cat([ro.prompt_mask, ro.completion_mask], dim=1)
    T = ro.completion_ids.shape[1]
    with torch.no_grad():
        logits = (
            model(
                input_ids=full,
                attention_mask=attn,
                position_ids=(attn.cumsum(1) - 1).clamp(min=0),
                logits_to_keep=T + 1,
            )
            .logits[:, :-1]
            .float()
            / 0.8
        )  # [B, T, V]
    warp = TopPLogitsWarper(0.5)
    nucleus = torch.stack([warp(None, logits[:, t]) for t in range(T)], dim=1).log_softmax(-1)
    want = nucleus.gather(2, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    m = ro.completion_mask.bool()
    assert torch.isfinite(want[m]).all()  # every sampled token lies inside its step's nucleus
    assert (want[m] - ro.old_logp[m]).abs().max().item() < 1e-4


def test_seeded_rollouts_leave_the_global_rng_alone(tiny_policy):
    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["5+6=?"] * 4, chat_template=True)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    ro = generate_rollouts(model, tok, ids, max_new_tokens=6, seed=11, record_logprobs=False)
    assert torch.equal(torch.rand(3), want)
    assert torch.all(ro.old_logp == 0)


def test_counter_noise_is_splitmix64():
    """The int64 tensor arithmetic (wrapping multiply, masked shifts) equals splitmix64 on Python integers."""
    from rlk2.rollout.sampling import mix64 as _mix64
    from rlk2.rollout.sampling import to_int64 as _to_int64

    def reference(z: int) -> int:  # splitmix64's output function, on unbounded ints reduced mod 2**64
        m = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    words = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF]
    got = _mix64(torch.tensor([_to_int64(w) for w in words], dtype=torch.long)).tolist()
    assert [g % 2**64 for g in got] == [reference(w) for w in words]


def test_counter_noise_is_uniform():
    from rlk2.rollout.sampling import mix64, sequence_uniforms

    keys = mix64(torch.arange(4096))
    u = torch.stack([sequence_uniforms(keys, t) for t in range(64)])  # [64 positions, 4096 keys]
    # U(0, 1): mean 1/2, and each decile holds a tenth: 262k draws put both within ~0.005 of their value
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    deciles = torch.bincount((u * 10).long().flatten(), minlength=10).double() / u.numel()
    assert (deciles - 0.1).abs().max() < 0.005
    assert not torch.equal(u[0], u[1])  # positions differ; keys (rows) differ
    assert len(set(u[0].tolist())) == 4096


def test_inverse_cdf_draws_from_the_distribution():
    """200k draws from one distribution over 1,000 tokens (two-level blocks of 64): a chi-square statistic that an
    exact sampler keeps near its 999 degrees of freedom (mean 999, sd 45), and a nucleus is never left."""
    from rlk2.rollout.sampling import inverse_cdf

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 1000, generator=g) * 2
    logits[0, 500:] = float("-inf")  # half the vocabulary outside the nucleus
    lp = torch.log_softmax(logits, -1).expand(200_000, -1)
    tok = inverse_cdf(lp, torch.rand(200_000, generator=g, dtype=torch.float64), block=64)
    assert tok.max() < 500
    p = lp[0, :500].exp().double()
    counts = torch.bincount(tok, minlength=500).double()
    chi2 = ((counts - 200_000 * p) ** 2 / (200_000 * p)).sum().item()
    assert chi2 < 499 + 5 * (2 * 499) ** 0.5, chi2


def test_per_sequence_seeds_do_not_depend_on_the_batch(tiny_policy):
    """A sequence's tokens depend on its own seed only: sampling a subset of the batch (as one of several
    processes would) gives those sequences exactly the completions they had in the full batch."""
    model, tok = load_policy(tiny_policy)
    prompts = ["1+2=?", "45+67=?", "9+99=?", "12+3=?"]
    ids = [i for i in encode_prompts(tok, prompts, chat_template=True) for _ in range(4)]
    seeds = list(range(100, 116))
    full = generate_rollouts(model, tok, ids, max_new_tokens=12, seeds=seeds)
    part = generate_rollouts(model, tok, ids[8:], max_new_tokens=12, seeds=seeds[8:])
    width = part.completion_ids.shape[1]
    assert torch.equal(full.completion_ids[8:, :width], part.completion_ids)
    assert torch.all(full.completion_ids[8:, width:] == tok.pad_token_id)
    assert full.texts[8:] == part.texts
    m = part.completion_mask.bool()
    assert (full.old_logp[8:, :width][m] - part.old_logp[m]).abs().max().item() < 1e-5
    # the samples of one group differ (different seeds), and a different seed changes the draw
    assert len(set(full.texts[:4])) > 1
    other = generate_rollouts(model, tok, ids[8:], max_new_tokens=12, seeds=[s + 1000 for s in seeds[8:]])
    assert other.texts != part.texts


def test_on_finished_reports_each_ended_response_with_its_final_tokens(tiny_policy):
    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["3+4=?", "12+30=?"] * 16, chat_template=True)
    reported: dict[int, list[int]] = {}

    def on_finished(rows, token_ids):
        assert not set(rows) & set(reported)  # each row once
        reported.update(zip(rows, token_ids))

    ro = generate_rollouts(model, tok, ids, max_new_tokens=16, seed=4, on_finished=on_finished)
    assert reported  # a random tiny model ends some responses before others
    last = int(ro.completion_mask.sum(1).max())
    for i in range(len(ids)):
        n = int(ro.completion_mask[i].sum())
        if i in reported:  # exactly the completion the Rollout holds, EOS included, and it had ended early
            assert reported[i] == ro.completion_ids[i, :n].tolist() and not ro.truncated[i] and n < last
        else:  # not reported: ran to the end of the batch (or out of tokens)
            assert n == last
    # the texts a caller decodes from the reported tokens are the Rollout's own texts
    assert all(tok.decode(t, skip_special_tokens=True) == ro.texts[i] for i, t in reported.items())
    # and the reports change nothing: the same rollout without the callback
    same = generate_rollouts(model, tok, ids, max_new_tokens=16, seed=4)
    assert torch.equal(same.completion_ids, ro.completion_ids)
