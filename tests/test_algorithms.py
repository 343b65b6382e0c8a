"""Losses and advantages, with expected values worked out by hand in comments."""

import math

import pytest
import torch

from rlk2.algorithms import LOSSES, SCALE_ADVANTAGES, dapo_loss, group_advantages, grpo_loss, gspo_loss, k2_loss


def test_group_advantages_mean_baseline_and_unscorable_left_out():
    # group 0: rewards 1, 0, 1, None -> baseline over the 3 valid = 2/3; advantages 1/3, -2/3, 1/3, 0
    # group 1: all 1.0 -> zero std, no signal
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    adv, zero_std = group_advantages(rewards, valid, scale=False)
    assert torch.allclose(adv[0], torch.tensor([1 / 3, -2 / 3, 1 / 3, 0.0]), atol=1e-6)
    assert torch.all(adv[1] == 0)
    assert zero_std.tolist() == [False, True]


def test_group_advantages_std_scaled():
    # rewards 1, 0 -> mean 0.5, population std 0.5 -> advantages +1, -1
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, True]]), scale=True)
    assert torch.allclose(adv, torch.tensor([[1.0, -1.0]]), atol=1e-4)


def test_k2_loss_value_by_hand():
    # one sequence of 2 tokens, log-ratio per token 0.1 and 0.3 -> sequence log-ratio 0.4 (sum)
    # adv = 0.5, tau = 0.5 -> (0.5 - 0.5 * 0.4)^2 = 0.3^2 = 0.09
    logp = torch.tensor([[0.1, 0.3]])
    old = torch.zeros(1, 2)
    loss, _ = k2_loss(logp, old, torch.tensor([0.5]), torch.ones(1, 2), tau=0.5)
    assert loss.item() == pytest.approx(0.09)
    # length_norm: mean log-ratio 0.2 -> (0.5 - 0.1)^2 = 0.16
    loss, _ = k2_loss(logp, old, torch.tensor([0.5]), torch.ones(1, 2), tau=0.5, length_norm=True)
    assert loss.item() == pytest.approx(0.16)


def test_k2_loss_ignores_masked_tokens():
    logp = torch.tensor([[0.1, 5.0]])  # second token is padding after EOS
    loss, _ = k2_loss(logp, torch.zeros(1, 2), torch.tensor([0.5]), torch.tensor([[1.0, 0.0]]), tau=0.5)
    assert loss.item() == pytest.approx((0.5 - 0.05) ** 2)


def test_k2_gradient_at_old_policy_is_scaled_policy_gradient():
    # At theta = theta_old the log-ratio is 0, so d/dtheta (1/N) sum_i (A_i - tau s_i)^2 = -(2 tau / N) sum_i A_i ds_i.
    # With logits z (one token, 3-way softmax) and sampled token y: d log pi(y)/dz = onehot(y) - softmax(z).
    torch.manual_seed(0)
    z = torch.randn(2, 3, requires_grad=True)  # two sequences, one token each
    tokens = torch.tensor([0, 2])
    adv = torch.tensor([0.7, -0.7])
    tau = 0.3
    logp = torch.log_softmax(z, -1).gather(1, tokens[:, None])  # [2, 1]
    loss, _ = k2_loss(logp, logp.detach(), adv, torch.ones(2, 1), tau=tau)
    loss.backward()
    grad_logpi = torch.nn.functional.one_hot(tokens, 3).float() - torch.softmax(z.detach(), -1)
    expected = -2 * tau * adv[:, None] * grad_logpi / 2  # N = 2 samples
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_grpo_clipping_by_hand():
    # ratio e^{0.5} = 1.6487 > 1 + 0.2 with positive advantage -> clipped objective 1.2 * A, no gradient
    logp = torch.tensor([[0.5]], requires_grad=True)
    loss, m = grpo_loss(logp, torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-2.4)
    loss.backward()
    assert logp.grad.abs().item() == 0.0
    assert m["clip_ratio"] == 1.0


def test_grpo_at_ratio_one_is_minus_mean_advantage():
    # ratio 1 everywhere: per-sequence token mean of -A, then mean over sequences -> -(1 + -3)/2 = 1
    logp = torch.zeros(2, 3)
    loss, _ = grpo_loss(logp, logp, torch.tensor([1.0, -3.0]), torch.ones(2, 3), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(1.0)


def test_dapo_token_mean_weights_long_sequences_more():
    # seq0: 1 token, A=1; seq1: 3 tokens, A=-1. token mean: (-1*1 + 1*3) / 4 = 0.5 ; GRPO's sequence mean gives 0
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    dapo, _ = dapo_loss(logp, logp, adv, mask, clip_low=0.2, clip_high=0.28)
    grpo, _ = grpo_loss(logp, logp, adv, mask, clip_low=0.2, clip_high=0.28)
    assert dapo.item() == pytest.approx(0.5)
    assert grpo.item() == pytest.approx(0.0)


def test_gspo_sequence_ratio_is_length_normalised():
    # token log-ratios 0.2 and 0.4 -> sequence log-ratio mean 0.3; ratio e^0.3 = 1.3499 > 1.2 -> clipped at 1.2
    logp = torch.tensor([[0.2, 0.4]])
    loss, _ = gspo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_low=0.2, clip_high=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert math.isclose(math.exp(0.3), 1.34986, rel_tol=1e-4)


def test_every_loss_is_registered_and_finite():
    logp = torch.randn(4, 5)
    for name, fn in LOSSES.items():
        loss, metrics = fn(logp, logp - 0.01, torch.randn(4), torch.ones(4, 5), tau=0.1, clip_low=0.2, clip_high=0.2)
        assert torch.isfinite(loss), name
        assert "kl/approx" in metrics


def test_every_loss_is_named_in_the_config_and_says_how_it_scales_and_averages():
    from rlk2.config import LOSS_NAMES
    from rlk2.distributed import LOSS_UNIT

    assert set(LOSS_NAMES) == set(LOSSES) == set(SCALE_ADVANTAGES) == set(LOSS_UNIT)
