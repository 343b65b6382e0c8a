"""`DenseDecoder`: prefill and decode steps of standard-attention models as one plain function over the weights.

The families users bring (Llama, Mistral, Qwen2, Qwen3; Qwen3-MoE and Mixtral for their attention) decode through
transformers' modules at a cost that, for a model of 100 M parameters on a CPU, is mostly per-operation overhead:
masks rebuilt every step, RMSNorm as six kernels, RoPE as a dozen, a cache class that concatenates. Here a layer is
a few fused calls over a static KV cache ([rows, kv heads, width, head dim], written in place, width in multiples of
16 columns so the softmax takes its fast path), with GQA attention as batched products over the shared key heads,
the same RoPE table the model uses (its scaling included), and the model's own MoE block where it has one (called
as a module, so router hooks see it). No library we depend on ships a decode path for transformers models (vLLM
and SGLang bring their own model code); transformers' `generate` runs the same modules.

Precision: `compute_dtype` (bfloat16 where the CPU has native bf16 units, see `rlk2.hardware.fast_dtype`) holds a
copy of the weights made when the decoder opens (the model keeps its float32 master weights); the residual stream,
the norms and the logits are float32, and the softmax accumulates in float32. In float32 it matches the model's
forward to rounding (tests/test_dense_decoder.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from rlk2.moe import RouterProbe, find_routers


def family(model: nn.Module) -> str:
    """The model's class name; FSDP2 (`fully_shard`) makes a subclass named FSDP<class>, the same model."""
    return type(model).__name__.removeprefix("FSDP")


def plain_linear(module: nn.Module) -> bool:
    """An `nn.Linear` the plain-function decoders may read `.weight` from: torch's own, or one whose weight is
    read through a parametrization (QAT's INT4 weights, rlk2.qat; torch makes it a subclass named Parametrized*)."""
    return type(module) is nn.Linear or (parametrize.is_parametrized(module) and type(module).__bases__ == (nn.Linear,))


def plain_weight(module: nn.Module, name: str) -> bool:
    """`module.<name>` is an ordinary tensor (a parameter, or one read through a parametrization), not a DTensor
    shard or a wrapper."""
    if parametrize.is_parametrized(module, name):
        return type(module.parametrizations[name].original) is nn.Parameter
    return type(getattr(module, name)) is nn.Parameter


FAMILIES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)


class DenseDecoder:
    """A static-cache decoder for a standard-attention causal LM (see the module docstring); the interface of
    `rlk2.rollout.decode.LatentDecoder`: `logits` after the prefill, `reorder`, `step`, `routes`."""

    def __init__(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        record_routing: bool = False,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.inner, self.cfg = model, model.model, model.config
        self.dtype = compute_dtype
        self.layers = list(self.inner.layers[: self.cfg.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = self.cfg.num_attention_heads
        self.kv_heads = self.cfg.num_key_value_heads
        self.scaling = attn.scaling
        self.probe = RouterProbe(find_routers(model) if record_routing else [])
        self.probe.__enter__()
        self.weights = [self._layer_weights(layer) for layer in self.layers]
        self.norm_w = self.inner.norm.weight.float()[:, None]
        self.eps = self.inner.norm.variance_epsilon
        self.embed = self.inner.embed_tokens.weight
        self.head_w = self.model.lm_head.weight.to(compute_dtype)
        U, P = prompt_mask.shape
        width = -(-(P + max_new_tokens) // 16) * 16
        device = prompt_mask.device
        self.k = [
            torch.zeros(U, self.kv_heads, width, self.head_dim, dtype=compute_dtype, device=device) for _ in self.layers
        ]
        self.v = [torch.zeros_like(c) for c in self.k]
        self.bias = torch.full((U, width), float("-inf"), dtype=compute_dtype, device=device)
        self.bias[:, :P].masked_fill_(prompt_mask.bool(), 0.0)
        self.width = 0
        cos, sin = self.inner.rotary_emb(self.k[0][:1, 0, :1], torch.arange(width, device=device)[None])
        self.cos, self.sin = cos[0].to(compute_dtype), sin[0].to(compute_dtype)  # [width, head_dim]
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        keep = causal & prompt_mask.bool()[:, None, :] | torch.eye(P, dtype=torch.bool, device=device)  # [U, P, P]
        bias = torch.full((U, P, width), float("-inf"), dtype=compute_dtype, device=device)
        bias[..., :P].masked_fill_(keep, 0.0)
        self.logits = self._forward(prompt_ids, positions, bias)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        if family(model) not in FAMILIES or not plain_linear(model.lm_head):
            return False
        cfg = model.config
        if (
            getattr(cfg, "sliding_window", None)
            and getattr(cfg, "use_sliding_window", True)
            and family(model) != "LlamaForCausalLM"
        ):
            return False  # sliding-window attention is not implemented here: the model's forward decodes it
        if getattr(cfg, "hidden_act", "silu") != "silu" or not model.dtype.is_floating_point:
            return False
        for layer in model.model.layers:
            a = layer.self_attn
            if any(not plain_linear(getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
                return False
            mlp = layer.mlp
            if hasattr(mlp, "gate_proj") and any(
                not plain_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")
            ):
                return False
        return True

    # ------------------------------------------------------------------------------------------- interface
    def __enter__(self) -> DenseDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.probe.__exit__()

    def routes(self) -> torch.Tensor:
        return self.probe.take()

    def reorder(self, keep: torch.Tensor) -> None:
        self.k = [c.index_select(0, keep) for c in self.k]
        self.v = [c.index_select(0, keep) for c in self.v]
        self.bias = self.bias.index_select(0, keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.bias[:, self.width] = 0.0
        return self._forward(tokens[:, None], positions[:, None], self.bias[:, None])

    # ------------------------------------------------------------------------------------------- the model
    def _layer_weights(self, layer: nn.Module) -> dict:
        a, dt = layer.self_attn, self.dtype
        # q, k and v as one product: one GEMM per layer instead of three. The softmax scale is folded into the query
        # rows (or, where a per-head RMSNorm follows the projection, into that norm's weight): one multiply fewer
        # per layer and step.
        q_norm = getattr(a, "q_norm", None)
        q_scale = 1.0 if q_norm is not None else self.scaling
        qkv_w = torch.cat([a.q_proj.weight * q_scale, a.k_proj.weight, a.v_proj.weight]).to(dt)
        biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
        qkv_b = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [
                    b * scale if b is not None else torch.zeros(p.weight.shape[0], device=p.weight.device)
                    for b, p, scale in zip(biases, (a.q_proj, a.k_proj, a.v_proj), (q_scale, 1.0, 1.0))
                ]
            ).to(dt)
        )
        w = {
            "qkv": qkv_w,
            "qkv_b": None if qkv_b is None else qkv_b[:, None],
            "o": a.o_proj.weight.to(dt),
            "o_b": None if a.o_proj.bias is None else a.o_proj.bias.to(dt)[:, None],
            "ln1": layer.input_layernorm.weight.float()[:, None],
            "ln2": layer.post_attention_layernorm.weight.float(),
            "eps": layer.input_layernorm.variance_epsilon,
            "q_norm": None if q_norm is None else q_norm.weight.float() * self.scaling,
            "k_norm": None if q_norm is None else a.k_norm.weight.float(),
        }
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):
            w["gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(dt)
            w["down"] = mlp.down_proj.weight.to(dt)
        w["ln2"] = w["ln2"][:, None] if "gate_up" in w else w["ln2"]
        return w

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Feed [n, t] tokens at [n, t] positions into columns width..width+t-1, attending with the additive
        `bias` [n, t, >= S]; return the float32 logits after each row's last token [n, V].

        The residual stream is feature-major, x [H, N] in float32 (N = n * t tokens): every linear layer multiplies
        weight [out, in] @ activations [in, N], which with N the small side the CPU's GEMM runs about twice as fast
        as activations @ weight.T (measured on SmolLM2's shapes at 32 rows: 106 vs 200 ms per decode step), and the
        stream never needs a transposing copy between layers."""
        col, (n, t) = self.width, tokens.shape
        self.width += t
        s = self.k[0].shape[2]  # attend over the whole static cache (the unwritten columns are masked): a slice of
        bias = bias[..., :s]  # it would be a strided view, which the batched products copy first (measured)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [n, t, 1, hd]
        x = self.embed[tokens].view(n * t, -1).t().contiguous().float()  # [H, N]: the residual stream
        for i, (layer, w) in enumerate(zip(self.layers, self.weights)):
            x += self._attention(w, _norm(x, w["ln1"], w["eps"], self.dtype), n, t, cos, sin, bias, i, col, s)
            if "gate_up" in w:
                gate, up = (w["gate_up"] @ _norm(x, w["ln2"], w["eps"], self.dtype)).chunk(2, dim=0)  # [I, N] each
                x += w["down"] @ F.silu(gate).mul_(up)
            else:  # a mixture-of-experts block: the model's own module (routing hooks see it), in float32
                h = F.rms_norm(x.t(), x.shape[:1], w["ln2"], w["eps"])
                x += layer.mlp(h.reshape(n, t, -1)).view(n * t, -1).t()
        last = _norm(x.view(-1, n, t)[:, :, -1], self.norm_w, self.eps, self.dtype)  # [H, n]
        # Token-major logits [n, V] straight from the product: [V, n] would need a transposing copy of V x n floats.
        return F.linear(last.t(), self.head_w).float()

    def _attention(
        self,
        w: dict,
        hT: torch.Tensor,
        n: int,
        t: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        bias: torch.Tensor,
        i: int,
        col: int,
        s: int,
    ) -> torch.Tensor:
        """Self-attention of the N = n * t tokens whose normed states are hT [H, N]; returns its output [H, N]."""
        hd, H, G = self.head_dim, self.heads, self.kv_heads
        qkv = w["qkv"] @ hT  # [(H + 2G) hd, N]
        if w["qkv_b"] is not None:
            qkv += w["qkv_b"]
        qkv = qkv.t().reshape(n, t, H + 2 * G, hd)  # [n, t, heads, hd]
        qk, v = qkv[:, :, : H + G], qkv[:, :, H + G :]
        if w["q_norm"] is not None:  # Qwen3: RMSNorm over each head's query and key (the query's holds the scale)
            q = F.rms_norm(qk[:, :, :H].float(), (hd,), w["q_norm"], w["eps"])
            k = F.rms_norm(qk[:, :, H:].float(), (hd,), w["k_norm"], w["eps"])
            qk = torch.cat([q, k], dim=2).to(self.dtype)
        qk = _rope(qk, cos, sin)  # queries and keys in one pass
        q, k = qk.split([H, G], dim=2)
        self.k[i][:, :, col : col + t] = k.transpose(1, 2)
        self.v[i][:, :, col : col + t] = v.transpose(1, 2)
        keys, values = self.k[i], self.v[i]  # [n, G, S, hd]
        # Grouped-query attention: the H / G query heads of a key head, and the t tokens, are one batch of rows.
        q = q.reshape(n, t, G, H // G, hd).permute(0, 2, 3, 1, 4).reshape(n, G, (H // G) * t, hd)
        scores = torch.matmul(q, keys.transpose(-1, -2)).view(n, G, H // G, t, s)  # [n, G, H/G, t, S], scaled
        scores += bias[:, None, None]  # 0 or -inf: exact in any dtype
        probs = torch.softmax(scores, dim=-1).view(n, G, (H // G) * t, s)  # accumulated in float32 for bf16 input
        out = torch.matmul(probs, values).view(n, G, H // G, t, hd).permute(1, 2, 4, 0, 3).reshape(H * hd, n * t)
        out = w["o"] @ out  # [H, N]
        return out if w["o_b"] is None else out + w["o_b"]


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm over the features of x [H, N] (float32; weight [H, 1]), in `dtype`: the formula of transformers'
    RMSNorm, column-wise, so the feature-major stream needs no transposing copy (23 vs 35 us at [576, 32])."""
    scale = x.pow(2).mean(dim=0, keepdim=True).add_(eps).rsqrt_()  # [1, N]
    return (x * scale).mul_(weight).to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE (`rotate_half` convention) on [n, t, heads, hd] with cos, sin [n, t, 1, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos).addcmul_(rotated, sin)
