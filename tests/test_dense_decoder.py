"""`DenseDecoder` against transformers' own forward, for each standard-attention family on a tiny random model:
the same logits (prefill and decode steps), the same experts for MoE kin, and rollouts whose recorded log-probs
equal the training forward's (float32: 1e-4; bfloat16 decoding: a stated, looser tolerance)."""

from __future__ import annotations

import pytest
import torch
import transformers

from rlk2.rollout import encode_prompts, generate_rollouts, policy_logprobs
from rlk2.rollout.decode import open_decoder
from rlk2.rollout.dense import DenseDecoder

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"use_sliding_window": False}),  # qkv bias
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),  # q/k norms
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
}


def build(family: str) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra, attn_implementation="eager")).eval()
    if family == "qwen2":  # random biases, so a bias left out would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(~mask.bool(), 0)
    return ids, mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_supported(family):
    assert DenseDecoder.supports(build(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_and_decode_steps_match_the_models_forward(family):
    model = build(family)
    ids, mask = batch()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        dec = DenseDecoder(model, ids, mask, max_new_tokens=4)
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        torch.testing.assert_close(dec.logits, ref, atol=1e-4, rtol=1e-4)
        seq, att, p = ids, mask, mask.sum(1)
        for step in range(3):
            nxt = torch.tensor([5 + step, 7, 11 + step])
            got = dec.step(nxt, p)
            seq, att = torch.cat([seq, nxt[:, None]], 1), torch.cat([att, torch.ones_like(nxt)[:, None]], 1)
            full_pos = (att.cumsum(1) - 1).clamp(min=0)
            want = model(input_ids=seq, attention_mask=att, position_ids=full_pos).logits[:, -1]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            p = p + 1
        dec.__exit__()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_routing_is_recorded_as_the_model_routes(family):
    from rlk2.moe import RouterProbe, find_routers

    model = build(family)
    ids, mask = batch()
    with torch.no_grad(), DenseDecoder(model, ids, mask, 2, record_routing=True) as dec:
        routes = dec.routes()  # [L, U * P, k]
        with RouterProbe(find_routers(model)) as probe:
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
            want = probe.take()
    real = mask.bool().flatten()
    assert torch.equal(routes[:, real].sort(-1).values, want[:, real].sort(-1).values)


class _Tok:
    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids.tolist()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_logprobs_equal_the_training_forward(family, monkeypatch):
    monkeypatch.setenv("RLK2_COMPUTE_DTYPE", "float32")
    model = build(family)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]] * 2
    ro = generate_rollouts(model, _Tok(), prompts, max_new_tokens=10, seed=3)
    logp, _ = policy_logprobs(model, ro, temperature=1.0)
    m = ro.completion_mask.bool()
    assert m.sum() > 20
    torch.testing.assert_close(logp[m], ro.old_logp[m], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bfloat16_decoding_stays_close_to_the_float32_training_forward(family, monkeypatch):
    """bfloat16 weights and activations in the decoder (as on CPUs with native bfloat16), float32 training
    forward: per-token log-probs within 0.05 on average and 0.5 at worst on these random models."""
    monkeypatch.setenv("RLK2_COMPUTE_DTYPE", "bfloat16")
    model = build(family)
    ro = generate_rollouts(model, _Tok(), [[5, 6, 7], [8, 9, 10, 11, 12]] * 4, max_new_tokens=12, seed=3)
    logp, _ = policy_logprobs(model, ro, temperature=1.0)
    diff = (logp - ro.old_logp)[ro.completion_mask.bool()].abs()
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_the_decoder_is_chosen_by_architecture(monkeypatch):
    ids, mask = batch()
    with torch.no_grad():
        with open_decoder(build("llama"), ids, mask, 2) as dec:
            assert isinstance(dec, DenseDecoder)
        with open_decoder(build("llama"), ids, mask, 2, fast=False) as dec:
            assert not isinstance(dec, DenseDecoder)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rollouts_with_and_without_the_dense_decoder_agree(family, monkeypatch):
    monkeypatch.setenv("RLK2_COMPUTE_DTYPE", "float32")
    model = build(family)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]] * 3
    a = generate_rollouts(model, _Tok(), prompts, max_new_tokens=8, seed=4)
    b = generate_rollouts(model, _Tok(), prompts, max_new_tokens=8, seed=4, use_latent_decoder=False)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.old_logp, b.old_logp, atol=1e-4, rtol=0)


def test_real_tokenizer_prompts_round_trip(tiny_policy):  # encode_prompts is what the loop feeds the decoder
    from rlk2.policy import load_policy

    _, tok = load_policy(tiny_policy)
    assert encode_prompts(tok, ["1+2=?"], chat_template=True)[0]
