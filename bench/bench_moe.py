"""MoE router health: DeepSeek-V3 bias balancing and router replay, on the demo-shape DeepSeek-V3 MoE.

Model: `DeepseekV3ForCausalLM` with `TinyMoEShape()` (the demo: hidden 96, 3 layers, the first dense, 8 routed
experts, top-2, one shared expert), vocab 160, random weights (seed = repetition). Batch: 16 sequences of
random tokens, 8-24 prompt tokens left padded, up to 16 sampled tokens (rlk2.rollout.generate_rollouts,
temperature 1, seeded).

- Balancing: every router is skewed toward experts 0 and 1 (their weight rows get 3 x the unit mean router
  input added), then `RouterControl.update_bias` runs after each forward of the same batch (no training, replay
  off so the bias acts on this batch). Value: `moe/expert_load_cv` after N updates; baseline: before any
  update. Rates 1e-3 (DeepSeek-V3's) over 400 updates and 1e-2 over 60.
- Router replay: `moe/router_mismatch` of the training forward against the routing recorded during generation,
  (a) same float32 weights, (b) same weights in bfloat16, (c) float32 after one AdamW step (lr 1e-3) on a
  policy-gradient loss with random +-1 advantages, i.e. what a second inner step sees. With replay on, the
  experts that run are the recorded ones by construction (tests/test_moe.py checks it), so the baseline is 0.
  For (b) and (c) also the mean |log pi_train - log pi_old| over sampled tokens, replay on vs off.

    python bench/bench_moe.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 160


def _model(seed: int, dtype=torch.float32):
    from transformers import DeepseekV3ForCausalLM

    from rlk2.policy import tiny_deepseek_v3_config

    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, pad_token_id=0, eos_token_id=2)).to(dtype)


class _Tok:  # generate_rollouts needs only these from a tokenizer
    pad_token_id, eos_token_id = 0, 2

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def _rollout(model, seed: int):
    from rlk2.rollout import generate_rollouts

    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, VOCAB, (int(torch.randint(8, 25, (1,), generator=g)),), generator=g).tolist()
        for _ in range(16)
    ]
    return generate_rollouts(model, _Tok(), prompts, max_new_tokens=16, seed=seed, record_routing=True)


def _routed(model, ro, *, replay: bool):
    from rlk2.moe import RouterControl
    from rlk2.rollout import policy_logprobs

    ctl = RouterControl(model, router_replay=replay, bias_update_rate=0, aux_loss_coef=0)
    with torch.no_grad(), ctl.training_forward(ro) as routed:
        logp, _ = policy_logprobs(model, ro, temperature=1.0)
    gap = float(((logp.float() - ro.old_logp).abs() * ro.completion_mask).sum() / ro.completion_mask.sum())
    return routed.metrics()["moe/router_mismatch"], gap


def balance(seed: int, rate: float, updates: int) -> tuple[float, float]:
    from rlk2.moe import RouterControl, skew_routers
    from rlk2.rollout import policy_logprobs

    model = _model(seed)
    ro = _rollout(model, seed)
    skew_routers(model, ro)
    ctl = RouterControl(model, router_replay=False, bias_update_rate=rate, aux_loss_coef=0)
    cvs = []
    for _ in range(updates + 1):
        with torch.no_grad(), ctl.training_forward(ro) as routed:
            policy_logprobs(model, ro, temperature=1.0)
        cvs.append(routed.metrics()["moe/expert_load_cv"])
        ctl.update_bias(routed)
    return cvs[0], cvs[-1]


def mismatch(seed: int) -> dict[str, tuple[float, float, float, float]]:
    """case -> (mismatch replay off, |dlogp| replay off, mismatch seen by replay on, |dlogp| replay on)."""
    from rlk2.rollout import policy_logprobs

    out = {}
    model = _model(seed)
    ro = _rollout(model, seed)
    out["float32, same weights"] = (*_routed(model, ro, replay=False), *_routed(model, ro, replay=True))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    logp, _ = policy_logprobs(model, ro, temperature=1.0)
    adv = torch.randint(0, 2, (logp.shape[0], 1)).float() * 2 - 1
    (-(adv * logp * ro.completion_mask).sum() / ro.completion_mask.sum()).backward()
    opt.step()
    out["float32, after one AdamW step"] = (*_routed(model, ro, replay=False), *_routed(model, ro, replay=True))
    bf = _model(seed, torch.bfloat16)
    ro_bf = _rollout(bf, seed)
    out["bfloat16, same weights"] = (*_routed(bf, ro_bf, replay=False), *_routed(bf, ro_bf, replay=True))
    return out


def _row(name, value, unit, baseline, baseline_value, ratios, reps):
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": statistics.median(ratios) if ratios else None,
        "spread": (max(ratios) - min(ratios)) / 2 if ratios else None,
        "reps": reps,
    }


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    reps = 1 if quick else 3
    rows = []
    for rate, updates in ((1e-3, 100 if quick else 400), (1e-2, 60)):
        res = [balance(s, rate, updates) for s in range(reps)]
        before, after = [b for b, _ in res], [a for _, a in res]
        rows.append(
            _row(
                f"load CV, skewed router, {updates} bias updates u={rate:g}",
                statistics.median(after),
                "cv",
                "no update",
                statistics.median(before),
                [a / b for b, a in res],
                reps,
            )
        )
    cases = [mismatch(s) for s in range(reps)]
    for case in cases[0]:
        vals = [c[case] for c in cases]
        rows.append(
            _row(
                f"router mismatch, replay off, {case}",
                statistics.median(v[0] for v in vals),
                "fraction",
                "replay on (forced)",
                0.0,
                [],
                reps,
            )
        )
        rows.append(
            _row(
                f"mean |logp - old_logp|, replay on, {case}",
                statistics.median(v[3] for v in vals),
                "nats",
                "replay off",
                statistics.median(v[1] for v in vals),
                [v[3] / v[1] for v in vals if v[1] > 0],
                reps,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition, fewer updates")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = run(args.quick)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"  ratio {r['ratio']:.3g}"
        print(f"{r['name']:<62} {r['value']:.4g} {r['unit']:<8} vs {r['baseline']} {r['baseline_value']:.4g}{ratio}")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "moe.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
