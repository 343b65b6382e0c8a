"""Write your own reward: a plain function over a batch (DESIGN.md 2.3), selected by `path:function`.

Debug it offline, then name it in a task's rewards (or as `my_pkg.rewards:short_and_right` from a package):

    rlk2 score --reward examples/my_reward.py:short_and_right --input examples/data/my_reward_rows.jsonl

    rewards:
      - {name: math, weight: 1.0}
      - {name: "examples/my_reward.py:short_and_right", weight: 0.5, kwargs: {max_words: 80}}
"""


def short_and_right(
    completions: list[str], *, prompts: list[str], answer: list[str], max_words: int = 60
) -> list[float | None]:
    """1.0 if the last line contains the gold answer and the reply is at most `max_words` words, else 0.0."""
    scores: list[float | None] = []
    for text, gold in zip(completions, answer):
        if gold is None:
            scores.append(None)  # no gold for this row: unscorable, left out of the baseline, never 0.0
            continue
        last_line = (text.strip().splitlines() or [""])[-1]
        scores.append(float(str(gold) in last_line and len(text.split()) <= max_words))
    return scores
