r"""The `math` reward: is the completion's final answer equal to the gold answer? Built on Math-Verify.

Per sample:
1. The gold answer (column `answer`, LaTeX or plain) is parsed first. A gold that does not parse makes the sample
   unscorable: `None` with error "unparsable gold" (a dataset problem, not the model's).
2. The prediction's answer is the content of its **last** `\boxed{...}` (or `\fbox{...}`), braces matched. With no
   box, Math-Verify's own fallbacks apply, rightmost match first: "final answer is ...", the last LaTeX
   environment (`$...$`, `\[...\]`), then the last plain number or expression.
3. Math-Verify's `verify(gold, prediction)` decides equality (numeric to 6 decimals, symbolic via sympy, sets,
   intervals, matrices, equations `x = 3` vs `3`). The verdict is cached by (gold, extracted answer), per process.

Scores: 1.0 equal, 0.0 not equal or no answer found; a prediction whose parse or comparison times out is 0.0
with error "timeout" (the model wrote something pathological, so it is the model's fault). Timeouts hold at two
levels: Math-Verify's own `signal.alarm` (seconds, interrupts pure-Python sympy work) inside the worker, and the
engine's process kill for what an alarm cannot interrupt (a C-level bignum power such as `10^{10^{10}}`).

Known limits (measured on tests/data/math_labelled.jsonl, see bench/math_accuracy.py):
- Equality is Math-Verify's: units and text are stripped, so `5 \text{ cm}` equals `5`; an unboxed completion
  is judged on whatever number comes last, which can be an intermediate value.
- Multiple-choice letters are compared as strings only when both sides parse as strings.
- The alarm has one-second resolution; sub-second deadlines come only from the engine.
- When the *gold* itself hangs in C (never seen in practice), the engine's kill charges the sample as a timeout
  of the prediction (0.0), because the kill cannot tell which side hung.
- The cache lives in each worker process; hit rates are per worker.

>>> math([r"... so the answer is $\boxed{\frac{1}{2}}$.", "I do not know.", r"\boxed{0.5}", r"\boxed{2}"],
...      prompts=[""] * 4, answer=["1/2", "1/2", r"\frac12", "1/2"])["rewards"]
[1.0, 0.0, 1.0, 0.0]
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rewards.engine import reward_traits

_CACHE_SIZE = 16384


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` / `\fbox{...}` in `text` (braces matched), or None.

    Written by hand because Math-Verify only returns an answer after parsing it, and the raw string is what the
    cache is keyed by and what the format reward checks.

    >>> last_boxed(r"first \boxed{1} then \boxed{\frac{a}{b}} end")
    '\\frac{a}{b}'
    >>> last_boxed(r"\boxed 7") is None, last_boxed(r"\boxed{unclosed") is None
    (True, True)
    """
    best: tuple[int, str] | None = None
    for marker in ("\\boxed{", "\\fbox{"):
        start = text.rfind(marker)
        while start != -1:
            depth, i = 1, start + len(marker)
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth == 0:
                if best is None or start > best[0]:
                    best = (start, text[start + len(marker): i - 1])
                break
            start = text.rfind(marker, 0, start)
    return best[1] if best else None


def _in_main_thread() -> bool:
    # Math-Verify's alarm-based timeouts only work in the main thread; elsewhere rely on the engine's kill.
    return threading.current_thread() is threading.main_thread()


def _alarm(timeout_s: int) -> int | None:
    return timeout_s if _in_main_thread() else None


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _parse_gold(gold: str, timeout_s: int) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = gold
    if not any(m in text for m in ("$", "\\boxed", "\\(", "\\[")):
        text = f"${text}$"  # bare LaTeX like \frac12 is only found inside a math environment
    # no_fallback: a gold that only "parses" as its own raw string is a broken gold, not an answer
    parsed = parse(text, [LatexExtractionConfig(), ExprExtractionConfig()], fallback_mode="no_fallback",
                   extraction_mode="first_match", parsing_timeout=_alarm(timeout_s), raise_on_error=True)
    if not parsed and text != gold:  # plain-text gold the LaTeX route could not read
        parsed = parse(gold, fallback_mode="no_fallback", extraction_mode="first_match",
                       parsing_timeout=_alarm(timeout_s), raise_on_error=True)
    return tuple(parsed)


def _parse_prediction(text: str, timeout_s: int) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=_alarm(timeout_s), raise_on_error=True)


def _equal(gold: tuple, pred: list, timeout_s: int) -> bool:
    """Math-Verify's verify, letting only its timeout through (with raise_on_error=True it would also re-raise
    sympy's own exceptions, which mean "not equal")."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if not pred:
        return False
    try:
        return bool(verify(list(gold), pred, timeout_seconds=_alarm(timeout_s), raise_on_error=True))
    except TimeoutException:
        raise
    except Exception:
        return bool(verify(list(gold), pred, timeout_seconds=_alarm(timeout_s), raise_on_error=False))


_VERDICTS: OrderedDict[tuple[str, str, str], bool | str] = OrderedDict()  # (gold, "boxed"|"fallback", answer) -> equal


_TIMED_OUT = "timeout"


def _cached(key: tuple[str, str, str], compute: Callable[[], bool]) -> bool:
    """The cached verdict for key, computing it on a miss. A timeout is cached too (and re-raised on every hit):
    a policy repeats its answers across a group, and paying the deadline again for the same string buys nothing."""
    from math_verify.errors import TimeoutException

    if key in _VERDICTS:
        _VERDICTS.move_to_end(key)
        value = _VERDICTS[key]
    else:
        try:
            value = compute()
        except TimeoutException:
            value = _TIMED_OUT
        _VERDICTS[key] = value
        if len(_VERDICTS) > _CACHE_SIZE:
            _VERDICTS.popitem(last=False)
    if value is _TIMED_OUT:
        raise TimeoutException("timeout (cached)")
    return value


def check(gold: Any, completion: str, *, parse_timeout_s: int = 2,
          verify_timeout_s: int = 2) -> tuple[float | None, str | None]:
    """(score, error) for one sample; see the module docstring for the rules."""
    from math_verify.errors import TimeoutException

    gold_text = "" if gold is None else str(gold).strip()
    if not gold_text:
        return None, "empty gold"
    try:
        gold_parsed = _parse_gold(gold_text, parse_timeout_s)
    except TimeoutException:
        return None, "gold parse timeout"
    except Exception:
        gold_parsed = ()
    if not gold_parsed:
        return None, "unparsable gold"
    try:
        boxed = last_boxed(completion)
        if boxed is not None:
            boxed = boxed.strip()
            return float(_cached((gold_text, "boxed", boxed), lambda: _equal(
                gold_parsed, _parse_prediction(f"\\boxed{{{boxed}}}", parse_timeout_s), verify_timeout_s))), None
        pred = _parse_prediction(completion, parse_timeout_s)
        if not pred:
            return 0.0, None
        # Math-Verify returns [parsed, matched string]; the string is the extracted answer
        return float(_cached((gold_text, "fallback", str(pred[-1])),
                             lambda: _equal(gold_parsed, pred, verify_timeout_s))), None
    except TimeoutException:
        return 0.0, "timeout"
    except (ValueError, TypeError, RecursionError, MemoryError, OverflowError):
        return 0.0, None  # the prediction is not valid maths: not equal


@reward_traits(elementwise=True, timeout_score=0.0)
def math(completions: list[str], *, prompts: list[str] | None = None, answer: list[Any],
         parse_timeout_s: int = 2, verify_timeout_s: int = 2) -> dict:
    """1.0 if the final answer (last \\boxed{}, else Math-Verify's fallbacks) equals `answer`, else 0.0."""
    scores: list[float | None] = []
    errors: list[str | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        score, error = check(gold, completion, parse_timeout_s=parse_timeout_s, verify_timeout_s=verify_timeout_s)
        scores.append(score)
        errors.append(error)
    return {"rewards": scores, "errors": errors}
