"""Evaluation of a policy on held-out tasks: one implementation for the training loop and `rlk2 eval`.

`evaluate_policy` generates `samples` completions per prompt (and one greedy) through `rlk2.rollout`, scores them
with the reward engine while the next batch generates, and returns `eval/<task>/<metric>` values
(`rlk2.eval.metrics`), per-sample records and throughput.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from rlk2.envs import SampledTurns, ToolRunner, run_episodes, unscorable
from rlk2.eval.metrics import TaskOutcome, extract_answer, task_metrics
from rlk2.rollout import encode_prompts, generate_rollouts


# ================================================================================================ data types
@dataclass
class EpisodeSettings:
    """How an environment task plays its episodes (rlk2.envs): the checked class, the rows `reset` takes, and the
    limits."""

    env: object  # rlk2.envs.EnvSpec
    rows: list[dict]
    max_turns: int
    tool_timeout_s: float
    describe_tools: str


@dataclass
class EvalTask:
    """A held-out task: prompts, the columns its rewards need, the rewards, and its token budget."""

    name: str
    prompts: list[str]
    columns: dict[str, list]
    specs: Sequence  # rewards.engine.RewardSpec; the first is the primary (pass / fail) reward
    max_new_tokens: int
    vote: str = "auto"
    """maj@n answers: "boxed" (last \\boxed{}), "none" (no maj@n), "auto" (boxed when the primary reward is math)."""
    episodes: EpisodeSettings | None = None
    """Set for an environment task: each sample is a multi-turn episode; None for single-turn prompts."""

    @property
    def vote_kind(self) -> str:
        if self.vote == "auto":
            return "boxed" if self.specs and self.specs[0].name == "math" else "none"
        return self.vote


@dataclass(frozen=True)
class Split:
    """Evaluation shared by the processes of a run: this one generates every `world`-th batch (from `rank`), and
    `gather(list)` returns the concatenation of every process's list (accelerate's `gather_object`)."""

    rank: int
    world: int
    gather: Callable[[list], list]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    samples: dict[str, list[dict]] = field(default_factory=dict)  # per task: one record per generated sample
    outcomes: dict[str, TaskOutcome] = field(default_factory=dict)
    timing: dict[str, dict[str, float]] = field(default_factory=dict)  # per task: sequences, tokens, seconds


# ================================================================================================ generation
def _merge_scores(parts: list) -> tuple[dict[str, list], dict[str, int]]:
    rewards: dict[str, list] = {}
    errors: dict[str, int] = {}
    for part in parts:
        for name, vals in part.rewards.items():
            rewards.setdefault(name, []).extend(vals)
        for name, cnt in part.errors.items():
            errors[name] = errors.get(name, 0) + cnt
    return rewards, errors


def evaluate_policy(
    model,
    tokenizer,
    tasks: Sequence[EvalTask],
    engine,
    *,
    samples: int,
    temperature: float,
    greedy: bool,
    batch_size: int,
    chat_template: bool,
    seed: int,
    ks: Sequence[int] = (1,),
    progress: bool = False,
    desc: str = "eval",
    split: Split | None = None,
) -> EvalResult:
    """Generate `samples` completions per prompt (batched) and score them; returns eval/<task>/<metric>.

    A batch is scored by the reward engine while the next one generates (`RewardEngine.score_later`). Seeds depend
    only on `seed` and the batch position, so a rerun gives the same numbers, and so does a run `split` over several
    processes (every process gets the whole result).
    """
    result = EvalResult({})
    total = sum(len(t.prompts) * (samples + int(greedy)) for t in tasks)
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True, leave=False)
    for task in tasks:
        ids = encode_prompts(tokenizer, task.prompts, chat_template=chat_template)
        t_task, outs = time.perf_counter(), {}
        for mode, reps in [("sample", samples)] + ([("greedy", 1)] if greedy else []):
            outs[mode] = _generate_and_score(
                model,
                tokenizer,
                task,
                ids,
                engine,
                reps=reps,
                greedy=mode == "greedy",
                temperature=temperature,
                batch_size=batch_size,
                seed=seed,
                bar=bar,
                chat_template=chat_template,
                split=split,
            )
        outcome = _outcome(task, outs)
        result.outcomes[task.name] = outcome
        result.metrics.update({f"eval/{task.name}/{key}": value for key, value in task_metrics(outcome, ks).items()})
        if task.episodes is not None:  # sampled episodes: how many turns and tool calls they took
            result.metrics[f"eval/{task.name}/turns"] = float(np.mean(outs["sample"]["turns"]))
            result.metrics[f"eval/{task.name}/tool_calls"] = float(np.mean(outs["sample"]["tool_calls"]))
        elapsed = time.perf_counter() - t_task
        sequences = len(task.prompts) * (samples + int(greedy))
        tokens = sum(sum(o["ntok"]) for o in outs.values())
        result.timing[task.name] = {
            "sequences": sequences,
            "tokens": tokens,
            "seconds": elapsed,
            "generate_s": sum(o["generate_s"] for o in outs.values()),
            "samples_per_s": sequences / elapsed if elapsed else 0.0,
            "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        }
        result.samples[task.name] = _records(task, outs)
    bar.close()
    return result


def _generate_and_score(
    model,
    tokenizer,
    task: EvalTask,
    ids: list[list[int]],
    engine,
    *,
    reps: int,
    greedy: bool,
    temperature: float,
    batch_size: int,
    seed: int,
    bar,
    chat_template: bool = True,
    split: Split | None = None,
) -> dict:
    """`reps` completions (episodes, for an environment task) of every prompt of `task`, scored; everything in
    prompt order. With `split`, this process generates every world-th batch and the batches are gathered: the same
    batches with the same seeds as one process, so the same numbers."""
    n = len(task.prompts)
    # Longest prompts first so each batch holds prompts of similar length (less left padding); the results are put
    # back in prompt order below.
    by_length = sorted(range(n), key=lambda i: -len(ids[i]))
    order = [i for i in by_length for _ in range(reps)]  # prompt index of each sequence
    starts = list(range(0, len(order), batch_size))
    if split is not None:
        starts = starts[split.rank :: split.world]
    done, t_gen = [], 0.0
    for start in starts:
        chunk = order[start : start + batch_size]
        t0 = time.perf_counter()
        out = _batch(model, tokenizer, task, ids, chunk, greedy, temperature, seed + start, chat_template)
        t_gen += time.perf_counter() - t0
        cols = out.pop("cols")
        out["scored"] = engine.score_later(list(task.specs), out["texts"], [task.prompts[i] for i in chunk], cols)
        done.append((start, out))
        bar.update(len(chunk))
    done = [(start, {**out, "scored": out["scored"].result()}) for start, out in done]
    if split is not None and split.world > 1:
        done = sorted(split.gather(done), key=lambda item: item[0])
    batches = [out for _, out in done]
    rewards, errors = _merge_scores([b["scored"] for b in batches])
    texts, ntok, trunc, turns, calls, failed = ([x for b in batches for x in b[key]] for key in _PER_SEQUENCE)
    if any(failed):  # an environment that raised: the episode is unscorable under every reward, never 0.0
        rewards = {name: [None if bad else v for v, bad in zip(vals, failed)] for name, vals in rewards.items()}
    back = sorted(range(len(order)), key=lambda j: order[j])  # stable: samples keep their order
    order, texts, ntok, trunc = ([xs[j] for j in back] for xs in (order, texts, ntok, trunc))
    rewards = {name: [vals[j] for j in back] for name, vals in rewards.items()}
    if turns:
        turns, calls = [turns[j] for j in back], [calls[j] for j in back]
    return {
        "turns": turns,
        "tool_calls": calls,
        "order": order,
        "texts": texts,
        "ntok": ntok,
        "trunc": trunc,
        "rewards": rewards,
        "errors": errors,
        "reps": reps,
        "generate_s": t_gen,
    }


_PER_SEQUENCE = ("texts", "ntok", "trunc", "turns", "calls", "failed")


def _batch(model, tokenizer, task: EvalTask, ids, chunk: list[int], greedy, temperature, seed, chat) -> dict:
    """One batch of sequences (prompt indices `chunk`): texts, lengths, truncation, and for episodes their turns,
    tool calls and failures; `cols` are the reward columns."""
    cols = {k: [v[i] for i in chunk] for k, v in task.columns.items()}
    turns, calls, failed = [], [], []
    if task.episodes is None:
        ro = generate_rollouts(
            model,
            tokenizer,
            [ids[i] for i in chunk],
            max_new_tokens=task.max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            seed=seed,
            record_logprobs=False,
        )
    else:
        ro, episodes = _play(
            model, tokenizer, task, chunk, greedy=greedy, temperature=temperature, seed=seed, chat=chat
        )
        cols["env_reward"] = [e.reward for e in episodes]
        failed = unscorable(episodes)
        turns, calls = [e.turns for e in episodes], [e.tool_calls for e in episodes]
    return {
        "texts": ro.texts,
        "ntok": ro.num_tokens.tolist(),
        "trunc": ro.truncated.tolist(),
        "turns": turns,
        "calls": calls,
        "failed": failed,
        "cols": cols,
    }


def _play(
    model, tokenizer, task: EvalTask, chunk: list[int], *, greedy: bool, temperature: float, seed: int, chat: bool
):
    """One episode per sequence of `chunk` (prompt indices) in the task's environment."""
    settings = task.episodes
    runner = ToolRunner(settings.tool_timeout_s)
    turns = SampledTurns(
        model,
        tokenizer,
        max_new_tokens=task.max_new_tokens,
        temperature=temperature,
        greedy=greedy,
        record_logprobs=False,
    )
    try:
        return run_episodes(
            turns,
            tokenizer,
            settings.env,
            [settings.rows[i] for i in chunk],
            max_turns=settings.max_turns,
            runner=runner,
            chat_template=chat,
            describe_tools=settings.describe_tools,
            seed=seed,
        )
    finally:
        runner.close()


def _as_array(vals: list, shape: tuple[int, int]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=float).reshape(shape)


def _outcome(task: EvalTask, outs: dict[str, dict]) -> TaskOutcome:
    n = len(task.prompts)
    s = outs["sample"]
    shape = (n, s["reps"])
    primary = task.specs[0].name
    scores = {name: _as_array(vals, shape) for name, vals in s["rewards"].items()}
    passed = np.nan_to_num(scores[primary], nan=0.0) >= 1.0 - 1e-6
    kind = task.vote_kind
    answers = None
    if kind != "none":
        flat = [extract_answer(t, kind) for t in s["texts"]]
        answers = [flat[i * s["reps"] : (i + 1) * s["reps"]] for i in range(n)]
    greedy_passed = None
    errors = dict(s["errors"])
    if "greedy" in outs:
        g = outs["greedy"]["rewards"][primary]
        greedy_passed = np.array([r is not None and r >= 1.0 - 1e-6 for r in g], dtype=bool)
        for name, cnt in outs["greedy"]["errors"].items():
            errors[name] = errors.get(name, 0) + cnt
    return TaskOutcome(
        task.name,
        primary,
        passed,
        scores,
        np.array(s["ntok"], dtype=np.int64).reshape(shape),
        np.array(s["trunc"], dtype=bool).reshape(shape),
        answers,
        greedy_passed,
        errors,
    )


def _records(task: EvalTask, outs: dict[str, dict]) -> list[dict]:
    primary = task.specs[0].name
    kind = task.vote_kind
    records = []
    for mode, o in outs.items():
        for j, (i, text) in enumerate(zip(o["order"], o["texts"])):
            r = o["rewards"][primary][j]
            rec = {
                "mode": mode,
                "prompt_index": i,
                "prompt": task.prompts[i],
                "completion": text,
                "passed": r is not None and r >= 1.0 - 1e-6,
                "tokens": o["ntok"][j],
                "truncated": o["trunc"][j],
                "rewards": {name: vals[j] for name, vals in o["rewards"].items()},
            }
            if kind != "none":
                rec["answer"] = extract_answer(text, kind)
            if o.get("turns"):
                rec["turns"], rec["tool_calls"] = o["turns"][j], o["tool_calls"][j]
            records.append(rec)
    return records
