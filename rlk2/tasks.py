"""A run's tasks as the loop uses them: training rows, reward specs, the held-out evaluation task, how to score.

`load_tasks` reads and checks everything a user can get wrong about a task (rows, columns, rewards, the sandbox the
`code` reward needs) before anything is written; `Task` then carries what each phase of the loop needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rewards import RewardEngine, RewardSpec, required_columns, resolve_reward
from rewards.code import code as code_reward
from rlk2.config import TaskConfig
from rlk2.data import load_task_split, split_overlap
from rlk2.envs import EnvSpec, load_env
from rlk2.errors import UserError
from rlk2.eval.evaluate import EvalTask
from rlk2.eval.tasks import build_eval_task, from_run_task
from rlk2.rollout.text import encode_prompts
from sandboxes import SandboxError, choose_backend, probe


@dataclass
class Task:
    cfg: TaskConfig
    specs: list[RewardSpec]
    """The task's rewards; the first decides pass / fail in evaluation."""
    rows: list[dict]
    """Training rows (prompt, reward columns, and `completion` for built-in tasks)."""
    eval: EvalTask
    """The held-out split as an evaluation task (the same rewards)."""
    overlap: bool
    """Every reward runs in the worker processes: the task is scored while the next task generates."""
    streamed: bool
    """... and each reward scores samples one by one: each response is scored as soon as it ends."""
    env: EnvSpec | None = None
    """Multi-turn episodes in this environment (rlk2.envs) instead of single-turn completions."""

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def rubric(self) -> bool:
        """Scored by the rubric reward (the critic's time counts as critic time)."""
        return any(metric_name(s.name) == "rubric" for s in self.specs)


def load_tasks(tasks: list[TaskConfig], engine: RewardEngine, *, note=print) -> list[Task]:
    """Every task's rows and rewards, checked; built-in code tasks without a working sandbox are left out with a
    `note` (a user's own code task is an error instead: never a run whose code rewards are all None)."""
    out = []
    sandbox: str | None | bool = False  # not probed yet
    for i, task in enumerate(tasks):
        specs = [RewardSpec(r.name, r.weight, r.timeout_s, dict(r.kwargs)) for r in task.rewards]
        if any(resolve_reward(s.name) is code_reward for s in specs):
            sandbox = _sandbox_problem() if sandbox is False else sandbox
            if sandbox and task.source.startswith("builtin:"):
                note(
                    f"note: no sandbox backend works here ({sandbox}); the '{task.name}' code task is left out "
                    "(see `rlk2 sandbox doctor`)"
                )
                continue
            if sandbox:
                raise UserError(
                    f"tasks[{i}] ({task.name}): the code reward needs a sandbox and none works here "
                    f"({sandbox}); see `rlk2 sandbox doctor`"
                )
        env = None
        if task.env:
            env = load_env(task.env, tools=list(task.tools), parser=task.tool_parser, where=f"tasks[{i}].env")
            if any(s.name == "env" for s in specs) and not env.has_reward:
                raise UserError(f"tasks[{i}].rewards: reward 'env' but {task.env} has no reward(messages, **row)")
        made = {"env_reward"} if env else set()  # columns the episode loop adds
        needed = sorted({c for s in specs for c in required_columns(resolve_reward(s.name))} - made)
        rows, held = load_task_split(task.source, eval_size=task.eval_size, needed=needed)
        columns = sorted(({k for r in rows[:1] for k in r} - {"prompt", "completion"}) | made)
        engine.check_columns(specs, columns, where=f"task '{task.name}' ({task.source})")
        if repeated := split_overlap(rows, held):
            note(
                f"warning: task '{task.name}': {repeated} of its {len(held)} held-out prompts also occur among its "
                f"training prompts ({task.source} repeats them), so eval/{task.name}/* is not fully held out"
            )
        evaluation = build_eval_task(from_run_task(task), engine)
        overlap = engine.runs_apart(specs) and env is None  # episodes are scored once they have all ended
        out.append(Task(task, specs, rows, evaluation, overlap, overlap and engine.elementwise(specs), env))
    if not out:
        raise UserError("tasks: no task left to train (every task needs a sandbox, and none works here)")
    return out


def check_prompt_lengths(tasks: list[Task], tokenizer, limit: int | None, *, chat_template: bool) -> None:
    """Every prompt of every task (training and held-out) plus the task's token budget fits the model's context,
    or a one-line error names the task and the prompt (instead of a run that trains on cut-off sequences)."""
    for task in tasks:
        prompts = [r["prompt"] for r in task.rows] + list(task.eval.prompts)
        # All prompts' raw lengths in one batched call, then the exact chat-template encoding of the longest few
        # (the template adds the same tokens to every prompt, up to merges at its seams) and of the shortest.
        raw = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        shortest = min(range(len(prompts)), key=lambda i: len(raw[i]))
        if not encode_prompts(tokenizer, [prompts[shortest]], chat_template=chat_template)[0]:
            raise UserError(
                f"task '{task.name}': the prompt {prompts[shortest]!r} encodes to no token at all; "
                "give it text (or use the chat template)"
            )
        if not limit:
            continue
        for i in sorted(range(len(prompts)), key=lambda i: -len(raw[i]))[:16]:
            n = len(encode_prompts(tokenizer, [prompts[i]], chat_template=chat_template)[0])
            if n + task.cfg.max_new_tokens > limit:
                raise UserError(
                    f"task '{task.name}': a prompt of {n} tokens plus max_new_tokens={task.cfg.max_new_tokens} "
                    f"exceeds the model's context of {limit} tokens ({prompts[i][:60]!r}...); shorten the prompt "
                    "or lower max_new_tokens"
                )


def bind_critic(tasks: list[Task], critic) -> None:
    """Give the rubric rewards that name `backend: self` the live policy's critic object (rlk2.critic.PolicyCritic),
    in training and evaluation alike: the reward then judges with the weights of the moment."""
    for task in tasks:
        task.specs = _bound(task.specs, critic)
        task.eval.specs = _bound(list(task.eval.specs), critic)


def _bound(specs: list[RewardSpec], critic) -> list[RewardSpec]:
    return [
        dataclasses.replace(s, kwargs={**s.kwargs, "backend": critic})
        if metric_name(s.name) == "rubric" and s.kwargs.get("backend", "self") == "self"
        else s
        for s in specs
    ]


def reward_inputs(group_rows: list[dict], k: int) -> tuple[list[str], dict[str, list]]:
    """The prompts and dataset columns (answer, tests, ...) of K samples per row, as the reward engine takes them."""
    rows = [r for r in group_rows for _ in range(k)]
    columns = {c: [r.get(c) for r in rows] for c in rows[0] if c not in ("prompt", "completion")}
    return [r["prompt"] for r in rows], columns


def metric_name(reward_name: str) -> str:
    """`rewards/<name>/...` uses the function's own name for `pkg.module:fn` and `path/file.py:fn` rewards."""
    return reward_name.rsplit(":", 1)[-1]


def _sandbox_problem() -> str | None:
    """None when the sandbox backend the code reward would open works here, else why not (one line)."""
    try:
        name = choose_backend()
    except SandboxError as exc:
        return " ".join(str(exc).split())
    problem = probe()[name]
    return f"{name}: {' '.join(problem.split())}" if problem else None
