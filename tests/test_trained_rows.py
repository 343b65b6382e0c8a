"""The training forward over the sequences that can move the weights only: same loss, same gradient, same loads.

The loop leaves a sequence with advantage 0 out of the training forward and gives it log-prob = old log-prob
(rlk2.algorithms.trained_rows). These tests compare that against the forward over the whole batch.
"""

import pytest
import torch

from rlk2.algorithms import LOSSES, group_advantages, trained_rows
from rlk2.moe import RouterControl
from rlk2.policy import load_policy
from rlk2.rollout import encode_prompts, generate_rollouts, policy_logprobs

HP = {"tau": 0.5, "length_norm": False, "clip_low": 0.2, "clip_high": 0.28}


def _batch(tiny_policy, seed: int = 5):
    model, tok = load_policy(tiny_policy)
    prompts = ["1+2=?", "45+67=?", "9+99=?", "123+4=?"]  # different lengths: left padding to trim
    ids = encode_prompts(tok, prompts, chat_template=True)
    ro = generate_rollouts(
        model, tok, [i for i in ids for _ in range(4)], max_new_tokens=12, seed=seed, record_routing=True
    )
    # groups 0 and 2 tie (no signal), 1 and 3 are mixed; one response of group 3 is unscorable
    rewards = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 1], [0.1, 0.1, 0.1, 0.1], [0, 1, 0, 0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    valid[3, 2] = False
    return model, ro, rewards, valid


def test_tied_groups_get_exactly_zero_advantage():
    # 4 x 0.1 sums to 0.4000000059604645 in float32: r - mean is rounding noise, std ~1e-8, and dividing by
    # (std + 1e-6) would turn it into |adv| ~ 0.01. A tie means no signal: exactly 0.
    rewards = torch.full((1, 4), 0.1)
    adv, zero_std = group_advantages(rewards, torch.ones_like(rewards, dtype=torch.bool), scale=True)
    assert zero_std.tolist() == [True] and torch.equal(adv, torch.zeros_like(adv))


def test_trained_rows_are_the_sequences_with_signal():
    rewards = torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 1], [0, 1, 0, 0]])
    valid = torch.ones_like(rewards, dtype=torch.bool)
    valid[2, 1] = False  # unscorable: advantage 0 (and its group has no other signal)
    adv, _ = group_advantages(rewards, valid, scale=True)
    mask = torch.ones(12, 5)
    mask[5] = 0  # a sequence with no token in the loss
    rows = trained_rows(adv.view(-1), mask, loss="grpo", inner_steps=1)
    assert rows.tolist() == [4, 6, 7]
    assert trained_rows(adv.view(-1), mask, loss="k2", inner_steps=1).tolist() == [4, 6, 7]
    # off-policy inner steps: k2 pulls every sequence back to pi_old, and kl/approx is the whole batch's drift
    assert trained_rows(adv.view(-1), mask, loss="k2", inner_steps=2) is None
    assert trained_rows(adv.view(-1), mask, loss="dapo", inner_steps=2) is None


def test_select_trims_common_padding_and_keeps_the_logprobs(tiny_policy):
    model, ro, _, _ = _batch(tiny_policy)
    rows = torch.tensor([0, 1, 9])  # the two shortest prompts' groups: left padding in common
    sub = ro.select(rows)
    assert sub.prompt_ids.shape[1] < ro.prompt_ids.shape[1]
    assert sub.prompt_mask[:, 0].any() and sub.completion_mask[:, -1].any()  # nothing left that all rows pad
    full, _ = policy_logprobs(model, ro, temperature=1.0)
    part, _ = policy_logprobs(model, sub, temperature=1.0)
    width = part.shape[1]
    assert torch.allclose(part * sub.completion_mask, full[rows, :width] * sub.completion_mask, atol=1e-5)
    assert not ro.completion_mask[rows, width:].any()
    assert torch.equal(
        sub.routed_experts,
        torch.cat(
            [
                ro.routed_experts[:, rows, ro.prompt_ids.shape[1] - sub.prompt_ids.shape[1] :][
                    :, :, : sub.prompt_ids.shape[1]
                ],
                ro.routed_experts[:, rows, ro.prompt_ids.shape[1] :][:, :, :width],
            ],
            dim=2,
        ),
    )


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gradient_of_the_selection_equals_the_whole_batch(tiny_policy, loss):
    model, ro, rewards, valid = _batch(tiny_policy)
    adv, _ = group_advantages(rewards, valid, scale=loss not in ("k2", "dr_grpo"))
    adv = adv.view(-1)
    mask = ro.completion_mask.float() * valid.view(-1, 1)
    rows = trained_rows(adv, mask, loss=loss, inner_steps=1)
    assert 0 < len(rows) < len(adv)

    def grads(selected: bool) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if selected:
            sub = ro.select(rows)
            part, _ = policy_logprobs(model, sub, temperature=1.0)
            logp = ro.old_logp.index_put((rows.unsqueeze(1), torch.arange(part.shape[1])), part)
        else:
            logp, _ = policy_logprobs(model, ro, temperature=1.0)
        value, _ = LOSSES[loss](logp, ro.old_logp, adv, mask, **HP)
        value.backward()
        return float(value.detach()), [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
        ]

    whole_loss, whole = grads(selected=False)
    part_loss, part = grads(selected=True)
    assert any(g.abs().sum() > 0 for g in whole)
    # Equal up to float rounding: the whole-batch forward's log-probs of the skipped rows differ from the
    # recorded ones by ~1e-7 (a different batch shape), which moves k2's tau * log-ratio term by as much.
    assert part_loss == pytest.approx(whole_loss, rel=1e-4, abs=1e-6)
    for a, b in zip(whole, part):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_expert_loads_of_a_selection_are_the_whole_batchs(tiny_policy):
    model, ro, _, _ = _batch(tiny_policy)
    ctl = RouterControl(model, router_replay=True, bias_update_rate=1e-3, aux_loss_coef=0)
    assert ctl.loads_from_record(ro) and not ctl.needs_every_sequence(ro)
    with ctl.training_forward(ro) as whole:
        policy_logprobs(model, ro, temperature=1.0)
    sub = ro.select(torch.tensor([1, 6, 9]))
    with ctl.training_forward(sub, whole=ro) as part:
        policy_logprobs(model, sub, temperature=1.0)
    assert torch.equal(part.counts, whole.counts) and whole.counts.sum() > 0
    assert part.mismatch[1] < whole.mismatch[1]  # the mismatch is measured on the tokens actually computed
    # Without replay the loads are the forward's own choice: the bias update needs every sequence.
    no_replay = RouterControl(model, router_replay=False, bias_update_rate=1e-3, aux_loss_coef=0)
    assert no_replay.needs_every_sequence(ro)
    with pytest.raises(ValueError, match="replay"), no_replay.training_forward(sub, whole=ro):
        policy_logprobs(model, sub, temperature=1.0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_sampling_entropy_is_the_sampling_distributions(tiny_policy, temperature, top_p):
    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["1+2=?", "45+67=?"] * 4, chat_template=True)
    ro = generate_rollouts(model, tok, ids, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=2)
    assert torch.all(ro.entropy[ro.completion_mask == 0] == 0)
    _, full_entropy = policy_logprobs(model, ro, temperature=temperature, with_entropy=True)
    m = ro.completion_mask.bool()
    if top_p == 1.0:  # the same distribution the training forward computes
        assert torch.allclose(ro.entropy[m], full_entropy[m], atol=1e-4)
    else:  # the nucleus is a truncation: never more uncertain than the full softmax, and finite
        assert torch.all(ro.entropy[m] <= full_entropy[m] + 1e-4) and torch.isfinite(ro.entropy).all()
        assert (ro.entropy[m] < full_entropy[m] - 1e-3).any()
