"""Multi-turn, tool-using episodes (DESIGN.md 2.6): environments, tools and the episode loop.

- `environment`: `load_env` resolves and checks an `env:` class; `EnvSpec` holds its tools and their schemas.
- `tools`: the tool-call format (`PARSERS`, Hermes by default), the built-in `calculator` and `python` tools, and
  `ToolRunner`, which runs calls with a deadline.
- `episode`: `run_episodes`, the policy's turns and the tools' answers as one `Rollout` row per episode.
- `builtin`: the environments rlk2 ships (the agent demo's).
"""

from rlk2.envs.environment import EnvSpec, load_env
from rlk2.envs.episode import (
    Episode,
    PausedGroups,
    SampledTurns,
    ScriptedTurns,
    as_rollout,
    continuation_ids,
    end_episodes,
    episode_stats,
    play,
    run_episodes,
    stale_mask,
    start_episodes,
    unscorable,
)
from rlk2.envs.tools import BUILTIN_TOOLS, PARSERS, ToolCall, ToolRunner, calculator, format_hermes, parse_hermes

__all__ = [
    "BUILTIN_TOOLS",
    "PARSERS",
    "EnvSpec",
    "Episode",
    "PausedGroups",
    "SampledTurns",
    "ScriptedTurns",
    "ToolCall",
    "ToolRunner",
    "as_rollout",
    "calculator",
    "continuation_ids",
    "episode_stats",
    "end_episodes",
    "format_hermes",
    "load_env",
    "parse_hermes",
    "play",
    "run_episodes",
    "stale_mask",
    "start_episodes",
    "unscorable",
]
