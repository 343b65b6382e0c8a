"""Absorbed MLA decode: the same attention as transformers' DeepseekV3Attention, to float rounding."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from rlk2.policy import TinyMoEShape, load_policy, tiny_deepseek_v3_config
from rlk2.rollout import encode_prompts, generate_rollouts
from rlk2.rollout.decode import LatentDecoder, absorbed_mla_decode


def _model(attn: str, q_lora_rank=None, rope_interleave=True):
    torch.manual_seed(0)
    cfg = tiny_deepseek_v3_config(64, TinyMoEShape(hidden_size=48, num_hidden_layers=2, q_lora_rank=q_lora_rank))
    cfg.rope_interleave = rope_interleave
    cfg._attn_implementation = attn
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than init-scale weights, so that attention is far from uniform
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(8.0)
    return model


def _decode_logits(model, absorbed: bool, steps: int = 6) -> torch.Tensor:
    """Logits of `steps` one-token decode steps after a left-padded prefill, [steps, B, V]."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (5, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[3, :2] = 0  # left padding in two rows
    outs = []
    with torch.no_grad(), absorbed_mla_decode(model) if absorbed else torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        cache, pos = out.cache, mask.sum(1, keepdim=True)
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(5, 1, dtype=mask.dtype)], dim=1)
            out = model(
                input_ids=torch.randint(3, 64, (5, 1), generator=gen),
                attention_mask=mask,
                position_ids=pos + t,
                cache=cache,
                use_cache=True,
            )
            outs.append(out.logits[:, -1])
    return torch.stack(outs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("q_lora_rank,rope_interleave", [(None, True), (24, False)])
def test_absorbed_decode_matches_the_models_attention(attn, q_lora_rank, rope_interleave):
    model = _model(attn, q_lora_rank, rope_interleave)
    ref = _decode_logits(model, absorbed=False)
    got = _decode_logits(model, absorbed=True)
    assert ref.std() > 0.05  # the tolerance below is thousands of times finer than the logits' spread
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), (got - ref).abs().max()


def test_only_decode_steps_are_absorbed_and_the_forward_is_restored():
    model = _model("sdpa")
    attn = [m for m in model.modules() if type(m).__name__ == "DeepseekV3Attention"]
    calls = []
    original = type(attn[0]).forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[1] if args else kwargs["hidden_states"].shape[1])
        return original(self, *args, **kwargs)

    type(attn[0]).forward = counting  # the class forward runs only for what the absorbed path hands back
    try:
        _decode_logits(model, absorbed=True, steps=3)
    finally:
        type(attn[0]).forward = original
    assert calls == [9, 9]  # the prefill of each layer; none of the 3 x 2 one-token steps
    assert all("forward" not in m.__dict__ for m in attn)


def test_rollouts_are_the_same_with_and_without_absorption(tiny_policy, monkeypatch):
    import rlk2.rollout.decode as decode

    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["1+2=?", "45+67=?", "9+99=?"] * 4, chat_template=True)
    a = generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5, use_latent_decoder=False)
    monkeypatch.setattr(decode, "absorbed_mla_decode", lambda m: torch.no_grad())
    b = generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5, use_latent_decoder=False)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.old_logp, b.old_logp, atol=1e-5)


def test_lora_wrapped_layers_keep_the_models_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("sdpa"), LoraConfig(r=4, target_modules=["kv_b_proj"]))
    with absorbed_mla_decode(model) as absorbed:
        assert absorbed == 0


# ---- the latent decoder ----------------------------------------------------------------------------------------------


def _routed_model(attn: str, q_lora_rank=None, rope_interleave=True, groups: int = 1):
    torch.manual_seed(0)
    shape = TinyMoEShape(hidden_size=48, num_hidden_layers=3, q_lora_rank=q_lora_rank, n_routed_experts=8)
    cfg = tiny_deepseek_v3_config(64, shape)
    cfg.rope_interleave, cfg._attn_implementation = rope_interleave, attn
    cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor = groups, max(1, groups // 2), 2.5
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(8.0)
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)  # routers away from their zero init, so that the choice depends on the token
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.linspace(-0.2, 0.2, len(p)))
    return model


def _steps(model, latent: bool, steps: int = 7):
    """Logits [B, V] and routes [L, B, k] of a left-padded prefill (routes of its real tokens) and of one-token decode
    steps after it; rows leave the batch after the third and the fifth step, as finished sequences do."""
    from rlk2.moe import RouterProbe, find_routers

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (5, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = mask[3, :2] = 0
    logits, routes = [], []
    with torch.no_grad(), RouterProbe(find_routers(model)) as probe:
        if latent:  # the prefill: logits after each prompt, and the routing of its real tokens
            dec = LatentDecoder(model, ids, mask, steps, record_routing=True)
            logits.append(dec.logits)
            routes.append(dec.routes().view(-1, 5, 9, 2)[:, mask.bool()])
        else:
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True
            )
            cache = out.cache
            logits.append(out.logits[:, -1])
            routes.append(probe.take().view(-1, 5, 9, 2)[:, mask.bool()])
        pos = mask.sum(1)
        rows = torch.arange(5)
        for t in range(steps):
            if t in (3, 5):  # rows finish: 3 left, then 1 (the decoder's one-token expert path)
                keep = torch.tensor([0, 2, 4]) if t == 3 else torch.tensor([1])
                rows, pos, mask = rows[keep], pos[keep], mask[keep]
                dec.reorder(keep) if latent else cache.reorder_cache(keep)
            tok = torch.randint(3, 64, (5,), generator=gen)[rows]
            if latent:
                logits.append(dec.step(tok, pos))
                routes.append(dec.routes())
            else:
                mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
                logits.append(
                    model(
                        input_ids=tok[:, None],
                        attention_mask=mask,
                        position_ids=pos[:, None],
                        cache=cache,
                        use_cache=True,
                    ).logits[:, -1]
                )
                routes.append(probe.take())
            pos = pos + 1
    return logits, routes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("q_lora_rank,rope_interleave,groups", [(None, True, 1), (24, False, 1), (None, True, 4)])
def test_latent_decoder_matches_the_models_forward(attn, q_lora_rank, rope_interleave, groups):
    model = _routed_model(attn, q_lora_rank, rope_interleave, groups)
    assert LatentDecoder.supports(model)
    ref_logits, ref_routes = _steps(model, latent=False)
    got_logits, got_routes = _steps(model, latent=True)
    for ref, got in zip(ref_logits, got_logits):
        assert ref.std() > 0.05
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for ref, got in zip(ref_routes, got_routes):  # the same experts (the order within a token's top-k aside)
        assert torch.equal(got.sort(dim=-1).values, ref.sort(dim=-1).values)


def test_rollouts_are_the_same_with_and_without_the_latent_decoder(tiny_policy):
    model, tok = load_policy(tiny_policy)
    assert LatentDecoder.supports(model)
    ids = encode_prompts(tok, ["1+2=?", "45+67=?", "9+99=?"] * 4, chat_template=True)
    a = generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5, record_routing=True, use_latent_decoder=False)
    b = generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5, record_routing=True)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completion_mask.sum() > 12
    torch.testing.assert_close(b.old_logp, a.old_logp, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.routed_experts.sort(dim=-1).values, b.routed_experts.sort(dim=-1).values)


def test_latent_decoder_declines_what_it_does_not_implement():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    assert not LatentDecoder.supports(get_peft_model(_routed_model("sdpa"), LoraConfig(r=4, target_modules=["q_proj"])))
    assert not LatentDecoder.supports(
        LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
        )
    )
