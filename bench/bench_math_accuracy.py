"""Accuracy of the `math` reward vs raw `math_verify.verify` on tests/data/math_labelled.jsonl.

The labelled set holds (gold, prediction, equal) pairs taken from Math-Verify's own test suite, the Qwen2.5-Math
grader's tests and examples, and false positives / negatives reported against both (each row cites its source).
The baseline is Math-Verify used the plain way: `verify(parse(gold), parse(prediction))` with default settings.
The reward runs through `RewardEngine`, as in training. A false positive is a pair labelled unequal that was
scored equal; a false negative the reverse; an unscorable reward (None) counts as wrong.

    python bench/bench_math_accuracy.py          # prints a table and the misjudged rows, writes bench/out/
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "math_labelled.jsonl"


def load() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def raw_verdicts(rows: list[dict]) -> list[bool]:
    from math_verify import parse, verify

    out = []
    for r in rows:
        try:
            out.append(bool(verify(parse(r["gold"]), parse(r["prediction"]))))
        except BaseException:  # noqa: BLE001 - Math-Verify's TimeoutException is a BaseException: count as "no"
            out.append(False)
    return out


def reward_verdicts(rows: list[dict]) -> tuple[list[float | None], list[str | None]]:
    from rewards import RewardEngine, RewardSpec

    with RewardEngine(num_workers=2) as engine:
        result = engine.score(
            [RewardSpec("math", timeout_s=10.0)],
            [r["prediction"] for r in rows],
            [""] * len(rows),
            {"answer": [r["gold"] for r in rows]},
        )
    return result.rewards["math"], result.sample_errors["math"]


def confusion(labels: list[bool], said: list[bool | None]) -> dict:
    fp = sum(1 for y, s in zip(labels, said) if not y and s is True)
    fn = sum(1 for y, s in zip(labels, said) if y and s is not True)
    correct = sum(1 for y, s in zip(labels, said) if s is not None and s == y)
    return {
        "accuracy": correct / len(labels),
        "false_positives": fp,
        "false_negatives": fn,
        "unscorable": sum(s is None for s in said),
        "n": len(labels),
    }


def measure() -> tuple[dict, dict, list[str]]:
    rows = load()
    labels = [bool(r["equal"]) for r in rows]
    raw = raw_verdicts(rows)
    scores, errors = reward_verdicts(rows)
    ours = [None if s is None else s == 1.0 for s in scores]
    misjudged = []
    for i, (r, y, a, b, e) in enumerate(zip(rows, labels, raw, ours, errors)):
        if b != y:
            misjudged.append(
                f"row {i + 1}: label={y} reward={b} raw={a} error={e} [{r['source']}] "
                f"gold={r['gold'][:60]!r} pred=...{r['prediction'][-60:]!r}"
            )
    return confusion(labels, ours), confusion(labels, raw), misjudged


def _table(ours: dict, raw: dict) -> list[dict]:
    rows = []
    for key, unit in (("accuracy", "fraction"), ("false_positives", "pairs"), ("false_negatives", "pairs")):
        rows.append(
            {
                "name": f"math_labelled/{key}",
                "value": ours[key],
                "unit": unit,
                "baseline": "math_verify.verify(parse(gold), parse(pred))",
                "baseline_value": raw[key],
                "ratio": ours[key] / raw[key] if raw[key] else None,
                "spread": 0.0,
                "reps": 1,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict]:
    ours, raw, _ = measure()  # deterministic and small: quick and full are the same single run
    return _table(ours, raw)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    ours, raw, misjudged = measure()
    print(f"{'':22}{'math reward':>14}{'raw verify':>14}")
    for key in ("accuracy", "false_positives", "false_negatives", "unscorable", "n"):
        fmt = "{:>14.3f}" if key == "accuracy" else "{:>14d}"
        print(f"{key:22}" + fmt.format(ours[key]) + fmt.format(raw[key]))
    print("\nrows the math reward misjudges:")
    print("\n".join(misjudged))
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "math_accuracy.json").write_text(json.dumps({"rows": _table(ours, raw), "misjudged": misjudged}, indent=1))
