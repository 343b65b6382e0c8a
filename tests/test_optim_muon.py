"""Muon's pieces: batched Newton-Schulz, K2's RMS matching, and parameter routing on three model families."""

import math

import pytest
import torch
from transformers import (
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from rlk2.optim import MuonClip, newton_schulz, ns_dtype, route_parameters
from rlk2.optim.muon import muon_scale
from rlk2.policy import tiny_deepseek_v3_config


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return Qwen3MoeForCausalLM(cfg)


def tiny_deepseek() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(tiny_deepseek_v3_config(64))


# ---- Newton-Schulz ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 48, 24), (4, 24, 48), (3, 16, 16)])
def test_batched_newton_schulz_equals_per_matrix(shape):
    experts = torch.randn(shape)  # [E, n, m], both orientations and square
    batched = newton_schulz(experts)
    for e in range(shape[0]):
        torch.testing.assert_close(batched[e], newton_schulz(experts[e]), rtol=1e-5, atol=1e-6)
    # Not the same as orthogonalising the flattened [E*n, m] matrix: each expert is normalised on its own.
    flat = newton_schulz(experts.reshape(-1, shape[-1])).reshape(shape)
    assert not torch.allclose(batched, flat, atol=1e-3)


def test_newton_schulz_matches_the_quintic_in_float64():
    # Reference: the same quintic written out in float64 on one matrix (a, b, c from DESIGN.md 4).
    g = torch.randn(20, 36, dtype=torch.float64)
    x = g / g.norm()
    for _ in range(5):
        a_mat = x @ x.T
        x = 3.4445 * x + (-4.7750 * a_mat + 2.0315 * a_mat @ a_mat) @ x
    torch.testing.assert_close(newton_schulz(g.float()).double(), x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 256), (256, 96), (32, 512), (8, 128, 96)])
def test_update_rms_is_about_0_2_for_full_rank_matrices(shape):
    # Exact orthogonalisation of a full-rank n x m matrix has min(n, m) unit singular values, so its RMS is
    # sqrt(min / (n m)) = 1 / sqrt(max); times 0.2 sqrt(max) that is 0.2 exactly. Five quintic steps leave the
    # singular values in about [0.68, 1.13] for Gaussian matrices, so the update's RMS lands near 0.17-0.18.
    torch.manual_seed(0)
    update = newton_schulz(torch.randn(shape)) * muon_scale(shape)
    rms = update.pow(2).mean().sqrt().item()
    assert 0.16 < rms < 0.22, rms
    u, _, vh = torch.linalg.svd(torch.randn(shape[-2:]), full_matrices=False)
    assert abs((u @ vh * muon_scale(shape)).pow(2).mean().sqrt().item() - 0.2) < 1e-5


def test_muonclip_step_moves_a_hidden_matrix_by_lr_times_rms_0_2():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False), torch.nn.Linear(64, 128, bias=False))
    opt = MuonClip(model, lr=1.0, weight_decay=0.0, momentum=0.0, qk_clip_tau=None)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(256, 128)).pow(2).mean().backward()
    opt.step()
    for p, b in zip(model.parameters(), before):
        rms = (p.detach() - b).pow(2).mean().sqrt().item()
        assert 0.15 < rms < 0.22, rms


def test_matches_torch_muon_with_rms_matching_when_run_in_bfloat16(monkeypatch):
    # torch.optim.Muon with adjust_lr_fn="match_rms_adamw" is the same update rule (K2's), on 2-D weights, with
    # Newton-Schulz always in bfloat16. Forcing our precision to bfloat16 must reproduce it step for step.
    # momentum=0: torch keeps an EMA buffer (1-mu) * sum_k mu^k g, we keep K2's plain sum; Newton-Schulz
    # normalises the scale away, but bfloat16 rounds the two differently scaled inputs differently.
    import rlk2.optim.muon as muon

    monkeypatch.setattr(muon, "ns_dtype", lambda device, shape=None: torch.bfloat16)
    torch.manual_seed(0)
    ours = torch.nn.Linear(64, 48, bias=False)
    ref = torch.nn.Linear(64, 48, bias=False)
    ref.load_state_dict(ours.state_dict())
    opt_ours = MuonClip(ours, lr=0.05, weight_decay=0.1, momentum=0.0, qk_clip_tau=None)
    opt_ref = torch.optim.Muon(
        ref.parameters(), lr=0.05, weight_decay=0.1, momentum=0.0, adjust_lr_fn="match_rms_adamw"
    )
    start = ours.weight.detach().clone()
    for seed in range(3):
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert (ours.weight - start).abs().max() > 0.01
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=1e-6)


def test_newton_schulz_precision_is_chosen_per_device(monkeypatch):
    import rlk2.hardware as hardware
    import rlk2.optim.muon as muon

    monkeypatch.delenv("RLK2_NS_DTYPE", raising=False)
    assert ns_dtype(torch.device("cuda")) == torch.bfloat16
    assert ns_dtype(torch.device("cpu"), (96, 96)) == torch.float32  # small: float32 on every CPU
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(muon, "cpu_has_native_bf16", lambda native=native: native)
        assert ns_dtype(torch.device("cpu"), (8, 512, 1408)) == expected
    monkeypatch.undo()
    monkeypatch.delenv("RLK2_NS_DTYPE", raising=False)
    hardware.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN capped below bfloat16 instructions: emulated
    try:
        assert ns_dtype(torch.device("cpu"), (8, 512, 1408)) == torch.float32
    finally:
        hardware.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("RLK2_NS_DTYPE", "float32")
    assert ns_dtype(torch.device("cuda")) == torch.float32
    assert newton_schulz(torch.randn(4, 8, dtype=torch.float64)).dtype == torch.float64  # returned in input dtype


# ---- routing ---------------------------------------------------------------------------------------------------------


def _names(pairs):
    return {n for n, _ in pairs}


@pytest.mark.parametrize(
    "build", [tiny_deepseek, tiny_qwen3_moe, tiny_llama], ids=["deepseek_v3", "qwen3_moe", "llama"]
)
def test_every_parameter_is_routed_exactly_once(build):
    model = build()
    routing = route_parameters(model)
    groups = [_names(routing.muon), _names(routing.adamw), _names(routing.adamw_no_decay)]
    all_names = {n for n, _ in model.named_parameters()}
    assert set().union(*groups) == all_names
    assert sum(len(g) for g in groups) == len(all_names)  # disjoint
    total = sum(p.numel() for _, p in routing.muon + routing.adamw + routing.adamw_no_decay)
    assert total == sum(p.numel() for p in model.parameters())
    muon, adamw, no_decay = groups
    assert "lm_head.weight" in adamw and "model.embed_tokens.weight" in adamw
    assert all(n.endswith(("norm.weight", ".bias")) for n in no_decay)
    assert all(p.ndim in (2, 3) for _, p in routing.muon)
    assert any(".self_attn.o_proj." in n for n in muon)
    if build is not tiny_llama:  # MoE: router gates [E, H] to AdamW, 3-D expert stacks [E, n, m] to Muon
        routers = {n for n in all_names if n.endswith(".mlp.gate.weight")}
        experts = {n for n in all_names if ".mlp.experts." in n}
        assert routers and routers <= adamw
        assert experts and experts <= muon and all(model.get_parameter(n).ndim == 3 for n in experts)
    assert "muon" in routing.summary() and "adamw_no_decay" in routing.summary()


def test_tied_embeddings_are_routed_once_to_adamw():
    model = tiny_llama(tie=True)
    routing = route_parameters(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert [n for n, p in routing.adamw if p is model.lm_head.weight] == ["model.embed_tokens.weight"]


def test_frozen_parameters_are_left_out():
    model = tiny_llama()
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    routing = route_parameters(model)
    routed = _names(routing.muon) | _names(routing.adamw) | _names(routing.adamw_no_decay)
    assert not any(n.startswith("model.layers.0.") for n in routed)
    assert len(routing.frozen) == len(list(model.model.layers[0].parameters()))


def test_lora_adapters_go_to_adamw_and_the_base_stays_frozen():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    routing = route_parameters(model)
    assert routing.muon == [] and routing.adamw_no_decay == []
    assert _names(routing.adamw) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in _names(routing.adamw))
    assert math.isclose(len(routing.frozen), len(list(model.parameters())) - len(routing.adamw))
