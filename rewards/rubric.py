r"""`rubric`: Kimi K2's self-critique rubric reward, for prompts that no verifier can check (DESIGN.md 5).

A critic model compares the K responses to one prompt **pairwise** against rubrics and the comparisons become one
scalar per response.

- **Rubrics are data** (`rewards.rubrics`): TOML or YAML files of `[[rubric]]` tables (`name`, `title`,
  `description`, `weight` > 0, optional `mandatory`), validated on load with one-line errors naming the file and
  the field. Shipped sets, by name: `core` (clarity and relevance; conversational fluency and engagement;
  objective and grounded interaction) and `prescriptive` (no initial praise; no explicit self-justification; both
  mandatory). Anything else is a path to the user's own file.
- **Template**: `critic_prompt.txt` beside this file (or `template=PATH`), with placeholders `{prompt}`,
  `{response_a}`, `{response_b}` (required), `{rubrics}` and `{rubric_names}`. The critic writes a short reason,
  then a last line `Verdict: A`, `Verdict: B` or `Verdict: tie`. No such line -> the verdict is None, counted.
- **Pairs**: `pairs="all"` compares every pair of a group (K(K-1)/2); an integer N compares N random pairs, drawn
  so that every response is in at least one pair when N >= K (a random cycle first, then random extra pairs).
- **Position bias**: `order="both"` (default) judges each pair twice, A/B swapped, and averages the two outcomes;
  `order="random"` judges once in a random order, which is kept with the judgment.
- **Pair outcome** s_ij in [0, 1] for response i against j: one judgment gives 1 (i wins), 0.5 (tie) or 0;
  unparsable judgments are left out; a pair with no parsable judgment has no outcome. With `judge="per_rubric"`
  every rubric is judged on its own: mandatory rubrics decide the pair when their weighted mean outcome is not a
  tie, otherwise the weighted mean over the other rubrics does. `judge="overall"` (default) asks once, with all
  rubrics in the prompt (how K2's critic was prompted).
- **Aggregation** (`aggregate=`): `winrate` (default) r_i = mean of s_ij over the j that i has an outcome
  against; `bradley_terry` fits strengths p by Hunter's (2004) MM iteration with a weak prior (half a win and
  half a loss against an anchor of strength 1, so perfect records stay finite) and gives r_i = p_i / (p_i + 1),
  the chance of beating an average response. A response without any outcome is None (counted by the engine).

Critic backends (`rewards.critic`) are looked up by name (`openai` here; `checkpoint` once `rlk2.critic` is
imported; `self` is the live policy, which `rlk2 train` passes in as an object), by `pkg.module:factory`, or
passed as an object with a `complete(prompts, *, max_new_tokens, temperature, seed) -> list[Reply]` method. Reasons
and verdicts come
back as extras (`rubric/judgments`: per sample, every judgment it took part in; `rubric/unparsable`);
`summarize` turns one call's judgments into counts and position consistency for logging.

The reward runs in the caller's process (`run_in="caller"`, the `self` critic is the live model) on the whole
batch (groups must stay together). Critic generation is slow next to a verifier: give it a generous
`timeout_s`. `check_options(**kwargs)` validates the options (rubric files, template) without calling a critic,
for start-up checks.

>>> class Scripted:  # a stand-in critic that always prefers the reply shown first
...     def complete(self, prompts, **_):
...         return [Reply("first one reads better\nVerdict: A")] * len(prompts)
>>> rubric(["x", "y"], prompts=["p", "p"], backend=Scripted())["rewards"]  # each wins once, in one order
[0.5, 0.5]
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from rewards.critic import BACKENDS, Critic, Reply, get_critic, register_backend
from rewards.rubrics import (
    DEFAULT_RUBRICS,
    DEFAULT_TEMPLATE,
    PLACEHOLDERS,
    RUBRIC_DIR,
    Rubric,
    RubricError,
    fill_template,
    load_rubric_file,
    load_rubrics,
    load_template,
    render_rubrics,
    rubric_path,
)
from rewards.traits import reward_traits

__all__ = [  # the rubric-file and template helpers of rewards.rubrics are re-exported: one import for users
    "AGGREGATES",
    "BACKENDS",
    "DEFAULT_RUBRICS",
    "DEFAULT_TEMPLATE",
    "PLACEHOLDERS",
    "RUBRIC_DIR",
    "Critic",
    "Reply",
    "Rubric",
    "RubricError",
    "Verdict",
    "bradley_terry",
    "check_options",
    "choose_pairs",
    "combine_rubric_outcomes",
    "fill_template",
    "get_critic",
    "load_rubric_file",
    "register_backend",
    "load_rubrics",
    "load_template",
    "outcome_for_first",
    "parse_verdict",
    "render_rubrics",
    "rubric",
    "rubric_path",
    "summarize",
    "win_rate",
]

_MAX_REASON = 400


# ------------------------------------------------------------------------------------------------ verdicts
# Case-sensitive A/B so that "Verdict: a tie" is not read as A; the last verdict line wins.
_VERDICT = re.compile(r"(?i:verdict)\s*[:=]\s*[*_`\"'(\[]*\s*(A|B|tie|Tie|TIE)(?![A-Za-z0-9])")


class Verdict(NamedTuple):
    verdict: str | None  # "A" | "B" | "tie" | None (unparsable)
    reason: str


def parse_verdict(text: str | None) -> Verdict:
    """The critic's last `Verdict: A|B|tie` and the reason written before it.

    >>> parse_verdict("B repeats itself.\\nVerdict: A")
    Verdict(verdict='A', reason='B repeats itself.')
    >>> parse_verdict("both fine, I think A").verdict is None
    True
    """
    if not text:
        return Verdict(None, "")
    matches = list(_VERDICT.finditer(text))
    if not matches:
        return Verdict(None, " ".join(text.split())[:_MAX_REASON])
    last = matches[-1]
    verdict = last.group(1) if last.group(1) in ("A", "B") else "tie"
    return Verdict(verdict, " ".join(text[: last.start()].split())[:_MAX_REASON])


def outcome_for_first(verdict: str | None) -> float | None:
    """1 if the response shown as A won, 0.5 for a tie, 0 if it lost, None if unparsable."""
    return {"A": 1.0, "tie": 0.5, "B": 0.0}.get(verdict) if verdict else None


# ------------------------------------------------------------------------------------------------ pairs
def choose_pairs(k: int, pairs: int | str, rng: random.Random) -> list[tuple[int, int]]:
    """Pairs (i < j) of a group of k: all of them, or `pairs` random ones covering every response first."""
    every = list(itertools.combinations(range(k), 2))
    if pairs == "all" or int(pairs) >= len(every):
        return every
    perm = list(range(k))
    rng.shuffle(perm)
    cycle = [tuple(sorted((perm[t], perm[(t + 1) % k]))) for t in range(k)] if k > 2 else [(0, 1)]
    rest = [p for p in every if p not in set(cycle)]
    rng.shuffle(rest)
    chosen = list(dict.fromkeys(cycle + rest))[: int(pairs)]
    return sorted(chosen)


def combine_rubric_outcomes(by_rubric: dict[str, float], rubrics: Sequence[Rubric]) -> float | None:
    """Pair outcome from per-rubric outcomes: mandatory rubrics first (unless they tie), then the others."""
    weights = {r.name: r.weight for r in rubrics}
    mandatory = {r.name for r in rubrics if r.mandatory}

    def mean(names: list[str]) -> float | None:
        names = [n for n in names if n in by_rubric]
        total = sum(weights[n] for n in names)
        return sum(weights[n] * by_rubric[n] for n in names) / total if names else None

    first = mean(sorted(mandatory))
    if first is not None and abs(first - 0.5) > 1e-12:
        return first
    rest = mean([r.name for r in rubrics if r.name not in mandatory])
    return rest if rest is not None else first


def win_rate(k: int, outcomes: dict[tuple[int, int], float]) -> list[float | None]:
    """r_i = mean over compared j of s_ij, where outcomes[(i, j)] = s_ij for i < j and s_ji = 1 - s_ij."""
    wins, games = [0.0] * k, [0] * k
    for (i, j), s in outcomes.items():
        wins[i] += s
        wins[j] += 1.0 - s
        games[i] += 1
        games[j] += 1
    return [wins[i] / games[i] if games[i] else None for i in range(k)]


def bradley_terry(
    k: int, outcomes: dict[tuple[int, int], float], *, prior: float = 0.5, iters: int = 500, tol: float = 1e-10
) -> list[float | None]:
    """Bradley–Terry strengths by MM (Hunter 2004), ties as half wins; r_i = p_i / (p_i + 1).

    Written by hand: it is a dozen lines, and the libraries that fit it (choix) would be a new dependency for one
    function. Each response also plays `2 * prior` games against an anchor of strength 1 and wins half of them.
    """
    wins = [prior] * k
    games: dict[tuple[int, int], float] = {}
    compared = [False] * k
    for (i, j), s in outcomes.items():
        wins[i] += s
        wins[j] += 1.0 - s
        games[(i, j)] = games.get((i, j), 0.0) + 1.0
        compared[i] = compared[j] = True
    p = [1.0] * k
    for _ in range(iters):
        denom = [2 * prior / (p[i] + 1.0) for i in range(k)]
        for (i, j), n in games.items():
            denom[i] += n / (p[i] + p[j])
            denom[j] += n / (p[i] + p[j])
        new = [wins[i] / denom[i] for i in range(k)]
        done = max(abs(a - b) / b for a, b in zip(new, p)) < tol
        p = new
        if done:
            break
    return [p[i] / (p[i] + 1.0) if compared[i] else None for i in range(k)]


AGGREGATES = {"winrate": win_rate, "bradley_terry": bradley_terry}


# ------------------------------------------------------------------------------------------------ the reward
@dataclass(frozen=True)
class Judgment:
    """One critic call: response `first` shown as A, `second` as B, judged on one rubric (or all: None)."""

    first: int
    second: int
    rubric: str | None


def check_options(
    *,
    rubrics: Any = DEFAULT_RUBRICS,
    template: Any = None,
    pairs: Any = "all",
    order: str = "both",
    judge: str = "overall",
    aggregate: str = "winrate",
    **_: Any,
) -> tuple[list[Rubric], str]:
    """Validates the reward's options (the loop may call this at start-up); returns (rubrics, template)."""
    if not (pairs == "all" or (isinstance(pairs, int) and not isinstance(pairs, bool) and pairs >= 1)):
        raise RubricError(f"rubric: pairs must be 'all' or an integer >= 1, got {pairs!r}")
    for name, value, allowed in (
        ("order", order, ("both", "random")),
        ("judge", judge, ("overall", "per_rubric")),
        ("aggregate", aggregate, tuple(AGGREGATES)),
    ):
        if value not in allowed:
            raise RubricError(f"rubric: {name} must be one of {', '.join(allowed)}, got {value!r}")
    return load_rubrics(rubrics), load_template(template)


@reward_traits(run_in="caller", whole_batch=True)
def rubric(
    completions: list[str],
    *,
    prompts: list[str],
    backend: Any = "self",
    rubrics: Sequence[str] = DEFAULT_RUBRICS,
    template: str | None = None,
    pairs: int | str = "all",
    order: str = "both",
    judge: str = "overall",
    aggregate: str = "winrate",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    critic: dict[str, Any] | None = None,
    **_: Any,
) -> dict:
    """Self-critique rubric reward: pairwise critic verdicts within each prompt's group, aggregated per response.

    Groups are the completions that share a prompt. Options are documented in the module docstring; `critic`
    holds the backend's own options (e.g. `{"base_url": ..., "timeout_s": 30}` for `openai`).
    """
    rubric_list, tmpl = check_options(
        rubrics=rubrics, template=template, pairs=pairs, order=order, judge=judge, aggregate=aggregate
    )
    n = len(completions)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    judged = [r.name for r in rubric_list] if judge == "per_rubric" else [None]
    jobs: list[Judgment] = []
    for prompt, members in groups.items():
        rng = random.Random(f"{seed}/{prompt}")
        for a, b in choose_pairs(len(members), pairs, rng):
            i, j = members[a], members[b]
            orders = [(i, j), (j, i)] if order == "both" else [rng.choice([(i, j), (j, i)])]
            jobs += [Judgment(f, s, rub) for f, s in orders for rub in judged]
    by_name = {r.name: r for r in rubric_list}
    texts = []
    for job in jobs:
        shown = [by_name[job.rubric]] if job.rubric else rubric_list
        texts.append(
            fill_template(
                tmpl,
                {
                    "prompt": prompts[job.first],
                    "response_a": completions[job.first],
                    "response_b": completions[job.second],
                    "rubrics": render_rubrics(shown),
                    "rubric_names": ", ".join(r.name for r in shown),
                },
            )
        )
    replies = (
        get_critic(backend, critic).complete(texts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        if texts
        else []
    )
    if len(replies) != len(texts):
        raise RubricError(f"rubric: critic returned {len(replies)} replies for {len(texts)} prompts")

    judgments: list[list[dict]] = [[] for _ in range(n)]
    unparsable = [0] * n
    pair_votes: dict[tuple[int, int], dict[str | None, list[float]]] = {}
    for jid, (job, reply) in enumerate(zip(jobs, replies)):
        v = parse_verdict(reply.text)
        s_first = outcome_for_first(v.verdict)
        lo, hi = sorted((job.first, job.second))
        if s_first is not None:
            s_lo = s_first if job.first == lo else 1.0 - s_first
            pair_votes.setdefault((lo, hi), {}).setdefault(job.rubric, []).append(s_lo)
        for me, other in ((job.first, job.second), (job.second, job.first)):
            judgments[me].append(
                {
                    "id": jid,
                    "vs": other,
                    "shown_first": me == job.first,
                    "rubric": job.rubric,
                    "verdict": v.verdict,
                    "reason": v.reason,
                    "error": reply.error,
                }
            )
            unparsable[me] += v.verdict is None
    where = {i: (prompt, a) for prompt, members in groups.items() for a, i in enumerate(members)}
    local: dict[str, dict[tuple[int, int], float]] = {prompt: {} for prompt in groups}  # s_ab by group positions
    for (lo, hi), votes in pair_votes.items():
        per = {name: sum(vs) / len(vs) for name, vs in votes.items()}  # both orders averaged
        s = per[None] if judge == "overall" else combine_rubric_outcomes(per, rubric_list)
        if s is not None:
            local[where[lo][0]][(where[lo][1], where[hi][1])] = s
    rewards: list[float | None] = [None] * n
    errors: list[str | None] = [None] * n
    for prompt, members in groups.items():
        scores = AGGREGATES[aggregate](len(members), local[prompt])
        for a, i in enumerate(members):
            rewards[i] = scores[a]
            if scores[a] is None:
                if len(members) < 2:
                    errors[i] = "no other response to the same prompt to compare with"
                else:
                    failed = sorted({j["error"] for j in judgments[i] if j["error"]})
                    errors[i] = f"critic failed: {failed[0]}" if failed else "no parsable critic verdict"
    return {"rewards": rewards, "errors": errors, "extras": {"judgments": judgments, "unparsable": unparsable}}


def summarize(judgments_per_sample: Sequence[Sequence[dict]]) -> dict[str, float]:
    """Counts over one reward call's `rubric/judgments` extra: verdicts, unparsable ones, position consistency.

    Position consistency is the share of pairs judged in both orders (both parsable) whose two outcomes agree
    once the order is undone; a critic that always says "A" scores 0.
    """
    seen: dict[int, tuple] = {}
    for sample, items in enumerate(judgments_per_sample):
        for j in items or []:
            if j["shown_first"]:
                seen[j["id"]] = (sample, j["vs"], j["rubric"], j["verdict"])
    pairs: dict[tuple, list[float]] = {}
    for first, second, rub, verdict in seen.values():
        s = outcome_for_first(verdict)
        if s is not None:
            lo, hi = sorted((first, second))
            pairs.setdefault((lo, hi, rub), []).append(s if first == lo else 1.0 - s)
    both = [v for v in pairs.values() if len(v) == 2]
    return {
        "verdicts": float(len(seen)),
        "unparsable": float(sum(v[3] is None for v in seen.values())),
        "pairs_both_orders": float(len(both)),
        "position_consistency": sum(abs(a - b) < 1e-9 for a, b in both) / len(both) if both else math.nan,
    }
