"""Evaluation metrics: pass@k, maj@n and the rest as ratios of per-prompt sums, with bootstrap intervals.

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
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb

import numpy as np

from rewards.math import last_boxed

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


# ================================================================================================ outcomes
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
