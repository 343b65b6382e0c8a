"""Decoders: the prefill and one-token decode steps that `generate_rollouts` runs, behind one interface.

A decoder is opened on the distinct prompts (`logits` [U, V] after the prefill), then `reorder(rows)` expands or
drops rows of its cache, `step(tokens, positions)` feeds one token per row and returns the next logits, and
`routes()` gives the experts each MoE layer used for the last call's tokens. `open_decoder` picks one:
- `LatentDecoder`: DeepSeek-V3-family models (the demo's and K2's architecture) as a plain function over the
  weights with a static latent cache (below);
- `ForwardDecoder`: any other model, through its own forward and transformers' KV cache, with MLA attention
  absorbed for decode steps where the projections allow (`absorbed_mla_decode`).

Absorbed multi-head latent attention for one-token decode steps (DeepSeek-V3 / K2 architecture):

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
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rlk2.hardware import fast_dtype
from rlk2.moe import RouterProbe, find_routers
from rlk2.rollout.dense import DenseDecoder, family, plain_linear, plain_weight


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
        keep = (
            attention_mask[:, -scores.shape[-1] :]
            if attention_mask.ndim == 2
            else attention_mask[:, 0, -1:, -scores.shape[-1] :]
        )  # [B, S] (flash) or [B, 1, S]
        if keep.ndim == 2:
            keep = keep.bool().unsqueeze(1)
        scores = scores.masked_fill(~keep, float("-inf")) if keep.dtype == torch.bool else scores + keep
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = ((probs @ c).transpose(0, 1) @ w[:, dn:].mT).transpose(0, 1)  # [B, H, dv]
    return self.o_proj(out.reshape(bsz, 1, h * dv)), None


# ================================================================================================ latent decoder
class LatentDecoder:
    """The prompts' prefill and the one-token decode steps of a DeepSeek-V3-family model (the demo's and K2's
    architecture) as one plain function over the model's own weights, with a static latent KV cache.

    Why by hand: a decode step feeds n tokens through every layer, and for a small model on a CPU the step's time is
    the per-operation overhead of transformers' modules (masks rebuilt, RMSNorm as six kernels, RoPE as twelve, the
    cache classes, output dataclasses), not arithmetic. Here a layer is ~45 tensor operations: fused RMSNorm
    (`F.rms_norm`), RoPE as one complex product, absorbed MLA attention over a preallocated latent cache (no
    concatenation per token), and the MoE block with the router's own selection rule. No library we depend on ships
    a decode path for transformers models (vLLM and SGLang bring their own model code); transformers' `generate`
    goes through the same modules.

    Same model, same numbers to float rounding (tested against transformers' forward, logits and routing); used by
    `generate_rollouts` when `supports(model)`: a DeepseekV3ForCausalLM with plain `nn.Linear` projections (no
    LoRA, no quantised layers), float weights, interleaved or plain RoPE, with or without a query LoRA rank.
    """

    def __init__(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        record_routing: bool = False,
    ) -> None:
        """Prefill `prompt_ids` [U, P] (left padded, `prompt_mask` 1 on real tokens): `logits` [U, V] then predict
        each prompt's first completion token. `reorder` expands or drops rows; `step` feeds one token per row."""
        self.model, self.inner = model, model.model
        self.cfg = model.config
        self.layers = list(self.inner.layers[: self.cfg.num_hidden_layers])
        self.record_routing = record_routing
        self.layer_routes: list[torch.Tensor] = []  # per MoE layer, the experts of the last call's tokens [n * t, k]
        U, P = prompt_mask.shape
        # Columns in multiples of 16: torch's CPU softmax takes a scalar path on rows shorter than 16 (~12x slower
        # per element, measured), so every step attends over a multiple of 16 columns, the unwritten ones masked.
        width = -(-(P + max_new_tokens) // 16) * 16
        attn0 = self.layers[0].self_attn
        r, dr = attn0.kv_lora_rank, attn0.qk_rope_head_dim
        dtype, device = self.inner.embed_tokens.weight.dtype, prompt_mask.device
        # The latent cache: one [rows, width, r] latent and one rotated key per position, per layer.
        self.latent = [torch.zeros(U, width, r, dtype=dtype, device=device) for _ in self.layers]
        self.rot = [torch.zeros(U, width, dr, dtype=dtype, device=device) for _ in self.layers]
        # Additive mask over cache columns: 0 on every written position, -inf on the prompts' left padding and on
        # the columns not written yet.
        self.bias = torch.full((U, width), float("-inf"), dtype=torch.float32, device=device)
        self.bias[:, :P].masked_fill_(prompt_mask.bool(), 0.0)
        self.width = 0  # columns written so far
        # RoPE as a complex turn per position: cos + i sin of each pair's angle (the model's own rotary embedding,
        # attention scaling included), one table for every position this generation can reach.
        cos, sin = self.inner.rotary_emb(self.latent[0][:1, :1], torch.arange(width, device=device)[None])
        self.turn = torch.complex(cos[0, :, : dr // 2].float(), sin[0, :, : dr // 2].float())  # [width, dr/2]
        # The prefill: causal attention over the prompt; a padding position (which no real token attends to)
        # attends to itself only, so that its row of the softmax is not empty.
        positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # as generate() counts them: real tokens only
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        keep = causal & prompt_mask.bool()[:, None, :] | torch.eye(P, dtype=torch.bool, device=device)  # [U, P, P]
        bias = torch.full((U, P, width), float("-inf"), device=device)
        bias[..., :P].masked_fill_(keep, 0.0)
        self.logits = self._forward(prompt_ids, positions, bias)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        if family(model) != "DeepseekV3ForCausalLM" or inner is None:
            return False
        if not model.dtype.is_floating_point or not plain_linear(model.lm_head):
            return False
        for layer in inner.layers:
            attn = layer.self_attn
            linears = [attn.kv_a_proj_with_mqa, attn.kv_b_proj, attn.o_proj] + (
                [attn.q_proj] if attn.q_lora_rank is None else [attn.q_a_proj, attn.q_b_proj]
            )
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                linears += [mlp.shared_experts.gate_proj, mlp.shared_experts.up_proj, mlp.shared_experts.down_proj]
                if not (plain_weight(mlp.experts, "gate_up_proj") and plain_weight(mlp.experts, "down_proj")):
                    return False
            else:
                linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if (
                any(not plain_linear(m) for m in linears)
                or attn.o_proj.bias is not None
                or attn.kv_b_proj.bias is not None
            ):
                return False
            if model.config.hidden_act != "silu":
                return False
        return True

    def routes(self) -> torch.Tensor:
        """[L, n * t, k]: the experts every MoE layer used for the last call's tokens (with `record_routing`)."""
        return torch.stack(self.layer_routes)

    def __enter__(self) -> LatentDecoder:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def reorder(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (in that order): finished sequences leave the cache."""
        self.latent = [c.index_select(0, keep) for c in self.latent]
        self.rot = [c.index_select(0, keep) for c in self.rot]
        self.bias = self.bias.index_select(0, keep)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row ([n] ids at [n] position ids); return next-token logits [n, V]."""
        self.bias[:, self.width] = 0.0
        return self._forward(tokens[:, None], positions[:, None], self.bias[:, None])

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Feed [n, t] tokens at [n, t] positions into columns width..width+t-1 of the cache, attending with the
        additive `bias` [n, t, >= S]; return the logits after each row's last token [n, V]."""
        col, t = self.width, tokens.shape[1]
        self.width += t
        s = -(-self.width // 16) * 16  # the written columns, rounded up to the softmax's fast width
        bias = bias[..., :s]
        turn = self.turn[positions]  # [n, t, dr/2]
        x = self.inner.embed_tokens(tokens)  # [n, t, H]
        self.layer_routes = []
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer.self_attn, _rms(layer.input_layernorm, x), turn, bias, i, col, s)
            h = _rms(layer.post_attention_layernorm, x)
            x = x + (self._moe(layer.mlp, h) if hasattr(layer.mlp, "experts") else _mlp(layer.mlp, h))
        return self.model.lm_head(_rms(self.inner.norm, x[:, -1]))

    def _attention(
        self, attn, x: torch.Tensor, turn: torch.Tensor, bias: torch.Tensor, i: int, col: int, s: int
    ) -> torch.Tensor:
        n, t = x.shape[:2]
        h, dn, dr, dv, r = (
            attn.num_heads,
            attn.qk_nope_head_dim,
            attn.qk_rope_head_dim,
            attn.v_head_dim,
            attn.kv_lora_rank,
        )
        if attn.q_lora_rank is None:
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
        else:
            q = F.linear(
                _rms(attn.q_a_layernorm, F.linear(x, attn.q_a_proj.weight, attn.q_a_proj.bias)),
                attn.q_b_proj.weight,
                attn.q_b_proj.bias,
            )
        q = q.view(n, t, h, dn + dr)
        kv = F.linear(x, attn.kv_a_proj_with_mqa.weight, attn.kv_a_proj_with_mqa.bias)  # [n, t, r + dr]
        self.latent[i][:, col : col + t] = _rms(attn.kv_a_layernorm, kv[..., :r])
        self.rot[i][:, col : col + t] = _rotate(kv[..., r:], turn, self.cfg.rope_interleave)
        c, k_rot = self.latent[i][:, :s], self.rot[i][:, :s]  # [n, S, r], [n, S, dr]
        q_rot = _rotate(q[..., dn:], turn.unsqueeze(2), self.cfg.rope_interleave)  # [n, t, h, dr]
        w = attn.kv_b_proj.weight.view(h, dn + dv, r)  # per head: k-nope rows (W_UK), then value rows (W_UV)
        # Heads are the rows of per-sequence GEMMs over the latents: [n, h*t, r] x [n, r, S].
        q_latent = torch.bmm(q[..., :dn].permute(2, 0, 1, 3).reshape(h, n * t, dn), w[:, :dn])  # [h, n*t, r]
        q_latent = q_latent.view(h, n, t, r).transpose(0, 1).reshape(n, h * t, r)
        scores = torch.bmm(q_latent, c.mT).baddbmm_(q_rot.transpose(1, 2).reshape(n, h * t, dr), k_rot.mT)
        scores = torch.add(bias.unsqueeze(1), scores.view(n, h, t, s), alpha=attn.scaling)  # [n, h, t, S]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(n, h * t, s)
        attended = torch.bmm(probs, c).view(n, h, t, r).transpose(0, 1).reshape(h, n * t, r)
        out = torch.bmm(attended, w[:, dn:].mT)  # [h, n*t, dv]
        return F.linear(out.view(h, n, t, dv).permute(1, 2, 0, 3).reshape(n, t, h * dv), attn.o_proj.weight)

    def _moe(self, moe, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # [n * t, H]: the router and experts see tokens
        router = moe.gate
        logits = F.linear(x.float(), router.weight.float())  # [n, E], the router's own float32 scores
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        if router.num_group > 1:  # group-limited routing: only the topk_group best groups (top-2 sum) compete
            grouped = choice.view(len(x), router.num_group, -1)
            best = grouped.topk(2, dim=-1)[0].sum(dim=-1).topk(router.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(len(x), -1)
        idx = choice.topk(router.top_k, dim=-1, sorted=False)[1]  # [n, k]
        weights = scores.gather(1, idx)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * router.routed_scaling_factor
        if self.record_routing:
            self.layer_routes.append(idx)
        return (_experts(moe.experts, x, idx, weights) + _mlp(moe.shared_experts, x)).view(shape)


def _experts(experts: nn.Module, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted sum for tokens x [n, H] routed to idx [n, k]. Up to 2 tokens (the last
    sequences still generating): each token's k experts' weights gathered and applied as one batched product
    (~10 operations instead of the grouped kernel's few hundred: 65 vs 130 us for one token on the demo shape);
    more tokens: the model's own experts implementation, where gathering weight copies per token would cost more."""
    n, k = idx.shape
    if n > 2 or type(experts).__name__.removeprefix("Parametrized") != "DeepseekV3Experts":
        return experts(x, idx, weights)
    flat = idx.reshape(-1)
    gate, up = (
        torch.bmm(experts.gate_up_proj.index_select(0, flat), x.repeat_interleave(k, 0).unsqueeze(-1))
        .squeeze(-1)
        .chunk(2, dim=-1)
    )  # [n*k, I] each
    y = torch.bmm(experts.down_proj.index_select(0, flat), (experts.act_fn(gate) * up).unsqueeze(-1))  # [n*k, H, 1]
    return (y.view(n, k, -1) * weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused call, the weight included (the same products as the module's)
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype) * norm.weight


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(
        F.silu(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
        * F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias),
        mlp.down_proj.weight,
        mlp.down_proj.bias,
    )


def _rotate(x: torch.Tensor, turn: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE in the layout transformers' DeepSeek-V3 functions produce: the pairs are (x[2j], x[2j+1]) when
    interleaved, (x[j], x[j + d/2]) otherwise; the output is [rotated first members | rotated second members]."""
    d = x.shape[-1]
    pairs = x.unflatten(-1, (d // 2, 2)) if interleaved else x.unflatten(-1, (2, d // 2)).transpose(-1, -2)
    z = torch.view_as_complex(pairs.float().contiguous()) * turn
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


# ================================================================================================ any model
class ForwardDecoder:
    """The model's own forward with transformers' KV cache: any architecture, any wrapping (LoRA, quantised layers).

    MLA attention runs absorbed in decode steps where `kv_b_proj` is a plain linear layer (`absorbed_mla_decode`);
    routing is read by hooks on the routers (`rlk2.moe.RouterProbe`). Use as a context manager (the hooks and the
    absorbed forwards are removed on exit)."""

    def __init__(
        self,
        model: nn.Module,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        max_new_tokens: int,
        record_routing: bool = False,
    ) -> None:
        self.model = model
        self.probe = RouterProbe(find_routers(model) if record_routing else [])
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.probe)
        self._stack.enter_context(absorbed_mla_decode(model))
        try:
            out = model(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                use_cache=True,
                logits_to_keep=1,
                position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
            )
        except BaseException:
            self._stack.close()
            raise
        self.cache, self.logits = out.cache, out.logits[:, -1]
        self.attn = prompt_mask  # [n, P + t] attention mask of the rows in the cache

    def __enter__(self) -> ForwardDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def routes(self) -> torch.Tensor:
        return self.probe.take()

    def reorder(self, keep: torch.Tensor) -> None:
        self.cache.reorder_cache(keep)
        self.attn = self.attn[keep]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones((self.attn.shape[0], 1))], dim=1)
        return self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=self.attn,
            position_ids=positions.unsqueeze(1),
            cache=self.cache,
            use_cache=True,
        ).logits[:, -1]


def open_decoder(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    record_routing: bool = False,
    fast: bool = True,
):
    """The decoder for `model`, prefilled with `prompt_ids` [U, P] (left padded): a plain-function decoder where the
    architecture allows and `fast` (`LatentDecoder` for DeepSeek-V3, `DenseDecoder` for Llama / Mistral / Qwen2 /
    Qwen3 and their MoE kin, in bfloat16 where the hardware multiplies it natively), else the model's forward.
    A context manager."""
    if fast and LatentDecoder.supports(model):
        return LatentDecoder(model, prompt_ids, prompt_mask, max_new_tokens, record_routing=record_routing)
    if fast and DenseDecoder.supports(model):
        dtype = fast_dtype(prompt_ids.device, model.dtype)
        return DenseDecoder(
            model, prompt_ids, prompt_mask, max_new_tokens, record_routing=record_routing, compute_dtype=dtype
        )
    return ForwardDecoder(model, prompt_ids, prompt_mask, max_new_tokens, record_routing=record_routing)
