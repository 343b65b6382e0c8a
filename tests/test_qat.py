"""Quantization-aware training (rlk2.qat): INT4 reads of the expert weights, straight-through gradients, rollouts
at the quantized precision, plain checkpoints, and one-line refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlk2.errors import UserError
from rlk2.policy import load_policy
from rlk2.qat import fake_int4, int4_qparams, quantize_for_eval, quantize_weights
from rlk2.rollout import encode_prompts, generate_rollouts, policy_logprobs
from rlk2.rollout.decode import LatentDecoder

ROOT = Path(__file__).resolve().parents[1]
GROUP = 16  # the tiny policy's experts are 16 wide (conftest.tiny_policy)


def experts(model):
    return [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def test_fake_int4_is_symmetric_int4_per_group():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 64)
    w[0, 0, :16] = 0.0  # an all-zero group stays zero
    q = fake_int4(w, 16)
    scale, zero = int4_qparams(w, 16)
    assert torch.all(zero == 0)
    levels = q.reshape(-1, 4, 16) / scale.reshape(-1, 4, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # integers ...
    assert levels.round().min() >= -8 and levels.round().max() <= 7  # ... of 4 bits
    assert torch.all(q[0, 0, :16] == 0)
    assert (q - w).abs().max() <= scale.max() / 2 + 1e-6  # rounded to the nearest level (clamped at +7 only)
    assert not torch.equal(q, w)


def test_quantized_reads_straight_through_gradients_and_plain_state_dict(tiny_policy, tmp_path):
    model, _ = load_policy(tiny_policy)
    names = list(model.state_dict())
    q = quantize_weights(model, ["experts"], GROUP)
    assert q.names and all(".mlp.experts." in n for n in q.names)
    assert list(model.state_dict()) == names  # the checkpoint layout is unchanged
    e = experts(model)[0]
    master = e.parametrizations.gate_up_proj.original
    assert torch.equal(e.gate_up_proj, fake_int4(master, GROUP)) and not torch.equal(e.gate_up_proj, master)

    # Straight-through: the master weight gets exactly the gradient the quantized weight would get.
    ids = torch.randint(0, 100, (2, 10))
    model(ids).logits.square().mean().backward()
    reference, _ = load_policy(tiny_policy)
    with torch.no_grad():
        for r, m in zip(experts(reference), experts(model)):
            r.gate_up_proj.copy_(m.gate_up_proj)
            r.down_proj.copy_(m.down_proj)
    reference(ids).logits.square().mean().backward()
    for r, m in zip(experts(reference), experts(model)):
        assert torch.allclose(m.parametrizations.gate_up_proj.original.grad, r.gate_up_proj.grad, atol=1e-7)
        assert torch.allclose(m.parametrizations.down_proj.original.grad, r.down_proj.grad, atol=1e-7)

    # Saved checkpoints hold the master weights under the plain names; a quantized model loads them back.
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(experts(plain)[0].gate_up_proj, master)
    again, _ = load_policy(tiny_policy)
    quantize_weights(again, ["experts"], GROUP)
    again.load_state_dict(model.state_dict())
    assert torch.equal(experts(again)[0].parametrizations.gate_up_proj.original, master)


@pytest.mark.parametrize("fast", [True, False])
def test_recorded_logprobs_are_the_quantized_training_forward(tiny_policy, fast):
    model, tok = load_policy(tiny_policy)
    quantize_weights(model, ["experts"], GROUP)
    assert LatentDecoder.supports(model)  # the plain-function decoder reads the quantized weights too
    ids = encode_prompts(tok, ["1+2=?", "45+67=?", "9+99=?", "12+3=?"] * 4, chat_template=True)
    ro = generate_rollouts(model, tok, ids, max_new_tokens=16, seed=5, use_latent_decoder=fast)
    logp, _ = policy_logprobs(model, ro, temperature=1.0)
    assert ((logp - ro.old_logp) * ro.completion_mask).abs().max().item() < 1e-4
    # ... and not those of the full-precision experts: the rollout really sampled the INT4 policy.
    full, _ = load_policy(tiny_policy)
    full_logp, _ = policy_logprobs(full, ro, temperature=1.0)
    assert ((full_logp - ro.old_logp) * ro.completion_mask).abs().max().item() > 1e-3


def test_eval_quantization_rounds_the_experts_in_place(tiny_policy):
    model, _ = load_policy(tiny_policy)
    before = experts(model)[0].down_proj.detach().clone()
    q = quantize_for_eval(model, ["experts"], GROUP)
    assert len(q.names) == 2 * len(experts(model))
    assert torch.equal(experts(model)[0].down_proj, fake_int4(before, GROUP))


def test_bad_selections_are_refused_in_one_line(tiny_policy):
    model, _ = load_policy(tiny_policy)
    with pytest.raises(
        UserError,
        match=r"qat.group_size: 24 does not divide the input dimension 32 of model.layers.1.mlp.experts.gate_up_proj",
    ):
        quantize_weights(model, ["experts"], 24)
    with pytest.raises(UserError, match="qat.modules: 'expertz' matches no module of the policy"):
        quantize_weights(model, ["expertz"], GROUP)
    with pytest.raises(UserError, match="attention weight"):
        quantize_weights(model, ["self_attn"], GROUP)
    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UserError, match="no routed experts: name its dense modules, e.g. mlp"):
        quantize_weights(dense, ["experts"], GROUP)
    q = quantize_weights(dense, ["mlp"], GROUP)  # a dense policy's MLPs, as asked
    assert sorted(n.rsplit(".", 2)[-2] for n in q.names) == ["down_proj", "gate_proj", "up_proj"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.integration
def test_a_qat_run_trains_checkpoints_master_weights_and_resumes(tiny_policy, tmp_path):
    run = tmp_path / "r"
    common = [
        f"policy.path={tiny_policy}",
        "rollout.group_size=4",
        "rollout.prompts_per_step=4",
        "warm_start.enabled=false",
        "eval.samples=1",
        "tasks=[{name: max, source: 'builtin:max', max_new_tokens: 8, rewards: [{name: math}], eval_size: 8}]",
        "qat.enabled=true",
        f"qat.group_size={GROUP}",
    ]
    bad = run_cli("train", f"run.dir={tmp_path / 'bad'}", "trainer.steps=1", *common, "qat.group_size=12")
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "qat.group_size: 12 does not divide" in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before anything was written

    done = run_cli("train", f"run.dir={run}", "trainer.steps=2", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "QAT: 2 weight matrices read as INT4" in done.stdout
    ckpt = run / "checkpoints" / "step-2"
    saved = experts(AutoModelForCausalLM.from_pretrained(ckpt))[0].gate_up_proj
    assert not torch.equal(saved, fake_int4(saved, GROUP))  # master weights, not the rounded ones
    resumed = run_cli("train", "--resume", str(run), "trainer.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "checkpoints" / "step-3").is_dir()

    # rlk2 eval of a QAT run evaluates it as trained (INT4), labelled so; a bad group size is one line.
    flags = ["--tasks", "arith", "--limit", "4", "--k", "1", "--no-greedy", "--bootstrap", "10"]
    ev = run_cli("eval", str(run), *flags, "--out", str(tmp_path / "ev"))
    assert ev.returncode == 0 and "r@step-3+int4 arith: pass@1" in ev.stdout, ev.stderr[-2000:]
    bad = run_cli("eval", str(ckpt), *flags, "--out", str(tmp_path / "ev2"), "--quantize", "int4-experts",
                  "--quantize-group-size", "12")  # fmt: skip
    assert bad.returncode == 2 and "--quantize-group-size: 12 does not divide" in bad.stderr, bad.stderr[-2000:]

    # Exports: packed INT4 (compressed-tensors, loaded by transformers) and dequantized hold the trained values.
    for fmt in ("int4", "dequantized"):
        out = run_cli("export", str(run), "--out", str(tmp_path / fmt), "--format", fmt)
        assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    master = experts(AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-3"))
    for fmt in ("int4", "dequantized"):
        for got, want in zip(experts(AutoModelForCausalLM.from_pretrained(tmp_path / fmt)), master):
            assert torch.equal(got.gate_up_proj, fake_int4(want.gate_up_proj, GROUP))
            assert torch.equal(got.down_proj, fake_int4(want.down_proj, GROUP))
    again = run_cli("export", str(run), "--out", str(tmp_path / "int4"))
    assert again.returncode == 2 and "--out:" in again.stderr and "not an empty directory" in again.stderr
