r"""Shape rewards: `format` (is there a final answer where the grader looks?), `length` (Kimi k1.5's
group-relative length penalty) and `budget` (K2's per-task token budget: a truncated response is penalised).

All three are cheap pure-Python functions over strings and numbers, so they run in the caller's process
(`run_in="caller"`), with no worker round trip. `length` compares the completions of one prompt with each
other, so it always sees the whole batch.

>>> format_reward([r"so \boxed{4}", "four", r"\boxed{}"], prompts=[""] * 3)
[1.0, 0.0, 0.0]
>>> length_reward(["ab", "abcd", "abcdef"], prompts=["p"] * 3)
[0.0, 0.0, -0.5]
>>> budget_penalty([10, 50, 20], [False, True, False], budget=32, penalty=-1.0)
[0.0, -1.0, 0.0]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.math import last_boxed
from rewards.traits import RewardError, reward_traits


@reward_traits(run_in="caller")
def format_reward(
    completions: list[str], *, prompts: list[str] | None = None, pattern: str | None = None, **_: Any
) -> list[float]:
    r"""1.0 if the completion ends in a non-empty `\boxed{...}` answer (or fully matches `pattern`), else 0.0.

    `pattern` is a regular expression matched against the whole completion (DOTALL), e.g.
    `"<think>.*</think>.*\\\\boxed\\{.+\\}.*"` for a reasoning format.
    """
    if pattern is not None:
        try:
            regex = re.compile(pattern, re.DOTALL)
        except re.error as exc:
            raise RewardError(f"format: bad pattern {pattern!r}: {exc}") from None
        return [1.0 if regex.fullmatch(c.strip()) else 0.0 for c in completions]
    out = []
    for c in completions:
        boxed = last_boxed(c)
        out.append(1.0 if boxed is not None and boxed.strip() else 0.0)
    return out


@reward_traits(run_in="caller", whole_batch=True)
def length_reward(
    completions: list[str],
    *,
    prompts: list[str],
    num_tokens: list[int] | None = None,
    correct: list[Any] | None = None,
    **_: Any,
) -> list[float]:
    """Kimi k1.5's length reward, over the completions that share a prompt (a rollout group).

    With lengths len_i in a group, lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len) (0 when all tie).
    A correct response gets lambda_i, an incorrect one min(0, lambda_i). Without a `correct` column every
    response is treated as incorrect, i.e. only the longer-than-average ones are penalised (never a bonus for
    being short and wrong). Lengths are `num_tokens` when given, else characters.
    """
    lengths = list(num_tokens) if num_tokens is not None else [len(c) for c in completions]
    flags = [bool(x) for x in correct] if correct is not None else [False] * len(completions)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = [0.0] * len(completions)
    for members in groups.values():
        lo = min(lengths[i] for i in members)
        hi = max(lengths[i] for i in members)
        if hi == lo:
            continue
        for i in members:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = lam if flags[i] else min(0.0, lam)
    return out


def budget_penalty(
    num_tokens: Sequence[int], truncated: Sequence[bool], *, budget: int | Sequence[int], penalty: float
) -> list[float]:
    """K2 budget control: `penalty` for a response that was truncated or went over its token budget, else 0.0.

    `budget` is one number or one per sample (per-task budgets). The loop adds this to the total reward and may
    also mask the loss of truncated responses; the rule itself is this pure function.
    """
    n = len(num_tokens)
    if len(truncated) != n:
        raise ValueError(f"budget_penalty: {len(truncated)} truncated flags for {n} token counts")
    budgets = [budget] * n if isinstance(budget, (int, float)) else list(budget)
    if len(budgets) != n:
        raise ValueError(f"budget_penalty: {len(budgets)} budgets for {n} token counts")
    return [float(penalty) if (cut or tokens > b) else 0.0 for tokens, cut, b in zip(num_tokens, truncated, budgets)]


@reward_traits(run_in="caller")
def budget(
    completions: list[str],
    *,
    prompts: list[str] | None = None,
    num_tokens: list[int],
    truncated: list[bool],
    token_budget: list[int] | None = None,
    budget: int | None = None,
    penalty: float = -1.0,
    **_: Any,
) -> list[float]:
    """Budget control as a reward: `penalty` when a response was truncated or exceeds its token budget.

    `num_tokens` and `truncated` are per-sample columns the training loop supplies; the budget is the row's
    `token_budget` column when the dataset has one (per-task budgets), else the `budget` option.
    """
    if token_budget is not None:
        budgets: list[int] | int = [int(b) if b is not None else (budget or 2**62) for b in token_budget]
    elif budget is not None:
        budgets = int(budget)
    else:
        budgets = 2**62  # no budget: only truncation is penalised
    return budget_penalty(num_tokens, truncated, budget=budgets, penalty=penalty)


@reward_traits(run_in="caller", elementwise=True)
def env_reward(completions: list[str], *, prompts: list[str], env_reward: list[float | None], **_: Any) -> list:
    """An environment's own reward (`reward(messages, **row)`, DESIGN.md 2.6), computed by the episode loop when
    each episode ended; the column `env_reward` carries it here, so it is weighted, logged and counted like any
    other reward. None (the environment raised, or said the episode cannot be scored) stays None."""
    if len(env_reward) != len(completions):
        raise RewardError(f"env: {len(env_reward)} env_reward values for {len(completions)} completions")
    return [None if v is None else float(v) for v in env_reward]
