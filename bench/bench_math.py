"""Math checks per second through the reward engine vs Math-Verify in a plain loop.

Workload: `n` mixed (gold, completion) checks built from a fixed seed: integers, fractions vs decimals,
radicals and polynomials in other forms, tuples and intervals, unboxed "final answer is" completions, each after
a short chain of reasoning, right or wrong; 1 % are pathological (`2**30**5`, `10^{10^{10}}+k`, 5,000-digit
numbers, fractions and radicals nested hundreds deep) with random parts so no two are alike.

- baseline: `verify(parse("$gold$"), parse(completion))` in a Python loop, one core, Math-Verify's own alarm
  timeouts at their shortest (1 s for the parse, 1 s for the comparison);
- engine: `RewardEngine(num_workers=2)` scoring batches of 256 with the `math` reward, its in-worker deadline
  set to the same 1 s per check, process deadline `TIMEOUT_S` per check. A fresh engine per repetition, so no
  cache carries over between repetitions.

Also reported: the longest single pathological check through the engine (each scored alone, wall clock of the
call), against the target of its deadline + 1 s.

    python bench/bench_math.py [--quick]
"""

from __future__ import annotations

import pathlib
import random
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 3.0  # per-check process deadline in the engine
ALARM_S = 1  # Math-Verify's in-process alarm (seconds, integer), same for both sides
BATCH = 256
FILLER = (
    "Let us work through the problem step by step. First we note that {a} + {b} = {c}, and multiplying "
    "by {d} gives {e}. Checking the boundary case, {a} is not a solution, so we continue. "
)


def _pathological(rng: random.Random) -> tuple[str, str]:
    k = rng.randint(1, 10**6)
    depth = rng.randint(150, 400)
    options = [
        (str(k), f"So the answer is 2**30**5 + {k}"),
        (str(k), rf"\boxed{{10^{{10^{{10}}}} + {k}}}"),
        (str(k), rf"\boxed{{2^{{30^{{5}}}}-{k}}}"),
        (
            "".join(rng.choice("123456789") for _ in range(5000)),
            r"\boxed{" + "".join(rng.choice("123456789") for _ in range(5000)) + "}",
        ),
        ("1/2", r"\boxed{" + r"\frac{" * depth + str(k) + "}{2}" * depth + "}"),
        ("2", r"\boxed{" + r"\sqrt{" * depth + str(k) + "}" * depth + "}"),
    ]
    return rng.choice(options)


def _normal(rng: random.Random) -> tuple[str, str]:
    a, b, d = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 9)
    prefix = FILLER.format(a=a, b=b, c=a + b, d=d, e=(a + b) * d)
    right = rng.random() < 0.6
    kind = rng.randrange(7)
    if kind == 0:
        gold = str(a * d)
        return gold, prefix + rf"Therefore the answer is $\boxed{{{gold if right else a * d + 1}}}$."
    if kind == 1:
        return rf"\frac{{{a}}}{{{b}}}", prefix + rf"Hence $\boxed{{{a * d}/{b * d if right else b * d + 1}}}$."
    if kind == 2:
        num = a * 25
        return f"{num / 100:g}", prefix + rf"The result is $\boxed{{\frac{{{num if right else num + 1}}}{{100}}}}$."
    if kind == 3:
        s = rng.choice([2, 3, 5, 6, 7])
        return rf"{d}\sqrt{{{s}}}", prefix + rf"So $\boxed{{\sqrt{{{d * d * s if right else d * d * s + 1}}}}}$."
    if kind == 4:
        return f"x^2 + {2 * d}x + {d * d}", prefix + rf"which factors as $\boxed{{(x + {d if right else d + 1})^2}}$."
    if kind == 5:
        lo, hi = sorted((a, b + 1000))
        return f"({lo}, {hi}]", prefix + rf"The solution set is $\boxed{{({lo}, {hi if right else hi + 1}]}}$."
    return str(a + b), prefix + f"The final answer is ${a + b if right else a + b - 1}$. I hope it is correct."


def workload(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    items = [_normal(rng) for _ in range(n)]
    for i in rng.sample(range(n), max(1, n // 100)):
        items[i] = _pathological(rng)
    return items


def plain_loop(items: list[tuple[str, str]]) -> tuple[float, float]:
    """(checks/s, longest single check in s) of Math-Verify in a loop."""
    from math_verify import parse, verify

    longest = 0.0
    start = time.perf_counter()
    for gold, completion in items:
        t = time.perf_counter()
        try:
            verify(
                parse(f"${gold}$", parsing_timeout=ALARM_S),
                parse(completion, parsing_timeout=ALARM_S),
                timeout_seconds=ALARM_S,
            )
        except BaseException:  # noqa: BLE001 - its TimeoutException is a BaseException; a failure is "no"
            pass
        longest = max(longest, time.perf_counter() - t)
    return len(items) / (time.perf_counter() - start), longest


def _spec():
    from rewards import RewardSpec

    # in-worker deadline 1 s per check: the same budget Math-Verify's shortest alarm gives the baseline
    return RewardSpec("math", timeout_s=TIMEOUT_S, kwargs={"check_timeout_s": float(ALARM_S)})


def through_engine(items: list[tuple[str, str]]) -> float:
    from rewards import RewardEngine

    spec = _spec()
    with RewardEngine(num_workers=2) as engine:
        engine.score([spec], ["\\boxed{1}"] * 4, [""] * 4, {"answer": ["1"] * 4})  # workers up, not timed
        start = time.perf_counter()
        for lo in range(0, len(items), BATCH):
            chunk = items[lo : lo + BATCH]
            engine.score([spec], [c for _, c in chunk], [""] * len(chunk), {"answer": [g for g, _ in chunk]})
        return len(items) / (time.perf_counter() - start)


def longest_pathological(count: int) -> tuple[float, int]:
    """Longest wall time of one pathological check scored alone through the engine, and how many timed out."""
    from rewards import RewardEngine

    rng = random.Random(1)
    spec = _spec()
    longest, timeouts = 0.0, 0
    with RewardEngine(num_workers=2) as engine:
        engine.score([spec], ["\\boxed{1}"], [""], {"answer": ["1"]})
        for _ in range(count):
            gold, completion = _pathological(rng)
            t = time.perf_counter()
            out = engine.score([spec], [completion], [""], {"answer": [gold]})
            longest = max(longest, time.perf_counter() - t)
            timeouts += out.sample_errors["math"][0] == "timeout"
    return longest, timeouts


def run(quick: bool) -> list[dict]:
    n, reps = (1000, 3) if quick else (10_000, 3)
    items = workload(n)
    base, eng, base_longest = [], [], []
    for _ in range(reps):
        rate, longest = plain_loop(items)
        base.append(rate)
        base_longest.append(longest)
        eng.append(through_engine(items))
    ratios = [e / b for e, b in zip(eng, base)]
    worst, timeouts = longest_pathological(6 if quick else 24)
    return [
        {
            "name": f"math_checks_per_s/{n}_mixed_1pct_pathological",
            "value": statistics.median(eng),
            "unit": "checks/s",
            "baseline": "math_verify plain loop",
            "baseline_value": statistics.median(base),
            "ratio": statistics.median(ratios),
            "spread": (max(ratios) - min(ratios)) / 2,
            "reps": reps,
        },
        {
            "name": "math_longest_single_pathological_check",
            "value": worst,
            "unit": "s",
            "baseline": f"deadline + 1 s ({timeouts} of the checks hit the deadline)",
            "baseline_value": TIMEOUT_S + 1.0,
            "ratio": worst / (TIMEOUT_S + 1.0),
            "spread": 0.0,
            "reps": 1,
        },
        {
            "name": "math_longest_single_check/plain_loop",
            "value": statistics.median(base_longest),
            "unit": "s",
            "baseline": "engine deadline + 1 s",
            "baseline_value": TIMEOUT_S + 1.0,
            "ratio": statistics.median(base_longest) / (TIMEOUT_S + 1.0),
            "spread": (max(base_longest) - min(base_longest)) / 2,
            "reps": reps,
        },
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import run_all  # this file's folder is on sys.path

    run_all.standalone(run, "math", __doc__, "1,000 checks instead of 10,000", threads=False)
