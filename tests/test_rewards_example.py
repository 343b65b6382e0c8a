"""examples/my_reward.py: the README's "write your own reward" runs as shown, offline and through the engine."""

from __future__ import annotations

import inspect
import pathlib

import rewards
from rewards import RewardEngine, RewardSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "examples/my_reward.py:short_and_right"


def test_example_scores_its_rows(monkeypatch):
    monkeypatch.chdir(ROOT)  # file paths in reward names are relative to the working directory
    fn = rewards.resolve_reward(NAME)
    assert rewards.required_columns(fn) == ["answer"]
    completions = ["2 plus 3 makes\n5", "It is 6.", "7", "5 " + "word " * 100]
    answers = ["5", "5", None, "5"]
    assert fn(completions, prompts=[""] * 4, answer=answers) == [1.0, 0.0, None, 0.0]
    with RewardEngine(num_workers=1, preload=()) as engine:
        engine.check_columns([RewardSpec(NAME)], ["answer"], where="rows.jsonl")
        out = engine.score([RewardSpec(NAME, kwargs={"max_words": 200})], completions, [""] * 4, {"answer": answers})
    assert out.rewards[NAME] == [1.0, 0.0, None, 1.0]
    assert out.errors[NAME] == 0  # a None the reward chose is not an error


def test_readme_shows_the_tested_code():
    fn = rewards.resolve_reward(str(ROOT / "examples" / "my_reward.py") + ":short_and_right")
    source = inspect.getsource(fn)
    docstring = f'    """{fn.__doc__}"""\n'
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert source.replace(docstring, "") in readme
