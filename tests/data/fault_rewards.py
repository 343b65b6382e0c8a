"""Misbehaving rewards for the fault tests: each is named by path in a real training run."""

import asyncio
import time

from rewards.engine import reward_traits


@reward_traits(elementwise=True)
def raises_on_some(completions, *, prompts, **_):
    """Raises for prompts whose first number is odd: those samples must become None, never 0.0."""
    out = []
    for p in prompts:
        first = int("".join(ch for ch in p.split(",")[0] if ch.isdigit()) or 0)
        if first % 2:
            raise ValueError(f"cannot score {p!r}")
        out.append(1.0)
    return out


def sleeps_forever(completions, *, prompts, **_):
    time.sleep(10_000)
    return [0.0] * len(completions)


def spins_forever(completions, *, prompts, **_):
    x = 0
    while True:  # pure-Python CPU loop: no signal or asyncio timeout inside the process can stop this
        x += 1


async def async_length(completions, *, prompts, **_):
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


def always_raises(completions, *, prompts, **_):
    raise RuntimeError("this reward is broken")


def no_arguments():
    return []


def returns_text(completions, *, prompts, **_):
    """'1.0' as text for the completion "x" (not a number: an error), 1.0 for the others."""
    return ["1.0" if c == "x" else 1.0 for c in completions]
