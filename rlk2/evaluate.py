"""Evaluation of a policy on held-out tasks: one implementation for the training loop and `rlk2 eval`.

A sample *passes* when the task's first (primary) reward gives it full marks (>= 1.0): for `math` and binary
`code` that is "correct"; an unscorable sample (reward None) does not pass and is counted in `unscorable`.

Metrics per task, each the ratio of two per-prompt sums so that one bootstrap serves them all:
- `pass@k`: the unbiased estimator of Chen et al. (2021) over n >= k samples per prompt, averaged over prompts;
- `mean@n`: the mean primary reward over the n samples (partial credit counts; unscorable samples left out);
- `maj@n`: is the most frequent answer among the n samples right? (tasks whose answers can be compared, see
  `majority_vote`); `greedy_pass@1`: one greedy completion per prompt;
- `reward/<name>`, `mean_length`, `max_length` (tokens), `truncated` (hit the token budget), `unscorable`.

Confidence intervals are 95 % percentile-bootstrap intervals over prompts (`bootstrap_ci`); differences between
checkpoints resample the same prompts for both (a paired bootstrap), so a checkpoint against itself gives exactly 0.
The command-line side (`rlk2 eval`) lives in rlk2.eval_run; this module stays import-light for `rlk2 --help`.
"""

from __future__ import annotations

import argparse
import time
import zlib
from dataclasses import dataclass, field
from math import comb
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
VOTE_KINDS = ("auto", "boxed", "none")


# ================================================================================================ estimators
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


def extract_answer(text: str, kind: str) -> str | None:
    r"""The answer a completion gives, for majority voting: `boxed` = the last \boxed{...}, whitespace removed.

    >>> extract_answer(r"so \boxed{ 1 + 2 } then \boxed{85}", "boxed"), extract_answer("85", "boxed")
    ('85', None)
    """
    if kind != "boxed":
        return None
    from rewards.math import last_boxed

    found = last_boxed(text)
    return None if found is None else "".join(found.split())


def majority_vote(answers: Sequence[str | None], passed: Sequence[bool]) -> float:
    """Correctness of the most frequent answer among one prompt's samples, ties broken uniformly at random
    (so the result is the expected correctness: 1/2 for a two-way tie with the right answer).

    Passing samples form one cluster whatever their spelling (each equals the gold, hence each other: `\\frac12`
    and `0.5` vote together). Failing samples cluster by their extracted answer string, so two spellings of
    the same wrong answer split their vote (maj@n is slightly optimistic there). Samples without an answer
    abstain; if nobody votes the majority is wrong.

    >>> majority_vote(["5", "5", "7"], [False, False, True]), majority_vote(["5", "7"], [False, True])
    (0.0, 0.5)
    >>> majority_vote(["7", "7.0", "5", None], [True, True, False, False])
    1.0
    """
    counts: dict[tuple, int] = {}
    for answer, ok in zip(answers, passed, strict=True):
        if ok:
            key: tuple = ("pass",)
        elif answer is None:
            continue
        else:
            key = ("answer", answer)
        counts[key] = counts.get(key, 0) + 1
    if not counts:
        return 0.0
    top = max(counts.values())
    winners = [key for key, c in counts.items() if c == top]
    return float(("pass",) in winners) / len(winners)


# ================================================================================================ data types
@dataclass
class EvalTask:
    """A held-out task: prompts, the columns its rewards need, the rewards, and its token budget."""

    name: str
    prompts: list[str]
    columns: dict[str, list]
    specs: Sequence  # rewards.engine.RewardSpec; the first is the primary (pass / fail) reward
    max_new_tokens: int
    vote: str = "auto"
    """maj@n answers: "boxed" (last \\boxed{}), "none" (no maj@n), "auto" (boxed when the primary reward is math)."""

    @property
    def vote_kind(self) -> str:
        if self.vote == "auto":
            return "boxed" if self.specs and self.specs[0].name == "math" else "none"
        return self.vote


@dataclass
class TaskOutcome:
    """Everything measured on one task, per prompt (P prompts, n samples each). Metrics are computed from this."""

    name: str
    primary: str  # name of the pass / fail reward
    passed: np.ndarray  # [P, n] bool; unscorable samples are False
    scores: dict[str, np.ndarray]  # reward name -> [P, n] float, NaN where unscorable
    tokens: np.ndarray  # [P, n] completion tokens
    truncated: np.ndarray  # [P, n] bool: hit the token budget without EOS
    answers: list[list[str | None]] | None = None  # [P][n] extracted answers (maj@n), None: not comparable
    greedy_passed: np.ndarray | None = None  # [P] bool
    errors: dict[str, int] = field(default_factory=dict)  # reward name -> samples with an error

    @property
    def n(self) -> int:
        return int(self.passed.shape[1])


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: dict[str, list[dict]] = field(default_factory=dict)  # per task: one record per generated sample
    outcomes: dict[str, TaskOutcome] = field(default_factory=dict)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)  # per task: sequences, tokens, seconds


# ================================================================================================ metrics
Stat = tuple[np.ndarray, np.ndarray]  # (numerator [P], denominator [P]); metric = sum(num) / sum(den)


def prompt_stats(o: TaskOutcome, ks: Sequence[int]) -> dict[str, Stat]:
    """Each metric of the task as per-prompt (numerator, denominator) sums; the metric is their ratio of sums."""
    P, n = o.passed.shape
    ones, full = np.ones(P), np.full(P, float(n))
    out: dict[str, Stat] = {}
    correct = o.passed.sum(axis=1)
    for k in sorted(set(ks)):
        if 1 <= k <= n:
            out[f"pass@{k}"] = (np.array([pass_at_k(n, int(c), k) for c in correct]), ones)
    prim = o.scores[o.primary]
    scorable = ~np.isnan(prim)
    out[f"mean@{n}"] = (np.where(scorable, prim, 0.0).sum(axis=1), scorable.sum(axis=1).astype(float))
    if o.answers is not None:
        out[f"maj@{n}"] = (np.array([majority_vote(a, p) for a, p in zip(o.answers, o.passed)]), ones)
    if o.greedy_passed is not None:
        out["greedy_pass@1"] = (o.greedy_passed.astype(float), ones)
    for name, vals in o.scores.items():
        ok = ~np.isnan(vals)
        out[f"reward/{name}"] = (np.where(ok, vals, 0.0).sum(axis=1), ok.sum(axis=1).astype(float))
    out["mean_length"] = (o.tokens.sum(axis=1).astype(float), full)
    out["truncated"] = (o.truncated.sum(axis=1).astype(float), full)
    out["unscorable"] = ((~scorable).sum(axis=1).astype(float), full)
    return out


def ratio(stat: Stat) -> float:
    num, den = stat
    total = float(den.sum())
    return float(num.sum()) / total if total > 0 else float("nan")


def task_metrics(o: TaskOutcome, ks: Sequence[int]) -> dict[str, float]:
    """Point estimates: {metric: value}, including `max_length` (a maximum has no ratio form and no interval)."""
    out = {name: ratio(stat) for name, stat in prompt_stats(o, ks).items()}
    out["max_length"] = float(o.tokens.max()) if o.tokens.size else float("nan")
    return out


# ================================================================================================ bootstrap
# Written by hand rather than with scipy.stats.bootstrap: every metric of every checkpoint must be resampled on
# the *same* prompt indices (paired differences), the metrics are ratios of sums, and a resample whose
# denominator is 0 (every drawn prompt unscorable) must be skipped rather than turn the interval into NaN.
def bootstrap_indices(num_prompts: int, resamples: int, *, seed: int, task: str) -> np.ndarray:
    """[B, P] prompt indices drawn with replacement; a function of (seed, task) only, so reruns agree."""
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return rng.integers(0, num_prompts, size=(resamples, num_prompts), dtype=np.int32)


def _resampled(stat: Stat, idx: np.ndarray) -> np.ndarray:
    num, den = stat
    d = den[idx].sum(axis=1)  # [B]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(d > 0, num[idx].sum(axis=1) / np.where(d > 0, d, 1.0), np.nan)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float] | None:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def bootstrap_ci(stat: Stat, idx: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of ratio(stat) over prompts (None when nothing is scorable)."""
    return _interval(_resampled(stat, idx), confidence)


def bootstrap_diff_ci(a: Stat, b: Stat, idx: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Paired-bootstrap interval of ratio(b) - ratio(a): both evaluated on the same prompts, resampled together."""
    if a[0].shape != b[0].shape:
        raise ValueError(f"paired difference needs the same prompts ({a[0].shape[0]} vs {b[0].shape[0]})")
    return _interval(_resampled(b, idx) - _resampled(a, idx), confidence)


# ================================================================================================ generation
def _merge_scores(parts: list) -> tuple[dict[str, list], dict[str, int]]:
    rewards: dict[str, list] = {}
    errors: dict[str, int] = {}
    for part in parts:
        for name, vals in part.rewards.items():
            rewards.setdefault(name, []).extend(vals)
        for name, cnt in part.errors.items():
            errors[name] = errors.get(name, 0) + cnt
    return rewards, errors


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
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Generate `samples` completions per prompt (batched) and score them; returns eval/<task>/<metric>.

    Scoring of one batch runs in a background thread (the reward engine's workers are processes) while the next
    batch generates. Seeds depend only on `seed` and the batch position, so a rerun gives the same numbers.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from rlk2.rollout import encode_prompts, generate_rollouts

    metrics: dict[str, float] = {}
    result = EvalResult(metrics)
    total = sum(len(t.prompts) * (samples + int(greedy)) for t in tasks)
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True, leave=False)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-score") as scorer:
        for task in tasks:
            ids = encode_prompts(tokenizer, task.prompts, chat_template=chat_template)
            n = len(task.prompts)
            t_task, t_gen, ntok_total = time.perf_counter(), 0.0, 0
            outs: dict[str, dict] = {}
            for mode, reps in [("sample", samples)] + ([("greedy", 1)] if greedy else []):
                # Longest prompts first so each batch holds prompts of similar length (less left padding);
                # the results are put back in prompt order below.
                by_length = sorted(range(n), key=lambda i: -len(ids[i]))
                order = [i for i in by_length for _ in range(reps)]  # prompt index of each sequence
                texts, ntok, trunc, pending = [], [], [], []
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    t0 = time.perf_counter()
                    ro = generate_rollouts(
                        model, tokenizer, [ids[i] for i in chunk], max_new_tokens=task.max_new_tokens,
                        temperature=temperature, greedy=mode == "greedy", seed=seed + start, record_logprobs=False,
                    )
                    t_gen += time.perf_counter() - t0
                    cols = {k: [v[i] for i in chunk] for k, v in task.columns.items()}
                    pending.append(scorer.submit(engine.score, list(task.specs), ro.texts,
                                                 [task.prompts[i] for i in chunk], cols))
                    texts += ro.texts
                    ntok += ro.num_tokens.tolist()
                    trunc += ro.truncated.tolist()
                    bar.update(len(chunk))
                rewards, errors = _merge_scores([f.result() for f in pending])
                back = sorted(range(len(order)), key=lambda j: order[j])  # stable: samples keep their order
                order, texts, ntok, trunc = ([xs[j] for j in back] for xs in (order, texts, ntok, trunc))
                rewards = {name: [vals[j] for j in back] for name, vals in rewards.items()}
                ntok_total += sum(ntok)
                outs[mode] = {"order": order, "texts": texts, "ntok": ntok, "trunc": trunc,
                              "rewards": rewards, "errors": errors, "reps": reps}
            outcome = _outcome(task, outs)
            result.outcomes[task.name] = outcome
            prefix = f"eval/{task.name}/"
            values = task_metrics(outcome, ks)
            for key, value in values.items():
                metrics[prefix + key] = value
            elapsed = time.perf_counter() - t_task
            sequences = n * (samples + int(greedy))
            result.timing[task.name] = {"sequences": sequences, "tokens": ntok_total, "seconds": elapsed,
                                        "generate_s": t_gen, "samples_per_s": sequences / elapsed if elapsed else 0.0,
                                        "tokens_per_s": ntok_total / elapsed if elapsed else 0.0}
            result.samples[task.name] = _records(task, outs)
    bar.close()
    return result


def _as_array(vals: list, shape: tuple[int, int]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=float).reshape(shape)


def _outcome(task: EvalTask, outs: dict[str, dict]) -> TaskOutcome:
    n = len(task.prompts)
    s = outs["sample"]
    shape = (n, s["reps"])
    primary = task.specs[0].name
    scores = {name: _as_array(vals, shape) for name, vals in s["rewards"].items()}
    passed = np.nan_to_num(scores[primary], nan=0.0) >= 1.0 - 1e-6
    kind = task.vote_kind
    answers = None
    if kind != "none":
        flat = [extract_answer(t, kind) for t in s["texts"]]
        answers = [flat[i * s["reps"] : (i + 1) * s["reps"]] for i in range(n)]
    greedy_passed = None
    errors = dict(s["errors"])
    if "greedy" in outs:
        g = outs["greedy"]["rewards"][primary]
        greedy_passed = np.array([r is not None and r >= 1.0 - 1e-6 for r in g], dtype=bool)
        for name, cnt in outs["greedy"]["errors"].items():
            errors[name] = errors.get(name, 0) + cnt
    return TaskOutcome(task.name, primary, passed, scores, np.array(s["ntok"], dtype=np.int64).reshape(shape),
                       np.array(s["trunc"], dtype=bool).reshape(shape), answers, greedy_passed, errors)


def _records(task: EvalTask, outs: dict[str, dict]) -> list[dict]:
    primary = task.specs[0].name
    kind = task.vote_kind
    records = []
    for mode, o in outs.items():
        for j, (i, text) in enumerate(zip(o["order"], o["texts"])):
            r = o["rewards"][primary][j]
            rec = {"mode": mode, "prompt_index": i, "prompt": task.prompts[i], "completion": text,
                   "passed": r is not None and r >= 1.0 - 1e-6, "tokens": o["ntok"][j], "truncated": o["trunc"][j],
                   "rewards": {name: vals[j] for name, vals in o["rewards"].items()}}
            if kind != "none":
                rec["answer"] = extract_answer(text, kind)
            records.append(rec)
    return records


# ================================================================================================ CLI
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from rlk2.eval_run import add_arguments

    add_arguments(parser)


def run_eval(args: argparse.Namespace) -> int:
    from rlk2.eval_run import run

    return run(args)
