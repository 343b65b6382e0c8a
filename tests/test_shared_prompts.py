"""The training forward that runs each distinct prompt once (rlk2.rollout.SharedPrompts): the same log-probs,
gradients, router records and QK-Clip maxima as the forward over every row."""

import pytest
import torch

from rlk2.moe import RouterControl, RouterProbe, find_routers
from rlk2.optim import MuonClip
from rlk2.rollout import Rollout, SharedPrompts, policy_logprobs
from tests.test_moe import tiny_model as model_of
from tests.test_optim_qk_clip import FAMILIES, build

VOCAB = 64


def grouped_rollout(groups: int = 3, K: int = 4, P: int = 6, T: int = 5, seed: int = 0) -> Rollout:
    """`groups` prompts, each repeated K times (group g left-padded by g tokens); completions of random lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, VOCAB, (groups, P), generator=g)
    pmask = torch.ones(groups, P, dtype=torch.long)
    for i in range(groups):
        pmask[i, :i] = 0
    B = groups * K
    cids = torch.randint(1, VOCAB, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    cmask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return Rollout(
        (prompts * pmask).repeat_interleave(K, 0),
        pmask.repeat_interleave(K, 0),
        cids * cmask,
        cmask,
        torch.zeros(B, T),
        torch.zeros(B, dtype=torch.bool),
    )


def test_sharing_is_found_and_counted():
    ro = grouped_rollout(groups=3, K=4, P=6)
    shared = SharedPrompts.of(ro)
    assert sorted(shared.first.tolist()) == [0, 4, 8]  # the first row of each group
    assert [shared.first[shared.row_of[r]].item() for r in range(12)] == [0] * 4 + [4] * 4 + [8] * 4
    # Real prompt tokens 6, 5, 4 per group; 3 of each group's 4 rows are not run: 3 * (6 + 5 + 4) = 45.
    assert shared.saved_tokens(ro) == 45
    distinct = grouped_rollout(groups=3, K=1)
    assert SharedPrompts.of(distinct) is None


def test_split_and_merge_are_inverse():
    ro = grouped_rollout(groups=2, K=3, P=4, T=2)
    shared = SharedPrompts.of(ro)
    B, S = 6, 6
    # A per-token record whose prompt part is the same within a group, as generation records it.
    record = torch.arange(2 * B * S).view(2, B, S, 1)
    record[:, :, :4] = record[:, shared.first[shared.row_of], :4]
    prompts, completions = shared.split(record, 4)
    assert prompts.shape == (2, 2 * 4, 1) and completions.shape == (2, B * 2, 1)
    merged = torch.stack([shared.merge(p, c, 4) for p, c in zip(prompts, completions)])
    assert torch.equal(merged, record.flatten(1, 2))


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "qwen3"])
def test_log_probs_and_gradients_match_the_per_row_forward(family):
    model = model_of(family).train()
    ro = grouped_rollout()
    shared = SharedPrompts.of(ro)
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for s in (None, shared):
        logp, _ = policy_logprobs(model, ro, temperature=0.7, shared=s)
        loss = (logp * ro.completion_mask * torch.linspace(-1, 1, len(logp))[:, None]).sum()
        out.append((logp, torch.autograd.grad(loss, params, allow_unused=True)))
    (full, g_full), (once, g_once) = out
    mask = ro.completion_mask.bool()
    torch.testing.assert_close(once[mask], full[mask], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_full, g_once):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "family, replay, aux", [("deepseek_v3", True, 0.0), ("deepseek_v3", False, 0.0), ("qwen3_moe", False, 0.01)]
)
def test_router_records_match_the_per_row_forward(family, replay, aux):
    model = model_of(family).train()
    ro = grouped_rollout()
    shared = SharedPrompts.of(ro)
    layers = len(find_routers(model))
    # A recorded routing that differs from the router's own choice, the same for every row of a group's prompt.
    g = torch.Generator().manual_seed(1)
    rec = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(layers * 12 * 11)]).view(layers, 12, 11, 2)
    rec[:, :, :6] = rec[:, shared.first[shared.row_of], :6]
    ro.routed_experts = rec.to(torch.int16)
    ctl = RouterControl(model, router_replay=replay, bias_update_rate=1e-3, aux_loss_coef=aux)
    seen = []
    for s in (None, shared):
        with ctl.training_forward(ro, shared=s) as routed:
            logp, _ = policy_logprobs(model, ro, temperature=1.0, shared=s)
        seen.append((logp, routed))
    (lp_full, full), (lp_once, once) = seen
    mask = ro.completion_mask.bool()
    torch.testing.assert_close(lp_once[mask], lp_full[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(once.counts, full.counts)
    assert once.mismatch == full.mismatch and full.mismatch[0] > 0
    if aux:
        torch.testing.assert_close(once.aux_loss, full.aux_loss, rtol=1e-5, atol=1e-7)
    else:
        assert once.metrics() == full.metrics()


def test_replay_with_more_forward_calls_than_records_is_an_error():
    model = model_of("deepseek_v3")
    ro = grouped_rollout()
    routers = find_routers(model)
    force = [torch.full((len(routers), 3 * 6, 2), -1)]  # a record for the prompts' call only
    with RouterProbe(routers, force=force) as _, pytest.raises(ValueError, match="recorded routings for more"):
        policy_logprobs(model, ro, temperature=1.0, shared=SharedPrompts.of(ro))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qk_clip_records_the_same_max_logits(family, attn):
    # The completion call attends to cached prompt keys it did not project: the recorder reads them from the cache.
    model = build(family, attn).train()
    ro = grouped_rollout()
    opt = MuonClip(model, lr=0.0, qk_clip_tau=None)
    maxima = []
    for s in (None, SharedPrompts.of(ro)):
        policy_logprobs(model, ro, temperature=1.0, shared=s)[0].sum().backward()
        maxima.append(torch.stack([a.take() for a in opt.attentions]))
        model.zero_grad()
    torch.testing.assert_close(maxima[1], maxima[0], rtol=1e-5, atol=1e-5)


def test_padding_prompts_changes_no_log_prob_and_no_record():
    model = model_of("deepseek_v3").train()
    ro = grouped_rollout(groups=2, K=2, P=4, T=3)
    layers = len(find_routers(model))
    ro.routed_experts = torch.randint(0, 8, (layers, 4, 7, 2), dtype=torch.int16)
    padded = ro.pad_prompts(9, pad_id=0)
    assert padded.prompt_ids.shape == (4, 9) and padded.routed_experts.shape == (layers, 4, 12, 2)
    assert (padded.routed_experts[:, :, :5] == -1).all() and torch.equal(
        padded.routed_experts[:, :, 5:], ro.routed_experts
    )
    assert ro.pad_prompts(3, pad_id=0) is ro
    ctl = RouterControl(model, router_replay=True, bias_update_rate=1e-3, aux_loss_coef=0.0)
    out = []
    for r in (ro, padded):
        with ctl.training_forward(r) as routed:
            logp, _ = policy_logprobs(model, r, temperature=1.0)
        out.append((logp, routed.counts))
    mask = ro.completion_mask.bool()
    torch.testing.assert_close(out[1][0][mask], out[0][0][mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1][1], out[0][1])
