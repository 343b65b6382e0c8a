"""Advantages and policy losses: small pure functions over explicit tensors, selected by name from `LOSSES`.

Shapes: B = sequences in the batch (prompts x K), T = completion tokens. Every loss takes
`logp, old_logp, mask` of shape [B, T] (log-probs of the sampled tokens under the current and the sampling
policy; mask 1 on generated tokens up to and including EOS) and `adv` of shape [B], and returns
`(scalar loss, metrics dict of floats)`.

`k2` is the default: the policy-mirror-descent objective of Kimi k1.5 / K2 (DESIGN.md 3.1),

    L(theta) = mean over prompts x and samples i of ( r_i - rbar(x) - tau * log(pi_theta(y_i|x) / pi_old(y_i|x)) )^2

with `adv = r - rbar` and the sequence log-ratio formed as the SUM of per-token log-ratios over the response
(the exact log-ratio of the sequence probabilities), or their mean when `length_norm=True` (a choice the papers
leave open; the mean keeps tau's meaning independent of response length). At theta = pi_old the log-ratio is 0 and
the gradient is  -2 tau (r - rbar) grad log pi(y|x) / N: a REINFORCE step with a mean baseline, whose step size
the optimiser (AdamW or Muon, both scale-invariant) sets; off-policy (inner_steps > 1) the squared term pulls
the policy back towards pi_old with strength tau.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Metrics = dict[str, float]


# ----------------------------------------------------------------------------------------------- advantages
def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, *, scale: bool, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages.

    rewards, valid: [P, K] (P prompts, K samples each); `valid` False where the reward is unscorable (None).
    Unscorable samples are left out of their group's mean and std and get advantage 0.
    Returns (advantages [P, K], zero_std [P] bool: groups whose valid rewards all tie — no learning signal).
    """
    valid_f = valid.float()
    count = valid_f.sum(dim=1, keepdim=True).clamp(min=1.0)  # [P, 1]
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = r.sum(dim=1, keepdim=True) / count
    var = (((r - mean) ** 2) * valid_f).sum(dim=1, keepdim=True) / count
    std = var.sqrt()
    adv = r - mean
    if scale:
        adv = adv / (std + eps)
    zero_std = (std.squeeze(1) < eps) | (valid.sum(dim=1) < 2)
    # A tied group's r - mean is rounding noise (8 x 0.1 sums to 0.8000001), which std-scaling would blow up to
    # |adv| ~ 0.01: set it to exactly 0, as the tie means.
    adv = torch.where(valid & ~zero_std.unsqueeze(1), adv, torch.zeros_like(adv))
    return adv, zero_std


def trained_rows(adv: torch.Tensor, mask: torch.Tensor, *, loss: str, inner_steps: int) -> torch.Tensor | None:
    """Indices of the sequences whose loss term can have a gradient; None when every sequence needs computing.

    adv [B], mask [B, T]. A sequence with advantage 0 (a tied group, an unscorable response) or no unmasked token
    adds exactly nothing to the gradient of the clipped-surrogate losses: its per-token term is -min(r * 0,
    clip(r) * 0) = 0 whatever the ratio r. Its training forward and backward can be skipped, and the loop gives
    it log-prob = old log-prob, so the loss's value, normalisers and metrics are those of the whole batch.
    k2's term (0 - tau * log ratio)^2 has zero value and gradient only at pi_theta = pi_old, that is with one
    inner step. With more inner steps every sequence is computed: k2 pulls each back towards pi_old, and the
    logged KL must measure how far the whole batch drifted.
    """
    if inner_steps > 1:
        return None
    return ((adv != 0) & (mask.sum(dim=1) > 0)).nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------- helpers
def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def _ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> Metrics:
    # k3 estimator of KL(pi_old || pi_theta) per token: (r - 1) - log r, r = pi_theta / pi_old.
    with torch.no_grad():
        kl = _masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return {"kl/approx": float(kl)}


# ----------------------------------------------------------------------------------------------- losses
def k2_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    length_norm: bool = False,
    **_: float,
) -> tuple[torch.Tensor, Metrics]:
    """K2 / Kimi k1.5 squared policy-mirror-descent loss; `adv` is r - rbar (not std-scaled)."""
    log_ratio = (logp - old_logp) * mask  # [B, T]
    seq_log_ratio = log_ratio.sum(dim=1)  # [B]
    if length_norm:
        seq_log_ratio = seq_log_ratio / mask.sum(dim=1).clamp(min=1.0)
    loss = ((adv - tau * seq_log_ratio) ** 2).mean()
    return loss, _ratio_metrics(logp - old_logp, mask)


def _clipped_surrogate(logp, old_logp, adv, clip_low, clip_high):
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = adv.unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    clipped_frac = (clipped < unclipped).float()
    return per_token, clipped_frac


def grpo_loss(logp, old_logp, adv, mask, *, clip_low: float, clip_high: float, **_: float):
    """GRPO (DeepSeekMath): clipped surrogate, per-sequence token mean, then mean over sequences."""
    per_token, clipped = _clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    loss = _masked_mean(per_token, mask, dim=1).mean()
    return loss, {**_ratio_metrics(logp - old_logp, mask), "clip_ratio": float(_masked_mean(clipped, mask))}


def dr_grpo_loss(logp, old_logp, adv, mask, *, clip_low: float, clip_high: float, **_: float):
    """Dr. GRPO (Liu et al. 2025): token sums divided by a constant (the budget T), no length bias."""
    per_token, clipped = _clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    loss = (per_token * mask).sum(dim=1).mean() / mask.shape[1]
    return loss, {**_ratio_metrics(logp - old_logp, mask), "clip_ratio": float(_masked_mean(clipped, mask))}


def dapo_loss(logp, old_logp, adv, mask, *, clip_low: float, clip_high: float, **_: float):
    """DAPO (Yu et al. 2025): clip-higher (pass a larger clip_high) and one token-level mean over the batch."""
    per_token, clipped = _clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    loss = _masked_mean(per_token, mask)
    return loss, {**_ratio_metrics(logp - old_logp, mask), "clip_ratio": float(_masked_mean(clipped, mask))}


def gspo_loss(logp, old_logp, adv, mask, *, clip_low: float, clip_high: float, **_: float):
    """GSPO (Zheng et al. 2025): one length-normalised sequence ratio per response, clipped at sequence level."""
    seq_log_ratio = _masked_mean(logp - old_logp, mask, dim=1)  # [B]
    ratio = torch.exp(seq_log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped).mean()
    return loss, {**_ratio_metrics(logp - old_logp, mask), "clip_ratio": float((clipped < unclipped).float().mean())}


LossFn = Callable[..., tuple[torch.Tensor, Metrics]]
LOSSES: dict[str, LossFn] = {
    "k2": k2_loss,
    "grpo": grpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "gspo": gspo_loss,
}

# Whether each loss wants std-scaled advantages (k2 and Dr. GRPO use r - rbar as the papers do).
SCALE_ADVANTAGES: dict[str, bool] = {"k2": False, "grpo": True, "dr_grpo": False, "dapo": True, "gspo": True}
