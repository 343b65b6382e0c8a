"""One-token decode steps: rlk2's (`rlk2.rollout.decode`) vs transformers' own DeepseekV3 forward.

The same model, the same prompt and the same tokens, decoded three ways, alternating repetition by repetition:
transformers' forward with its KV cache (the baseline), the same forward with `absorbed_mla_decode`, and
`LatentDecoder` (the plain-function decode step `generate_rollouts` uses); a row per (model, batch, context
length, way). Time is the mean of one decode step (the whole model, as the sampling loop calls it) over `STEPS`
steps after a prefill of `context` tokens. Ratio = how many times faster than the baseline.

Models: the demo policy shape (`TinyMoEShape` defaults, random weights) and the ~50 M-parameter DeepSeek-V3 config
of `bench_optim.py`, SDPA attention (transformers' default), float32, CPU.

    python bench/bench_decode.py [--quick] [--threads N]
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 160
STEPS = 8


def _model(shape=None):
    from transformers import DeepseekV3ForCausalLM

    from rlk2.policy import TinyMoEShape, tiny_deepseek_v3_config

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(tiny_deepseek_v3_config(VOCAB, shape or TinyMoEShape())).eval()
    model.config._attn_implementation = "sdpa"
    return model


def _decode_time(model, batch: int, context: int, absorbed: bool) -> float:
    """Seconds per decode step after a prefill of `context` tokens."""
    from rlk2.rollout.decode import absorbed_mla_decode

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, context), generator=gen)
    mask = torch.ones_like(ids)
    with torch.inference_mode(), absorbed_mla_decode(model) if absorbed else contextlib.nullcontext():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).cache
        nxt = torch.randint(3, VOCAB, (batch, 1), generator=gen)
        start = time.perf_counter()
        for t in range(STEPS):
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            pos = torch.full((batch, 1), context + t)
            model(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return (time.perf_counter() - start) / STEPS


def _latent_time(model, batch: int, context: int) -> float:
    """Seconds per `LatentDecoder` decode step after its own prefill of `context` tokens."""
    from rlk2.rollout.decode import LatentDecoder

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, context), generator=gen)
    with torch.inference_mode():
        decoder = LatentDecoder(model, ids, torch.ones_like(ids), STEPS)
        nxt = torch.randint(3, VOCAB, (batch,), generator=gen)
        start = time.perf_counter()
        for t in range(STEPS):
            decoder.step(nxt, torch.full((batch,), context + t))
        return (time.perf_counter() - start) / STEPS


def decode_rows(label: str, shape, batch: int, contexts: list[int], reps: int) -> list[dict]:
    model = _model(shape)
    ways = {
        "absorbed_mla": lambda c: _decode_time(model, batch, c, True),
        "latent_decoder": lambda c: _latent_time(model, batch, c),
    }
    rows = []
    for context in contexts:
        for fn in (*ways.values(), lambda c: _decode_time(model, batch, c, False)):
            fn(context)  # warm-up
        base, ours = [], {name: [] for name in ways}
        for _ in range(reps):
            base.append(_decode_time(model, batch, context, False))
            for name, fn in ways.items():
                ours[name].append(fn(context))
        for name, times in ours.items():
            speedups = [b / o for b, o in zip(base, times)]
            rows.append(
                {
                    "name": f"decode/{label}_batch{batch}_context{context}/{name}",
                    "value": statistics.median(times),
                    "unit": "s/step",
                    "baseline": "transformers DeepseekV3 forward (SDPA)",
                    "baseline_value": statistics.median(base),
                    "ratio": statistics.median(speedups),
                    "spread": (max(speedups) - min(speedups)) / 2,
                    "reps": reps,
                }
            )
    return rows


def run(quick: bool) -> list[dict]:
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_optim import _shape_50m

    reps = 3 if quick else 7
    rows = decode_rows("demo", None, 64, [16, 128, 512] if not quick else [16, 256], reps)
    rows += decode_rows("demo", None, 1, [16], reps)  # the last sequence still generating
    rows += decode_rows("deepseek_v3_53M", _shape_50m(), 16, [128] if quick else [128, 512], reps)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import run_all  # this file's folder is on sys.path

    run_all.standalone(run, "decode", __doc__, "fewer repetitions and contexts")
