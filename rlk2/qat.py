"""Quantization-aware RL for the routed experts (Kimi K2-Thinking's recipe, `qat:` in the config).

K2-Thinking was post-trained with INT4 weight-only quantization of its MoE experts (symmetric, groups of 32 along
the input dimension; attention, shared experts, dense MLPs and the LM head left in 16 bits), so that the released
INT4 model is the model RL optimised. Here:

- every weight matrix inside the modules `qat.modules` names (the routed experts by default: the fused 3-D
  `gate_up_proj` / `down_proj` of transformers' DeepSeek-V3, Qwen3-MoE and Mixtral experts, or the `weight` of
  `nn.Linear`s) is read through a torch parametrization that quantizes and dequantizes it on the fly;
- the parameters themselves (and the optimizer state: MuonClip's Newton-Schulz and QK-Clip) stay the full-precision
  master weights; the gradient passes the rounding unchanged (straight-through estimator);
- since every read of the weight goes through the parametrization, rollouts (the plain-function decoders included),
  the training forward and evaluation all use the same quantized values, and the recorded log-probs are those of
  the quantized policy;
- the state dict keeps the plain parameter names (hooks below), so checkpoints, resume and `rlk2 eval` see an
  ordinary model holding the master weights.

The quantizer is compressed-tensors' (`calculate_qparams` and `fake_quantize` with a group strategy), the library
and format K2-Thinking's checkpoint ships in, so an exported INT4 checkpoint dequantizes to exactly the values the
run trained with. The straight-through wrapper, the module selection and the state-dict naming are rlk2's: no
library applies fake quantization to transformers' fused 3-D expert tensors.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from rlk2.errors import UserError
from rlk2.optim.muon import ROUTER_MODULE_NAMES


def quant_args(group_size: int):
    """compressed-tensors' description of K2-Thinking's scheme: 4-bit signed integers, symmetric, per group."""
    from compressed_tensors.quantization import QuantizationArgs  # imported only by runs that quantize

    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)


def int4_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [rows, in / group_size] of w [..., in] seen as rows [prod(...), in] (float32)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    flat = w.detach().reshape(-1, w.shape[-1]).float()
    groups = flat.view(flat.shape[0], -1, group_size)
    return calculate_qparams(groups.amin(-1), groups.amax(-1), quant_args(group_size))


def fake_int4(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w quantized to INT4 and back, group by group along its last dimension, in w's shape and dtype."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():
        scale, zero = int4_qparams(w, group_size)
        flat = w.detach().reshape(-1, w.shape[-1]).float()
        return fake_quantize(flat, scale, zero, quant_args(group_size)).view(w.shape).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int) -> torch.Tensor:
        return fake_int4(w, group_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class Int4Weight(nn.Module):
    """The parametrization: a master weight read as its INT4 quantize-dequantize (straight-through)."""

    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.group_size)


# ================================================================================================ applying it
@dataclass
class Quantized:
    """What `quantize_weights` did: the parameters read quantized (names as in the state dict)."""

    names: list[str]
    group_size: int


def select_weights(
    model: nn.Module,
    patterns: list[str],
    group_size: int,
    *,
    what: str = "qat.modules",
    group_key: str = "qat.group_size",
) -> list[tuple[str, nn.Module, str]]:
    """(full name, owner module, attribute) of every weight matrix (2-D or 3-D floating parameter) inside a module
    `patterns` names, routers excluded. A pattern with a dot is matched (fnmatch) against whole module names
    (`model.layers.*.mlp.experts`); one without against their last part (`experts`, `mlp`). Refuses in one line
    a pattern that names nothing, attention weights (QK-Clip rescales them in place, and K2 keeps them in 16 bits)
    and a group size that does not divide a weight's input dimension (`what`, `group_key`: the keys to name)."""
    modules = dict(model.named_modules())
    chosen: dict[str, tuple[str, nn.Module, str]] = {}
    for pattern in patterns:
        hits = [n for n in modules if n and fnmatch.fnmatchcase(n if "." in pattern else n.rsplit(".", 1)[-1], pattern)]
        if not hits:
            experts = any(n.rsplit(".", 1)[-1] == "experts" for n in modules)
            hint = "" if experts else " (this policy has no routed experts: name its dense modules, e.g. mlp)"
            raise UserError(f"{what}: '{pattern}' matches no module of the policy{hint}")
        for hit in hits:
            for sub, owner in modules[hit].named_modules(prefix=hit):
                if sub.rsplit(".", 1)[-1] in ROUTER_MODULE_NAMES or type(owner).__name__.endswith("Router"):
                    continue
                for attr, p in owner.named_parameters(recurse=False):
                    if p.is_floating_point() and p.ndim in (2, 3):
                        chosen[f"{sub}.{attr}"] = (f"{sub}.{attr}", owner, attr)
    for name, owner, attr in chosen.values():
        if "attn" in name or "attention" in name:
            raise UserError(f"{what}: {name} is an attention weight; only MLP and expert weights are quantized")
        width = getattr(owner, attr).shape[-1]
        if width % group_size:
            raise UserError(
                f"{group_key}: {group_size} does not divide the input dimension {width} of {name}; use a divisor of it"
            )
    return list(chosen.values())


def quantize_weights(model: nn.Module, patterns: list[str], group_size: int) -> Quantized:
    """Read the selected weights (`select_weights`) as INT4 from now on; the parameters stay the master weights.
    The state dict keeps their plain names, and each owner module computes its quantized weights once per forward
    (transformers' eager experts read them once per expert)."""
    selected = select_weights(model, patterns, group_size)
    owners = {}
    for _, owner, attr in selected:
        parametrize.register_parametrization(owner, attr, Int4Weight(group_size))
        owners[id(owner)] = owner
    for owner in owners.values():
        owner.register_state_dict_post_hook(_plain_names)
        owner.register_load_state_dict_pre_hook(_parametrized_names)
        owner.register_forward_pre_hook(_enter_cache)
        owner.register_forward_hook(_leave_cache, always_call=True)
    return Quantized([name for name, _, _ in selected], group_size)


def _enter_cache(module: nn.Module, _args) -> None:
    module._rlk2_cache = parametrize.cached()
    module._rlk2_cache.__enter__()


def _leave_cache(module: nn.Module, _args, _output) -> None:
    cache = module.__dict__.pop("_rlk2_cache", None)
    if cache is not None:
        cache.__exit__(None, None, None)


def _plain_names(module: nn.Module, state_dict: dict, prefix: str, _metadata) -> None:
    """`<prefix>parametrizations.<attr>.original` -> `<prefix><attr>`: the master weight under its own name."""
    for attr in list(module.parametrizations):
        state_dict[prefix + attr] = state_dict.pop(f"{prefix}parametrizations.{attr}.original")


def _parametrized_names(module: nn.Module, state_dict: dict, prefix: str, *_rest) -> None:
    for attr in list(module.parametrizations):
        if prefix + attr in state_dict:
            state_dict[f"{prefix}parametrizations.{attr}.original"] = state_dict.pop(prefix + attr)


def quantize_for_eval(
    model: nn.Module,
    patterns: list[str],
    group_size: int = 32,
    *,
    what: str = "--quantize-modules",
    group_key: str = "--quantize-group-size",
) -> Quantized:
    """`rlk2 eval --quantize int4-experts` (and a QAT run's checkpoints in `rlk2 eval`): the selected weights
    rounded to INT4 once, in place. `what`, `group_key`: the options named in a refusal."""
    selected = select_weights(model, patterns, group_size, what=what, group_key=group_key)
    with torch.no_grad():
        for _, owner, attr in selected:
            p = getattr(owner, attr)
            p.copy_(fake_int4(p, group_size))
    return Quantized([name for name, _, _ in selected], group_size)
