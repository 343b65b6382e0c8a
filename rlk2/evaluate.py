"""Evaluation of a policy on held-out tasks: one implementation for the training loop and `rlk2 eval`.

A sample *passes* when the task's first (primary) reward gives it full marks (>= 1.0): for `math` and binary
`code` that is "correct". pass@k uses the unbiased estimator of Chen et al. (2021) over n >= k samples per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1)
    0.25
    >>> pass_at_k(4, 0, 2), pass_at_k(4, 4, 4)
    (0.0, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


@dataclass
class EvalTask:
    """A held-out task: prompts, the columns its rewards need, the rewards, and its token budget."""

    name: str
    prompts: list[str]
    columns: dict[str, list]
    specs: Sequence  # rewards.engine.RewardSpec
    max_new_tokens: int


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: dict[str, list[dict]] = field(default_factory=dict)  # per task: one record per generated sample


def evaluate_policy(
    model,
    tokenizer,
    tasks: Sequence[EvalTask],
    engine,
    *,
    samples: int,
    temperature: float,
    greedy: bool,
    batch_size: int,
    chat_template: bool,
    seed: int,
    ks: Sequence[int] = (1,),
) -> EvalResult:
    """Generate `samples` completions per prompt (batched) and score them; returns eval/<task>/<metric>."""
    from rlk2.rollout import encode_prompts, generate_rollouts

    metrics: dict[str, float] = {}
    records: dict[str, list[dict]] = {}
    for task in tasks:
        ids = encode_prompts(tokenizer, task.prompts, chat_template=chat_template)
        n = len(task.prompts)
        modes = [("sample", samples)] + ([("greedy", 1)] if greedy else [])
        for mode, reps in modes:
            order = [i for i in range(n) for _ in range(reps)]  # prompt index of each sequence
            texts, ntok, trunc = [], [], []
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                ro = generate_rollouts(
                    model,
                    tokenizer,
                    [ids[i] for i in chunk],
                    max_new_tokens=task.max_new_tokens,
                    temperature=temperature,
                    greedy=mode == "greedy",
                    seed=seed + start,
                )
                texts += ro.texts
                ntok += ro.num_tokens.tolist()
                trunc += ro.truncated.tolist()
            cols = {k: [v[i] for i in order] for k, v in task.columns.items()}
            scored = engine.score(list(task.specs), texts, [task.prompts[i] for i in order], cols)
            primary = scored.rewards[task.specs[0].name]
            passed = np.array([r is not None and r >= 1.0 - 1e-6 for r in primary], dtype=float).reshape(n, reps)
            unscorable = np.mean([r is None for r in primary])
            prefix = f"eval/{task.name}/"
            if mode == "greedy":
                metrics[prefix + "greedy_pass@1"] = float(passed.mean())
                continue
            per_prompt = passed.sum(axis=1).astype(int)
            for k in ks:
                if k <= reps:
                    metrics[prefix + f"pass@{k}"] = float(np.mean([pass_at_k(reps, int(c), k) for c in per_prompt]))
            for name, vals in scored.rewards.items():
                good = [v for v in vals if v is not None]
                metrics[prefix + f"reward/{name}"] = float(np.mean(good)) if good else float("nan")
            metrics[prefix + "mean_length"] = float(np.mean(ntok))
            metrics[prefix + "truncated"] = float(np.mean(trunc))
            metrics[prefix + "unscorable"] = float(unscorable)
            records[task.name] = [
                {"prompt": task.prompts[i], "completion": t, "passed": bool(p), "tokens": nt}
                for i, t, p, nt in zip(order, texts, passed.reshape(-1), ntok)
            ]
    return EvalResult(metrics, records)
