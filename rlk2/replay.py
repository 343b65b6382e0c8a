"""`rlk2 episode --env SPEC [--input FILE]`: try an environment offline, with scripted assistant turns.

Each input line is `{"row": {...}, "assistant": ["turn 1", "turn 2", ...]}`: the row goes to `reset(**row)`, the
turns are played in order through the same episode loop as training (tool calls parsed, tools run with their
deadline, answers appended), and one JSON line per input line comes out, in order:
`{"messages": [...], "reward": ..., "rewards": {...}, "turns": n, "tool_calls": n, "tool_errors": n,
"truncated": bool, "error": ...}`. `reward` is the environment's own `reward(messages, **row)` (null when it has
none or it failed); `--reward NAME` adds task rewards scored on the last assistant message, as training would.
"""

from __future__ import annotations

import argparse
import json
import sys

from rewards import RewardEngine, RewardError, RewardSpec, resolve_reward
from rlk2.envs import ScriptedTurns, ToolRunner, load_env, run_episodes
from rlk2.errors import UserError
from rlk2.policy.demo import build_tokenizer
from sandboxes.jsonl import JsonlError, iter_jsonl


def read_scripts(stream, source: str) -> list[dict]:
    """The input lines, every one checked before anything runs (a bad line is one UserError naming it)."""
    out = []
    try:
        for lineno, line in iter_jsonl(stream, source):
            if not isinstance(line.get("row"), dict):
                raise UserError(f"{source}:{lineno}: field 'row' must be an object (the columns reset(**row) takes)")
            turns = line.get("assistant")
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise UserError(f"{source}:{lineno}: field 'assistant' must be a list of strings (the turns)")
            out.append(line)
    except JsonlError as exc:
        raise UserError(str(exc)) from None
    return out


def run(args: argparse.Namespace) -> int:
    """`rlk2 episode` (arguments: rlk2.cli)."""
    tools = [t for t in (args.tools or "").split(",") if t]
    spec = load_env(args.env, tools=tools, parser=args.tool_parser, where="--env")
    if args.tool_timeout <= 0:
        raise UserError("--tool-timeout: must be > 0")
    specs = [RewardSpec(name) for name in args.reward]
    for s in specs:
        try:
            resolve_reward(s.name)
        except RewardError as exc:
            raise UserError(f"--reward: {exc}") from None
    if args.input:
        try:
            with open(args.input) as f:
                lines = read_scripts(f, args.input)
        except OSError as exc:
            raise UserError(f"--input {args.input}: {exc.strerror}") from None
    else:
        lines = read_scripts(sys.stdin, "<stdin>")
    if not lines:
        return 0
    # Scripted turns need token ids only to keep the episode loop's bookkeeping: a character-level tokenizer does.
    tokenizer = build_tokenizer([""])
    scripts = [line["assistant"] for line in lines]
    runner = ToolRunner(args.tool_timeout)
    try:
        _, episodes = run_episodes(
            ScriptedTurns(tokenizer, scripts),
            tokenizer,
            spec,
            [line["row"] for line in lines],
            max_turns=max(len(s) for s in scripts) + 1,
            runner=runner,
            describe_tools="none",
        )
    finally:
        runner.close()
    task_scores = _task_rewards(specs, episodes, lines) if specs else {}
    for j, ep in enumerate(episodes):
        out = {
            "messages": ep.messages,
            "reward": ep.reward,
            "rewards": {name: vals[j] for name, vals in task_scores.items()},
            "turns": ep.turns,
            "tool_calls": ep.tool_calls,
            "tool_errors": ep.tool_errors,
            "truncated": ep.truncated,
            "error": ep.error or ep.reward_error,
        }
        print(json.dumps(out), flush=True)
    return 0


def _task_rewards(specs: list[RewardSpec], episodes, lines: list[dict]) -> dict[str, list]:
    engine = RewardEngine(num_workers=1)
    try:
        rows = [line["row"] for line in lines]
        names = sorted({c for r in rows for c in r} - {"prompt", "completion"})
        columns = {c: [r.get(c) for r in rows] for c in names}
        columns["env_reward"] = [e.reward for e in episodes]
        try:
            scored = engine.score(
                specs, [e.final_text for e in episodes], [str(r.get("prompt", "")) for r in rows], columns
            )
        except RewardError as exc:
            raise UserError(str(exc).splitlines()[0]) from None
        return scored.rewards
    finally:
        engine.close()
