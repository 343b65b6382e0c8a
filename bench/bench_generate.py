"""Generation on a real model: rlk2's decoder vs transformers' `model.generate`, SmolLM2-135M-Instruct, batch 32.

Same checkpoint, same 32 prompts (the held-out word problems, chat template), same sampling: temperature 1,
top-p 1, no top-k, at most 128 new tokens, stopping at EOS (a sequence that ends stops counting; `generate` keeps
stepping the batch until every sequence has ended). tokens/s = generated tokens (up to and including EOS) / wall
time. transformers runs in float32 and, where the CPU multiplies bfloat16 natively (AVX512-BF16 / AMX), in bfloat16
too; its best is the baseline. rlk2 runs `generate_rollouts` as the training loop does (its `DenseDecoder`, in the
dtype `rlk2.hardware.fast_dtype` picks). The two alternate, `reps` times each, in one process; the row reports
medians and the ratio of medians.

The limit: a decode step of batch 32 multiplies the 106 M non-embedding weights and the 28 M-row tied LM head by
32 tokens (2 x 135 M x 32 = 8.6 GFLOP) after a prefill of 32 prompts x ~72 tokens (2 x 106 M x 2.3k = 0.49 TFLOP);
128 steps are ~1.6 TFLOP. `limit_tokens_per_s` is what this machine's GEMM rates in rlk2's decode dtype allow if
nothing but those products ran: the prefill at the rate of its own shapes (weights @ ~2.3k activations), the decode
steps at the rate of weights @ 32 activations with every layer's weights distinct, as in a real decode step (the
model's 270 MB of bfloat16 weights do not stay in cache from one step to the next; a rate measured by repeating one
layer's small matrices reads them from cache and overstates the limit). `--gflops` overrides both.

    python bench/bench_generate.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, NEW_TOKENS = 32, 128


def _prompts(tok):
    from rlk2.data import builtin_split
    from rlk2.rollout import encode_prompts

    rows = builtin_split("word_problems", "eval")[:BATCH]
    return encode_prompts(tok, [r["prompt"] for r in rows], chat_template=True)


def _hf(model, tok, ids, dtype) -> tuple[int, float]:
    from rlk2.rollout.batch import left_pad

    pid, mask = left_pad(ids, tok.pad_token_id)
    m = model.to(dtype)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        out = m.generate(
            input_ids=pid,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    seconds = time.perf_counter() - start
    model.to(torch.float32)
    new = out[:, pid.shape[1] :]
    is_eos = new == tok.eos_token_id
    ended = is_eos.any(dim=1)
    lengths = torch.where(ended, is_eos.int().argmax(dim=1) + 1, torch.full_like(ended, new.shape[1], dtype=torch.long))
    return int(lengths.sum()), seconds


def _rlk2(model, tok, ids, seed: int) -> tuple[int, float]:
    from rlk2.rollout import generate_rollouts

    start = time.perf_counter()
    ro = generate_rollouts(model, tok, ids, max_new_tokens=NEW_TOKENS, seed=seed)
    return int(ro.completion_mask.sum()), time.perf_counter() - start


def _gemm_gflops(dtype: torch.dtype, columns: int, layers: int) -> float:
    """GEMM rate in `dtype` (the one rlk2 decodes in) on SmolLM2's layer shapes (weights @ `columns` activations),
    through `layers` layers of distinct weights, as a forward pass reads them."""
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
    x = {k: torch.randn(k, columns, dtype=dtype) for _, k in shapes}
    ws = [torch.randn(n, k, dtype=dtype) for _ in range(layers) for n, k in shapes]
    for w in ws:
        w @ x[w.shape[1]]
    start, reps = time.perf_counter(), 3
    for _ in range(reps):
        for w in ws:
            w @ x[w.shape[1]]
    flops = reps * sum(2 * w.shape[0] * w.shape[1] * columns for w in ws)
    return flops / (time.perf_counter() - start) / 1e9


def measure(reps: int, gflops: float | None) -> dict:
    from rlk2.hardware import cpu_has_native_bf16, fast_dtype
    from rlk2.policy import load_policy

    torch.set_num_threads(torch.get_num_threads())
    model, tok = load_policy("smollm2-135m-instruct")
    ids = _prompts(tok)
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_native_bf16() else [])
    results: dict[str, list[tuple[int, float]]] = {f"hf_{str(d)[6:]}": [] for d in dtypes} | {"rlk2": []}
    _rlk2(model, tok, ids[:4], seed=99)  # warm-up (allocator, kernels)
    for rep in range(reps):
        order = ["rlk2", *results.keys() - {"rlk2"}] if rep % 2 == 0 else [*results.keys() - {"rlk2"}, "rlk2"]
        for name in order:
            if name == "rlk2":
                results[name].append(_rlk2(model, tok, ids, seed=rep))
            else:
                results[name].append(_hf(model, tok, ids, getattr(torch, name[3:])))
            tokens, seconds = results[name][-1]
            print(
                f"  rep {rep} {name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.0f} tokens/s",
                file=sys.stderr,
            )
    speed = {name: statistics.median(t / s for t, s in runs) for name, runs in results.items()}
    baseline = max((k for k in speed if k != "rlk2"), key=speed.get)
    dtype, prompt_tokens = fast_dtype("cpu", torch.float32), sum(map(len, ids))
    decode_rate = gflops or _gemm_gflops(dtype, BATCH, layers=30)
    prefill_rate = gflops or _gemm_gflops(dtype, prompt_tokens, layers=2)
    generated = statistics.median(t for t, _ in results["rlk2"])
    limit = generated / (2 * 106e6 * prompt_tokens / (prefill_rate * 1e9) + 2 * 135e6 * generated / (decode_rate * 1e9))
    return {
        "model": "SmolLM2-135M-Instruct",
        "batch": BATCH,
        "max_new_tokens": NEW_TOKENS,
        "reps": reps,
        "rlk2_dtype": str(dtype),
        "tokens_per_s": speed,
        "baseline": baseline,
        "ratio_vs_best_hf": speed["rlk2"] / speed[baseline],
        "gemm_gflops": {"decode": decode_rate, "prefill": prefill_rate},
        "limit_tokens_per_s": limit,
        "fraction_of_limit": speed["rlk2"] / limit,
        "runs": {k: [[t, round(s, 3)] for t, s in v] for k, v in results.items()},
    }


def run(quick: bool) -> list[dict]:
    """`bench/run_all.py`'s entry: one row, rlk2's tokens/s against transformers' best."""
    res = measure(1 if quick else 3, None)
    return [
        {
            "name": f"generate/tokens_per_s/smollm2_{BATCH}x{NEW_TOKENS}tok",
            "value": res["tokens_per_s"]["rlk2"],
            "unit": "tokens/s",
            "baseline": f"transformers generate ({res['baseline']})",
            "baseline_value": res["tokens_per_s"][res["baseline"]],
            "ratio": res["ratio_vs_best_hf"],
            "spread": 0.0,
            "reps": res["reps"],
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one repetition")
    parser.add_argument("--gflops", type=float, help="GEMM rate for the limit (default: measured here)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "generate.json"))
    args = parser.parse_args()
    res = measure(1 if args.quick else args.reps, args.gflops)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(
        f"| generation, SmolLM2-135M, batch {BATCH} x {NEW_TOKENS} | "
        + " | ".join(f"{k} {v:.0f} tok/s" for k, v in res["tokens_per_s"].items())
        + f" | rlk2 / {res['baseline']} = {res['ratio_vs_best_hf']:.2f}x | limit {res['limit_tokens_per_s']:.0f}"
        f" tok/s ({100 * res['fraction_of_limit']:.0f} % reached) |"
    )


if __name__ == "__main__":
    main()
