"""A verifiable reward for the closed-loop critic test: every model, however untrained, gets mixed outcomes."""


def even_length(completions, *, prompts, **_):
    """1.0 when the completion has an even number of characters, else 0.0 (a check anyone can verify)."""
    return [float(len(c) % 2 == 0) for c in completions]
