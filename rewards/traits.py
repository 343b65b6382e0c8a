"""How the engine runs a reward (its traits), and the error a reward's configuration raises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


class RewardError(ValueError):
    """A reward cannot be used as configured (unknown name, missing column, bad option). One-line message."""


@dataclass(frozen=True)
class RewardTraits:
    run_in: Literal["worker", "caller"] = "worker"
    """"worker": a killable worker process (default). "caller": this process, for stateful or trivial rewards."""
    elementwise: bool = False
    """Scores each sample independently: the engine may call it per sample and charges a timeout to one sample."""
    timeout_score: float | None = None
    """Score of a sample whose own evaluation timed out (elementwise only); None = unscorable."""
    whole_batch: bool = False
    """Never split the batch into chunks (group-relative rewards that compare completions of one prompt)."""
    shortcut: Callable[[str, dict], float | None] | None = None
    """Elementwise rewards: `shortcut(completion, row)` (row = the sample's dataset columns) gives the final score
    of the samples it can decide at a glance, None for the rest, which go to the reward proper. It runs in this
    process before any dispatch, so it must be cheap and linear in the text: it exists for the common, trivial
    case (math's plain-integer answers), whose worker round trip would cost more than the check itself."""

    def __post_init__(self) -> None:
        if self.shortcut is not None and not self.elementwise:
            raise RewardError("reward_traits: a shortcut decides single samples, so it needs elementwise=True")


_TRAITS_ATTR = "__rlk2_reward_traits__"


def reward_traits(**traits: Any) -> Callable[[Callable], Callable]:
    """Decorator declaring how the engine runs a reward, e.g. `@reward_traits(elementwise=True)`."""
    value = RewardTraits(**traits)

    def mark(fn: Callable) -> Callable:
        setattr(fn, _TRAITS_ATTR, value)
        return fn

    return mark


def traits_of(fn: Callable) -> RewardTraits:
    return getattr(fn, _TRAITS_ATTR, None) or RewardTraits()
