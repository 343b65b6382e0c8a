"""Absorbed multi-head latent attention for one-token decode steps (DeepSeek-V3 / K2 architecture).

transformers' `DeepseekV3Attention` keeps the compressed latent c (kv_lora_rank wide) in its KV cache, as MLA
intends, but at every decode step it re-expands the whole cache through `kv_b_proj` into per-head keys and values
([B, H, S, dn + dv]) and runs ordinary attention over them: work and copies that grow with the context, paid once
per generated token. DeepSeek-V2's paper (section 2.1.3) points out that the up-projections can be absorbed instead:

    score_h(t, s) = q_nope_h(t) . (W_UK_h c_s) + q_rope_h(t) . k_rope(s)  =  (W_UK_h^T q_nope_h(t)) . c_s + ...
    out_h(t)      = sum_s p_h(t, s) W_UV_h c_s                            =  W_UV_h (sum_s p_h(t, s) c_s)

so a decode step projects its one query into the latent space, attends over the cached latents directly, and
projects the attended latent back out: no [B, H, S, .] key or value tensor is ever built. The result is the same
attention to float rounding (a different order of the same sums). No library that rlk2 depends on ships this for
transformers models (vLLM and SGLang have their own kernels), hence this module.

`absorbed_mla_decode(model)` swaps the forward of every eligible attention module for the duration of a `with`
block; calls with more than one query token (prefill) or without a cache go to the model's own forward
unchanged. Eligible: a plain `nn.Linear` `kv_b_proj` without bias (a LoRA-wrapped or sharded one is left alone).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _eligible(module: nn.Module) -> bool:
    kv_b = getattr(module, "kv_b_proj", None)
    return (
        type(module).__name__ == "DeepseekV3Attention"
        and type(kv_b) is nn.Linear
        and kv_b.bias is None
        and type(kv_b.weight) is nn.Parameter
        and hasattr(module, "kv_lora_rank")
    )


@contextlib.contextmanager
def absorbed_mla_decode(model: nn.Module) -> Iterator[int]:
    """Within the block, one-token decode steps of the model's MLA layers run absorbed; yields how many layers."""
    patched = [m for m in model.modules() if _eligible(m) and "forward" not in m.__dict__]
    for m in patched:
        m.forward = types.MethodType(_absorbed_forward, m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            del m.forward


def _absorbed_forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None, **kwargs):
    bsz, t = hidden_states.shape[:2]
    if cache is None or t != 1:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
    h, dn, dr, dv, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, self.kv_lora_rank

    # Query and the new token's latent, as the model's own forward computes them.
    if self.q_lora_rank is None:
        q = self.q_proj(hidden_states)
    else:
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q_nope, q_rot = q.view(bsz, 1, h, dn + dr).transpose(1, 2).split([dn, dr], dim=-1)  # [B, H, 1, .]
    latent, k_rot = self.kv_a_proj_with_mqa(hidden_states).split([r, dr], dim=-1)
    latent = self.kv_a_layernorm(latent).view(bsz, 1, 1, r)
    k_rot = k_rot.view(bsz, 1, 1, dr)
    family = sys.modules[type(self).__module__]
    rope = family.apply_rotary_pos_emb_interleave if self.config.rope_interleave else family.apply_rotary_pos_emb
    q_rot, k_rot = rope(q_rot, k_rot, *position_embeddings)
    latent, k_rot = cache.update(latent, k_rot, self.layer_idx, kwargs=kwargs)  # [B, 1, S, r], [B, 1, S, dr]
    c, k_rot = latent.view(bsz, -1, r), k_rot.view(bsz, -1, dr)  # one latent and one rotary key per position

    # Heads become the rows of per-sequence GEMMs: [B, H, r] x [B, r, S], no copy of the cache per head.
    w = self.kv_b_proj.weight.view(h, dn + dv, r)  # per head: k-nope rows (W_UK), then value rows (W_UV)
    q_latent = (q_nope.reshape(bsz, h, dn).transpose(0, 1) @ w[:, :dn]).transpose(0, 1)  # [B, H, r]
    scores = torch.baddbmm(q_latent @ c.mT, q_rot.reshape(bsz, h, dr), k_rot.mT) * self.scaling  # [B, H, S]
    if attention_mask is not None:
        keep = attention_mask[:, -scores.shape[-1]:] if attention_mask.ndim == 2 \
            else attention_mask[:, 0, -1:, -scores.shape[-1]:]  # [B, S] (flash) or [B, 1, S]
        if keep.ndim == 2:
            keep = keep.bool().unsqueeze(1)
        scores = scores.masked_fill(~keep, float("-inf")) if keep.dtype == torch.bool else scores + keep
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = ((probs @ c).transpose(0, 1) @ w[:, dn:].mT).transpose(0, 1)  # [B, H, dv]
    return self.o_proj(out.reshape(bsz, 1, h * dv)), None
