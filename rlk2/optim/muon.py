"""Muon's pieces: batched Newton-Schulz orthogonalisation and the one function that routes parameters.

Newton-Schulz is written here rather than taken from `torch.optim.Muon` because that one is 2-D only and always
runs in bfloat16; MoE expert weights are 3-D `[E, n, m]` tensors, and CPUs without native bfloat16 run it 10-30x
slower than float32 (see `ns_dtype`). The iteration itself is the quintic of Keller Jordan's Muon with the coefficients
K2 uses.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from rlk2.hardware import cpu_has_native_bf16

logger = logging.getLogger("rlk2.optim")

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # (a, b, c) of the quintic; DESIGN.md 4
RMS_MATCH = 0.2  # K2: O = NS5(M) * sqrt(max(n, m)) * 0.2 gives the update RMS of AdamW, so AdamW lrs carry over


BF16_MIN_DIM = 256
"""On CPUs with native bfloat16 dot products, matrices whose smaller side is at least this run Newton-Schulz in
bfloat16; below it the float32 kernels are as fast or faster (measured: 96 x 96 1.4 ms float32 vs 1.8 ms bfloat16;
512 x 1408 286 ms vs 136 ms)."""


def ns_dtype(device: torch.device, shape: tuple[int, ...] | torch.Size | None = None) -> torch.dtype:
    """Precision of the Newton-Schulz matmuls for matrices of `shape` on `device`.

    bfloat16 on CUDA (tensor cores; what Muon's authors use, and the iteration is robust to it). On CPU, bfloat16
    only where the hardware makes it fast: CPUs with AVX512-BF16 or AMX (and no oneDNN ISA cap that hides them),
    for matrices whose smaller side is at least `BF16_MIN_DIM`; float32 otherwise, because CPUs without native
    bfloat16 emulate it 10-30x slower than float32.
    The choice depends only on the CPU's features and the shape, never on timings, so a run (and its resume) does
    the same maths every time on a given machine. `RLK2_NS_DTYPE=float32|bfloat16` forces one.
    """
    forced = os.environ.get("RLK2_NS_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"RLK2_NS_DTYPE={forced!r}: expected float32 or bfloat16")
        return getattr(torch, forced)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if shape is not None and min(shape[-2:]) >= BF16_MIN_DIM and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def newton_schulz(
    grads: torch.Tensor, steps: int = 5, *, dtype: torch.dtype | None = None, eps: float = 1e-7
) -> torch.Tensor:
    """Approximately orthogonalise each matrix of `grads` ([n, m] or [..., n, m]); returns `grads.dtype`.

    Every leading index is its own matrix with its own Frobenius normalisation (an expert tensor [E, n, m] is E
    matrices, never one flattened [E*n, m] matrix). The quintic pushes singular values towards 1 (into roughly
    [0.7, 1.2] after 5 steps), which is what Muon wants; it does not compute U V^T exactly.
    """
    if grads.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices, got shape {tuple(grads.shape)}")
    a, b, c = NS_COEFFICIENTS
    n, m = grads.shape[-2:]
    x = grads.reshape(-1, n, m).to(dtype or ns_dtype(grads.device, grads.shape))  # [k, n, m]
    if n > m:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller [min, min] one
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # [k, r, r], r = min(n, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a*X + (b*A + c*A^2) X
    if n > m:
        x = x.mT
    return x.reshape(grads.shape).to(grads.dtype)


def muon_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """K2's RMS matching factor for a matrix (or a stack of matrices) of the given shape: 0.2 * sqrt(max(n, m))."""
    n, m = shape[-2:]
    return RMS_MATCH * math.sqrt(max(n, m))


# ---------------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------------

# Module names that hold MoE router weights (DeepSeek-V3/Qwen3-MoE/Mixtral call it `gate`; Qwen2-MoE adds
# `shared_expert_gate`). A router's rows are per-expert scores, not a hidden linear map, so it gets AdamW (K2).
ROUTER_MODULE_NAMES = {"gate", "router", "shared_expert_gate"}


@dataclass
class Routing:
    """Which trainable parameters each update rule gets. Lists hold (name, parameter) pairs."""

    muon: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    adamw: list[tuple[str, nn.Parameter]] = field(default_factory=list)  # embeddings, LM head, routers, LoRA: decayed
    adamw_no_decay: list[tuple[str, nn.Parameter]] = field(default_factory=list)  # norms, biases, other 1-D
    frozen: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def part(label: str, pairs: list) -> str:
            return f"{label} {len(pairs)} tensors / {sum(p.numel() for _, p in pairs):,} params"

        return "; ".join(
            [part("muon", self.muon), part("adamw", self.adamw), part("adamw_no_decay", self.adamw_no_decay)]
            + [f"frozen {len(self.frozen)} tensors"]
        )


def _is_adapter(name: str) -> bool:
    # PEFT names its adapter tensors lora_A / lora_B / lora_embedding_A / lora_embedding_B.
    return ".lora_" in name or name.startswith("lora_")


def route_parameters(model: nn.Module) -> Routing:
    """Assign every trainable parameter of `model` to exactly one of Muon / AdamW / AdamW-without-decay.

    Rules, first match wins:
      frozen (requires_grad False)                 -> not optimised
      1-D and scalars (norms, biases, DoRA gains)  -> AdamW, no weight decay
      PEFT adapter matrices (LoRA A/B)             -> AdamW (see rlk2/optim/README.md for why)
      input embeddings, output embeddings/LM head  -> AdamW
      MoE router gates                             -> AdamW
      2-D hidden matrices, 3-D expert stacks       -> Muon (a 3-D tensor [E, n, m] is E matrices)
      anything else (4-D and up)                   -> AdamW
    """
    special: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            special.update(id(p) for p in module.parameters())
    for mod_name, module in model.named_modules():
        last = mod_name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) or last in ROUTER_MODULE_NAMES or type(module).__name__.endswith("Router"):
            special.update(id(p) for p in module.parameters(recurse=False))

    routing = Routing()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            routing.frozen.append(name)
        elif p.ndim < 2:
            routing.adamw_no_decay.append((name, p))
        elif _is_adapter(name) or id(p) in special or p.ndim > 3:
            routing.adamw.append((name, p))
        else:
            routing.muon.append((name, p))

    # The contract (STYLE.md 7): each trainable parameter lands in exactly one group.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    placed = [id(p) for pairs in (routing.muon, routing.adamw, routing.adamw_no_decay) for _, p in pairs]
    assert len(placed) == len(set(placed)), "a parameter was routed to more than one optimizer group"
    assert set(placed) == trainable, f"{len(trainable - set(placed))} trainable parameters were not routed"
    return routing
