"""Evaluation maths: pass@k, majority voting, per-prompt metrics, bootstrap intervals, report keys.

Every expected value is worked out by hand in the comments; nothing here loads a model.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from rlk2.eval.metrics import (
    TaskOutcome,
    bootstrap_ci,
    bootstrap_diff_ci,
    bootstrap_indices,
    majority_vote,
    pass_at_k,
    ratio,
    task_metrics,
)


# ------------------------------------------------------------------------------------------------ pass@k
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (1, 0, 1, 0.0),  # n = k, c = 0
        (1, 1, 1, 1.0),  # n = k, c = n
        (4, 0, 4, 0.0),  # c = 0: no subset of k can contain a pass
        (4, 4, 1, 1.0),  # c = n
        (4, 1, 4, 1.0),  # n = k and c >= 1: the only subset is all samples, which contains the pass
        (4, 1, 1, 0.25),  # c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5) = 1 - 21/252
        (8, 7, 2, 1.0),  # n - c = 1 < k: every pair holds a pass
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_brute_force_over_subsets():
    from itertools import combinations

    n = 6
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 5), (4, 1, 0)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------------ maj@n
def test_majority_vote_cases():
    # the right answer wins outright, even spelled two ways (both passed, so they vote together)
    assert majority_vote(["0.5", r"\frac12", "3"], [True, True, False]) == 1.0
    # a wrong answer outvotes the right one
    assert majority_vote(["3", "3", "0.5"], [False, False, True]) == 0.0
    # three-way tie with the right answer among them: expected correctness 1/3
    assert majority_vote(["1", "2", "3"], [True, False, False]) == pytest.approx(1 / 3)
    # nobody gave an answer: the majority is wrong; abstainers do not outvote a single right answer
    assert majority_vote([None, None], [False, False]) == 0.0
    assert majority_vote([None, None, "7"], [False, False, True]) == 1.0


# ------------------------------------------------------------------------------------------------ metrics
def _outcome(passed, *, scores=None, tokens=None, truncated=None, answers=None, greedy=None):
    passed = np.array(passed, dtype=bool)
    scores = np.array(scores if scores is not None else passed, dtype=float)
    tokens = np.array(tokens if tokens is not None else np.full(passed.shape, 5), dtype=np.int64)
    truncated = np.array(truncated if truncated is not None else np.zeros(passed.shape), dtype=bool)
    return TaskOutcome(
        "t",
        "math",
        passed,
        {"math": scores},
        tokens,
        truncated,
        answers,
        None if greedy is None else np.array(greedy, dtype=bool),
    )


def test_task_metrics_worked_example():
    # prompt 0: 1 of 4 passes; prompt 1: 4 of 4 pass; one sample of prompt 0 is unscorable (NaN).
    o = _outcome(
        [[1, 0, 0, 0], [1, 1, 1, 1]],
        scores=[[1.0, 0.0, np.nan, 0.0], [1.0, 1.0, 1.0, 1.0]],
        tokens=[[2, 4, 6, 8], [1, 1, 1, 13]],
        truncated=[[0, 0, 0, 1], [0, 0, 0, 1]],
        answers=[["3", "4", None, "4"], ["5", "5", "5", "5"]],
        greedy=[False, True],
    )
    m = task_metrics(o, ks=[1, 2, 4, 8])
    assert m["pass@1"] == pytest.approx((0.25 + 1.0) / 2)
    assert m["pass@2"] == pytest.approx((0.5 + 1.0) / 2)  # prompt 0: 1 - C(3,2)/C(4,2) = 0.5
    assert m["pass@4"] == pytest.approx(1.0)
    assert "pass@8" not in m  # k > n is not estimable
    assert m["mean@4"] == pytest.approx(5 / 7)  # 7 scorable samples, 5 of them score 1
    assert m["reward/math"] == pytest.approx(5 / 7)
    assert m["maj@4"] == pytest.approx(0.5)  # prompt 0: "4" (2 wrong votes) beats the pass (1); prompt 1 right
    assert m["greedy_pass@1"] == pytest.approx(0.5)
    assert m["mean_length"] == pytest.approx(36 / 8)
    assert m["max_length"] == 13
    assert m["truncated"] == pytest.approx(2 / 8)
    assert m["unscorable"] == pytest.approx(1 / 8)


def test_no_maj_or_greedy_when_not_measured():
    m = task_metrics(_outcome([[1, 0]]), ks=[1])
    assert "maj@2" not in m and "greedy_pass@1" not in m and m["pass@1"] == 0.5


def test_all_unscorable_reward_is_nan_not_zero():
    o = _outcome([[0, 0]], scores=[[np.nan, np.nan]])
    m = task_metrics(o, ks=[1])
    assert math.isnan(m["reward/math"]) and math.isnan(m["mean@2"])
    assert m["unscorable"] == 1.0 and m["pass@1"] == 0.0


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_on_a_fixed_sample():
    # 10 prompts, 3 pass: a resampled mean is Binomial(10, 0.3) / 10. P(X <= 5) = 0.953 < 0.975 <= P(X <= 6) =
    # 0.989, so the 97.5th percentile is 0.6; P(X = 0) = 0.028 is close to 0.025, so the 2.5th percentile lies
    # between the atoms 0.0 and 0.1 (percentiles interpolate). The resampled values average the sample mean 0.3.
    stat = (np.array([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0]), np.ones(10))
    idx = bootstrap_indices(10, 4000, seed=0, task="fixed")
    lo, hi = bootstrap_ci(stat, idx)
    assert ratio(stat) == pytest.approx(0.3)
    assert 0.0 <= lo <= 0.1 and hi == pytest.approx(0.6)
    assert stat[0][idx].mean() == pytest.approx(0.3, abs=0.01)


def test_bootstrap_degenerate_and_unscorable():
    idx = bootstrap_indices(5, 200, seed=1, task="x")
    assert bootstrap_ci((np.ones(5), np.ones(5)), idx) == (1.0, 1.0)  # no variation: a point interval
    assert bootstrap_ci((np.zeros(5), np.zeros(5)), idx) is None  # nothing scorable: no interval
    # one scorable prompt of five: resamples that miss it are skipped, not counted as NaN or 0
    lo, hi = bootstrap_ci((np.array([0, 0, 2.0, 0, 0]), np.array([0, 0, 2.0, 0, 0])), idx)
    assert (lo, hi) == (1.0, 1.0)


def test_bootstrap_indices_depend_only_on_seed_and_task():
    a = bootstrap_indices(50, 100, seed=3, task="arith")
    assert np.array_equal(a, bootstrap_indices(50, 100, seed=3, task="arith"))
    assert not np.array_equal(a, bootstrap_indices(50, 100, seed=4, task="arith"))
    assert not np.array_equal(a, bootstrap_indices(50, 100, seed=3, task="other"))


def test_difference_of_a_checkpoint_with_itself_contains_zero():
    rng = np.random.default_rng(0)
    stat = (rng.random(200), np.ones(200))
    idx = bootstrap_indices(200, 1000, seed=0, task="t")
    assert bootstrap_diff_ci(stat, stat, idx) == (0.0, 0.0)
    # two independent draws from the same distribution (a re-run with another seed): 0 inside the interval
    other = (rng.random(200), np.ones(200))
    lo, hi = bootstrap_diff_ci(stat, other, idx)
    assert lo < 0 < hi


def test_paired_difference_sees_a_constant_shift_exactly():
    # b is a + 0.1 on every prompt: the paired interval is the point 0.1, although each side alone is wide.
    rng = np.random.default_rng(1)
    a = (rng.random(100) * 0.8, np.ones(100))
    b = (a[0] + 0.1, np.ones(100))
    idx = bootstrap_indices(100, 500, seed=0, task="t")
    lo, hi = bootstrap_diff_ci(a, b, idx)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    alo, ahi = bootstrap_ci(a, idx)
    assert ahi - alo > 0.05
    with pytest.raises(ValueError):
        bootstrap_diff_ci(a, (np.ones(3), np.ones(3)), idx)


# ------------------------------------------------------------------------------------------------ report
EXPECTED_METRICS = [
    "pass@1",
    "pass@2",
    "greedy_pass@1",
    "mean@2",
    "maj@2",
    "reward/math",
    "mean_length",
    "max_length",
    "truncated",
    "unscorable",
]


def _fake_eval(seed):
    rng = np.random.default_rng(seed)
    passed = rng.random((6, 2)) < 0.5
    o = _outcome(passed, answers=[["1", "2"]] * 6, greedy=rng.random(6) < 0.5)
    o.name = "arith"
    timing = {"arith": {"sequences": 18, "tokens": 90, "seconds": 1.5, "samples_per_s": 12.0, "tokens_per_s": 60.0}}
    return SimpleNamespace(outcomes={"arith": o}, timing=timing)


def test_report_keys_are_stable(tmp_path):
    from rlk2.eval.report import REPORT_KEYS, TASK_KEYS, build_report, markdown_tables
    from rlk2.eval_checkpoints import Checkpoint

    ckpts = [Checkpoint("a", tmp_path / "a", "hf", label="a"), Checkpoint("b", tmp_path / "b", "peft", label="b")]
    task = SimpleNamespace(name="arith", prompts=["p"] * 6, specs=[SimpleNamespace(name="math")], max_new_tokens=12)
    cfg = SimpleNamespace(source="builtin:arith")
    settings = {
        "ks": [1, 2],
        "samples": 2,
        "temperature": 1.0,
        "greedy": True,
        "seed": 0,
        "limit": None,
        "batch_size": 256,
        "bootstrap_resamples": 200,
        "confidence": 0.95,
        "device": "cpu",
    }
    report = build_report(ckpts, [cfg], [task], [_fake_eval(0), _fake_eval(1)], settings)
    assert tuple(report) == REPORT_KEYS
    t = report["tasks"]["arith"]
    assert tuple(t) == TASK_KEYS
    assert list(t["metrics"]) == ["a", "b"]
    assert list(t["metrics"]["a"]) == EXPECTED_METRICS
    assert all(set(v) == {"value", "ci"} for v in t["metrics"]["b"].values())
    assert t["metrics"]["a"]["max_length"]["ci"] is None
    assert list(t["differences"]) == ["b"] and t["differences"]["b"]["baseline"] == "a"
    assert set(t["differences"]["b"]["metrics"]) == set(EXPECTED_METRICS) - {"max_length"}
    for name, d in t["differences"]["b"]["metrics"].items():
        a, b = t["metrics"]["a"][name]["value"], t["metrics"]["b"][name]["value"]
        assert d["value"] == pytest.approx(b - a)
        assert d["ci"][0] <= d["ci"][1]
    assert report["throughput"]["a"]["samples_per_s"] == pytest.approx(12.0)
    json.dumps(report, allow_nan=False)  # strict JSON: NaN must have become null
    table = markdown_tables(report)
    assert "| pass@1 |" in table and "b − a" in table
