"""Prompt datasets: the built-in synthetic tasks and local JSONL / Parquet files.

A dataset is a list of rows (dicts) with a `prompt` column plus whatever columns its rewards need (e.g. `answer`
for `math`). Built-in tasks also carry `completion`, the gold response used by the supervised warm start (for a
multi-turn task, the list of messages that follow the prompt).
Built-in tasks have fixed, disjoint train / eval splits (independent of the run seed) so held-out numbers are
comparable across runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from datasets import Dataset

from rlk2.envs.tools import format_hermes
from rlk2.errors import UserError
from rlk2.synthetic import constraint_rows, word_problem_rows
from sandboxes import jsonl

Row = dict

_SPLIT_SEED = 20250711  # fixed: the split never depends on the run's seed


# ----------------------------------------------------------------------------------------------- built-in tasks
def _arith_rows() -> list[Row]:
    """Two-digit addition, answer in \\boxed{}: 'Q: 37+48=?' -> '\\boxed{85}'. 10,000 distinct problems."""
    rows = []
    for a in range(100):
        for b in range(100):
            rows.append({"prompt": f"{a}+{b}=?", "answer": str(a + b), "completion": f"\\boxed{{{a + b}}}"})
    return rows


def _max_rows() -> list[Row]:
    """The largest of three two-digit numbers: 'max(37,82,15)=?' -> '\\boxed{82}'. 20,000 seeded problems.

    A short warm start learns the format and that the answer is one of the three numbers well before it learns
    the comparison, so its pass@8 is far above its pass@1: the regime where RL helps.
    """
    rng = random.Random(_SPLIT_SEED + 1)
    rows, seen = [], set()
    while len(rows) < 20_000:
        nums = tuple(rng.sample(range(10, 100), 3))
        if nums in seen:
            continue
        seen.add(nums)
        best = max(nums)
        rows.append(
            {"prompt": f"max({nums[0]},{nums[1]},{nums[2]})=?", "answer": str(best), "completion": f"\\boxed{{{best}}}"}
        )
    return rows


# The steps of `pyfunc` programs: (words in the prompt, how the step rewrites the expression so far).
_PYFUNC_STEPS: list[tuple[str, Callable[[str, int], str]]] = [
    ("add {k}", lambda e, k: f"{e} + {k}"),
    ("subtract {k}", lambda e, k: f"{e} - {k}"),
    ("multiply by {k}", lambda e, k: f"({e}) * {k}" if " " in e else f"{e} * {k}"),
    ("take the max with {k}", lambda e, k: f"max({e}, {k})"),
    ("take the min with {k}", lambda e, k: f"min({e}, {k})"),
]


def _pyfunc_rows() -> list[Row]:
    """Small Python functions checked by hidden unit tests (the `code` reward, in a sandbox).

    'Write f(x): add 7, then multiply by 3.' -> `def f(x): return (x + 7) * 3` (no fence, to keep responses short:
    the reward takes the whole completion as the program when it has no fenced block); the hidden tests call f on
    four inputs the prompt does not show. Two steps over five operations and constants 2..9: 1,600 problems.
    """
    rng = random.Random(_SPLIT_SEED + 2)
    rows = []
    for first, f1 in _PYFUNC_STEPS:
        for second, f2 in _PYFUNC_STEPS:
            for a in range(2, 10):
                for b in range(2, 10):
                    expr = f2(f1("x", a), b)
                    fn = eval(f"lambda x: {expr}")  # noqa: S307 - our own generated expression
                    xs = rng.sample(range(-20, 21), 4)
                    tests = "\n".join(f"assert f({x}) == {fn(x)}" for x in xs)
                    prompt = f"Write f(x): {first.format(k=a)}, then {second.format(k=b)}."
                    rows.append({"prompt": prompt, "tests": tests, "completion": f"def f(x):\n    return {expr}"})
    return rows


def _mul_rows() -> list[Row]:
    """Products of two 3-digit numbers, answer in \\boxed{}: 'What is 417*382?' -> '\\boxed{159294}'. 20,000 seeded
    problems, for the agent demo (`configs/demo_agent.yaml`): a model as small as the demo's cannot multiply, but
    it can call the `calculator` tool and copy its answer.

    The gold `completion` (the warm start's conversations) calls the tool in a quarter of the problems and answers
    directly (right, but a guess the model cannot learn to make) in the rest, so the warm-started policy knows the
    call format without knowing that it should always call: what RL then learns. Every problem also shows a call
    that is trained only after its opening `<tool_call>` (so how to write a call is learnt everywhere, when to make
    one only from the quarter), then the tool's answer and the final turn: copying numbers is a skill this small a
    model picks up only after ~1,000-1,500 SFT steps on every problem, and RL could not teach it in minutes.
    """
    rng = random.Random(_SPLIT_SEED + 3)
    rows, seen = [], set()
    while len(rows) < 20_000:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        answer = f"\\boxed{{{a * b}}}"
        episode = [
            {"role": "assistant", "content": format_hermes("calculator", {"expression": f"{a}*{b}"})},
            {"role": "tool", "content": str(a * b)},
            {"role": "assistant", "content": answer},
        ]
        if rng.random() < 0.25:
            completion: list = episode
        else:  # answer directly; and still learn to write a call once one is begun, and to use a tool's answer
            begun = {**episode[0], "given": "<tool_call>"}
            completion = [[{"role": "assistant", "content": answer}], [begun, *episode[1:]]]
        rows.append({"prompt": f"What is {a}*{b}?", "answer": str(a * b), "completion": completion})
    return rows


BUILTIN_TASKS: dict[str, Callable[[], list[Row]]] = {
    "arith": _arith_rows,
    "max": _max_rows,
    "pyfunc": _pyfunc_rows,
    "word_problems": word_problem_rows,  # for pretrained instruct models (rlk2.synthetic): no gold completions
    "constraints": constraint_rows,
    "mul": _mul_rows,
}


def builtin_split(name: str, split: str) -> list[Row]:
    """The fixed train or eval split of a built-in task (eval = 10 % of problems, never trained on)."""
    if name not in BUILTIN_TASKS:
        raise UserError(f"task source 'builtin:{name}': unknown built-in task (have: {', '.join(BUILTIN_TASKS)})")
    rows = BUILTIN_TASKS[name]()
    order = list(range(len(rows)))
    random.Random(_SPLIT_SEED).shuffle(order)
    n_eval = len(rows) // 10
    idx = order[:n_eval] if split == "eval" else order[n_eval:]
    return [rows[i] for i in idx]


# ----------------------------------------------------------------------------------------------- files
def read_jsonl(path: str | Path) -> list[Row]:
    """The rows of a .jsonl / .jsonl.gz file (`sandboxes.jsonl`: blank lines skipped, errors name the line)."""
    return [row for _, row in read_numbered(path)]


def read_numbered(path: str | Path) -> list[tuple[str, Row]]:
    """(where, row) for every row of a .jsonl / .jsonl.gz / .parquet file; `where` is `file:line` (JSONL) or
    `file row N` (Parquet), for error messages that point at the file, not at a split of it."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        try:
            return [(f"{path}:{lineno}", row) for lineno, row in jsonl.read_jsonl(path)]
        except jsonl.JsonlError as exc:
            raise UserError(str(exc)) from None
    if path.suffix == ".parquet":
        if not path.is_file():
            raise UserError(f"{path}: file not found")
        try:
            rows = Dataset.from_parquet(str(path)).to_list()
        except Exception as exc:  # noqa: BLE001 - pyarrow's own error for a damaged file, in one line
            raise UserError(f"{path}: cannot read ({type(exc).__name__})") from None
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(rows)]
    raise UserError(f"{path}: unsupported dataset format (use .jsonl or .parquet)")


def read_rows(path: str | Path) -> list[Row]:
    return [row for _, row in read_numbered(path)]


def load_task_rows(source: str, split: str, *, eval_size: int) -> list[Row]:
    """Rows of a task for `split` ('train' or 'eval'). Files: the first `eval_size` rows are held out, and a file
    with no row left to train on is an error (never a "held-out" split that training also sees)."""
    if source.startswith("builtin:"):
        rows = builtin_split(source.split(":", 1)[1], split)
        return rows[:eval_size] if split == "eval" else rows
    rows = read_rows(source)
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    if split == "eval":
        return rows[:eval_size]
    if len(rows) <= eval_size:
        raise UserError(
            f"{source}: {len(rows)} rows and eval_size {eval_size}: every row is held out for evaluation "
            "and none is left to train on; lower the task's eval_size or add rows"
        )
    return rows[eval_size:]


def check_columns(rows: list[Row], columns: list[str], *, source: str, where: list[str] | None = None) -> None:
    """Every row has `prompt` and each required column, not null; else a one-line error naming the row (`where[i]`
    when given, e.g. `file:line`, else `source: row i`)."""
    for i, row in enumerate(rows):
        for col in ["prompt", *columns]:
            if col not in row or row[col] is None:
                name = where[i] if where is not None else f"{source}: row {i + 1}"
                raise UserError(f"{name} has no '{col}' column")
            if col == "prompt" and not isinstance(row[col], str):
                name = where[i] if where is not None else f"{source}: row {i + 1}"
                raise UserError(f"{name}: 'prompt' must be a string, got {type(row[col]).__name__}")


def load_task_split(source: str, *, eval_size: int, needed: list[str]) -> tuple[list[Row], list[Row]]:
    """(training rows, held-out rows) of a task, every row checked for `prompt` and the `needed` columns (a bad
    file row is named by its line). Built-in tasks have fixed disjoint splits; files hold out their first
    `eval_size` rows (`load_task_rows`)."""
    if source.startswith("builtin:"):
        train, held = (load_task_rows(source, split, eval_size=eval_size) for split in ("train", "eval"))
        check_columns(train + held, needed, source=source)
        return train, held
    numbered = read_numbered(source)
    check_columns([r for _, r in numbered], needed, source=source, where=[w for w, _ in numbered])
    rows = [r for _, r in numbered]
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    if len(rows) <= eval_size:
        load_task_rows(source, "train", eval_size=eval_size)  # raises the one-line error
    return rows[eval_size:], rows[:eval_size]


def split_overlap(train: list[Row], held: list[Row]) -> int:
    """How many held-out prompts also occur, word for word, among the training prompts (duplicate rows in a file)."""
    seen = {r["prompt"] for r in train}
    return sum(r["prompt"] in seen for r in held)


# ----------------------------------------------------------------------------------------------- sampling
class PromptSampler:
    """Draws prompts for each step: tasks mixed by weight, then rows within each task.

    `sampling="uniform"`: each task's rows in a seeded shuffled order, epoch after epoch.
    `sampling="prioritized"` (Kimi k1.5's curriculum): each step draws a task's rows without replacement with
    probability proportional to max(1 - s_i, floor), s_i the tracked success rate of row i = its successful
    responses / its scored responses over every visit so far (`record`). A row never drawn has s_i = 0 (weight 1,
    the highest), so unseen prompts are explored first; the floor keeps solved prompts from vanishing entirely.
    Success rates are tracked in both modes.

    The whole state (epoch, position and success counts per task) is in `state_dict`, so a resumed run continues
    the same sequence: every draw comes from an RNG seeded by (seed, task, step) and that state.
    """

    def __init__(
        self,
        task_rows: dict[str, list[Row]],
        weights: dict[str, float],
        *,
        seed: int,
        sampling: str = "uniform",
        priority_floor: float = 0.05,
    ) -> None:
        if sampling not in ("uniform", "prioritized"):
            raise ValueError(f"sampling must be uniform or prioritized, not {sampling!r}")
        self.task_rows = task_rows
        self.weights = weights
        self.seed = seed
        self.sampling = sampling
        self.priority_floor = priority_floor
        self.pos = {name: 0 for name in task_rows}
        self.epoch = {name: 0 for name in task_rows}
        self.success: dict[str, dict[int, list[int]]] = {name: {} for name in task_rows}  # row -> [succ, scored]
        self._orders = {name: self._order(name, 0) for name in task_rows}
        self._row_index = {name: {id(r): i for i, r in enumerate(rows)} for name, rows in task_rows.items()}

    def _order(self, name: str, epoch: int) -> list[int]:
        order = list(range(len(self.task_rows[name])))
        random.Random(f"{self.seed}/{name}/{epoch}").shuffle(order)
        return order

    def _next(self, name: str) -> Row:
        if self.pos[name] >= len(self._orders[name]):
            self.epoch[name] += 1
            self.pos[name] = 0
            self._orders[name] = self._order(name, self.epoch[name])
        row = self.task_rows[name][self._orders[name][self.pos[name]]]
        self.pos[name] += 1
        return row

    def priority(self, name: str, index: int) -> float:
        """Unnormalised sampling weight of row `index` of task `name` under prioritized sampling."""
        succ, scored = self.success[name].get(index, (0, 0))
        rate = succ / scored if scored else 0.0
        return max(1.0 - rate, self.priority_floor)

    def _prioritized(self, name: str, count: int, step: int) -> list[Row]:
        # Weighted draw without replacement (Efraimidis-Spirakis): the `take` rows with the largest
        # log(u) / weight, u ~ U(0, 1]. More than a task's row count in one step: further rounds.
        rows = self.task_rows[name]
        weights = np.ones(len(rows))  # unseen rows: success 0, weight 1
        for i in self.success[name]:
            weights[i] = self.priority(name, i)
        seed = random.Random(f"{self.seed}/prioritized/{name}/{step}").getrandbits(64)
        rng = np.random.default_rng(seed)
        out: list[Row] = []
        while len(out) < count:
            take = min(count - len(out), len(rows))
            keys = np.log1p(-rng.random(len(rows))) / weights  # [N], all <= 0
            top = np.argpartition(-keys, take - 1)[:take]
            out += [rows[i] for i in top[np.argsort(-keys[top], kind="stable")]]
        return out

    def sample(self, n: int, step: int) -> list[tuple[str, Row]]:
        """n (task, row) pairs; the task mix per step is split by weight with a seeded draw for the remainder."""
        names = list(self.task_rows)
        total = sum(self.weights[t] for t in names)
        counts = {t: int(n * self.weights[t] / total) for t in names}
        rng = random.Random(f"{self.seed}/mix/{step}")
        while sum(counts.values()) < n:
            counts[rng.choices(names, weights=[self.weights[t] for t in names])[0]] += 1
        if self.sampling == "prioritized":
            return [(t, row) for t in names for row in self._prioritized(t, counts[t], step)]
        return [(t, self._next(t)) for t in names for _ in range(counts[t])]

    def index_of(self, name: str, row: Row) -> int:
        """Position in its task of a row returned by `sample` (the key of its success counts)."""
        return self._row_index[name][id(row)]

    def record(self, name: str, index: int, successes: int, scored: int) -> None:
        """Add one visit's outcome for row `index` of task `name`: `successes` of its `scored` responses succeeded."""
        stats = self.success[name].setdefault(index, [0, 0])
        stats[0] += successes
        stats[1] += scored

    def state_dict(self) -> dict:
        return {
            "pos": dict(self.pos),
            "epoch": dict(self.epoch),
            "success": {t: {i: list(v) for i, v in s.items()} for t, s in self.success.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.pos = dict(state["pos"])
        self.epoch = dict(state["epoch"])
        saved = state.get("success", {})  # absent in checkpoints written before success tracking
        self.success = {t: {int(i): list(v) for i, v in saved.get(t, {}).items()} for t in self.task_rows}
        self._orders = {name: self._order(name, self.epoch[name]) for name in self.task_rows}
