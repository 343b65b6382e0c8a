"""MoE router health, auxiliary-loss-free balancing and router replay, with forward hooks on the routers.

Everything here is a no-op for a dense policy (`find_routers` finds nothing).

- **Expert load**: per MoE layer, the fraction of routed token slots (tokens x top-k) that went to each expert,
  over the real (non-pad) tokens of the training forward (with router replay: over the recorded routing of the
  whole batch, which the training forward follows token for token), and its coefficient of variation std/mean
  (population std; 0 = perfectly balanced, sqrt(E/k - 1) when every token picks the same k of E experts). Logged as
  `moe/expert_load_cv` (mean over MoE layers), `moe/expert_load_cv/layer_<i>` and `moe/expert_load_cv/max`.
- **Auxiliary-loss-free balancing** (DeepSeek-V3 report, sec. 2.1.2): after an optimizer step each layer's
  `e_score_correction_bias` moves by `b_i += u * sign(mean load - load_i)`: overloaded experts become less
  likely to be chosen, underloaded ones more. The bias only enters the top-k choice, never the gate weights.
  transformers keeps the buffer (and saves it in checkpoints) but never updates it. Routers without the buffer
  (Qwen3-MoE, Mixtral) are left alone.
- **Auxiliary load-balancing loss** for routers whose transformers module ships `load_balancing_loss_func`
  (Qwen3-MoE, Mixtral, ...): transformers' own Switch-Transformer loss over the router logits of the training
  forward, pad tokens excluded. DeepSeek-V3's modeling file has none; that family balances with the bias.
- **Router replay**: `generate_rollouts(record_routing=True)` stores the top-k experts of every token in every
  MoE layer on the Rollout (`routed_experts`, [L, B, P+T, k], -1 where nothing was recorded), and
  `RouterControl.training_forward(rollout)` forces exactly those experts in the training forward. Top-k selection
  is discontinuous: a tiny difference between the sampling forward (KV cache, other batch shapes, bf16 kernels, a
  separate inference engine, or weights that moved in an earlier inner step) flips which experts a token uses,
  and then pi_theta / pi_old compares two different networks. Replay removes that source of off-policy noise.
  Choice: only the *selection* is replayed; the gate weights are recomputed from the current router's scores at
  the recorded experts (the family's own normalisation and scaling), so the router keeps receiving gradients
  through the gate weights. Replaying recorded weights too would cut the router out of training.
  Tokens without a record keep the router's own choice: padding, and the last token of each completion (the
  sampling loop never feeds it back). Neither changes a trained log-prob (pads are masked keys; the last token's
  output only predicts past the completion). `moe/router_mismatch` is the fraction of (real token, MoE layer)
  pairs whose top-k set in the training forward's *own* choice differs from the recorded one: with replay off it
  is the mismatch that training actually sees; with replay on it is the mismatch replay removed.

Routers are found by duck typing the transformers 5 router interface: a module named `*Router*` with an int
`top_k`, an int `num_experts` and a `weight` of shape [num_experts, hidden], whose forward maps hidden states
[N, H] (N = batch x seq, flattened row-major) to `(router_logits [N, E], gate weights [N, k], indices [N, k])`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from rlk2.errors import UserError

_LAYER = re.compile(r"layers\.(\d+)\.")


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, router module) of every MoE layer, in layer order; [] for a dense model."""
    out = []
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        num_experts = getattr(mod, "num_experts", None)
        if (
            "router" in type(mod).__name__.lower()
            and isinstance(getattr(mod, "top_k", None), int)
            and isinstance(num_experts, int)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.shape[0] == num_experts
        ):
            m = _LAYER.search(name)
            out.append((int(m.group(1)) if m else len(out), mod))
    return sorted(out, key=lambda x: x[0])


def _gate_weights(router: nn.Module, logits: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gate weights [N, k] the router would give experts `indices` [N, k], from its logits [N, E]."""
    if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3 / K2: sigmoid scores, bias used for choice only
        w = logits.float().sigmoid().gather(1, indices)
        if router.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return (w * router.routed_scaling_factor).to(dtype)
    w = F.softmax(logits.float(), dim=-1).gather(1, indices)  # Qwen3-MoE, Mixtral: softmax over all experts
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises (no attribute); Qwen3-MoE by config
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(dtype)


class RouterProbe:
    """Context manager: hooks every router for the forward passes run inside it.

    Keeps, per MoE layer, from the last forward call: `used` [N, k], the experts the layer computed with;
    `own` [N, k], the router's own top-k choice; `logits` [N, E] (with their graph) when `keep_logits`.
    `force` [L, N, k] (-1 = no record for that row) replaces the selection with the recorded experts and
    recomputes the gate weights from the current logits (see the module docstring). A list of such tensors forces
    several forward calls in turn (the i-th call gets the i-th; a single tensor forces every call). With `keep_calls`,
    `calls` keeps every call's
    (own, used, logits) per layer, in call order.
    """

    def __init__(
        self,
        routers: list[tuple[int, nn.Module]],
        *,
        force: torch.Tensor | list[torch.Tensor] | None = None,
        keep_logits: bool = False,
        keep_calls: bool = False,
    ) -> None:
        self.routers, self.keep_logits, self.keep_calls = routers, keep_logits, keep_calls
        self.force = [force] if isinstance(force, torch.Tensor) else force
        self._per_call = isinstance(force, list)
        self._call = [0] * len(routers)  # forward calls seen, per layer
        self.used: list[torch.Tensor | None] = [None] * len(routers)
        self.own: list[torch.Tensor | None] = [None] * len(routers)
        self.logits: list[torch.Tensor | None] = [None] * len(routers)
        self.calls: list[list[tuple]] = [[] for _ in routers]
        self._handles: list = []

    def __enter__(self) -> RouterProbe:
        for slot, (_, router) in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(slot)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, slot: int) -> Callable:
        def hook(module, args, output):
            logits, weights, indices = output
            call = self._call[slot] if self._per_call else 0
            self._call[slot] += 1
            self.own[slot] = indices.detach()
            if self.keep_logits:
                self.logits[slot] = logits
            replaced = None
            if self.force is None:
                self.used[slot] = indices.detach()
            else:
                if call >= len(self.force):
                    raise ValueError(f"router replay: {len(self.force)} recorded routings for more forward calls")
                forced = self.force[call][slot].to(device=indices.device, dtype=indices.dtype)  # [N, k]
                if forced.shape != indices.shape:
                    raise ValueError(
                        f"router replay: recorded routing {tuple(forced.shape)} does not match the "
                        f"forward's {tuple(indices.shape)} (layer slot {slot})"
                    )
                recorded = (forced >= 0).all(dim=-1, keepdim=True)  # [N, 1]
                indices = torch.where(recorded, forced, indices)
                self.used[slot] = indices.detach()
                replaced = logits, _gate_weights(module, logits, indices, weights.dtype), indices
            if self.keep_calls:
                self.calls[slot].append((self.own[slot], self.used[slot], self.logits[slot]))
            return replaced

        return hook

    def take(self) -> torch.Tensor:
        """[L, N, k] experts used by the last forward (all MoE layers), then forget them."""
        out = torch.stack(self.used)
        self.used = [None] * len(self.routers)
        return out


# ------------------------------------------------------------------------------------------- pure statistics
def expert_counts(indices: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert [E] (float) over the rows of `indices` [N, k] where `mask` [N] is true."""
    return torch.bincount(indices[mask.bool()].reshape(-1).long(), minlength=num_experts).float()


def load_cv(counts: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation std/mean (population std) of expert loads [..., E] -> [...]; 0 if nothing routed."""
    load = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.std(dim=-1, unbiased=False) / mean.clamp(min=1e-12), torch.zeros_like(mean))


def routing_mismatch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(rows whose top-k *sets* differ, rows compared) between `a`, `b` [..., N, k], over rows where mask [..., N]."""
    differ = (a.sort(dim=-1).values != b.sort(dim=-1).values).any(dim=-1) & mask.bool()
    return int(differ.sum()), int(mask.bool().sum())


def update_correction_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free update, in place: b_i += rate * sign(mean load - load_i)."""
    if counts.sum() <= 0:
        return
    load = counts / counts.sum()
    bias.add_(rate * torch.sign(load.mean() - load).to(bias))


# ------------------------------------------------------------------------------------------- the loop's handle
class RoutedForward:
    """What one training forward saw; from `RouterControl.training_forward`. Empty for a dense policy."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # [L, E] routed slots per expert over real tokens
        self.mismatch: tuple[int, int] | None = None
        self.aux_loss: torch.Tensor | float = 0.0
        self.layers: list[int] = []

    def metrics(self) -> dict[str, float]:
        if self.counts is None:
            return {}
        cv = load_cv(self.counts)  # [L]
        row = {"moe/expert_load_cv": float(cv.mean()), "moe/expert_load_cv/max": float(cv.max())}
        row.update({f"moe/expert_load_cv/layer_{i}": float(c) for i, c in zip(self.layers, cv)})
        if self.mismatch is not None:
            row["moe/router_mismatch"] = self.mismatch[0] / max(self.mismatch[1], 1)
        if isinstance(self.aux_loss, torch.Tensor):
            row["moe/aux_loss"] = float(self.aux_loss.detach())
        return row


class RouterControl:
    """Router health for one policy: load statistics, bias updates, aux loss and replay (module docstring).

    `reduce` sums a tensor over processes (e.g. `lambda t: accelerator.reduce(t, "sum")`) so every rank updates
    the bias from the global load; identity by default.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        router_replay: bool,
        bias_update_rate: float,
        aux_loss_coef: float,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.routers = find_routers(model)
        self.replay, self.rate, self.aux_coef = router_replay, bias_update_rate, aux_loss_coef
        self.reduce = reduce or (lambda t: t)
        self._aux_fn = None
        if self.routers and aux_loss_coef > 0:
            router = self.routers[0][1]
            self._aux_fn = getattr(sys.modules[type(router).__module__], "load_balancing_loss_func", None)
            if self._aux_fn is None:
                raise UserError(
                    f"moe.aux_loss_coef: transformers has no load-balancing loss for "
                    f"{type(router).__name__}; use moe.bias_update_rate (auxiliary-loss-free balancing)"
                )

    @property
    def enabled(self) -> bool:
        return bool(self.routers)

    def loads_from_record(self, rollout) -> bool:
        """Whether the expert loads of a training forward over `rollout` are known without running it: with replay
        on, every token that has a record is routed as recorded, so the recorded routing IS the training load."""
        return self.replay and getattr(rollout, "routed_experts", None) is not None

    def needs_every_sequence(self, rollout) -> bool:
        """Whether the training forward must cover every sequence of `rollout` for the routing statistics the
        update uses (the aux loss, or the bias update's loads when they are not known from the record)."""
        if not self.routers:
            return False
        return self._aux_fn is not None or (self.rate > 0 and not self.loads_from_record(rollout))

    @contextmanager
    def training_forward(self, rollout, whole=None, shared=None) -> Iterator[RoutedForward]:
        """Wrap the training forward over `rollout`: replay its recorded routing (if on) and measure the routing.

        `whole` (a rollout that `rollout` is a selection of) is the batch the expert loads are measured on; it
        requires `loads_from_record(whole)`. `shared` (rlk2.rollout.SharedPrompts) says the forward runs as two
        calls, the distinct prompts then the completions (`policy_logprobs(shared=...)`): the record is split the
        same way and what the calls routed is put back in per-row order. The yielded RoutedForward is filled when
        the block exits (counts, mismatch and aux loss; counts over the recorded routing when replay is on — the
        tokens the training forward routes as generation did — else over the forward's own routing of the real
        tokens).
        """
        result = RoutedForward()
        if not self.routers:
            yield result
            return
        recorded = getattr(rollout, "routed_experts", None)  # [L, B, S, k] or None
        P = rollout.prompt_ids.shape[1]
        force = None
        if self.replay and recorded is not None:
            force = recorded.flatten(1, 2) if shared is None else list(shared.split(recorded, P))
        probe = RouterProbe(
            self.routers, force=force, keep_logits=self._aux_fn is not None, keep_calls=shared is not None
        )
        with probe:
            yield result
        if shared is not None:  # the two calls' records back in the per-row token order [B*(P+T), ...]
            for slot, calls in enumerate(probe.calls):
                if len(calls) != 2:
                    raise ValueError(f"training_forward: shared prompts expect 2 forward calls, saw {len(calls)}")
                (own_p, used_p, logit_p), (own_c, used_c, logit_c) = calls
                probe.own[slot] = shared.merge(own_p, own_c, P)
                probe.used[slot] = shared.merge(used_p, used_c, P)
                if logit_p is not None:
                    probe.logits[slot] = shared.merge(logit_p, logit_c, P)
        attn = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [B, S] 1 on real tokens
        real = attn.reshape(-1).bool()  # [N]
        num_experts = self.routers[0][1].num_experts
        result.layers = [i for i, _ in self.routers]
        if whole is not None and not self.loads_from_record(whole):
            raise ValueError("training_forward: `whole` needs router replay and a recorded routing")
        if recorded is not None:
            rec = recorded.flatten(1, 2).to(real.device).long()  # [L, N, k]
            compare = real.unsqueeze(0) & (rec >= 0).all(dim=-1)  # [L, N]
            result.mismatch = routing_mismatch(torch.stack(probe.own), rec, compare)
        source = whole if whole is not None else rollout
        if self.loads_from_record(source):
            rec = source.routed_experts.flatten(1, 2).to(real.device).long()  # [L, N, k]
            whole_real = torch.cat([source.prompt_mask, source.completion_mask], dim=1).reshape(-1).bool()
            result.counts = self.reduce(
                torch.stack([expert_counts(r, whole_real & (r >= 0).all(dim=-1), num_experts) for r in rec])
            )
        else:
            result.counts = self.reduce(torch.stack([expert_counts(u, real, num_experts) for u in probe.used]))
        if self._aux_fn is not None:
            router = self.routers[0][1]
            aux = self._aux_fn(tuple(probe.logits), router.num_experts, router.top_k, attn)
            result.aux_loss = self.aux_coef * aux

    def update_bias(self, routed: RoutedForward) -> None:
        """After an optimizer step: move each layer's `e_score_correction_bias` toward balance (rate 0: off)."""
        if self.rate <= 0 or routed.counts is None:
            return
        for (_, router), counts in zip(self.routers, routed.counts):
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is not None:
                update_correction_bias(bias, counts.to(bias.device), self.rate)
