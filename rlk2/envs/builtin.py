"""Environments rlk2 ships: `Question`, the plainest one (the row's prompt is the first message; the tools come from
the task's `tools:`), used by the agent demo (`configs/demo_agent.yaml`)."""

from __future__ import annotations


class Question:
    """One user question per episode, from the row's `prompt`; no tools of its own and no reward of its own (the
    task's `tools:` and `rewards:` supply both)."""

    def reset(self, prompt: str, **row) -> str:
        return prompt
