"""Absorbed MLA decode: the same attention as transformers' DeepseekV3Attention, to float rounding."""

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from rlk2.decode import absorbed_mla_decode
from rlk2.policy import TinyMoEShape, load_policy, tiny_deepseek_v3_config
from rlk2.rollout import encode_prompts, generate_rollouts


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
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=True)
        cache, pos = out.cache, mask.sum(1, keepdim=True)
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(5, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.randint(3, 64, (5, 1), generator=gen), attention_mask=mask,
                        position_ids=pos + t, cache=cache, use_cache=True)
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
    import rlk2.rollout as rollout

    model, tok = load_policy(tiny_policy)
    ids = encode_prompts(tok, ["1+2=?", "45+67=?", "9+99=?"] * 4, chat_template=True)
    a = generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5)
    monkeypatch.setattr(rollout, "absorbed_mla_decode", lambda m: torch.no_grad())
    b = generate_rollouts(model, tok, ids, max_new_tokens=12, seed=5)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.old_logp, b.old_logp, atol=1e-5)


def test_lora_wrapped_layers_keep_the_models_forward():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("sdpa"), LoraConfig(r=4, target_modules=["kv_b_proj"]))
    with absorbed_mla_decode(model) as absorbed:
        assert absorbed == 0
