"""A reward for the training-control tests: some groups always tie, the others have a spread.

Prompts whose first number is even score 1.0 on every response (a tied, always-solved group); the others score
the parity of the completion's length, which differs between responses of a random tiny policy.
"""


def ties_on_even(completions, *, prompts, **_):
    out = []
    for text, prompt in zip(completions, prompts):
        first = int("".join(ch for ch in prompt.split(",")[0] if ch.isdigit()) or 0)
        out.append(1.0 if first % 2 == 0 else float(len(text) % 2))
    return out
