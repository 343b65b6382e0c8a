"""format, length and budget rewards, and the pure budget rule the loop calls."""

from __future__ import annotations

import pytest

from rewards import RewardEngine, RewardError, RewardSpec, budget_penalty
from rewards.format import budget, format_reward, length_reward


def test_format_gold_is_one_and_malformed_is_zero():
    good = [r"so $\boxed{4}$", r"\boxed{\frac{1}{2}}", r"\fbox{x}"]
    bad = ["4", r"\boxed{}", r"\boxed{4", r"\boxed 4", ""]
    assert format_reward(good, prompts=[""] * 3) == [1.0, 1.0, 1.0]
    assert format_reward(bad, prompts=[""] * 5) == [0.0] * 5


def test_format_pattern_matches_whole_completion():
    pattern = r"<think>.+</think>.*\\boxed\{.+\}.*"
    done = r"<think>2+2</think> The answer is \boxed{4}."
    assert format_reward([done, "The answer is \\boxed{4}."], prompts=["", ""], pattern=pattern) == [1.0, 0.0]
    with pytest.raises(RewardError, match="bad pattern"):
        format_reward(["x"], prompts=[""], pattern="(")


def test_length_is_group_relative_and_only_penalises_without_correctness():
    # group p: lengths 2, 4, 6 -> lambda = 0.5, 0.0, -0.5; without `correct` only the negative part is kept
    # group q: one completion, lengths tie -> 0
    completions = ["ab", "abcd", "abcdef", "xyz"]
    prompts = ["p", "p", "p", "q"]
    assert length_reward(completions, prompts=prompts) == [0.0, 0.0, -0.5, 0.0]
    # with correctness (Kimi k1.5): correct ones get lambda, wrong ones min(0, lambda)
    assert length_reward(completions, prompts=prompts, correct=[1, 0, 1, 1]) == [0.5, 0.0, -0.5, 0.0]
    # token counts when the loop gives them: 10 vs 30 tokens -> 0.5 and -0.5
    assert length_reward(["a", "b"], prompts=["p", "p"], num_tokens=[10, 30], correct=[1, 1]) == [0.5, -0.5]


def test_budget_penalty_rule():
    assert budget_penalty([10, 50, 20, 40], [False, True, False, False], budget=32, penalty=-0.5) == [
        0.0,
        -0.5,
        0.0,
        -0.5,
    ]  # #1 truncated, #3 over budget
    assert budget_penalty([10, 10], [False, False], budget=[5, 20], penalty=-1.0) == [-1.0, 0.0]  # per task
    with pytest.raises(ValueError, match="2 truncated flags for 3 token counts"):
        budget_penalty([1, 2, 3], [True, False], budget=4, penalty=-1.0)


def test_budget_reward_reads_per_row_budgets():
    out = budget(
        ["a", "b", "c"],
        prompts=[""] * 3,
        num_tokens=[100, 100, 10],
        truncated=[False, False, True],
        token_budget=[50, 200, None],
        penalty=-2.0,
    )
    assert out == [-2.0, 0.0, -2.0]


def test_shape_rewards_through_the_engine():
    with RewardEngine(num_workers=1) as engine:
        specs = [RewardSpec("format"), RewardSpec("length", weight=0.0), RewardSpec("budget", kwargs={"budget": 5})]
        out = engine.score(
            specs, [r"\boxed{1}", "abc"], ["p", "p"], {"num_tokens": [3, 9], "truncated": [False, False]}
        )
    assert out.rewards["format"] == [1.0, 0.0]
    assert out.rewards["budget"] == [0.0, -1.0]
    assert out.total == [1.0, -1.0]  # format + budget; length has weight 0


@pytest.mark.parametrize("module_name", ["rewards.registry", "rewards.math", "rewards.format", "rewards.rubric"])
def test_docstring_examples_run(module_name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module_name))
    assert result.attempted > 0 and result.failed == 0
