"""MuonClip: K2's optimizer (DESIGN.md 4). Muon with RMS matching on hidden matrices, AdamW on the rest, QK-Clip.

opt = MuonClip(model, lr=2e-4)          # before accelerator.prepare; routes and hooks `model`
loss.backward(); opt.step(); opt.zero_grad()
log(opt.metrics())                      # {"qk_clip/max_logit": float, "qk_clip/clipped_heads": int}
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.adamw import adamw

from rlk2.errors import UserError
from rlk2.optim.muon import muon_scale, newton_schulz, route_parameters
from rlk2.optim.qk_clip import find_attention, qk_clip
from rlk2.optim.sharded import local, orthogonalise

logger = logging.getLogger("rlk2.optim")


def _is_zero3(p: torch.Tensor) -> bool:
    """DeepSpeed ZeRO-3 leaves an empty tensor tagged `ds_id` in place of each parameter."""
    return hasattr(p, "ds_id")


class MuonClip(torch.optim.Optimizer):
    """Muon (K2 update `NS5(M) * sqrt(max(n, m)) * 0.2`, decoupled weight decay) + AdamW + QK-Clip.

    Param groups carry a `kind` ("muon" or "adamw") and an `lr` each, so LR schedulers, `state_dict()` and
    Accelerate's wrapper treat it like any torch optimizer. Learning rate and weight decay are shared by both
    rules (RMS matching makes AdamW learning rates valid for Muon); norms and biases get no weight decay.
    `qk_clip_tau=None` (or inf) disables clipping; max logits are still recorded and reported.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        qk_clip_tau: float | None = 100.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError("MuonClip takes the model (an nn.Module), not its parameters: it routes them by role")
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # routing needs the model's own get_input/output_embeddings
        for name, value, ok in [
            ("lr", lr, lr >= 0),
            ("weight_decay", weight_decay, weight_decay >= 0),
            ("momentum", momentum, 0 <= momentum < 1),
            ("ns_steps", ns_steps, isinstance(ns_steps, int) and ns_steps >= 1),
            ("qk_clip_tau", qk_clip_tau, qk_clip_tau is None or qk_clip_tau > 0),
            ("adamw_eps", adamw_eps, adamw_eps >= 0),
            ("adamw_betas", adamw_betas, all(0 <= b < 1 for b in adamw_betas)),
        ]:
            if not ok:
                raise ValueError(f"MuonClip: invalid {name}={value!r}")

        sharded = [n for n, p in model.named_parameters() if p.requires_grad and _is_zero3(p)]
        if sharded:
            raise UserError(
                f"MuonClip: parameter '{sharded[0]}' is partitioned by DeepSpeed ZeRO-3, whose partitions cannot be "
                "gathered whole here; supported: a single process, DDP, or FSDP2 (rlk2.optim.sharded)"
            )
        routing = route_parameters(model)
        logger.info("MuonClip parameter routing: %s", routing.summary())
        self.routing = routing
        groups = [
            {"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs], "kind": kind, **extra}
            for pairs, kind, extra in [
                (routing.muon, "muon", {}),
                (routing.adamw, "adamw", {}),
                (routing.adamw_no_decay, "adamw", {"weight_decay": 0.0}),
            ]
            if pairs
        ]
        if not groups:
            raise ValueError("MuonClip: the model has no trainable parameters")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            kind="adamw",
        )
        super().__init__(groups, defaults)

        self.qk_clip_tau = None if qk_clip_tau is None or math.isinf(qk_clip_tau) else float(qk_clip_tau)
        self.attentions = find_attention(model)
        self._hooks = [handle for attn in self.attentions for handle in attn.register()]
        not_clipped = {f"{a.kind}: {a.why_not}" for a in self.attentions if not a.clippable}
        if not_clipped and self.qk_clip_tau is not None:
            logger.warning("QK-Clip records but does not clip some layers (%s)", "; ".join(sorted(not_clipped)))
        self._metrics: dict[str, float | int] = {"qk_clip/max_logit": float("nan"), "qk_clip/clipped_heads": 0}

    # ---------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One Muon/AdamW update of every group, then QK-Clip from the logits recorded since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        max_logit, clipped = qk_clip(self.attentions, self.qk_clip_tau)
        self._metrics = {"qk_clip/max_logit": max_logit, "qk_clip/clipped_heads": clipped}
        return loss

    def metrics(self) -> dict[str, float | int]:
        """`qk_clip/max_logit` (max over layers and heads, before clipping; NaN if nothing was recorded) and
        `qk_clip/clipped_heads` for the step just taken."""
        return dict(self._metrics)

    def remove_hooks(self) -> None:
        """Stop recording logits (detaches the forward hooks from the model)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---------------------------------------------------------------------------------------------------------------
    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        params, updates = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = local(p.grad)  # FSDP2: this rank's slice; its momentum stays a slice too
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(grad)  # M_t = mu M_{t-1} + G_t
            params.append(p)
            updates.append(grad.add(buf, alpha=mu) if group["nesterov"] else buf)
        # Matrices of one shape (all layers' q_proj, every expert of every MoE layer, ...) go through Newton-Schulz
        # as one batch; sharded matrices are gathered whole and spread over ranks first (rlk2.optim.sharded).
        ortho = orthogonalise(params, updates, lambda x: newton_schulz(x, group["ns_steps"]))
        for p, o in zip(params, ortho):
            w = local(p.data)
            w.mul_(1 - lr * wd)  # decoupled weight decay: W <- W - lr * (O + wd * W)
            w.add_(o, alpha=-lr * muon_scale(p.shape))  # the whole matrix's shape, not the slice's

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(  # torch's own AdamW maths (functional form), so the two rules live in one optimizer and one state
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
