"""Evaluation throughput: `evaluate_policy` batched (what `rlk2 eval` and the training loop do) vs one prompt at a
time (each generate call holds one prompt's n samples), on the demo model and the arith task.

Model: the demo DeepSeek-V3 MoE (default `TinyMoEShape`, offline tokenizer) with random weights, or `--policy DIR`
(e.g. the cached warm start). Task: the first `--prompts` held-out arith problems, n = `--samples` samples each plus
one greedy completion, scored by the math reward. The two settings run interleaved, repetition by repetition, on
the same prompts and seeds; value = median samples/s batched, ratio = median of per-repetition batched / per-prompt.

    python bench/bench_eval.py [--quick] [--policy DIR]        (or bench/run_all.py --only eval)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _demo_policy(folder: pathlib.Path) -> pathlib.Path:
    from rlk2.data import builtin_split
    from rlk2.policy import build_demo_policy

    rows = builtin_split("arith", "train")[:2000]
    corpus = [f"Q: {r['prompt']}\nA: " for r in rows] + [r["completion"] for r in rows]
    return build_demo_policy(folder, corpus, seed=0)


def measure(policy: str | None, prompts: int, samples: int, reps: int) -> dict[str, list[float]]:
    """samples/s of each setting per repetition, interleaved."""
    import transformers

    from rewards.engine import RewardEngine
    from rlk2.eval.evaluate import evaluate_policy
    from rlk2.eval.tasks import build_eval_task, find_task_file, load_task_config
    from rlk2.policy import load_policy

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(policy) if policy else _demo_policy(pathlib.Path(tmp) / "demo")
        model, tok = load_policy(path)
    runs: dict[str, list[float]] = {"batched": [], "per-prompt": []}
    batch = {"batched": 256, "per-prompt": samples}
    with RewardEngine(num_workers=2) as engine:
        task = build_eval_task(load_task_config(find_task_file("arith")), engine, limit=prompts)
        evaluate_policy(
            model,
            tok,
            [task],
            engine,
            samples=1,
            temperature=1.0,
            greedy=False,
            batch_size=256,
            chat_template=True,
            seed=0,
        )  # warm-up: reward workers, math-verify import, kernels
        for _ in range(reps):
            for name in runs:
                res = evaluate_policy(
                    model,
                    tok,
                    [task],
                    engine,
                    samples=samples,
                    temperature=1.0,
                    greedy=True,
                    batch_size=batch[name],
                    chat_template=True,
                    seed=0,
                    ks=(1, samples),
                )
                runs[name].append(res.timing[task.name]["samples_per_s"])
    return runs


def run(quick: bool, policy: str | None = None) -> list[dict]:
    prompts, samples, reps = (16, 4, 2) if quick else (64, 4, 3)
    runs = measure(policy, prompts, samples, reps)
    ratios = [b / p for b, p in zip(runs["batched"], runs["per-prompt"])]
    return [
        {
            "name": f"eval_samples_per_s/arith_{prompts}x({samples}+greedy)/{policy or 'demo_random'}",
            "value": statistics.median(runs["batched"]),
            "unit": "samples/s",
            "baseline": f"one prompt per generate call (batch = its {samples} samples)",
            "baseline_value": statistics.median(runs["per-prompt"]),
            "ratio": statistics.median(ratios),
            "spread": (max(ratios) - min(ratios)) / 2,
            "reps": reps,
        }
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts and 2 repetitions instead of 64 and 3")
    parser.add_argument("--policy", help="checkpoint directory (default: the demo model with random weights)")
    args = parser.parse_args()
    rows = run(args.quick, args.policy)
    for r in rows:
        print(
            f"{r['name']}: {r['value']:.1f} {r['unit']} vs {r['baseline_value']:.1f} ({r['baseline']}), "
            f"ratio {r['ratio']:.2f} +- {r['spread']:.2f} over {r['reps']} reps"
        )
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
