"""Evaluation throughput: `evaluate_policy` batched (what `rlk2 eval` and the training loop do) vs one prompt at a
time (each generate call holds one prompt's n samples), on the demo model and the arith task.

Model: the demo DeepSeek-V3 MoE (default `TinyMoEShape`, offline tokenizer) with random weights, or `--policy DIR`
(e.g. the cached warm start). Task: the first `--prompts` held-out arith problems, n = `--samples` samples each plus
one greedy completion, scored by the math reward. The two settings run interleaved, repetition by repetition, on
the same prompts and seeds; the reported figure is the median samples/s and ratio = batched / per-prompt.

    python bench/bench_eval.py [--quick] [--policy DIR]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repetitions")
    parser.add_argument("--policy", help="checkpoint directory (default: the demo model with random weights)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "eval.json"))
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.reps = 16, 2

    import torch
    import transformers

    from rewards.engine import RewardEngine
    from rlk2.eval_tasks import build_eval_task, find_task_file, load_task_config
    from rlk2.evaluate import evaluate_policy
    from rlk2.policy import load_policy

    transformers.utils.logging.set_verbosity_error()
    tmp = tempfile.TemporaryDirectory()
    path = pathlib.Path(args.policy) if args.policy else _demo_policy(pathlib.Path(tmp.name) / "demo")
    model, tok = load_policy(path)
    settings = {"batched": 256, "per-prompt": args.samples}
    runs: dict[str, list[float]] = {k: [] for k in settings}
    with RewardEngine(num_workers=2) as engine:
        task = build_eval_task(load_task_config(find_task_file("arith")), engine, limit=args.prompts)
        evaluate_policy(model, tok, [task], engine, samples=1, temperature=1.0, greedy=False, batch_size=256,
                        chat_template=True, seed=0)  # warm-up: reward workers, math-verify import, kernels
        for _ in range(args.reps):
            for name, batch in settings.items():
                res = evaluate_policy(model, tok, [task], engine, samples=args.samples, temperature=1.0, greedy=True,
                                      batch_size=batch, chat_template=True, seed=0, ks=(1, args.samples))
                runs[name].append(res.timing[task.name]["samples_per_s"])
    base = statistics.median(runs["per-prompt"])
    rows = []
    print(f"eval throughput: {args.prompts} arith prompts x ({args.samples} samples + greedy), "
          f"torch threads {torch.get_num_threads()}, {args.reps} repetitions")
    print(f"{'setting':<12} {'samples/s':>10} {'ratio':>7}")
    for name, vals in runs.items():
        med = statistics.median(vals)
        rows.append({"setting": name, "batch_size": settings[name], "samples_per_s": med, "ratio": med / base,
                     "runs": vals})
        print(f"{name:<12} {med:>10.1f} {med / base:>7.2f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "eval", "prompts": args.prompts, "samples": args.samples,
                               "policy": str(args.policy or "demo-random"), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
