"""Fixtures for tests and benchmarks that need a model in a particular state (not used by training)."""

from __future__ import annotations

import torch
from torch import nn

from rlk2.moe import find_routers
from rlk2.rollout import policy_logprobs


@torch.no_grad()
def skew_routers(model: nn.Module, rollout, favoured: tuple[int, ...] = (0, 1), scale: float = 3.0) -> None:
    """Make every router of `model` prefer the `favoured` experts on `rollout`'s tokens (adds the mean router input
    direction to their gate rows): a deliberately imbalanced router for the load-balancing test and benchmark."""
    routers = find_routers(model)
    hidden: dict[int, torch.Tensor] = {}
    hooks = [
        r.register_forward_hook(lambda _m, a, _o, i=i: hidden.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
        for i, r in routers
    ]
    try:
        with torch.no_grad():
            policy_logprobs(model, rollout, temperature=1.0)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for i, router in routers:
            m = hidden[i].mean(dim=0)
            for e in favoured:
                router.weight[e] += scale * m / m.norm()
