"""QK-Clip (K2): record each attention head's largest pre-softmax logit during the forward, then rescale the
query/key weights of the heads whose logit passed tau, right after the optimizer step.

Recording. Forward hooks copy (detached) the outputs of the projections that make queries and keys, plus the
attention module's `position_embeddings` and `attention_mask`; when the attention module returns, the hook
applies the model's own RoPE function and computes `q k^T * module.scaling` (the model's softmax scale,
YaRN mscale included) with the same mask the model used, and keeps a running per-head max. Nothing is returned
from the hooks, so the forward's outputs are untouched, and the result does not depend on which attention
kernel (eager, SDPA) ran: the logits are recomputed from the kernel's inputs, because SDPA never materialises
them. Only grad-enabled forwards are recorded: rollout generation and old-log-prob passes run under no_grad on
the very sequences the training forward sees next, so recording them would only cost time.

Clipping rules (gamma = tau / S_max for a head over tau; heads at or below tau are not touched at all):
  MLA (DeepSeek-V3 / K2): nope rows of the query projection and k-nope rows of kv_b_proj x sqrt(gamma), rope rows
      of the query projection x gamma; value rows of kv_b_proj and the shared rotary key in kv_a_proj_with_mqa
      untouched (it serves every head; scaling it would move heads below tau).
  MHA: that head's rows of W_q and W_k (and biases) x sqrt(gamma).
  GQA: a key head serves several query heads, so the whole gamma goes on the query head's rows (as for MLA's k^R).
  QK-norm (Qwen3 / Qwen3-MoE): recorded and reported, never clipped. A per-head RMSNorm follows q_proj/k_proj, so
      scaling their rows changes nothing; the logit scale lives in the q_norm/k_norm gains, which every head of the
      layer shares, so clipping them would rescale heads below tau. QK-norm already bounds the logit by
      sqrt(head_dim) * max|g_q| * max|g_k|.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from rlk2.optim.sharded import local_rows

logger = logging.getLogger("rlk2.optim")

# Attention classes whose recording and clipping the tests check against the eager kernel's own logits.
TESTED_ATTENTION = {"DeepseekV3Attention", "LlamaAttention", "Qwen3MoeAttention", "MixtralAttention", "Qwen2Attention"}
_CHUNK_ELEMENTS = 1 << 24  # logits materialised per chunk of the batch: 16M floats = 64 MB


class AttentionClip:
    """One attention module: the hooks that record its per-head max logit, and its QK-Clip rule."""

    kind = "mha"

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.scaling = float(module.scaling)
        if not self.scaling > 0:
            raise ValueError(f"{name}: softmax scale {self.scaling} is not positive")
        self._future_cache: dict[tuple, torch.Tensor] = {}
        self.running_max: torch.Tensor | None = None  # [H] float32, max since the last take()
        self._captured: dict[str, torch.Tensor] = {}
        # (position_embeddings, attention_mask, KV cache) of the current call
        self._inputs: tuple = (None, None, None)
        params = list(inspect.signature(module.forward).parameters)
        self._arg_index = {
            k: params.index(k)
            for k in ("position_embeddings", "attention_mask", "cache", "past_key_values")
            if k in params
        }
        rope_module = sys.modules[type(module).__module__]
        self._rope: Callable = rope_module.apply_rotary_pos_emb
        self.num_heads = 0
        self._num_sources = 0
        self.clippable = True
        self.why_not = ""

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def register(self) -> list:
        handles = [
            self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.module.register_forward_hook(self._post_hook),
        ]
        sources = self.sources()
        self._num_sources = len(sources)
        for key, sub in sources.items():
            handles.append(sub.register_forward_hook(self._capture_hook(key)))
        return handles

    def sources(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _capture_hook(self, key: str):
        def hook(_module, _args, output):
            if torch.is_grad_enabled():
                self._captured[key] = output.detach()

        return hook

    def _pre_hook(self, _module, args, kwargs):
        if torch.is_grad_enabled():
            cache = self._arg("cache", args, kwargs)
            self._inputs = (
                self._arg("position_embeddings", args, kwargs),
                self._arg("attention_mask", args, kwargs),
                cache if cache is not None else self._arg("past_key_values", args, kwargs),
            )

    def _arg(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        i = self._arg_index.get(name)
        return args[i] if i is not None and i < len(args) else None

    def _post_hook(self, _module, _args, _output):
        if not torch.is_grad_enabled() or len(self._captured) < self._num_sources:
            return
        try:
            with torch.no_grad(), torch.autocast(self._captured_device().type, enabled=False):
                smax = self.head_max_logits()
        finally:
            self._captured.clear()
            self._inputs = (None, None, None)
        self.running_max = smax if self.running_max is None else torch.maximum(self.running_max, smax)

    def _cached(self, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's KV cache (keys, values) after the call, when it holds more positions than the call fed:
        a forward that continues a cache (the training forward that runs shared prompts once, rlk2.rollout
        .SharedPrompts) attends to keys it did not project itself, already rotated (and normed) by the model."""
        cache = self._inputs[2]
        if cache is None or not hasattr(cache, "layers"):
            return None
        idx = self.module.layer_idx
        s = cache.get_seq_length(idx)
        if s <= t:
            return None
        layer = cache.layers[idx]
        return layer.keys[..., :s, :], layer.values[..., :s, :]

    def _captured_device(self) -> torch.device:
        return next(iter(self._captured.values())).device

    def take(self) -> torch.Tensor | None:
        out, self.running_max = self.running_max, None
        return out

    # ---- logits ---------------------------------------------------------------------------------------------------
    def head_max_logits(self) -> torch.Tensor:
        raise NotImplementedError

    def _max_over_chunks(self, logits_fn: Callable[[slice], torch.Tensor], batch: int, per_item: int) -> torch.Tensor:
        """Per-head max logit ([H], model scale, model mask) of `logits_fn(batch_slice)`, the unscaled q k^T
        of a slice of the batch ([b, H, T, S]), without materialising the whole batch at once."""
        step = max(1, _CHUNK_ELEMENTS // max(per_item, 1))
        maxes = [
            self._masked_head_max(logits_fn(slice(i, i + step)), slice(i, i + step)) for i in range(0, batch, step)
        ]
        return maxes[0] if len(maxes) == 1 else torch.stack(maxes).amax(dim=0)

    def _masked_head_max(self, raw: torch.Tensor, rows: slice) -> torch.Tensor:
        """Apply the model's mask as its kernel would and reduce to [H]. `raw` is ours: modified in place.

        Masks are applied by adding a float bias (0 or -inf): on CPU an add broadcast over heads costs a fraction
        of `masked_fill_` with a boolean mask."""
        mask = self._inputs[1]
        t, s = raw.shape[-2:]
        if mask is not None and mask.ndim == 4 and mask.dtype != torch.bool:  # eager: additive float mask
            mask = mask[..., -s:] if mask.shape[0] == 1 else mask[rows, ..., -s:]
            return raw.mul_(self.scaling).add_(mask).amax(dim=(0, 2, 3))  # the model's order of operations
        # Boolean masks only select entries, and scaling > 0 commutes with max: scale the [H] result, not [b,H,T,S].
        if mask is None or mask.ndim == 2:  # None: SDPA's is_causal path; 2-D: flash-attention padding mask
            if getattr(self.module, "is_causal", True) and t > 1:
                raw.add_(self._future_bias(t, s, raw.device))
            if mask is not None:
                raw.add_(_keep_to_bias(mask[rows, -s:].bool())[:, None, None, :])  # [b, 1, 1, S]
        else:  # SDPA: boolean keep-mask [b or 1, 1, T, S]
            raw.add_(_keep_to_bias(mask[..., -s:] if mask.shape[0] == 1 else mask[rows, ..., -s:]))
        return raw.amax(dim=(0, 2, 3)) * self.scaling

    def _future_bias(self, t: int, s: int, device: torch.device) -> torch.Tensor:
        """[T, S] -inf where a query would look ahead (the last T of S positions are this call's queries), else 0."""
        key = (t, s, device)
        if key not in self._future_cache:  # one entry: training shapes rarely change between forwards
            future = torch.ones(t, s, dtype=torch.bool, device=device).triu(diagonal=s - t + 1)
            self._future_cache = {key: _keep_to_bias(~future)}
        return self._future_cache[key]

    # ---- clipping -------------------------------------------------------------------------------------------------
    def clip(self, heads: list[tuple[int, float]]) -> None:
        """Rescale the weights of each (head, gamma) in `heads`; every other row stays bit-for-bit as it was."""
        raise NotImplementedError

    def _check_trainable(self, *linears: nn.Module) -> None:
        if not all(lin.weight.requires_grad for lin in linears):
            self.clippable, self.why_not = False, "query/key weights are frozen (e.g. LoRA): recorded, not clipped"


def _keep_to_bias(keep: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask -> additive float32 bias: 0 where kept, -inf where masked."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, float("-inf"))


def _scale_rows(linear: nn.Module, start: int, stop: int, factor: float) -> None:
    """Rows [start, stop) of the weight (and bias) x factor; of a sharded (FSDP2) weight, those this rank holds."""
    for t in (linear.weight, getattr(linear, "bias", None)):
        if t is not None:
            rows, first = local_rows(t.data)
            a, b = max(start - first, 0), min(stop - first, rows.shape[0])
            if a < b:
                rows[a:b].mul_(factor)


class StandardAttentionClip(AttentionClip):
    """Llama / Qwen2 / Mixtral / Qwen3-MoE attention: q_proj, k_proj, optional per-head q_norm/k_norm."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.head_dim = module.head_dim
        self.groups = module.num_key_value_groups
        self.num_heads = module.config.num_attention_heads
        self.qk_norm = getattr(module, "q_norm", None) is not None and getattr(module, "k_norm", None) is not None
        self.kind = "qk_norm" if self.qk_norm else ("gqa" if self.groups > 1 else "mha")
        if self.qk_norm:
            self.clippable, self.why_not = False, "QK-norm sets the logit scale with gains shared by all heads"
        else:
            self._check_trainable(module.q_proj, module.k_proj)

    def sources(self) -> dict[str, nn.Module]:
        m = self.module
        return {"q": m.q_norm, "k": m.k_norm} if self.qk_norm else {"q": m.q_proj, "k": m.k_proj}

    def head_max_logits(self) -> torch.Tensor:
        q, k = self._captured["q"].float(), self._captured["k"].float()
        bsz, t = q.shape[:2]
        q = q.reshape(bsz, t, -1, self.head_dim).transpose(1, 2)  # [B, Hq, T, d]
        k = k.reshape(bsz, k.shape[1], -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, d]
        cos, sin = self._inputs[0]
        cached = self._cached(t)
        if cached is None:
            q, k = self._rope(q, k, cos.float(), sin.float())
        else:  # the cache's keys are rotated already: rotate the queries only
            q, k = self._rope(q, q, cos.float(), sin.float())[0], cached[0].float()
        hq, hkv, s = q.shape[1], k.shape[1], k.shape[2]

        def logits(rows: slice) -> torch.Tensor:
            qg = q[rows].reshape(-1, hkv, hq // hkv, t, self.head_dim)  # [b, Hkv, g, T, d]
            return (qg @ k[rows].unsqueeze(2).mT).reshape(-1, hq, t, s)  # [b, Hkv, g, T, S] -> [b, Hq, T, S]

        return self._max_over_chunks(logits, bsz, hq * t * s)

    def clip(self, heads: list[tuple[int, float]]) -> None:
        d = self.head_dim
        for h, gamma in heads:
            if self.groups == 1:
                _scale_rows(self.module.q_proj, h * d, (h + 1) * d, math.sqrt(gamma))
                _scale_rows(self.module.k_proj, h * d, (h + 1) * d, math.sqrt(gamma))
            else:  # the key head is shared by the group: the whole gamma on this query head
                _scale_rows(self.module.q_proj, h * d, (h + 1) * d, gamma)


class MLAClip(AttentionClip):
    """DeepSeek-V3 / K2 multi-head latent attention (transformers `DeepseekV3Attention`)."""

    kind = "mla"

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        self.num_heads = module.num_heads
        self.dn, self.dr, self.dv = module.qk_nope_head_dim, module.qk_rope_head_dim, module.v_head_dim
        self.q_linear = module.q_proj if module.q_proj is not None else module.q_b_proj
        if getattr(module.config, "rope_interleave", False):
            self._rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_interleave
        # the interleaved rotation as a complex product needs even widths (complex views of the query copy)
        self._complex_rope = (
            bool(getattr(module.config, "rope_interleave", False)) and self.dn % 2 == 0 and self.dr % 2 == 0
        )
        self._check_trainable(self.q_linear, module.kv_b_proj)

    def sources(self) -> dict[str, nn.Module]:
        return {"q": self.q_linear, "kv_a": self.module.kv_a_proj_with_mqa, "kv_b": self.module.kv_b_proj}

    def head_max_logits(self) -> torch.Tensor:
        q, kv_a, kv_b = (self._captured[k].float() for k in ("q", "kv_a", "kv_b"))
        bsz, t = q.shape[:2]
        h, dn, dr = self.num_heads, self.dn, self.dr
        # Queries and keys laid out as the kernel sees them, [B, H, T, dn+dr] = [nope | rope], so that q k^T is one
        # batched GEMM over the concatenation (the model's own product, to float rounding). One copy each: the
        # query's transpose, and the key assembled from kv_b_proj's k-nope rows and the shared rotary key.
        q = q.view(bsz, t, h, dn + dr).transpose(1, 2).contiguous()
        s = kv_b.shape[-2]  # kv_b_proj ran on the cache-expanded latents: every key position, this call's last
        k = q.new_empty(bsz, h, s, dn + dr)
        k[..., :dn] = kv_b.reshape(bsz, s, h, dn + self.dv)[..., :dn].transpose(1, 2)
        k_rot = kv_a[..., -dr:].reshape(bsz, 1, t, dr)  # one rotary key for all heads
        cos, sin = self._inputs[0]
        cached = self._cached(t)
        if cached is not None:  # the cache holds every position's rotary key, rotated by the model already
            q[..., dn:] = self._rope(q[..., dn:], q[..., dn:], cos.float(), sin.float())[0]
            k[..., dn:] = cached[1].float()
        elif self._complex_rope:
            # Interleaved RoPE rotates each pair (x0, x1) by its angle: (x0 + i x1) * (cos + i sin), done in place
            # on the query copy. It leaves the pairs interleaved where the model's function de-interleaves them;
            # q and k share the layout, so every dot product is the same (3 ops instead of the function's ~14).
            turn = torch.complex(cos[..., : dr // 2].float(), sin[..., : dr // 2].float()).unsqueeze(1)  # [B,1,T,dr/2]
            torch.view_as_complex(q[..., dn:].unflatten(-1, (dr // 2, 2))).mul_(turn)
            k[..., dn:] = torch.view_as_real(
                torch.view_as_complex(k_rot.unflatten(-1, (dr // 2, 2)).contiguous()) * turn
            ).flatten(-2)
        else:
            q_rot, k_rot = self._rope(q[..., dn:], k_rot, cos.float(), sin.float())
            q[..., dn:] = q_rot
            k[..., dn:] = k_rot

        def logits(rows: slice) -> torch.Tensor:
            return q[rows] @ k[rows].mT  # [b, H, T, S]

        return self._max_over_chunks(logits, bsz, h * t * s)

    def clip(self, heads: list[tuple[int, float]]) -> None:
        q_width, kv_width = self.dn + self.dr, self.dn + self.dv
        for h, gamma in heads:
            root = math.sqrt(gamma)
            _scale_rows(self.q_linear, h * q_width, h * q_width + self.dn, root)  # q^C
            _scale_rows(self.q_linear, h * q_width + self.dn, (h + 1) * q_width, gamma)  # q^R
            _scale_rows(self.module.kv_b_proj, h * kv_width, h * kv_width + self.dn, root)  # k^C; values untouched


def find_attention(model: nn.Module) -> list[AttentionClip]:
    """Wrap every attention module of `model` that QK-Clip understands; warn about the ones it does not."""
    found, unknown = [], set()
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not cls.endswith("Attention"):
            continue
        rope_module = sys.modules[type(module).__module__]
        has = lambda *attrs, m=module: all(hasattr(m, a) for a in attrs)  # noqa: E731
        if has("kv_b_proj", "kv_a_proj_with_mqa", "qk_nope_head_dim", "qk_rope_head_dim", "scaling", "num_heads"):
            found.append(MLAClip(name, module))
        elif has("q_proj", "k_proj", "head_dim", "scaling", "num_key_value_groups", "config") and hasattr(
            rope_module, "apply_rotary_pos_emb"
        ):
            found.append(StandardAttentionClip(name, module))
        else:
            unknown.add(cls)
            continue
        if cls not in TESTED_ATTENTION:
            unknown.add(f"{cls} (treated as {found[-1].kind}, untested)")
    if unknown:
        logger.warning("QK-Clip: attention classes not recorded or untested: %s", ", ".join(sorted(unknown)))
    return found


def qk_clip(attentions: list[AttentionClip], tau: float | None) -> tuple[float, int]:
    """Clip every head whose recorded max logit exceeds tau; return (max logit over all heads, heads clipped).

    The recorded maxima are reduced across processes first (all ranks must clip the same heads, or replicas drift).
    The max logit is NaN when no grad-enabled forward was recorded since the previous step.
    """
    taken = [a.take() for a in attentions]
    recorded = [t for t in taken if t is not None]
    if not recorded:
        return float("nan"), 0
    device = recorded[0].device
    flat = torch.cat(
        [
            t if t is not None else torch.full((a.num_heads,), -math.inf, device=device)
            for a, t in zip(attentions, taken)
        ]
    )  # [sum of heads]
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
    values = flat.tolist()  # one host sync per step
    max_logit = max(values)
    clipped = 0
    if tau is not None and math.isfinite(tau):
        offset = 0
        for attn in attentions:
            heads = [(h, tau / s) for h, s in enumerate(values[offset : offset + attn.num_heads]) if s > tau]
            offset += attn.num_heads
            if heads and attn.clippable:
                attn.clip(heads)
                clipped += len(heads)
    return max_logit, clipped
