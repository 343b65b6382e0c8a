"""`ifeval`: verifiable instruction-following constraints in the style of IFEval (Zhou et al. 2023).

The checkers are IFEval's own, from the `if-verifiable` package (a maintained, Apache-2.0 packaging of Google's
IFEval instruction checkers that needs no download at run time for the constraints used here); this module adds
the reward contract around them. Column `constraints`: per sample, a list of `{"id": <IFEval instruction id>,
"kwargs": {...}}` (or its JSON text), e.g. `[{"id": "change_case:english_lowercase", "kwargs": {}},
{"id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": 40}}]`.

Reward: the fraction of the sample's constraints its completion follows (partial credit, a denser learning
signal), or 1/0 with `all_or_nothing=True`. Full marks is IFEval's prompt-level strict accuracy (evaluation
counts a sample as passed only then). The per-constraint verdicts come back as extras (`ifeval/followed`).
A constraints column that cannot be read (not a list, an unknown id, arguments the checker rejects) makes the
sample unscorable (None, with the reason): never 0.0. A checker that needs NLTK data (sentence counts) is such a
case too, since nothing is downloaded at run time.

Language detection (`change_case:english_*`, `language:*`) is seeded, so a verdict is the same on every call.

>>> ifeval(["all lower here", "Not Lower"], prompts=["p", "p"],
...        constraints=[[{"id": "change_case:english_lowercase", "kwargs": {}}]] * 2)["rewards"]
[1.0, 0.0]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rewards.traits import reward_traits


def _registry() -> dict:
    """IFEval's instruction classes by id. Imported on first use: the checkers pull in NLTK (~2 s to import)."""
    import langdetect
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect samples at random: a seed makes its verdicts repeatable
    return INSTRUCTION_DICT


def describe(instruction_id: str, kwargs: dict[str, Any]) -> str:
    """The instruction text IFEval shows for `instruction_id` with these arguments (e.g. "Answer with less than
    30 words.")."""
    checker = _registry()[instruction_id](instruction_id)
    return checker.build_description(**kwargs).strip()


def parse_constraints(value: Any) -> list[dict[str, Any]]:
    """The constraints of one sample as a list of {"id", "kwargs"}; ValueError naming what is wrong."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"constraints is not JSON ({exc.msg})") from None
    if not isinstance(value, list) or not value:
        raise ValueError("constraints must be a non-empty list of {id, kwargs}")
    registry = _registry()
    out = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError(f"constraint {item!r} is not {{id, kwargs}}")
        if item["id"] not in registry:
            raise ValueError(f"unknown IFEval instruction id {item['id']!r}")
        kwargs = item.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"constraint {item['id']}: kwargs must be a mapping")
        out.append({"id": item["id"], "kwargs": kwargs})
    return out


def follows(completion: str, constraints: Sequence[dict[str, Any]]) -> list[bool]:
    """Per constraint: does `completion` follow it (IFEval's strict check)?"""
    registry = _registry()
    verdicts = []
    for c in constraints:
        checker = registry[c["id"]](c["id"])
        checker.build_description(**c["kwargs"])  # sets the checker's arguments
        verdicts.append(bool(completion.strip()) and bool(checker.check_following(completion)))
    return verdicts


@reward_traits(elementwise=True)
def ifeval(
    completions: list[str], *, prompts: list[str], constraints: list, all_or_nothing: bool = False, **_: Any
) -> dict:
    """Instruction following: the fraction of each sample's IFEval constraints its completion follows."""
    rewards: list[float | None] = []
    errors: list[str | None] = []
    followed: list[list[bool] | None] = []
    for completion, spec in zip(completions, constraints):
        try:
            verdicts = follows(completion, parse_constraints(spec))
        except LookupError:
            rewards.append(None)
            errors.append("this constraint needs NLTK data, which is not downloaded at run time")
            followed.append(None)
            continue
        except (ValueError, TypeError) as exc:
            rewards.append(None)
            errors.append(str(exc)[:200])
            followed.append(None)
            continue
        rewards.append(float(all(verdicts)) if all_or_nothing else sum(verdicts) / len(verdicts))
        errors.append(None)
        followed.append(verdicts)
    return {"rewards": rewards, "errors": errors, "extras": {"followed": followed}}
