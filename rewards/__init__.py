"""Reward functions and the engine that scores them (DESIGN.md 2.3).

A reward is a plain function over a batch::

    def my_reward(completions: list[str], *, prompts: list[str], **columns) -> list[float | None]

`columns` are the dataset columns of each row as keyword arguments (lists aligned with `completions`); the
function names the ones it needs (`answer`, `tests`, ...). `async def` is allowed. `None` means unscorable
(infrastructure error, unparsable gold): the training loop leaves the sample out of its group's baseline and
counts it in `frac_unscorable`. An exception never becomes 0.0: the engine turns it into `None` plus a counted,
logged error with the reward's name. A reward may instead return `{"rewards": [...], "errors": [...],
"extras": {...}}` to report per-sample reasons (e.g. math's "timeout" for a 0.0) and extra per-sample info.

A reward is selected by a name in `REWARDS` (a plain dict), by a dotted path `package.module:function`, by a
file `path/to/rewards.py:function` (handy while debugging with `rlk2 score`), or by a Python entry point in group
`rlk2.rewards`, so a third-party package can ship rewards without touching rlk2::

    [project.entry-points."rlk2.rewards"]
    my_reward = "my_pkg.rewards:my_reward"

How the engine runs a reward (worker process or caller, per sample or per batch, the score a timed-out sample
gets) is declared with `reward_traits` (see `rewards.engine`); the defaults are the safe ones.
"""

from rewards.engine import RewardEngine, RewardSpec, ScoreBatch
from rewards.format import budget, budget_penalty, format_reward, length_reward
from rewards.registry import ENTRY_POINT_GROUP, REWARDS, describe_reward, list_rewards, required_columns, resolve_reward
from rewards.traits import RewardError, reward_traits, traits_of

__all__ = [
    "ENTRY_POINT_GROUP",
    "REWARDS",
    "RewardEngine",
    "RewardError",
    "RewardSpec",
    "ScoreBatch",
    "budget",
    "budget_penalty",
    "describe_reward",
    "format_reward",
    "length_reward",
    "list_rewards",
    "required_columns",
    "resolve_reward",
    "reward_traits",
    "traits_of",
]
