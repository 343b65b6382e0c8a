"""Quantization-aware training (rlk2.qat): what an INT4-expert run costs, and what INT4 experts could gain at decode.

1. `qat_step`: one RL step's work on the demo DeepSeek-V3 MoE (`TinyMoEShape` defaults, random weights, float32):
   `generate_rollouts` for 8 prompts x 8 samples x 24 new tokens, then the training forward + backward of the
   completions' log-probs and a MuonClip step. Baseline: the same policy without QAT. The two alternate, `reps`
   times; ratio = QAT seconds / plain seconds (the issue's bound: <= 1.2).
2. `int4_expert_mlp`: one routed expert's MLP (gate_up, SiLU, down) for one decode token, H x I per shape, through
   torch's CPU INT4 weight-only kernel (`aten._weight_int4pack_mm_for_cpu`, groups of 32, bfloat16 activations and
   scales: with float32 activations it is ~30x slower here; the same dequantized values as rlk2's fake quantization,
   checked to 2 % of the output norm) against float32 `F.linear` over those values. Ratio = float32
   seconds / INT4 seconds. rlk2's own decoders read the INT4 weights dequantized to float32 (the values, not the
   kernel): this row is what a kernel would change, largest for shapes that do not fit the caches.

    python bench/bench_qat.py [--quick] [--reps N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VOCAB, GROUP = 160, 32


def _policy(qat: bool):
    from transformers import DeepseekV3ForCausalLM

    from rlk2.optim import build_optimizer
    from rlk2.policy import TinyMoEShape, tiny_deepseek_v3_config
    from rlk2.qat import quantize_weights

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, TinyMoEShape(), eos_token_id=2, pad_token_id=0))
    model.config._attn_implementation = "eager"
    if qat:
        quantize_weights(model, ["experts"], GROUP)
    return model, build_optimizer("muonclip", model, lr=1e-3, weight_decay=0.1, qk_clip_tau=100.0)


class _Tok:
    pad_token_id, eos_token_id = 0, 2

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]


def _step(model, optimizer, prompts) -> float:
    from rlk2.rollout import generate_rollouts, policy_logprobs

    start = time.perf_counter()
    ro = generate_rollouts(model, _Tok(), prompts, max_new_tokens=24, seed=0)
    model.train()
    logp, _ = policy_logprobs(model, ro, temperature=1.0)
    (logp * ro.completion_mask).sum().div(ro.completion_mask.sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def qat_step(reps: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (12,), generator=gen).tolist() for _ in range(8) for _ in range(8)]
    plain, qat = _policy(False), _policy(True)
    _step(*plain, prompts), _step(*qat, prompts)  # warm-up
    base, ours = [], []
    for _ in range(reps):
        base.append(_step(*plain, prompts))
        ours.append(_step(*qat, prompts))
    ratios = [o / b for o, b in zip(ours, base)]
    return {
        "name": "qat_step",
        "value": statistics.median(ours),
        "unit": "s/step",
        "baseline": "plain step (no QAT)",
        "baseline_value": statistics.median(base),
        "ratio": statistics.median(ratios),
        "spread": (max(ratios) - min(ratios)) / 2,
        "reps": reps,
    }


def _int4_expert(w: torch.Tensor):
    """w [N, K] -> torch's packed INT4 layout and its scales (zero points 0), from rlk2's own quantization."""
    from rlk2.qat import fake_int4, int4_qparams

    scale, _ = int4_qparams(w, GROUP)  # [N, K / GROUP]
    levels = (fake_int4(w, GROUP).view(w.shape[0], -1, GROUP) / scale[..., None]).round()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((levels + 8).view(w.shape).to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale.t(), torch.zeros_like(scale.t())], -1).contiguous()
    return packed, scales_and_zeros, fake_int4(w, GROUP)


def _time(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def int4_expert_mlp(hidden: int, inter: int, reps: int) -> dict:
    torch.manual_seed(0)
    gate_up, down = torch.randn(2 * inter, hidden) * 0.02, torch.randn(hidden, inter) * 0.02
    (gu_p, gu_s, gu_q), (d_p, d_s, d_q) = _int4_expert(gate_up), _int4_expert(down)
    x = torch.randn(1, hidden)
    xb, gu_s, d_s = x.bfloat16(), gu_s.bfloat16(), d_s.bfloat16()
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def f32():
        g, u = F.linear(x, gu_q).chunk(2, -1)
        return F.linear(F.silu(g) * u, d_q)

    def int4():
        g, u = mm(xb, gu_p, GROUP, gu_s).chunk(2, -1)
        return mm(F.silu(g) * u, d_p, GROUP, d_s)

    ref, got = f32(), int4().float()
    assert (got - ref).norm() < 0.02 * ref.norm(), "the INT4 kernel must compute the fake-quantized values"
    n = max(20, int(2e8 / (hidden * inter * 3)))
    base, ours = [], []
    for _ in range(reps):
        base.append(_time(f32, n))
        ours.append(_time(int4, n))
    ratios = [b / o for b, o in zip(base, ours)]
    return {
        "name": f"int4_expert_mlp_H{hidden}_I{inter}",
        "value": statistics.median(ours) * 1e6,
        "unit": "us/token",
        "baseline": "float32 F.linear (dequantized weights)",
        "baseline_value": statistics.median(base) * 1e6,
        "ratio": statistics.median(ratios),
        "spread": (max(ratios) - min(ratios)) / 2,
        "reps": reps,
    }


def run(quick: bool, reps: int | None = None) -> list[dict]:
    reps = reps or (3 if quick else 7)
    shapes = [(96, 64), (2048, 768)] if quick else [(96, 64), (2048, 768), (7168, 2048)]
    return [qat_step(reps)] + [int4_expert_mlp(h, i, reps) for h, i in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.quick, args.reps)
    for r in rows:
        print(
            f"{r['name']:<32} {r['value']:10.4g} {r['unit']:<9} vs {r['baseline']} {r['baseline_value']:.4g}: "
            f"ratio {r['ratio']:.2f} ± {r['spread']:.2f}"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "bench_qat.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
