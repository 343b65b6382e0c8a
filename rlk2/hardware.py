"""What the machine computes fast: the choices that depend on the hardware, made from its features, not timings,
so that a run (and its resume) does the same arithmetic every time on a given machine."""

from __future__ import annotations

import functools
import os

import torch

# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA) that leave out the
# bfloat16 dot-product instructions: under them torch's CPU bfloat16 matmuls are emulated, as on a CPU without them
# (measured: 512 x 1408 Newton-Schulz matmuls 20x slower than float32 under AVX2, 2.5x faster without a cap).
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and no oneDNN cap hides it. Without,
    torch emulates bfloat16 matmuls, 5-30x slower than float32 (measured on an AVX2 CPU: 15 vs 90 GFLOPS)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in _ISAS_WITHOUT_BF16:
        return False
    try:  # private torch helpers, stable since 2.3; without them assume emulated bfloat16
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def fast_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in for weights stored in `dtype` on `device`: bfloat16 where the hardware makes it fast
    (CUDA, or a CPU with native bfloat16), else `dtype` itself. `RLK2_COMPUTE_DTYPE=float32|bfloat16` forces one."""
    forced = os.environ.get("RLK2_COMPUTE_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"RLK2_COMPUTE_DTYPE={forced!r}: expected float32 or bfloat16")
        return getattr(torch, forced)
    if dtype != torch.float32:
        return dtype
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def training_autocast_dtype(setting: str, device: torch.device | str) -> torch.dtype | None:
    """`trainer.mixed_precision` resolved on `device`: bfloat16 autocast for "bf16", and for "auto" where the
    hardware multiplies bfloat16 natively (as `fast_dtype` decides); None (full float32) otherwise."""
    if setting == "bf16" or (setting == "auto" and fast_dtype(device, torch.float32) == torch.bfloat16):
        return torch.bfloat16
    return None


def _float32_enter(module: torch.nn.Module, args: tuple) -> tuple:
    # Leave autocast for this module: its input goes to the dtype its weights are stored in (float32 master weights;
    # a policy stored in bfloat16 stays as it was) and its own product runs at that precision.
    ctx = torch.autocast(args[0].device.type, enabled=False)
    ctx.__enter__()
    module._rlk2_float32_ctx = ctx
    weight = next(module.parameters(), None)
    return (args[0].to(torch.float32 if weight is None else weight.dtype), *args[1:])


def _float32_exit(module: torch.nn.Module, args: tuple, output):
    ctx = module.__dict__.pop("_rlk2_float32_ctx", None)
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return output


def keep_in_float32(modules: list[torch.nn.Module]) -> None:
    """Run `modules` outside bfloat16 autocast, in float32 (the LM head, MoE routers). Under autocast the LM head's
    product would round the logits to bfloat16 (8 bits of mantissa: an error of ~0.06 on a logit of 16), far larger
    than the rollout-vs-training mismatch the importance ratios correct for; a router's top-k would flip on
    rounding. Module hooks, so copies of the model keep the rule; the exit hook runs even when the forward raises."""
    for m in modules:
        m.register_forward_pre_hook(_float32_enter)
        m.register_forward_hook(_float32_exit, always_call=True)
