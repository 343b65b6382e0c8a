"""The `ifeval` reward on labelled examples: each constraint kind the built-in task uses, followed and broken."""

from __future__ import annotations

import json

import pytest

from rewards import resolve_reward
from rewards.ifeval import describe, ifeval

LOWER = {"id": "change_case:english_lowercase", "kwargs": {}}
WORDS = {"id": "length_constraints:number_words", "kwargs": {"relation": "less than", "num_words": 10}}
KEYS = {"id": "keywords:existence", "kwargs": {"keywords": ["garden", "morning"]}}
END = {"id": "startend:end_checker", "kwargs": {"end_phrase": "Have a great day!"}}
BULLETS = {"id": "detectable_format:number_bullet_lists", "kwargs": {"num_bullets": 3}}
JSON = {"id": "detectable_format:json_format", "kwargs": {}}
COMMA = {"id": "punctuation:no_comma", "kwargs": {}}
TITLE = {"id": "detectable_format:title", "kwargs": {}}
PS = {"id": "detectable_content:postscript", "kwargs": {"postscript_marker": "P.S."}}

# (constraint, a completion that follows it, one that breaks it) — worked out by hand from IFEval's definitions
LABELLED = [
    (LOWER, "the garden was quiet and the sun came out this morning.", "The garden was quiet."),
    (
        WORDS,
        "Water the plant every two days.",
        "Water the plant every two days and keep it in a bright spot by the window.",
    ),
    (KEYS, "In the morning the garden smells of rain.", "In the morning it smells of rain."),
    (END, "Keep the soil moist. Have a great day!", "Have a great day! Keep the soil moist."),
    (BULLETS, "Tips:\n* water it\n* give it light\n* repot in spring", "Tips:\n* water it\n* give it light"),
    (JSON, '```json\n{"tip": "water it"}\n```', "tip: water it"),
    (COMMA, "Water it and give it light.", "Water it, and give it light."),
    (TITLE, "<<Plant care>>\nWater it weekly.", "Plant care\nWater it weekly."),
    (PS, "Water it weekly.\nP.S. It likes sun.", "Water it weekly. It likes sun."),
]


@pytest.mark.parametrize("constraint, good, bad", LABELLED, ids=[c["id"] for c, _, _ in LABELLED])
def test_each_constraint_on_a_followed_and_a_broken_example(constraint, good, bad):
    out = ifeval([good, bad], prompts=["p", "p"], constraints=[[constraint], [constraint]])
    assert out["rewards"] == [1.0, 0.0]
    assert out["errors"] == [None, None] and out["extras"]["followed"] == [[True], [False]]


def test_partial_credit_and_all_or_nothing():
    both = [[LOWER, COMMA]] * 3
    texts = ["all lower and no comma", "all lower, one comma", "Upper, and a comma"]
    assert ifeval(texts, prompts=["p"] * 3, constraints=both)["rewards"] == [1.0, 0.5, 0.0]
    strict = ifeval(texts, prompts=["p"] * 3, constraints=both, all_or_nothing=True)["rewards"]
    assert strict == [1.0, 0.0, 0.0]


def test_the_constraints_column_may_be_json_text():
    assert ifeval(["all lower"], prompts=["p"], constraints=[json.dumps([LOWER])])["rewards"] == [1.0]


@pytest.mark.parametrize(
    "spec, why",
    [
        ("not json", "not JSON"),
        ([], "non-empty list"),
        ([{"id": "no:such"}], "unknown IFEval instruction id"),
        ([{"id": "change_case:english_lowercase", "kwargs": [1]}], "kwargs must be a mapping"),
        ([{"id": "length_constraints:number_words", "kwargs": {"bogus": 1}}], "bogus"),
        (
            [{"id": "length_constraints:number_sentences", "kwargs": {"num_sentences": 2, "relation": "less than"}}],
            "NLTK data",
        ),
    ],
)
def test_an_unreadable_constraint_is_unscorable_never_zero(spec, why):
    out = ifeval(["some answer"], prompts=["p"], constraints=[spec])
    assert out["rewards"] == [None] and why in out["errors"][0]


def test_an_empty_completion_follows_nothing():
    assert ifeval([""], prompts=["p"], constraints=[[COMMA]])["rewards"] == [0.0]  # not a vacuous "no comma"


def test_registered_and_described_by_the_checkers_themselves():
    assert resolve_reward("ifeval") is ifeval
    assert describe(WORDS["id"], WORDS["kwargs"]) == "Answer with less than 10 words."
    # verdicts are repeatable (language detection is seeded)
    text = "the plant likes a bright window and a little water each week."
    assert len({tuple(ifeval([text], prompts=["p"], constraints=[[LOWER]])["rewards"]) for _ in range(5)}) == 1
