"""`rlk2 train` on a standard-attention pretrained-style policy (a tiny Llama read from a GGUF file, as SmolLM2 is):
the loop end to end, gradient checkpointing that changes memory and nothing else, and its refusal for MoE policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_gguf import write_tiny_llama

from rlk2.config import load_config
from rlk2.errors import UserError

TASK = (
    "tasks=[{name: max, source: 'builtin:max', rewards: [{name: math}, {name: format, weight: 0.5}], "
    "max_new_tokens: 6, eval_size: 4}]"
)


def _overrides(run: Path, gguf: Path, *extra: str) -> list[str]:
    """A tiny run on the GGUF Llama; `extra` overrides come last."""
    return [
        f"run.dir={run}",
        f"policy.path={gguf}",
        "warm_start.enabled=false",
        TASK,
        "rollout.group_size=4",
        "rollout.prompts_per_step=2",
        "optim.lr=1e-2",
        "eval.samples=1",
        "eval.greedy=false",
        *extra,
    ]


def _run(tmp_path: Path, name: str, gguf: Path, *extra: str) -> Path:
    from rlk2.train import train

    run = tmp_path / name
    extra = ("trainer.steps=2", "trainer.save_every=2", "optim.name=adamw", *extra)
    train(load_config(None, _overrides(run, gguf, *extra)))
    return run


@pytest.fixture
def gguf(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLK2_CACHE_DIR", str(tmp_path / "cache"))
    return write_tiny_llama(tmp_path / "tiny.gguf", context=96)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, gguf):
    torch.set_num_threads(1)
    plain = _run(tmp_path, "plain", gguf)
    ckpt = _run(tmp_path, "ckpt", gguf, "trainer.gradient_checkpointing=true")
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (plain, ckpt)]
    steps = [[r for r in rs if "loss" in r] for rs in rows]
    assert len(steps[0]) == 2 and [r["reward/mean"] for r in steps[0]] == [r["reward/mean"] for r in steps[1]]
    for a, b in zip(*steps):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    start = load_file(next((tmp_path / "cache" / "gguf").glob("*/model.safetensors")))
    w = [load_file(r / "checkpoints" / "step-2" / "model.safetensors") for r in (plain, ckpt)]
    moved = [k for k in w[0] if k in start and not torch.equal(w[0][k], start[k])]
    assert moved, "two steps at lr 1e-2 moved no weight"  # the comparison below is not between two frozen models
    for k in w[0]:
        torch.testing.assert_close(w[0][k], w[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_is_refused_for_an_moe_policy(tmp_path):
    cfg = load_config(
        None,
        [
            f"run.dir={tmp_path / 'r'}",
            "warm_start.steps=2",
            f"warm_start.cache_dir={tmp_path / 'ws'}",
            "policy.demo.hidden_size=32",
            "policy.demo.num_hidden_layers=2",
            "trainer.steps=1",
            "trainer.gradient_checkpointing=true",
            TASK,
        ],
    )
    from rlk2.train import train

    with pytest.raises(UserError, match="trainer.gradient_checkpointing: dense policies only"):
        train(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_smollm2_one_rl_step_then_its_checkpoint_loads_and_evaluates(tmp_path):
    """The real model end to end with small settings: `rlk2 train configs/smollm2.yaml` for one step (both task
    families, the math and ifeval rewards), the saved checkpoint loads, and `rlk2 eval` runs on the run."""
    import subprocess
    import sys

    from rlk2.policy import load_policy

    root = Path(__file__).resolve().parents[1]
    run, out = tmp_path / "run", tmp_path / "eval"

    def rlk2(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rlk2.cli", *args], capture_output=True, text=True, timeout=1800, cwd=root
        )

    proc = rlk2(
        "train",
        "configs/smollm2.yaml",
        f"run.dir={run}",
        "trainer.steps=1",
        "trainer.save_every=1",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "tasks.0.max_new_tokens=24",
        "tasks.1.max_new_tokens=24",
        "tasks.0.eval_size=2",
        "tasks.1.eval_size=2",
        "eval.samples=1",
        "eval.greedy=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "loss" in r)
    assert step["skipped_steps"] == 0 and step["completion/mean_length"] > 0
    assert {"eval/word_problems/pass@1", "eval/constraints/pass@1"} <= {k for r in rows for k in r}
    model, tok = load_policy(run / "checkpoints" / "step-1")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token == "<|im_end|>"
    proc = rlk2("eval", str(run), "--limit", "2", "--samples", "1", "--k", "1", "--no-greedy", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == {"word_problems", "constraints"}


def test_a_run_on_a_gguf_policy_resumes_exactly(tmp_path, gguf):
    """Killed after step 2 of 3 and resumed: the same training metrics as the uninterrupted run (gradient
    checkpointing on, as configs/smollm2.yaml has it)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]

    def rlk2(*args: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "rlk2.cli", "train", *args],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=root,
            env={**os.environ, "RLK2_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]

    def common(run: str, steps: int) -> list[str]:
        extra = (f"trainer.steps={steps}", "trainer.save_every=1", "trainer.gradient_checkpointing=true")
        return _overrides(tmp_path / run, gguf, *extra)

    def train_rows(run: str) -> dict[int, dict]:
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        volatile = ("time/", "throughput/")
        return {r["step"]: {k: v for k, v in r.items() if not k.startswith(volatile)} for r in rows if "loss" in r}

    rlk2(*common("full", 3))
    rlk2(*common("part", 2))
    rlk2("--resume", str(tmp_path / "part"), "trainer.steps=3")
    full, part = train_rows("full"), train_rows("part")
    assert sorted(part) == [1, 2, 3] and full == part


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_the_lm_head_and_routers_stay_float32_under_bf16_autocast(family):
    """`trainer.mixed_precision=bf16`: the decoder layers multiply in bfloat16, the LM head and the MoE routers in
    float32 (a bfloat16 head rounds every logit to 8 bits of mantissa; a router's top-k would flip on rounding). On
    SmolLM2 the float32 head halves the training forward's distance from the float32 one (k3-KL 2.95e-4 vs 7.19e-4
    per token, measured); on these tiny random models the trunk's own rounding dominates, so the gain is smaller,
    but it must be there."""
    from test_dense_decoder import build

    from rlk2.hardware import keep_in_float32
    from rlk2.moe import find_routers

    model = build(family)
    routers = [m for _, m in find_routers(model)]
    assert (family == "qwen3_moe") == bool(routers)
    router_dtypes = []
    for r in routers:
        r.register_forward_hook(
            lambda m, args, out: router_dtypes.append((out[0] if isinstance(out, tuple) else out).dtype)
        )
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float().log_softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(input_ids=ids).logits
        router_dtypes.clear()
        keep_in_float32([model.get_output_embeddings(), *routers])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = model(input_ids=ids).logits
            trunk = model.model(input_ids=ids).last_hidden_state
        outside = model(input_ids=ids).logits  # the hooks leave autocast as they found it: off here
    assert rounded.dtype == torch.bfloat16 and kept.dtype == torch.float32
    assert all(d == torch.float32 for d in router_dtypes) and len(router_dtypes) == 3 * len(routers)  # 3 forwards
    # the head's own product is float32: exactly the float32 head applied to the (bfloat16-computed) states
    torch.testing.assert_close(kept, torch.nn.functional.linear(trunk.float(), model.lm_head.weight))
    torch.testing.assert_close(outside.log_softmax(-1), ref)
    err_rounded = (rounded.float().log_softmax(-1) - ref).abs().mean()
    err_kept = (kept.log_softmax(-1) - ref).abs().mean()
    assert err_kept < err_rounded, (err_kept, err_rounded)


def test_a_bf16_run_trains_close_to_float32(tmp_path, gguf):
    """The same two steps (PTX on, so every step has a gradient) in float32 and under bf16 autocast: the same
    first-step rollouts, and a loss and gradient norm that differ by bfloat16 rounding only (not at all would mean
    autocast never ran). A bad value is one line."""
    torch.set_num_threads(1)
    ptx = ("algo.ptx.weight=1.0", "algo.ptx.source=builtin:max", "algo.ptx.batch_size=4")  # a gradient every step
    plain = _run(tmp_path, "plain", gguf, *ptx)
    bf16 = _run(tmp_path, "bf16", gguf, *ptx, "trainer.mixed_precision=bf16")
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (plain, bf16)]
    first = [[r for r in rs if "loss" in r][0] for rs in rows]
    assert first[0]["reward/mean"] == first[1]["reward/mean"]
    assert first[0]["grad_norm"] > 0.1 and first[0]["grad_norm"] != first[1]["grad_norm"]
    assert first[1]["grad_norm"] == pytest.approx(first[0]["grad_norm"], rel=0.05)
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=0.05, abs=1e-3)
    with pytest.raises(UserError, match=r"^trainer.mixed_precision: must be fp32, bf16 or auto"):
        load_config(None, _overrides(tmp_path / "bad", gguf, "trainer.mixed_precision=no"))


def test_a_run_does_not_inherit_an_earlier_mixed_precision_in_the_process(tmp_path, gguf):
    """transformers' Trainer (the warm start's SFT: TRL defaults to bf16) leaves accelerate's shared state in bf16;
    a later run in the same process must still train in float32 when asked to, to the last bit."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    ptx = ("algo.ptx.weight=1.0", "algo.ptx.source=builtin:max", "algo.ptx.batch_size=4")
    clean = _run(tmp_path, "clean", gguf, *ptx)
    AcceleratorState._reset_state(reset_partial_state=False)
    Accelerator(mixed_precision="bf16", cpu=True)  # what an in-process SFT leaves behind
    assert AcceleratorState().mixed_precision == "bf16"
    after = _run(tmp_path, "after", gguf, *ptx)
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (clean, after)]
    norms = [[r["grad_norm"] for r in rs if "loss" in r] for rs in rows]
    assert norms[0] == norms[1] and norms[0][0] > 0.1
